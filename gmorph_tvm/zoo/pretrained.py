"""Bundled real-weight Fashion-MNIST model sets (weights in ``gmorph_tvm/zoo/weights/``).

All models share one architecture, :func:`fmnist_cnn` (a :class:`~gmorph_tvm.zoo.vgg.VGG`)::

    features[0:4]   conv3x3 1->16  + BN + ReLU + maxpool   28 -> 14     \
    features[4:8]   conv3x3 16->32 + BN + ReLU + maxpool   14 -> 7       } frozen prefix (first half:
    features[8:11]  conv3x3 32->32 + BN + ReLU                          /  3 of the 6 weighted layers)
    features[11:15] conv3x3 32->64 + BN + ReLU + maxpool   7 -> 3
    classifier      flatten 576 -> linear 64 + ReLU -> linear num_classes

Input: float32 ``[batch, 1, 28, 28]`` normalised as :mod:`gmorph_tvm.data.fashion_mnist` does.
Output: logits ``[batch, num_classes]``. All returned models are in eval mode.

* :func:`fmnist_base` -- the 10-class CNN trained on the Fashion-MNIST train split.
* :func:`fmnist_backbone_set` -- benchmark **set B**: fine-tunes of the base for 8 tasks (derived
  label sets, see :data:`gmorph_tvm.data.fashion_mnist.TASKS`, and two 10-class fine-tunes on
  disjoint halves of the training data) with the frozen prefix ``features[:11]`` bit-identical to
  the base in every task; only ``features[11:]`` and ``classifier`` differ.
* :func:`fmnist_netfuse_set` -- benchmark **set C**: 8 models of the identical architecture (all
  10-class), each the base fine-tuned with nothing frozen on a different random half of the
  training data with a different seed: same shapes everywhere, every weight different.
* :func:`bundled_pair` -- two set-B models that share the frozen prefix, for the quick demo.

``bench/train_zoo.py`` regenerates the weights (deterministically with torch on one CPU thread)
and the accuracies in ``weights/fmnist_meta.json`` (read with :func:`metadata`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.fashion_mnist import TASKS
from ._common import ZooError
from .vgg import VGG

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BACKBONE_FILE = "fmnist_backbone_set.pt"
NETFUSE_FILE = "fmnist_netfuse_set.pt"
META_FILE = "fmnist_meta.json"

FMNIST_ARCH: dict[str, Any] = {
    "in_channels": 1,
    "widths": (16, 32, 32, 64),
    "pool_after": (0, 1, 3),
    "image_size": 28,
    "hidden": 64,
    "batch_norm": True,
}
FROZEN_PREFIX = 11  # len(features[:11]): the conv0..conv2 blocks
BACKBONE_TASKS: tuple[str, ...] = (
    "coarse4", "shirt_vs_rest", "footwear4", "class10_a", "tops6", "bag_vs_rest", "pullover_coat3", "class10_b",
)  # fmt: skip
NETFUSE_TASKS: tuple[str, ...] = tuple(f"class10_s{i}" for i in range(8))


def task_num_classes(task: str) -> int:
    """Number of outputs of the bundled model for ``task`` (``class10_*`` tasks have 10)."""
    base = "class10" if task.startswith("class10") else task
    if base not in TASKS:
        raise ZooError(f"unknown Fashion-MNIST task {task!r}")
    return TASKS[base].num_classes


def label_task_of(task: str) -> str:
    """Name of the label mapping in :data:`gmorph_tvm.data.fashion_mnist.TASKS` that ``task`` predicts."""
    return "class10" if task.startswith("class10") else task


def fmnist_cnn(num_classes: int = 10, seed: int | None = None) -> VGG:
    """The (untrained) architecture shared by every bundled Fashion-MNIST model."""
    return VGG(num_classes=num_classes, seed=seed, **FMNIST_ARCH)


def frozen_prefix(model: VGG) -> nn.Sequential:
    """The layers frozen in set B (``features[:11]``)."""
    return model.features[:FROZEN_PREFIX]


def _is_prefix_key(key: str) -> bool:
    parts = key.split(".")
    return parts[0] == "features" and int(parts[1]) < FROZEN_PREFIX


@functools.lru_cache(maxsize=2)
def _load(file: str) -> dict[str, Any]:
    path = WEIGHTS_DIR / file
    if not path.is_file():
        raise ZooError(f"bundled weights {path} are missing; run `python bench/train_zoo.py` to regenerate them")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt / truncated pickle: name the file instead of a pickle traceback
        raise ZooError(f"bundled weights {path} could not be read: {err}") from err


def _build(state: dict[str, torch.Tensor], num_classes: int, where: str) -> VGG:
    # Built on the meta device: no random init (which would also advance the caller's global RNG).
    # Cloned tensors, so no model shares storage with the cached file contents or another model.
    with torch.device("meta"):
        model = fmnist_cnn(num_classes)
    try:
        model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    except RuntimeError as err:
        raise ZooError(f"bundled weights for {where} do not fit the architecture: {err}") from err
    return model.eval()


def _select(n: int, names: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not isinstance(n, int) or not 1 <= n <= len(names):
        raise ZooError(f"{what}: n must be an int in 1..{len(names)}, got {n!r}")
    return names[:n]


def fmnist_base() -> VGG:
    """The 10-class Fashion-MNIST CNN that set B fine-tunes from and set C starts from."""
    return _build(_load(BACKBONE_FILE)["base"], 10, "fmnist base")


def fmnist_backbone_set(n: int = 8, include_base: bool = False) -> dict[str, VGG]:
    """Set B: ``n`` (1..8) task models sharing the bit-identical frozen prefix ``features[:11]``.

    Task order is :data:`BACKBONE_TASKS`; with ``include_base`` the 10-class base model (which has
    the same prefix) comes first under the name ``"class10"``.
    """
    blob = _load(BACKBONE_FILE)
    prefix = {k: v for k, v in blob["base"].items() if _is_prefix_key(k)}
    models: dict[str, VGG] = {"class10": fmnist_base()} if include_base else {}
    for task in _select(n, BACKBONE_TASKS, "fmnist_backbone_set"):
        # _build clones: every task owns its copy of the (bit-identical) prefix tensors.
        state = prefix | blob["tasks"][task]
        models[task] = _build(state, task_num_classes(task), f"set B task {task!r}")
    return models


def fmnist_netfuse_set(n: int = 8) -> dict[str, VGG]:
    """Set C: ``n`` (1..8) 10-class models of one architecture, all weights different."""
    blob = _load(NETFUSE_FILE)
    return {t: _build(blob[t], 10, f"set C model {t!r}") for t in _select(n, NETFUSE_TASKS, "fmnist_netfuse_set")}


def bundled_pair() -> dict[str, VGG]:
    """Two small real-weight models sharing a frozen prefix: ``{"class10": base, "coarse4": fine-tune}``."""
    return fmnist_backbone_set(1, include_base=True)


def metadata() -> dict[str, Any]:
    """Training configuration and accuracies recorded by ``bench/train_zoo.py``.

    ``metadata()["models"][name]`` has ``set`` ("base", "B" or "C"), ``label_task``,
    ``test_accuracy`` / ``test_balanced_accuracy`` (full 10k test split) and
    ``test500_accuracy`` / ``test500_balanced_accuracy`` (first 500 test samples).
    """
    path = WEIGHTS_DIR / META_FILE
    if not path.is_file():
        raise ZooError(f"bundled weight metadata {path} is missing; run `python bench/train_zoo.py`")
    return json.loads(path.read_text())


__all__ = [
    "BACKBONE_TASKS", "FMNIST_ARCH", "FROZEN_PREFIX", "NETFUSE_TASKS", "bundled_pair", "fmnist_backbone_set",
    "fmnist_base", "fmnist_cnn", "fmnist_netfuse_set", "frozen_prefix", "label_task_of", "metadata",
    "task_num_classes",
]  # fmt: skip
