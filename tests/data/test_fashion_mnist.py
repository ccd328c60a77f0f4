"""Fashion-MNIST loader (gmorph_tvm/data/fashion_mnist.py): splits, normalisation, derived labels,
and clear errors for missing / corrupt IDX files."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from gmorph_tvm import GmorphError
from gmorph_tvm.data import DatasetError
from gmorph_tvm.data import fashion_mnist as fm
from gmorph_tvm.data._common import carve_validation

pytestmark = pytest.mark.skipif(
    not (fm.DEFAULT_ROOT / "t10k-labels-idx1-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed"
)


def test_split_shapes_dtypes_and_label_ranges():
    sizes = {"train": 55000, "val": 5000, "test": 10000}
    for split, size in sizes.items():
        images, labels = fm.load_split(split)
        assert images.shape == (size, 1, 28, 28) and images.dtype == torch.float32
        assert labels.shape == (size,) and labels.dtype == torch.int64
        assert labels.min() == 0 and labels.max() == 9
        assert torch.bincount(labels, minlength=10).min() > size // 20  # every class present


def test_train_is_normalised():
    images, _ = fm.load_split("train")
    assert abs(images.mean().item()) < 0.01 and abs(images.std().item() - 1.0) < 0.01
    assert images.min().item() == pytest.approx(-fm.MEAN / fm.STD, abs=1e-5)


def test_validation_is_carved_disjointly_from_train():
    train_idx, val_idx = carve_validation(60000, fm.VALIDATION_SIZE, fm.SPLIT_SEED)
    assert len(val_idx) == 5000 and len(train_idx) == 55000
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    raw_images, raw_labels = fm._raw(fm._root(None), "train")
    val = fm.load_split("val")
    assert torch.equal(val.labels, torch.from_numpy(raw_labels[val_idx].astype(np.int64)))
    assert torch.equal(val.images, fm.normalize(raw_images[val_idx]))
    train = fm.load_split("train", limit=100)
    assert torch.equal(train.images, fm.normalize(raw_images[train_idx[:100]]))


def test_splits_are_deterministic_and_limit_takes_a_prefix():
    a, b = fm.load_split("val"), fm.load_split("val", limit=50)
    assert torch.equal(a.images[:50], b.images) and torch.equal(a.labels[:50], b.labels)
    assert torch.equal(fm.load_split("test", limit=10).labels, fm.load_split("test", limit=10).labels)


def test_coarse_labels_mapping():
    labels = torch.arange(10)
    coarse = fm.coarse_labels(labels)
    named = {fm.CLASS_NAMES[i]: fm.COARSE_NAMES[c] for i, c in enumerate(coarse.tolist())}
    assert named["Trouser"] == "bottoms" and named["Bag"] == "bags"
    assert {named[n] for n in ("Sandal", "Sneaker", "Ankle boot")} == {"footwear"}
    assert {named[n] for n in ("T-shirt/top", "Pullover", "Dress", "Coat", "Shirt")} == {"tops"}


@pytest.mark.parametrize("name", sorted(fm.TASKS))
def test_derived_tasks_use_every_label(name):
    task = fm.task(name)
    mapped = task(torch.arange(10))
    assert sorted(set(mapped.tolist())) == list(range(task.num_classes))


def test_unknown_split_and_task():
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        fm.load_split("dev")
    with pytest.raises(DatasetError, match="unknown Fashion-MNIST task"):
        fm.task("hats")
    with pytest.raises(DatasetError, match="limit"):
        fm.load_split("test", limit=0)


def _write_gz(path, payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(payload)


def test_missing_directory_names_the_file(tmp_path):
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz is missing") as info:
        fm.load_split("test", root=tmp_path)
    assert isinstance(info.value, GmorphError)


def test_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.ROOT_ENV_VAR, str(tmp_path))
    with pytest.raises(DatasetError, match=str(tmp_path)):
        fm.load_split("test")


def test_bad_magic_and_truncation_are_reported(tmp_path):
    bad_magic = tmp_path / "bad.gz"
    _write_gz(bad_magic, struct.pack(">IIII", 0x0801, 1, 28, 28) + bytes(784))
    with pytest.raises(DatasetError, match="bad.gz has magic 0x00000801"):
        fm.read_idx_images(bad_magic)
    truncated = tmp_path / "short.gz"
    _write_gz(truncated, struct.pack(">IIII", 0x0803, 2, 28, 28) + bytes(784))
    with pytest.raises(DatasetError, match="short.gz has 784 pixel bytes, header promises 1568"):
        fm.read_idx_images(truncated)
    wrong_count = tmp_path / "labels.gz"
    _write_gz(wrong_count, struct.pack(">II", 0x0801, 3) + bytes([1, 2, 3]))
    assert fm.read_idx_labels(wrong_count).tolist() == [1, 2, 3]
    with pytest.raises(DatasetError, match="holds 3 labels, expected 10000"):
        fm.read_idx_labels(wrong_count, 10000)
    bad_label = tmp_path / "bad_label.gz"
    _write_gz(bad_label, struct.pack(">II", 0x0801, 1) + bytes([12]))
    with pytest.raises(DatasetError, match="label 12"):
        fm.read_idx_labels(bad_label)
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(b"not a gzip file at all")
    with pytest.raises(DatasetError, match="plain.gz is not a readable gzip file"):
        fm.read_idx_labels(not_gzip)
