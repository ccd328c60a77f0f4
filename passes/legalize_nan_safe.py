"""Pass ``LegalizeNaNSafe``: lower ``relu``, ``clip``, ``maximum``/``minimum``, the ``max``/``min``
reductions and ``max_pool2d`` so that a NaN in gives a NaN out, as PyTorch computes them (and
onnxruntime for the elementwise ones; its ReduceMax/MaxPool keep a NaN only in some positions).

TVM's legalisations compute these with ``max``/``min`` (``relu(x) = max(x, 0)``), which LLVM turns
into a compare-and-select that returns the other operand for NaN, so a NaN input silently becomes
0 (relu), a clip bound, or disappears from a reduction. Here they are ``select`` expressions that
let NaN through; values that are not NaN (including +-inf and +-3e38) give exactly what TVM's
own lowering gives. Integer tensors and every other op are legalised as ``LegalizeOps`` does.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, topi
from tvm.relax.transform import LegalizeOps


def _is_float(expr) -> bool:
    ty = expr.ty
    return isinstance(ty, relax.TensorType) and str(getattr(ty.dtype, "dtype", ty.dtype)).startswith(("float", "bfloat"))


def _default(op_name: str):
    return tvm.ir.Op.get(op_name).get_attr("FLegalize")


def _relu(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if not _is_float(call.args[0]):
        return _default("relax.nn.relu")(bb, call)

    def te_relu(x: te.Tensor) -> te.Tensor:
        zero = tvm.tirx.const(0, x.dtype)
        return te.compute(x.shape, lambda *i: tvm.tirx.Select(x(*i) < zero, zero, x(*i)), name="relu")

    return bb.call_te(te_relu, call.args[0], primfunc_name_hint="relu")


def _clip(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if not _is_float(call.args[0]):
        return _default("relax.clip")(bb, call)

    def te_clip(x: te.Tensor, low, high) -> te.Tensor:
        low, high = tvm.tirx.Cast(x.dtype, low), tvm.tirx.Cast(x.dtype, high)

        def value(*i):  # min(max(v, low), high): low > high gives high, as torch.clamp and onnxruntime
            raised = tvm.tirx.Select(x(*i) < low, low, x(*i))
            return tvm.tirx.Select(raised > high, high, raised)

        return te.compute(x.shape, value, name="clip")

    return bb.call_te(te_clip, call.args[0], call.args[1], call.args[2], primfunc_name_hint="clip")


def _elementwise(op_name: str, te_op):
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        a, b = call.args
        if not (_is_float(a) and _is_float(b)):
            return _default(op_name)(bb, call)

        def te_func(x: te.Tensor, y: te.Tensor) -> te.Tensor:
            either_nan = topi.logical_or(topi.isnan(x), topi.isnan(y))
            return topi.where(either_nan, topi.add(x, y), te_op(x, y))  # x + y is NaN there

        return bb.call_te(te_func, a, b, primfunc_name_hint=op_name.split(".")[-1])

    return legalize


def _reduction(op_name: str, te_op):
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        x = call.args[0]
        if not _is_float(x) or x.ty.ndim == 0:
            return _default(op_name)(bb, call)
        axis = None if call.attrs.axis is None else [int(a) for a in call.attrs.axis]
        keepdims = bool(call.attrs.keepdims)

        def te_func(data: te.Tensor) -> te.Tensor:
            reduced = te_op(data, axis, keepdims)
            any_nan = topi.any(topi.isnan(data), axis, keepdims)
            nan = tvm.tirx.const(float("nan"), reduced.dtype)
            return te.compute(reduced.shape, lambda *i: tvm.tirx.Select(any_nan(*i), nan, reduced(*i)), name="reduce")

        return bb.call_te(te_func, x, primfunc_name_hint=op_name.split(".")[-1])

    return legalize


def _max_pool2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """A window holding a NaN pools to NaN (PyTorch's max_pool2d; TVM's drops it)."""
    if not _is_float(call.args[0]) or call.attrs.out_layout != call.attrs.layout:
        return _default("relax.nn.max_pool2d")(bb, call)
    attrs = call.attrs

    def pool(data: te.Tensor) -> te.Tensor:
        return topi.nn.pool2d(data, kernel=attrs.pool_size, stride=attrs.strides, dilation=attrs.dilation,
                              padding=attrs.padding, pool_type="max", ceil_mode=attrs.ceil_mode, layout=attrs.layout)

    def te_func(x: te.Tensor) -> te.Tensor:
        pooled = pool(x)
        nan_in_window = pool(topi.cast(topi.isnan(x), x.dtype))
        nan = tvm.tirx.const(float("nan"), x.dtype)
        zero = tvm.tirx.const(0, x.dtype)
        return te.compute(pooled.shape, lambda *i: tvm.tirx.Select(nan_in_window(*i) > zero, nan, pooled(*i)),
                          name="max_pool2d")

    return bb.call_te(te_func, call.args[0], primfunc_name_hint="max_pool2d")


NAN_SAFE_LEGALIZE = {
    "relax.nn.max_pool2d": _max_pool2d,
    "relax.nn.relu": _relu,
    "relax.clip": _clip,
    "relax.maximum": _elementwise("relax.maximum", topi.maximum),
    "relax.minimum": _elementwise("relax.minimum", topi.minimum),
    "relax.max": _reduction("relax.max", topi.max),
    "relax.min": _reduction("relax.min", topi.min),
}


def LegalizeNaNSafe() -> tvm.transform.Pass:  # noqa: N802 - named like TVM's pass constructors
    """``LegalizeOps`` with the NaN-propagating lowerings above."""
    return LegalizeOps(customize_legalize_map=NAN_SAFE_LEGALIZE)
