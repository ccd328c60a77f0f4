"""Helpers shared by the zoo architectures: seeded construction and non-trivial BN statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import GmorphError


class ZooError(GmorphError, ValueError):
    """A zoo model was asked for with an unknown name or invalid size knobs, or its bundled
    weights / source package are missing or corrupt."""


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Build layers under ``torch.manual_seed(seed)`` without disturbing the caller's RNG.

    With ``seed=None`` the caller's global RNG is used as is (so ``torch.manual_seed`` before the
    constructor also gives deterministic weights).
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randomize_batch_norm(module: nn.Module) -> None:
    """Give every BatchNorm layer random affine parameters and running statistics.

    A freshly built BN in eval mode is almost the identity (mean 0, var 1, weight 1, bias 0), which
    would hide bugs in BN folding / fusion passes; random statistics make eval-mode BN a real
    per-channel affine map. Uses the current RNG, so call it inside :func:`seeded`.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def image_example(in_channels: int, image_size: int, batch: int, seed: int) -> torch.Tensor:
    """A deterministic standard-normal NCHW float32 batch."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_channels, image_size, image_size, generator=gen, dtype=torch.float32)


def check_positive(name: str, **values: int) -> None:
    """Reject non-positive size knobs with a message naming the architecture and the knob."""
    for key, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ZooError(f"{name}: {key} must be a positive int, got {value!r}")
