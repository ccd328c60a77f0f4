"""ONNX ``HardSigmoid`` and opset<13 ``Softmax``/``LogSoftmax`` as the PyTorch importer spells them.

* ``HardSigmoid`` with PyTorch's constants (``alpha`` = 1/6 to float32 precision, ``beta`` = 0.5:
  what torch's exporter writes for ``hardsigmoid``/``hardswish``, and PaddlePaddle for its
  ``hardsigmoid``) is ``clip(x + 3, 0, 6) / 6``, PyTorch's ``hardsigmoid``; ``x * HardSigmoid(x)``
  then is PyTorch's ``hardswish`` too. Other constants: ``clip(x * alpha + beta, 0, 1)``. The
  two forms differ by float rounding only (``alpha`` within 1e-6 of 1/6).
* ``Softmax``/``LogSoftmax`` before opset 13 normalise over the input flattened from ``axis`` on;
  TVM's converter reshapes to 2-D and back. Over the last axis that is the plain op, so it is
  emitted as it is (no reshapes, the op PyTorch's importer emits); other axes keep TVM's form.
"""

from __future__ import annotations

import math

from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from ...core.ir import dtype_str

# |alpha - 1/6| / (1/6) below this: the exporter meant 1/6 (float32 rounding of 1/6 written with 7
# significant digits, e.g. PaddlePaddle's 0.1666667, is 2e-7 away).
_ONE_SIXTH_RTOL = 1e-6


class HardSigmoid(OnnxOpConverter):
    """max(0, min(1, alpha * x + beta))."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = dtype_str(x.ty)
        alpha, beta = float(attr.get("alpha", 0.2)), float(attr.get("beta", 0.5))
        if beta == 0.5 and math.isclose(alpha, 1.0 / 6.0, rel_tol=_ONE_SIXTH_RTOL):
            shifted = relax.op.add(x, relax.const(3.0, dtype))
            return relax.op.divide(relax.op.clip(shifted, 0.0, 6.0), relax.const(6.0, dtype))
        scaled = relax.op.add(relax.op.multiply(x, relax.const(alpha, dtype)), relax.const(beta, dtype))
        return relax.op.clip(scaled, 0.0, 1.0)


def _last_axis(x: relax.Expr, axis: int) -> bool:
    ndim = getattr(x.ty, "ndim", -1)
    return ndim is not None and ndim > 0 and axis % ndim == ndim - 1


class Softmax(onnx_frontend.Softmax):
    """Softmax; opset < 13 over the last axis is ``R.nn.softmax(x, -1)`` without reshapes."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if _last_axis(inputs[0], int(attr.get("axis", 1))):
            return relax.op.nn.softmax(inputs[0], axis=-1)
        return super()._impl_v1(bb, inputs, attr, params)

    _impl_v11 = _impl_v1


class LogSoftmax(onnx_frontend.LogSoftmax):
    """LogSoftmax; opset < 13 over the last axis is ``R.nn.log_softmax(x, -1)`` without reshapes."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if _last_axis(inputs[0], int(attr.get("axis", 1))):
            return relax.op.nn.log_softmax(inputs[0], axis=-1)
        return super()._impl_v1(bb, inputs, attr, params)

    _impl_v11 = _impl_v1
