"""ONNX ``Clip`` -> ``R.clip`` (what the PyTorch importer emits for ``clamp``, ReLU6 and Hardtanh).

TVM's own converter writes every Clip as two TIR functions (``emit_te(topi.maximum)``), which
neither the fusion nor the channels-last layout conversion can look through. Here:

* bounds known at import (attributes before opset 11; constants or initialisers after) give one
  ``R.clip(x, lo, hi)``; a missing bound is the dtype's limit (the specification's
  ``numeric_limits::lowest()`` / ``max()``: -inf becomes -3.4e38 in float32, as in onnxruntime);
* a bound computed by the graph gives ``R.maximum(x, lo)`` / ``R.minimum(., hi)``, the bound
  broadcast by the op itself.

ONNX semantics kept (as onnxruntime computes them): a NaN bound means "no bound" (a known NaN is
dropped, a computed one is replaced by -inf / +inf with ``R.where``); ``lo > hi`` gives ``hi``
everywhere (a known pair is written ``clip(x, hi, hi)``; computed bounds do it by op order); a NaN
input stays NaN (``LegalizeNaNSafe`` lowers clip/maximum/minimum so).
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from ...core.ir import dtype_str
from ._values import is_float, known_value, scalar_of


class Clip(OnnxOpConverter):
    """Clip (opset 1/6: ``min``/``max`` attributes; 11+: optional ``min``/``max`` inputs)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        lo, hi = attr.get("min"), attr.get("max")
        return _clip_known(inputs[0], None if lo is None else float(lo), None if hi is None else float(hi))

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        x = inputs[0]
        bounds = [inputs[i] if len(inputs) > i else None for i in (1, 2)]
        values = [known_value(b, params) for b in bounds]
        scalars = [scalar_of(v) for v in values]
        if all(b is None or s is not None for b, s in zip(bounds, scalars)):
            return _clip_known(x, *scalars)
        out = x
        for bound, scalar, lower in ((bounds[0], scalars[0], True), (bounds[1], scalars[1], False)):
            if bound is None or (scalar is not None and _is_nan(scalar)):
                continue
            if scalar is not None:
                bound = relax.const(scalar, dtype_str(x.ty))
            elif is_float(dtype_str(bound.ty)):
                unbounded = relax.const(-np.inf if lower else np.inf, dtype_str(bound.ty))
                bound = relax.op.where(relax.op.isnan(bound), unbounded, bound)
            out = relax.op.maximum(out, bound) if lower else relax.op.minimum(out, bound)
        return out

    _impl_v12 = _impl_v11
    _impl_v13 = _impl_v11


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _clip_known(x: relax.Expr, lo, hi) -> relax.Expr:
    """``clip(x, lo, hi)`` for bounds known now (None: the dtype's limit; NaN: no bound)."""
    dtype = dtype_str(x.ty)
    if lo is None and hi is None:
        return x
    if is_float(dtype):
        limit = float(np.finfo(dtype).max) if dtype in ("float16", "float32", "float64") else math.inf
        low = -limit if lo is None else -math.inf if _is_nan(lo) else float(lo)
        high = limit if hi is None else math.inf if _is_nan(hi) else float(hi)
        if math.isinf(low) and math.isinf(high):
            return x
    else:
        info = np.iinfo(dtype)
        low = int(info.min) if lo is None else int(lo)
        high = int(info.max) if hi is None else int(hi)
    if low > high:  # onnxruntime: min(max(x, lo), hi) = hi
        low = high
    return relax.op.clip(x, low, high)
