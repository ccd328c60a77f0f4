"""Analysis ``index_bounds``: which inputs of ``main`` index a table through ``take``, and the range
of indices that is valid for each.

TVM lowers ``take(table, idx, mode="fast")`` (ONNX Gather, ``nn.Embedding``) without a bounds
check: an index one past the table reads the next tensor's memory, a large one segfaults. The
indices that come straight from the caller are the ones that can be out of range, so the build
records, per such input, the range ``[low, high)`` every ``take`` it feeds accepts, and the
runner refuses inputs outside it (as onnxruntime and PyTorch do). The index is followed back
through ops that keep its values (``astype`` to a wide enough integer, ``reshape`` and friends)
and through ONNX's negative-index wrap ``where(idx < 0, idx + n, idx)``, which makes ``[-n, n)``
valid. Nothing is rewritten.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax

_SAME_VALUES = ("relax.reshape", "relax.flatten", "relax.expand_dims", "relax.squeeze", "relax.permute_dims",
                "relax.broadcast_to")


def index_bounds(mod: tvm.IRModule, func_name: str = "main") -> dict[str, dict[str, int]]:
    """``{input name: {"low": lo, "high": hi}}`` for the inputs of ``func_name`` that index a
    ``take`` (valid values: ``lo <= v < hi``; the intersection over every take the input feeds)."""
    func = mod[func_name]
    attrs = func.attrs or {}
    num_input = int(attrs["num_input"]) if "num_input" in attrs else len(func.params)
    inputs = {p: p.name for p in list(func.params)[:num_input]}
    bound: dict[Any, Any] = {}

    def collect(expr):
        if isinstance(expr, relax.Function):
            return
        if hasattr(expr, "blocks"):
            for block in expr.blocks:
                for binding in block.bindings:
                    if isinstance(binding, relax.VarBinding):
                        bound[binding.var] = binding.value

    relax.analysis.post_order_visit(func.body, collect)
    out: dict[str, dict[str, int]] = {}
    for value in bound.values():
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.take"):
            continue
        table_ty = value.args[0].ty
        if not isinstance(table_ty, relax.TensorType) or table_ty.shape is None:
            continue
        try:
            dims = [int(d) for d in table_ty.shape.values]
        except (TypeError, AttributeError):
            continue
        axis = value.attrs.axis
        axis = len(dims) - 1 if axis is None else int(axis)
        if axis < 0:
            axis += len(dims)
        size = dims[axis] if 0 <= axis < len(dims) else None
        if size is None:
            continue
        traced = _trace(value.args[1], bound, inputs, size)
        if traced is None:
            continue
        name, low = traced
        entry = out.setdefault(name, {"low": low, "high": size})
        entry["low"], entry["high"] = max(entry["low"], low), min(entry["high"], size)
    return out


def _trace(expr, bound: dict, inputs: dict, size: int) -> tuple[str, int] | None:
    """(input name, lowest valid index) when ``expr`` is an input's values, else None."""
    low = 0
    for _ in range(64):
        if isinstance(expr, relax.Var) and expr in inputs:
            return inputs[expr], low
        if not isinstance(expr, relax.Var) or expr not in bound:
            return None
        value = bound[expr]
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return None
        name = value.op.name
        if name in _SAME_VALUES:
            expr = value.args[0]
        elif name == "relax.astype":
            # Also a narrowing cast (torch's int64 -> int32): every valid index survives it, and
            # checking the input before the cast refuses the ones that would wrap into range.
            expr = value.args[0]
        elif name == "relax.where" and _is_negative_wrap(value, bound):
            low = -size
            expr = value.args[2]
        else:
            return None
    return None


def _is_negative_wrap(where: relax.Call, bound: dict) -> bool:
    """``where(less(i, 0), i + n, i)``: ONNX Gather's wrap of negative indices."""
    cond = bound.get(where.args[0], where.args[0])
    if not (isinstance(cond, relax.Call) and isinstance(cond.op, tvm.ir.Op) and cond.op.name == "relax.less"):
        return False
    zero = cond.args[1]
    is_zero = isinstance(zero, tvm.ir.GenericConst) and zero.value.numpy().size == 1 and int(zero.value.numpy()) == 0
    return is_zero and cond.args[0].same_as(where.args[2])
