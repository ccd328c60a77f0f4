"""scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``, 1,797 samples,
no download), as a tiny second image dataset.

Splits (fixed, from ``numpy.random.default_rng(0).permutation(1797)``): the first 360 indices are
``"test"``, the next 180 ``"val"``, the remaining 1,257 ``"train"``; each split keeps dataset order.
Images are float32 ``[N, 1, 8, 8]``: pixel values 0..16 scaled to [0, 1], then normalised with the
dataset mean 0.3053 and std 0.3760. Labels are int64 digits 0..9.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ._common import DatasetError, Split, check_split, take

MEAN, STD = 0.3053, 0.3760
IMAGE_SIZE = 8
TEST_SIZE, VALIDATION_SIZE = 360, 180
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DatasetError("the digits dataset needs scikit-learn (pip install scikit-learn)") from err
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def load_split(split: str = "train", *, limit: int | None = None) -> Split:
    """Load one split (``"train"``, ``"val"`` or ``"test"``) as a :class:`~gmorph_tvm.data.Split`."""
    check_split("digits", split)
    images, labels = _raw()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    val_end = TEST_SIZE + VALIDATION_SIZE
    bounds = {"test": (0, TEST_SIZE), "val": (TEST_SIZE, val_end), "train": (val_end, None)}
    lo, hi = bounds[split]
    idx = np.sort(order[lo:hi])
    images, labels = take(images[idx], labels[idx], limit, "digits")
    x = (torch.from_numpy(np.ascontiguousarray(images)) / 16.0 - MEAN) / STD
    return Split(x.to(torch.float32).unsqueeze(1), torch.from_numpy(labels.copy()))
