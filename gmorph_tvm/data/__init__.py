"""Real datasets for tests, benchmarks and the accuracy-aware fusion search.

* :mod:`gmorph_tvm.data.fashion_mnist`: Fashion-MNIST from the distro's gzip IDX files, fixed
  train / val / test splits, derived label tasks (coarse tops / bottoms / footwear / bags, ...).
* :mod:`gmorph_tvm.data.digits`: scikit-learn's 8x8 digits.

Every loader returns a :class:`Split` (``images`` float32 NCHW normalised, ``labels`` int64) and
raises :class:`DatasetError` (a :class:`~gmorph_tvm.errors.GmorphError`) naming the file when data
is missing or corrupt.
"""

from __future__ import annotations

from . import digits, fashion_mnist
from ._common import SPLITS, DatasetError, Split

__all__ = ["SPLITS", "DatasetError", "Split", "digits", "fashion_mnist"]
