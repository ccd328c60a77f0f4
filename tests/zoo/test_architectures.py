"""Zoo architectures (gmorph_tvm/zoo/{vgg,resnet,mobilenet,mlp,transformer}.py and the registry):
output shapes, example inputs, seeded determinism, validation of size knobs."""

from __future__ import annotations

import pytest
import torch

from gmorph_tvm import GmorphError, zoo
from gmorph_tvm.zoo import ZooError

# name -> (constructor keywords, expected example-input shape without batch, dtype)
CASES = {
    "vgg": ({}, (1, 28, 28), torch.float32),
    "resnet": ({}, (3, 32, 32), torch.float32),
    "mobilenet": ({}, (3, 32, 32), torch.float32),
    "mlp": ({"activation": "gelu"}, (1, 28, 28), torch.float32),
    "transformer": ({}, (32,), torch.int64),
}


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_registry_lists_every_architecture():
    assert zoo.names() == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_shape_and_example_input(name):
    kw, in_shape, dtype = CASES[name]
    model = zoo.make(name, num_classes=7, seed=0, **kw)
    assert not model.training
    for batch in (1, 3):
        x = zoo.example_input(name, batch, **kw)
        assert x.shape == (batch, *in_shape) and x.dtype == dtype
        with torch.no_grad():
            out = model(x)
        assert out.shape == (batch, 7) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    assert sum(p.numel() for p in model.parameters()) < 500_000  # keep CI models small


@pytest.mark.parametrize("name", sorted(CASES))
def test_seed_determines_weights(name):
    kw = CASES[name][0]
    assert _states_equal(zoo.make(name, seed=3, **kw), zoo.make(name, seed=3, **kw))
    assert not _states_equal(zoo.make(name, seed=3, **kw), zoo.make(name, seed=4, **kw))


def test_seeded_construction_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.make("resnet", seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_seed_none_uses_caller_rng():
    torch.manual_seed(5)
    a = zoo.make("mlp", seed=None)
    torch.manual_seed(5)
    b = zoo.make("mlp", seed=None)
    assert _states_equal(a, b)


def test_example_input_is_deterministic_per_seed():
    assert torch.equal(zoo.example_input("vgg", 2, seed=1), zoo.example_input("vgg", 2, seed=1))
    assert not torch.equal(zoo.example_input("vgg", 2, seed=1), zoo.example_input("vgg", 2, seed=2))


def test_batch_norm_is_not_identity_in_eval():
    # randomised running stats: eval-mode BN must change its input (keeps BN-folding tests honest)
    bn = next(m for m in zoo.make("resnet", seed=0).modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(1, bn.num_features, 4, 4)
    with torch.no_grad():
        assert not torch.allclose(bn(x), x, atol=1e-3)


def test_size_knobs_change_shapes():
    model = zoo.make("vgg", in_channels=3, image_size=32, widths=(8, 8), pool_after=(0,), hidden=16, num_classes=5)
    x = zoo.example_input("vgg", 2, in_channels=3, image_size=32)
    assert model(x).shape == (2, 5)
    deeper = zoo.make("resnet", blocks_per_stage=(2, 1), width=8)
    assert len(deeper.layers) == 3
    emb = zoo.make("transformer", input_kind="embeddings", dim=32, heads=2, seq_len=16, num_classes=3)
    x = zoo.example_input("transformer", 2, input_kind="embeddings", dim=32, seq_len=16)
    assert x.shape == (2, 16, 32) and emb(x).shape == (2, 3)


@pytest.mark.parametrize(
    "name, kw, message",
    [
        ("nope", {}, "unknown zoo model 'nope'"),
        ("vgg", {"colour": 1}, "zoo model 'vgg'"),
        ("vgg", {"image_size": 4, "pool_after": (0, 1, 2), "widths": (8, 8, 8)}, "too small"),
        ("vgg", {"pool_after": (7,)}, "pool_after"),
        ("resnet", {"width": 0}, "width must be a positive int"),
        ("mobilenet", {"strides": (3,), "channel_multipliers": (1,)}, "strides"),
        ("mlp", {"activation": "tanh"}, "activation"),
        ("transformer", {"dim": 30, "heads": 4}, "not divisible"),
        ("transformer", {"input_kind": "pixels"}, "input_kind"),
    ],
)
def test_invalid_configuration_raises_zoo_error(name, kw, message):
    with pytest.raises(ZooError, match=message) as info:
        zoo.make(name, **kw)
    assert isinstance(info.value, GmorphError)


def test_example_input_rejects_bad_batch():
    with pytest.raises(ZooError, match="batch"):
        zoo.example_input("mlp", 0)
