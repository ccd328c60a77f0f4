"""Fashion-MNIST from the gzip IDX files of the distro package ``dataset-fashion-mnist``.

Files (default directory ``/usr/share/datasets/fashion-mnist``, overridable with the ``root``
argument or the ``GMORPH_FASHION_MNIST_DIR`` environment variable)::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz   60,000 samples
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz    10,000 samples

Splits (fixed, independent of any global RNG):

* ``"val"``: 5,000 training samples picked by ``numpy.random.default_rng(0).permutation(60000)[:5000]``;
* ``"train"``: the other 55,000 training samples (original file order);
* ``"test"``: the 10,000 t10k samples (original file order).

Images are float32 ``[N, 1, 28, 28]``, scaled to [0, 1] and then normalised with the training-set
mean 0.2860 and std 0.3530; labels are int64 class ids 0..9 (see :data:`CLASS_NAMES`).

Derived label sets (:data:`TASKS`, used by the bundled Fashion-MNIST model sets) are class-wise
maps 0..9 -> 0..k-1; :func:`coarse_labels` is the four-way tops / bottoms / footwear / bags one.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._common import DatasetError, Split, carve_validation, check_split, take

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV_VAR = "GMORPH_FASHION_MNIST_DIR"

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MEAN, STD = 0.2860, 0.3530  # of the 60,000 training images scaled to [0, 1]
IMAGE_SIZE = 28
VALIDATION_SIZE = 5000
SPLIT_SEED = 0

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801  # IDX: unsigned byte, 3 dims / 1 dim


@dataclass(frozen=True)
class LabelTask:
    """A classification task derived class-wise from the 10 Fashion-MNIST classes."""

    name: str
    class_names: tuple[str, ...]
    mapping: tuple[int, ...]  # mapping[fashion_mnist_class] = task label
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.mapping, dtype=torch.int64)[labels]


# Coarse mapping. Dress goes with the tops: it is an upper-body-covering garment and the classes it
# is confused with are coat, shirt and T-shirt; "bottoms" is then trousers only.
COARSE_NAMES: tuple[str, ...] = ("tops", "bottoms", "footwear", "bags")
COARSE_OF_CLASS: tuple[int, ...] = (0, 1, 0, 0, 0, 2, 0, 2, 3, 2)

TASKS: dict[str, LabelTask] = {
    t.name: t
    for t in (
        LabelTask("class10", CLASS_NAMES, tuple(range(10)), "the 10 Fashion-MNIST classes"),
        LabelTask(
            "coarse4", COARSE_NAMES, COARSE_OF_CLASS,
            "tops (T-shirt, pullover, dress, coat, shirt) / bottoms (trouser) / footwear / bags",
        ),
        LabelTask("shirt_vs_rest", ("other", "shirt"), (0, 0, 0, 0, 0, 0, 1, 0, 0, 0), "is it a shirt (class 6)"),
        LabelTask(
            "footwear4", ("sandal", "sneaker", "ankle boot", "not footwear"), (3, 3, 3, 3, 3, 0, 3, 1, 3, 2),
            "which kind of footwear, or none",
        ),
        LabelTask(
            "tops6", ("T-shirt/top", "pullover", "dress", "coat", "shirt", "not a top"), (0, 5, 1, 2, 3, 5, 4, 5, 5, 5),
            "which kind of top, or none",
        ),
        LabelTask("bag_vs_rest", ("other", "bag"), (0, 0, 0, 0, 0, 0, 0, 0, 1, 0), "is it a bag (class 8)"),
        LabelTask(
            "pullover_coat3", ("pullover", "coat", "other"), (2, 2, 0, 2, 1, 2, 2, 2, 2, 2),
            "pullover / coat / anything else (a commonly confused pair)",
        ),
    )
}  # fmt: skip


def _root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ROOT_ENV_VAR, DEFAULT_ROOT))


def _read_gzip(path: Path) -> bytes:
    if not path.is_file():
        raise DatasetError(
            f"Fashion-MNIST file {path} is missing (install the dataset-fashion-mnist package, or point "
            f"{ROOT_ENV_VAR} / root= at a directory holding the IDX .gz files)"
        )
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"Fashion-MNIST file {path} is not a readable gzip file: {err}") from err


def _header(data: bytes, words: int, path: Path) -> tuple[int, ...]:
    if len(data) < 4 * words:
        raise DatasetError(f"Fashion-MNIST file {path} is truncated: {len(data)} bytes, header needs {4 * words}")
    return tuple(int(v) for v in np.frombuffer(data[: 4 * words], dtype=">u4"))


def read_idx_images(path: str | os.PathLike, expected_count: int | None = None) -> np.ndarray:
    """Decode a gzip IDX3 image file into uint8 ``[N, rows, cols]``, validating magic and sizes."""
    path = Path(path)
    data = _read_gzip(path)
    magic, count, rows, cols = _header(data, 4, path)
    if magic != _IMAGES_MAGIC:
        raise DatasetError(f"Fashion-MNIST file {path} has magic {magic:#010x}, expected {_IMAGES_MAGIC:#010x} (IDX images)")
    if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetError(f"Fashion-MNIST file {path} holds {rows}x{cols} images, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    if expected_count is not None and count != expected_count:
        raise DatasetError(f"Fashion-MNIST file {path} holds {count} images, expected {expected_count}")
    if len(data) != 16 + count * rows * cols:
        raise DatasetError(
            f"Fashion-MNIST file {path} has {len(data) - 16} pixel bytes, header promises {count * rows * cols}"
        )
    # copy: frombuffer views are read-only, which torch.from_numpy warns about
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols).copy()


def read_idx_labels(path: str | os.PathLike, expected_count: int | None = None) -> np.ndarray:
    """Decode a gzip IDX1 label file into uint8 ``[N]``, validating magic, size and label range."""
    path = Path(path)
    data = _read_gzip(path)
    magic, count = _header(data, 2, path)
    if magic != _LABELS_MAGIC:
        raise DatasetError(f"Fashion-MNIST file {path} has magic {magic:#010x}, expected {_LABELS_MAGIC:#010x} (IDX labels)")
    if expected_count is not None and count != expected_count:
        raise DatasetError(f"Fashion-MNIST file {path} holds {count} labels, expected {expected_count}")
    if len(data) != 8 + count:
        raise DatasetError(f"Fashion-MNIST file {path} has {len(data) - 8} label bytes, header promises {count}")
    labels = np.frombuffer(data, dtype=np.uint8, offset=8).copy()
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise DatasetError(f"Fashion-MNIST file {path} has label {labels.max()}, expected 0..{len(CLASS_NAMES) - 1}")
    return labels


@functools.lru_cache(maxsize=4)
def _raw(root: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file, count = _FILES[part]
    return read_idx_images(root / images_file, count), read_idx_labels(root / labels_file, count)


def normalize(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 1, 28, 28]``, (x / 255 - MEAN) / STD."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(torch.float32).div_(255.0)
    return x.sub_(MEAN).div_(STD).unsqueeze(1)


def load_split(split: str = "train", *, limit: int | None = None, root: str | os.PathLike | None = None) -> Split:
    """Load one split (``"train"``, ``"val"`` or ``"test"``) as a :class:`~gmorph_tvm.data.Split`.

    ``limit`` keeps the first ``limit`` samples of the split (deterministic subsets for quick tests).
    """
    check_split("fashion-mnist", split)
    if split == "test":
        images, labels = _raw(_root(root), "test")
    else:
        images, labels = _raw(_root(root), "train")
        train_idx, val_idx = carve_validation(len(labels), VALIDATION_SIZE, SPLIT_SEED)
        idx = train_idx if split == "train" else val_idx
        images, labels = images[idx], labels[idx]
    images, labels = take(images, labels, limit, "fashion-mnist")
    return Split(normalize(images), torch.from_numpy(labels.astype(np.int64)))


def coarse_labels(labels: torch.Tensor) -> torch.Tensor:
    """Map class ids 0..9 to 0 tops / 1 bottoms / 2 footwear / 3 bags (see :data:`COARSE_OF_CLASS`)."""
    return TASKS["coarse4"](labels)


def task(name: str) -> LabelTask:
    """The derived label task called ``name`` (one of :data:`TASKS`)."""
    try:
        return TASKS[name]
    except KeyError as err:
        raise DatasetError(f"unknown Fashion-MNIST task {name!r}; known: {', '.join(TASKS)}") from err
