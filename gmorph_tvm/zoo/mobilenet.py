"""MobileNetV3-style CNN: hardswish stem, inverted-residual blocks (1x1 expand, depthwise 3x3,
squeeze-excite, 1x1 project, residual add when shapes allow), global average pool, linear head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import ZooError, check_positive, image_example, randomize_batch_norm, seeded


class SqueezeExcite(nn.Module):
    """Channel attention: global average pool, 1x1 reduce + ReLU, 1x1 expand + hardsigmoid, scale."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        squeezed = max(8, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """expand (1x1) -> depthwise 3x3 (stride) -> SE -> project (1x1, linear); add input if same shape."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int, use_se: bool) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.Hardswish(),
        ]
        if use_se:
            layers.append(SqueezeExcite(hidden))
        layers += [nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNet(nn.Module):
    """Small MobileNetV3-like classifier.

    Parameters
    ----------
    in_channels, num_classes, image_size:
        Input ``[batch, in_channels, image_size, image_size]`` float32, output ``[batch, num_classes]``.
    width:
        Stem channels; block ``i`` outputs ``width * channel_multipliers[i]`` channels.
    channel_multipliers, strides:
        Per-block output width multiplier and depthwise stride (same length = number of blocks).
    expansion:
        Inverted-residual expansion ratio.
    seed:
        Seed for deterministic initial weights (``None``: caller's RNG). BN statistics are randomised.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 16,
        channel_multipliers: Sequence[int] = (1, 2, 2, 4),
        strides: Sequence[int] = (1, 2, 1, 2),
        expansion: int = 4,
        image_size: int = 32,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_positive(
            "MobileNet", in_channels=in_channels, num_classes=num_classes, width=width,
            expansion=expansion, image_size=image_size,
        )  # fmt: skip
        if len(channel_multipliers) != len(strides) or not strides:
            raise ZooError("MobileNet: channel_multipliers and strides must be non-empty and of equal length")
        if any(s not in (1, 2) for s in strides):
            raise ZooError(f"MobileNet: strides must be 1 or 2, got {tuple(strides)!r}")
        self.in_channels, self.image_size = in_channels, image_size
        with seeded(seed):
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.Hardswish()
            )
            blocks: list[nn.Module] = []
            prev = width
            for i, (mult, stride) in enumerate(zip(channel_multipliers, strides)):
                out = width * mult
                # SE on every other block, as MobileNetV3 uses it on a subset of blocks.
                blocks.append(InvertedResidual(prev, out, expansion, stride, use_se=i % 2 == 1))
                prev = out
            self.blocks = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.head = nn.Sequential(nn.Linear(prev, 4 * prev), nn.Hardswish(), nn.Linear(4 * prev, num_classes))
            randomize_batch_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.blocks(self.stem(x)))))

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        return image_example(self.in_channels, self.image_size, batch, seed)
