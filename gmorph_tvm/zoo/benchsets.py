"""The benchmark sets of ``bench/`` (and of the shipped tuning records), defined once.

``A``: the all-MiniLM-L6-v2 multi-task text set (``input_ids``, ``attention_mask``); ``B``: the
Fashion-MNIST backbone set (fine-tuned copies of one CNN: shared weights to stitch); ``C``: the
NetFuse-style set (same architecture, independently trained: nothing to stitch, all to merge).
Inputs are real: tokenised example sentences, Fashion-MNIST test images.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data import fashion_mnist
from . import minilm, pretrained

SETS = ("A", "B", "C")


def load_set(name: str, n: int, batch: int) -> tuple[dict[str, nn.Module], tuple[torch.Tensor, ...], list[str]]:
    """(models by task, inputs as a tuple of tensors, input names) of set ``name`` with ``n`` models."""
    if name == "A":
        models = minilm.minilm_task_set(n)
        ids, mask = minilm.example_inputs(batch)
        return models, (ids, mask), ["input_ids", "attention_mask"]
    if name not in SETS:
        raise ValueError(f"benchmark set {name!r} is not one of {', '.join(SETS)}")
    models = pretrained.fmnist_backbone_set(n) if name == "B" else pretrained.fmnist_netfuse_set(n)
    x = fashion_mnist.load_split("test", limit=batch).images.contiguous()
    return models, (x,), ["x"]
