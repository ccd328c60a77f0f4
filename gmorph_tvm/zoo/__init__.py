"""Model zoo: small PyTorch architectures (no torchvision needed) plus bundled real-weight sets.

``make(name, **kw)`` builds an architecture by registry name; ``example_input(name, batch, **kw)``
gives a deterministic input of the right shape and dtype for it. Every model is a plain
``nn.Module`` whose constructor takes ``seed`` for deterministic weights, runs in eval mode, exports
with ``torch.export`` and ONNX (opset 17) and imports into TVM Relax.

Real-weight sets live in :mod:`gmorph_tvm.zoo.pretrained` (Fashion-MNIST CNNs) and
:mod:`gmorph_tvm.zoo.minilm` (all-MiniLM-L6-v2 multi-task text set).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._common import ZooError
from .mlp import MLP
from .mobilenet import MobileNet
from .resnet import ResNet
from .transformer import TinyTransformer
from .vgg import VGG

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "vgg": VGG,
    "resnet": ResNet,
    "mobilenet": MobileNet,
    "mlp": MLP,
    "transformer": TinyTransformer,
}


def names() -> list[str]:
    """Registry names accepted by :func:`make`."""
    return sorted(_REGISTRY)


def make(name: str, **kw: Any) -> nn.Module:
    """Build zoo architecture ``name`` with constructor keywords ``kw``, in eval mode."""
    try:
        cls = _REGISTRY[name]
    except KeyError as err:
        raise ZooError(f"unknown zoo model {name!r}; known: {', '.join(names())}") from err
    try:
        return cls(**kw).eval()
    except TypeError as err:  # unknown keyword: name the model, not a raw constructor traceback
        raise ZooError(f"zoo model {name!r}: {err}") from err


def example_input(name: str, batch: int = 1, *, seed: int = 0, **kw: Any) -> torch.Tensor:
    """Deterministic example input for ``make(name, **kw)`` with leading dimension ``batch``.

    ``kw`` are the constructor keywords (only the shape-related ones matter: ``in_channels``,
    ``image_size``, ``seq_len``, ``vocab_size``, ``dim``, ``input_kind``).
    """
    if not isinstance(batch, int) or batch < 1:
        raise ZooError(f"example_input({name!r}): batch must be a positive int, got {batch!r}")
    return make(name, **kw).example_input(batch, seed)


__all__ = ["MLP", "MobileNet", "ResNet", "TinyTransformer", "VGG", "ZooError", "example_input", "make", "names"]
