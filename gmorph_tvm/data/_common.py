"""Pieces shared by the dataset loaders."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..errors import GmorphError

SPLITS = ("train", "val", "test")


class DatasetError(GmorphError):
    """A dataset file is missing or corrupt, or a split / task name is unknown."""


class Split(NamedTuple):
    """One split of a dataset: normalised float32 NCHW ``images`` and int64 ``labels``."""

    images: torch.Tensor
    labels: torch.Tensor


def check_split(dataset: str, split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"{dataset}: unknown split {split!r}; use one of {', '.join(SPLITS)}")


def carve_validation(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministically split ``range(n)`` into (train indices, validation indices), both sorted.

    Uses its own ``numpy.random.default_rng(seed)``, so the split never depends on global RNG state.
    """
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[val_size:]), np.sort(order[:val_size])


def take(images: np.ndarray, labels: np.ndarray, limit: int | None, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` samples (all when ``limit`` is None)."""
    if limit is None:
        return images, labels
    if not isinstance(limit, int) or limit < 1:
        raise DatasetError(f"{dataset}: limit must be a positive int or None, got {limit!r}")
    return images[:limit], labels[:limit]
