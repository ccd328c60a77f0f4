"""What the elementwise converters share: the value of an input known at import time.

With weights kept as inputs (how gmorph-tvm imports), TVM's frontend turns every float initialiser
into a weight parameter (a ``relax.Var``), so a ``Clip`` bound or an ``HardSigmoid``-style
constant written as an initialiser is not a ``relax.Constant``. The converters get the
initialisers' values in ``params[1]`` (name -> (var, array)); :func:`known_value` looks an input up
there or reads its constant.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def known_value(expr: relax.Expr | None, params) -> np.ndarray | None:
    """The value of ``expr`` if the import knows it (a constant or an initialiser), else None."""
    if expr is None:
        return None
    if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
        return expr.value.numpy()
    if isinstance(expr, relax.Var) and params is not None and len(params) > 1:
        for var, array in params[1].values():
            if var.same_as(expr):
                return np.asarray(array.numpy() if hasattr(array, "numpy") else array)
    return None


def scalar_of(value: np.ndarray | None) -> float | int | None:
    """The one element of ``value`` (shape ``[]``, ``[1]``, ``[1, 1]``...) as a Python number, else None."""
    if value is None or value.size != 1:
        return None
    return value.reshape(()).item()


def is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))
