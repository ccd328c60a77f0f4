"""Small readers of Relax IR that every layer needs, each in one place: the operator name of a call,
the static shape and dtype string of a tensor type, tensor byte counts, axis normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax


def op_name(expr: Any) -> str | None:
    """``"relax.nn.conv2d"`` for a call of a Relax operator; None for anything else (calls of
    functions, ``call_tir`` callees, non-calls)."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return None


def tensor_type(ty: Any, *, first_field: bool = False) -> relax.TensorType | None:
    """``ty`` if it is a tensor type; with ``first_field``, a tuple type's first field too."""
    if first_field and isinstance(ty, relax.TupleType) and len(ty.fields) > 0:
        ty = ty.fields[0]
    return ty if isinstance(ty, relax.TensorType) else None


def static_shape(ty: Any, *, first_field: bool = False) -> tuple[int, ...] | None:
    """The shape of a tensor type as ints; None when it is not a tensor or not fully static."""
    tensor = tensor_type(ty, first_field=first_field)
    if tensor is None or tensor.shape is None:
        return None
    try:
        return tuple(int(d) for d in tensor.shape.values)
    except (TypeError, ValueError, AttributeError):
        return None


def dtype_str(ty: Any, *, first_field: bool = False) -> str | None:
    """The dtype string of a tensor type (``"float32"``); None when unknown."""
    tensor = tensor_type(ty, first_field=first_field)
    if tensor is None or tensor.dtype is None:
        return None
    dtype = str(getattr(tensor.dtype, "dtype", tensor.dtype))
    return None if dtype in ("", "void") else dtype


def nbytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes of a dense tensor of ``shape`` and ``dtype``."""
    return int(np.prod([int(d) for d in shape], dtype=np.int64)) * np.dtype(str(dtype)).itemsize


def tensor_nbytes(value: Any) -> int:
    """Bytes of a tensor value (``tvm.runtime.Tensor``, numpy array: anything with shape and dtype)."""
    return nbytes(value.shape, str(value.dtype))


def normalize_axis(axis: int, rank: int) -> int:
    """A possibly negative axis as its non-negative index into a ``rank``-dimensional shape."""
    axis = int(axis)
    return axis + rank if axis < 0 else axis
