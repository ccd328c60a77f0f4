"""The models and inputs of the benchmark sets, defined once: :mod:`gmorph_tvm.recipe` (the benchmark
recipe that ``gmorph-tvm demo``, ``bench/`` and the shipped tuning records use) builds on them.

``A``: the all-MiniLM-L6-v2 multi-task text set (``input_ids``, ``attention_mask``); ``B``: the
Fashion-MNIST backbone set (fine-tuned copies of one CNN: shared weights to stitch); ``C``: the
NetFuse-style set (same architecture, independently trained: nothing to stitch, all to merge);
``E``: three tasks fine-tuned from ImageNet EfficientNet-Lite0 at 224x224 (a real model no one
here wrote: the stem and 12 of 16 blocks shared, the last 4 blocks and the heads differ).
Inputs are real: tokenised example sentences, Fashion-MNIST test images, photographs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data import fashion_mnist
from . import minilm, pretrained, real

DEFAULT_MODELS = {"A": 8, "B": 8, "C": 8, "E": 3}  # models per set
SETS = tuple(DEFAULT_MODELS)


def load_set(name: str, n: int | None, batch: int) -> tuple[dict[str, nn.Module], tuple[torch.Tensor, ...], list[str]]:
    """(models by task, inputs as a tuple of tensors, input names) of set ``name`` with ``n`` models
    (``None``: the set's default, :data:`DEFAULT_MODELS`)."""
    if name not in SETS:
        raise ValueError(f"benchmark set {name!r} is not one of {', '.join(SETS)}")
    n = DEFAULT_MODELS[name] if n is None else n
    if name == "A":
        models = minilm.minilm_task_set(n)
        ids, mask = minilm.example_inputs(batch)
        return models, (ids, mask), ["input_ids", "attention_mask"]
    if name == "E":
        x = torch.from_numpy(real.sample_photos(batch, 224))
        return real.efficientnet_task_set(n), (x,), ["inputs"]  # EfficientNet.forward(inputs)
    models = pretrained.fmnist_backbone_set(n) if name == "B" else pretrained.fmnist_netfuse_set(n)
    x = fashion_mnist.load_split("test", limit=batch).images.contiguous()
    return models, (x,), ["x"]
