"""Multi-layer perceptron on flattened images: Flatten, then Linear + activation per hidden layer,
then a linear classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import ZooError, check_positive, image_example, seeded

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class MLP(nn.Module):
    """MLP classifier.

    Parameters
    ----------
    in_channels, num_classes, image_size:
        Input ``[batch, in_channels, image_size, image_size]`` float32, output ``[batch, num_classes]``.
    hidden:
        Widths of the hidden layers.
    activation:
        ``"relu"`` or ``"gelu"`` (exact, erf-based).
    seed:
        Seed for deterministic initial weights (``None``: caller's RNG).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        hidden: Sequence[int] = (128, 64),
        image_size: int = 28,
        activation: str = "relu",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_positive("MLP", in_channels=in_channels, num_classes=num_classes, image_size=image_size)
        check_positive("MLP", **{f"hidden[{i}]": h for i, h in enumerate(hidden)})
        if activation not in _ACTIVATIONS:
            raise ZooError(f"MLP: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.in_channels, self.image_size = in_channels, image_size
        with seeded(seed):
            layers: list[nn.Module] = [nn.Flatten()]
            prev = in_channels * image_size * image_size
            for width in hidden:
                layers += [nn.Linear(prev, width), _ACTIVATIONS[activation]()]
                prev = width
            layers.append(nn.Linear(prev, num_classes))
            self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        return image_example(self.in_channels, self.image_size, batch, seed)
