"""VGG-style CNN: stacks of conv3x3 (+BN) + ReLU, 2x2 max-pool between stages, flatten + linear head.

The layer list is a flat ``nn.Sequential`` (``features``), so "the first k conv blocks" is simply a
prefix of it; the pretrained Fashion-MNIST sets freeze such a prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import ZooError, check_positive, image_example, randomize_batch_norm, seeded


class VGG(nn.Module):
    """VGG-style classifier.

    Parameters
    ----------
    in_channels, num_classes, image_size:
        Input is ``[batch, in_channels, image_size, image_size]`` float32, output ``[batch, num_classes]``.
    widths:
        Output channels of each conv3x3 block (padding 1, so a block keeps the spatial size).
    pool_after:
        Indices of the blocks followed by a 2x2 max-pool (stride 2).
    hidden:
        Width of an extra Linear+ReLU before the classifier; ``0`` means the classifier reads the
        flattened features directly.
    batch_norm:
        Put a BatchNorm2d between each conv and its ReLU.
    seed:
        Seed for deterministic initial weights (``None``: use the caller's RNG). BN statistics are
        randomised so eval-mode BN is not a no-op.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 32, 64),
        pool_after: Sequence[int] = (0, 1, 3),
        image_size: int = 28,
        hidden: int = 0,
        batch_norm: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_positive("VGG", in_channels=in_channels, num_classes=num_classes, image_size=image_size)
        if not widths:
            raise ZooError("VGG: widths must name at least one conv block")
        check_positive("VGG", **{f"widths[{i}]": w for i, w in enumerate(widths)})
        if any(not 0 <= p < len(widths) for p in pool_after):
            raise ZooError(f"VGG: pool_after {tuple(pool_after)} names a block outside 0..{len(widths) - 1}")
        spatial = image_size
        for _ in set(pool_after):
            spatial //= 2
        if spatial < 1:
            raise ZooError(f"VGG: image_size {image_size} is too small for {len(set(pool_after))} max-pools")
        self.in_channels, self.image_size = in_channels, image_size
        with seeded(seed):
            layers: list[nn.Module] = []
            prev = in_channels
            for i, width in enumerate(widths):
                layers.append(nn.Conv2d(prev, width, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU())
                if i in pool_after:
                    layers.append(nn.MaxPool2d(2))
                prev = width
            self.features = nn.Sequential(*layers)
            flat = prev * spatial * spatial
            head: list[nn.Module] = [nn.Flatten()]
            if hidden:
                head += [nn.Linear(flat, hidden), nn.ReLU()]
                flat = hidden
            head.append(nn.Linear(flat, num_classes))
            self.classifier = nn.Sequential(*head)
            randomize_batch_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        return image_example(self.in_channels, self.image_size, batch, seed)
