"""Pass ``LegalizeFastMath``: lower the float32 transcendental ops to polynomial forms that LLVM
vectorises, for CPU (llvm) targets.

TVM's llvm code generator turns ``exp``, ``erf``, ``tanh`` and ``sigmoid`` into one libm call per
element (``expf`` / ``erff``; ``tanh`` and ``sigmoid`` go through ``expf``): LLVM has no vector
libm to call, so every kernel holding one runs scalar (MiniLM's GELU kernel: 28 ns per element).
Here these float32 ops are legalised (before ``LegalizeOps``, which then finds none of them left):

* ``relax.exp``: :func:`exp_f32`, Cody-Waite range reduction, a degree-7 polynomial and the scale
  ``2**n`` applied as two factors, so results that are subnormal, the largest finite ones
  (``exp(88.7)``) and overflow to ``inf`` / underflow to 0 come out as libm's;
* ``relax.sigmoid`` (``1 / (1 + exp(-x))``), ``relax.nn.silu`` (``x * sigmoid(x)``),
  ``relax.nn.softmax`` (max, exp, sum, divide, as TVM's softmax): on :func:`exp_f32`;
* ``relax.erf``, ``relax.nn.gelu`` (``x * (0.5 + 0.5 * erf(x / sqrt 2))``): topi's ``fast_erf``
  (rational, clamped to [-4, 4]);
* ``relax.tanh``, ``relax.nn.gelu_tanh``: topi's ``fast_tanh`` (rational, clamped to [-9, 9]).

Preserved: the op's value within a few float32 ulp (measured against float64 over every 61st
float32 bit pattern by ``tests/passes/test_legalize_fast_math.py``: exp <= 2 ulp on normal
results; erf/tanh absolute error <= 4e-7), NaN in -> NaN out (topi's ``fast_erf`` clamps a NaN
to 1: a NaN input is selected through), +-inf and huge inputs as TVM's libm lowering gives them,
shapes (static or symbolic) and every other op. Other dtypes (float16, float64) and other ops are
left to ``LegalizeOps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tvm
from tvm import relax, te, tirx, topi

FLOAT32 = "float32"

# exp: 2**n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two: n * _LN2_HI is exact for
# |n| <= 152). p: Cephes' expf polynomial (max 1 ulp on the reduced range).
_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
# Inputs are clamped to [_EXP_LO, _EXP_HI]: exp(89) overflows to inf, exp(-104) rounds to 0.
_EXP_HI = 89.0
_EXP_LO = -104.0


def _const(value: float) -> tirx.PrimExpr:
    return tirx.const(value, FLOAT32)


def _pow2(n: tirx.PrimExpr) -> tirx.PrimExpr:
    """``2.0 ** n`` for an int32 ``n`` in [-126, 127] (the float32 with that exponent)."""
    return tirx.reinterpret(FLOAT32, tirx.shift_left(n + tirx.const(127, "int32"), tirx.const(23, "int32")))


def exp_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``exp(x)`` for a float32 expression, vectorisable (no call): see the module docstring."""
    clamped = tirx.Select(x > _const(_EXP_HI), _const(_EXP_HI), tirx.Select(x < _const(_EXP_LO), _const(_EXP_LO), x))
    # The integer part never sees a NaN (converting it to int is undefined); r carries it to the result.
    finite = tirx.Select(tirx.isnan(clamped), _const(0.0), clamped)
    n = tirx.floor(finite * _const(_LOG2E) + _const(0.5))
    r = clamped - n * _const(_LN2_HI) - n * _const(_LN2_LO)
    poly = _const(_EXP_POLY[0])
    for coef in _EXP_POLY[1:]:
        poly = poly * r + _const(coef)
    p = poly * r * r + r + _const(1.0)
    ni = tirx.Cast("int32", n)  # in [-150, 128]: two factors in [-75, 64] each
    half = tirx.shift_right(ni, tirx.const(1, "int32"))
    return p * _pow2(half) * _pow2(ni - half)


def _is_f32(expr: relax.Expr) -> bool:
    ty = expr.ty
    return isinstance(ty, relax.TensorType) and str(getattr(ty.dtype, "dtype", ty.dtype)) == FLOAT32


def _nan_through(x: te.Tensor, y: te.Tensor, name: str) -> te.Tensor:
    """``y`` with ``x``'s NaNs put back (where ``x`` is NaN, the result is ``x``)."""
    return te.compute(x.shape, lambda *i: tirx.Select(tirx.isnan(x(*i)), x(*i), y(*i)), name=name)


def _exp(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: exp_f32(x(*i)), name="fast_exp")


def _sigmoid(x: te.Tensor) -> te.Tensor:
    one = _const(1.0)
    return te.compute(x.shape, lambda *i: one / (one + exp_f32(-x(*i))), name="fast_sigmoid")


def _silu(x: te.Tensor) -> te.Tensor:
    one = _const(1.0)
    return te.compute(x.shape, lambda *i: x(*i) * (one / (one + exp_f32(-x(*i)))), name="fast_silu")


def _erf(x: te.Tensor) -> te.Tensor:
    return _nan_through(x, topi.fast_erf(x), "fast_erf")


def _gelu(x: te.Tensor) -> te.Tensor:
    erf = topi.fast_erf(te.compute(x.shape, lambda *i: x(*i) * _const(math.sqrt(0.5)), name="gelu_scale"))
    half = _const(0.5)
    gelu = te.compute(x.shape, lambda *i: x(*i) * (half + erf(*i) * half), name="fast_gelu")
    return _nan_through(x, gelu, "fast_gelu_nan")


def _tanh(x: te.Tensor) -> te.Tensor:
    return _nan_through(x, topi.fast_tanh(x), "fast_tanh")


def _gelu_tanh(x: te.Tensor) -> te.Tensor:
    # TVM's gelu_tanh: 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))
    k = _const(math.sqrt(2.0 / math.pi))
    inner = te.compute(x.shape, lambda *i: k * (x(*i) + _const(0.044715) * x(*i) * x(*i) * x(*i)), name="gelu_inner")
    tanh = topi.fast_tanh(inner)
    half, one = _const(0.5), _const(1.0)
    gelu = te.compute(x.shape, lambda *i: half * x(*i) * (one + tanh(*i)), name="fast_gelu_tanh")
    return _nan_through(x, gelu, "fast_gelu_tanh_nan")


def _softmax(x: te.Tensor, axis: int) -> te.Tensor:
    """TVM's softmax (max, exp of the difference, sum, divide) with :func:`exp_f32`."""
    axis = axis % len(x.shape)
    high = topi.max(x, axis=axis, keepdims=True)

    def shifted(*i):
        return exp_f32(x(*i) - high(*[0 if d == axis else v for d, v in enumerate(i)]))

    exp = te.compute(x.shape, shifted, name="T_softmax_exp")
    total = topi.sum(exp, axis=axis, keepdims=True)
    return te.compute(x.shape, lambda *i: exp(*i) / total(*[0 if d == axis else v for d, v in enumerate(i)]),
                      name="T_softmax_norm")


_UNARY: dict[str, tuple[Callable[[te.Tensor], te.Tensor], str]] = {
    "relax.exp": (_exp, "exp"),
    "relax.sigmoid": (_sigmoid, "sigmoid"),
    "relax.nn.silu": (_silu, "silu"),
    "relax.erf": (_erf, "erf"),
    "relax.nn.gelu": (_gelu, "gelu"),
    "relax.tanh": (_tanh, "tanh"),
    "relax.nn.gelu_tanh": (_gelu_tanh, "gelu_tanh"),
}
FAST_MATH_OPS = (*_UNARY, "relax.nn.softmax")


@relax.expr_functor.mutator
class _FastMath(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        op = call.op
        name = op.name if isinstance(op, tvm.ir.Op) else None
        if name not in FAST_MATH_OPS or not _is_f32(call.args[0]) or not _is_f32(call):
            return call
        if name == "relax.nn.softmax":
            return self.builder_.call_te(_softmax, call.args[0], int(call.attrs.axis), primfunc_name_hint="softmax")
        fn, hint = _UNARY[name]
        return self.builder_.call_te(fn, call.args[0], primfunc_name_hint=hint)


@tvm.transform.module_pass(opt_level=0, name="LegalizeFastMath")
class LegalizeFastMath:
    """Float32 ``exp``, ``sigmoid``, ``silu``, ``softmax``, ``erf``, ``gelu``, ``tanh`` and
    ``gelu_tanh`` of every Relax function legalised to vectorisable forms (see the module)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mutator = _FastMath(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()
