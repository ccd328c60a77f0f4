"""Fixtures for the fusion-search tests: real Fashion-MNIST slices and tiny, quickly trained models
of three different architectures (VGG, ResNet, MobileNet style), one per benchmark task."""

from __future__ import annotations

import pytest
import torch

from gmorph_tvm import zoo
from gmorph_tvm.lossy import tasks
from gmorph_tvm.lossy.graph import LayerGraph

TINY = {
    "class10": ("vgg", {"widths": (8, 16), "pool_after": (0, 1)}, 10),
    "coarse4": ("resnet", {"width": 4, "blocks_per_stage": (1, 1)}, 4),
    "size3": ("mobilenet", {"width": 4, "channel_multipliers": (1, 2), "strides": (1, 2), "expansion": 2}, 3),
}


@pytest.fixture(scope="session")
def tiny_data():
    """1200 train / 300 val / 300 test images with the three task labels."""
    return tasks.load_data(train=1200, val=300, test=300)


def make_tiny_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    return {
        task: zoo.make(arch, in_channels=1, image_size=28, num_classes=classes, seed=seed + i, **kw)
        for i, (task, (arch, kw, classes)) in enumerate(TINY.items())
    }


@pytest.fixture(scope="session")
def tiny_models(tiny_data):
    """The tiny models trained for 2 epochs on the 1200 training images (a few seconds)."""
    models = make_tiny_models()
    for task, model in models.items():
        tasks.train_model(model, tiny_data.train_x, tiny_data.train_y[task], epochs=2, batch_size=64, lr=3e-3, seed=0)
    return models


@pytest.fixture(scope="session")
def tiny_graphs(tiny_models, tiny_data):
    return {t: LayerGraph.trace(t, m, tiny_data.val_x[:2]) for t, m in tiny_models.items()}
