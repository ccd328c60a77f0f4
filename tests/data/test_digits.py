"""sklearn digits loader (gmorph_tvm/data/digits.py): split sizes, partition, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from gmorph_tvm.data import DatasetError, digits  # noqa: E402


def test_splits_partition_the_dataset():
    splits = {s: digits.load_split(s) for s in ("train", "val", "test")}
    assert {s: len(v.labels) for s, v in splits.items()} == {"train": 1257, "val": 180, "test": 360}
    for images, labels in splits.values():
        assert images.shape[1:] == (1, 8, 8) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() <= 9
    # the three splits together are exactly the dataset (as a multiset of (image, label) rows)
    raw_images, raw_labels = digits._raw()
    pixels = [(v.images.reshape(-1, 64) * digits.STD + digits.MEAN).numpy() * 16 for v in splits.values()]
    ours = np.concatenate([np.c_[p, v.labels] for p, v in zip(pixels, splits.values())])
    full = np.c_[raw_images.reshape(-1, 64), raw_labels]
    np.testing.assert_allclose(ours[np.lexsort(ours.T[::-1])], full[np.lexsort(full.T[::-1])], atol=1e-4)


def test_normalisation_and_determinism():
    train = digits.load_split("train")
    assert abs(train.images.mean().item()) < 0.05 and abs(train.images.std().item() - 1) < 0.05
    again = digits.load_split("train", limit=20)
    assert torch.equal(train.images[:20], again.images) and torch.equal(train.labels[:20], again.labels)


def test_unknown_split():
    with pytest.raises(DatasetError, match="digits: unknown split"):
        digits.load_split("holdout")
