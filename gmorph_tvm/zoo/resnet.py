"""ResNet-style CNN: conv stem, stages of basic blocks (two conv3x3+BN, residual add), global average
pool, linear head. The first block of every later stage halves the resolution and widens the channels,
so its shortcut is a strided 1x1 conv + BN."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import ZooError, check_positive, image_example, randomize_batch_norm, seeded


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (possibly projected) input, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Small ResNet.

    Parameters
    ----------
    in_channels, num_classes, image_size:
        Input ``[batch, in_channels, image_size, image_size]`` float32, output ``[batch, num_classes]``.
    width:
        Channels of the first stage; each later stage doubles them.
    blocks_per_stage:
        Number of basic blocks in each stage (its length is the number of stages).
    seed:
        Seed for deterministic initial weights (``None``: caller's RNG). BN statistics are randomised.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 16,
        blocks_per_stage: Sequence[int] = (1, 1, 1),
        image_size: int = 32,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_positive("ResNet", in_channels=in_channels, num_classes=num_classes, width=width, image_size=image_size)
        if not blocks_per_stage or any(not isinstance(b, int) or b < 1 for b in blocks_per_stage):
            raise ZooError(f"ResNet: blocks_per_stage must be positive ints, got {tuple(blocks_per_stage)!r}")
        self.in_channels, self.image_size = in_channels, image_size
        with seeded(seed):
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
            )
            blocks: list[nn.Module] = []
            prev = width
            for stage, count in enumerate(blocks_per_stage):
                out = width * 2**stage
                for i in range(count):
                    stride = 2 if stage > 0 and i == 0 else 1
                    blocks.append(BasicBlock(prev, out, stride))
                    prev = out
            self.layers = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(prev, num_classes)
            randomize_batch_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        return image_example(self.in_channels, self.image_size, batch, seed)
