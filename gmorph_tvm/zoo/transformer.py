"""Small pre-LayerNorm transformer encoder classifier.

Token ids (int64 ``[batch, seq_len]``) or ready-made embeddings (float32 ``[batch, seq_len, dim]``)
go through learned token + position embeddings, ``depth`` encoder layers (LayerNorm, multi-head
self-attention, residual; LayerNorm, GELU MLP, residual), a final LayerNorm, mean pooling over the
sequence and a linear head.

Self-attention is written with plain linear / matmul / softmax / reshape / permute ops. (Checked:
``nn.MultiheadAttention`` also exports and imports into TVM correctly on torch 2.13, but as one packed
in-projection plus ``scaled_dot_product_attention``; separate q/k/v linears and explicit matmuls give
fusion passes ordinary matmuls to merge, and export to ONNX opset 17 without an attention op.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._common import ZooError, check_positive, seeded


class SelfAttention(nn.Module):
    """Multi-head self-attention from separate q/k/v projections (no mask, no dropout)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ZooError(f"TinyTransformer: dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = t.shape
        return t.reshape(batch, seq, self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(context.permute(0, 2, 1, 3).reshape(batch, seq, dim))


class EncoderLayer(nn.Module):
    """Pre-LN encoder layer: x + attn(ln(x)), then x + mlp(ln(x)) with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Transformer encoder classifier.

    Parameters
    ----------
    vocab_size:
        Number of token ids (used when ``input_kind="tokens"``).
    num_classes:
        Output ``[batch, num_classes]``.
    dim, depth, heads, mlp_ratio:
        Model width, number of encoder layers, attention heads, MLP expansion.
    seq_len:
        Fixed sequence length (size of the learned position table and of the example input).
    input_kind:
        ``"tokens"``: int64 token ids ``[batch, seq_len]``; ``"embeddings"``: float32
        ``[batch, seq_len, dim]`` (the token table is skipped, positions are still added).
    seed:
        Seed for deterministic initial weights (``None``: caller's RNG).
    """

    def __init__(
        self,
        vocab_size: int = 1000,
        num_classes: int = 4,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        seq_len: int = 32,
        mlp_ratio: int = 2,
        input_kind: str = "tokens",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_positive(
            "TinyTransformer", vocab_size=vocab_size, num_classes=num_classes, dim=dim, depth=depth,
            heads=heads, seq_len=seq_len, mlp_ratio=mlp_ratio,
        )  # fmt: skip
        if input_kind not in ("tokens", "embeddings"):
            raise ZooError(f"TinyTransformer: input_kind must be 'tokens' or 'embeddings', got {input_kind!r}")
        self.vocab_size, self.dim, self.seq_len, self.input_kind = vocab_size, dim, seq_len, input_kind
        with seeded(seed):
            self.token_embedding = nn.Embedding(vocab_size, dim) if input_kind == "tokens" else None
            self.position_embedding = nn.Parameter(torch.randn(1, seq_len, dim) * 0.02)
            self.layers = nn.Sequential(*[EncoderLayer(dim, heads, mlp_ratio) for _ in range(depth)])
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, num_classes)
            # Non-trivial LayerNorm affine parameters, so LN folding bugs cannot hide behind 1/0.
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    with torch.no_grad():
                        m.weight.uniform_(0.5, 1.5)
                        m.bias.normal_(0.0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_embedding is not None:
            x = self.token_embedding(x)
        x = x + self.position_embedding
        x = self.norm(self.layers(x))
        return self.head(x.mean(dim=1))

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        if self.input_kind == "tokens":
            return torch.randint(0, self.vocab_size, (batch, self.seq_len), generator=gen, dtype=torch.int64)
        return torch.randn(batch, self.seq_len, self.dim, generator=gen, dtype=torch.float32)
