"""RecomposeOps: exporters' decompositions back into the one Relax op the PyTorch importer emits.

ONNX exporters (and older opsets) write many activations and normalisations as chains of
elementwise ops and reductions; TVM's PyTorch importer writes the same layers as one Relax op.
The chains cost a kernel or a memory pass each wherever fusion cannot join them (a reduction
between them), block the channels-last conversion (5-D ``stack`` glue) and never match the kernels
of the same model imported from PyTorch (its tuning records, stitching with it). This pass
rewrites each recognised chain, wherever it appears, to PyTorch's spelling:

=====================================================  =======================================
chain (any operand order; ``/ c`` or ``* (1/c)``)       becomes
=====================================================  =======================================
``x * sigmoid(x)``                                     ``R.nn.silu(x)``
``0.5 * x * (1 + erf(x / sqrt(2)))``                   ``R.nn.gelu(x)``
``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``  ``R.nn.gelu_tanh(x)``
``clip(x / 6 + 0.5, 0, 1)``, ``clip(x + 3, 0, 6) / 6``  ``clip(x + 3, 0, 6) / 6`` (hardsigmoid)
``x * <hardsigmoid(x)>`` in any of those spellings      ``x * (clip(x + 3, 0, 6) / 6)`` (hardswish)
``minimum(maximum(x, lo), hi)`` (scalars, lo <= hi)     ``R.clip(x, lo, hi)``
``clip(clip(x, a, b), c, d)`` (overlapping bounds)       ``R.clip(x, max(a, c), min(b, d))``
``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)``   ``R.nn.layer_norm(x, gamma, beta, axes,
``* gamma + beta`` (gamma/beta optional; ``*rsqrt``)      eps)`` (absent: ones / zeros)
``x * rsqrt(mean(x^2) + eps) * gamma`` (or ``/ sqrt``)  ``R.nn.rms_norm(x, gamma, axes, eps)``
``exp(x - max(x, a)) / sum(exp(x - max(x, a)), a)``     ``R.nn.softmax(x, a)`` (also without max)
``max/min/sum/mean(stack([broadcast_to(x_i)]), 0)``     a chain of ``maximum``/``minimum``/``add``
``power(abs(x), 2)`` (torch's ``norm(p=2)``)            ``x * x`` (ONNX's ReduceL2)
``power(sum(<square>), 0.5)``                           ``sqrt(sum(<square>))`` (ONNX's ReduceL2)
=====================================================  =======================================

Constants are read from ``relax.Constant`` s and from weight parameters (ONNX initialisers become
weight parameters); constants match within 1e-5 relative. Normalisations need trailing,
contiguous axes and ``gamma``/``beta`` of the normalised shape (leading 1s allowed).

What is preserved: every output, up to float rounding (the recomposed op computes the same
function in a different order, e.g. ``gelu`` as TVM's ``x * (0.5 + erf(x / sqrt2) * 0.5)``,
``softmax`` always subtracting the max; ``mean`` of a stack as ``sum * (1/n)``). NaN and inf
propagate as in the chain (``clip``/``maximum``/``minimum`` are lowered NaN-safe by
:class:`LegalizeNaNSafe`). Intermediate values used outside a chain stay computed; bindings the
rewrite leaves unused are removed, and so are weight parameters no longer used (constants a chain
held, e.g. an ``eps`` initialiser). A function with nothing to rewrite is returned as it is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from gmorph_tvm.core.ir import dtype_str, normalize_axis, op_name, static_shape
from gmorph_tvm.passes._util import (
    PROVENANCE_ATTR,
    map_relax_functions,
    raw_provenance,
    rebuild_function,
    weight_params,
)

_RTOL = 1e-5
_SQRT1_2 = 1.0 / math.sqrt(2.0)
_SQRT_2_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
# Weight parameters read as constants: only small ones (scalars, vectors of a few elements).
_MAX_CONST_ELEMENTS = 16

Remap = Callable[[relax.Expr], relax.Expr]
Build = Callable[[Remap], relax.Expr]


@tvm.transform.module_pass(opt_level=0, name="RecomposeOps")
class RecomposeOps:
    """Rewrite recognised decompositions to PyTorch's single ops (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_relax_functions(mod, recompose_function)


def recompose_function(func: relax.Function) -> relax.Function:
    """``func`` with every recognised chain rewritten (``func`` itself when there is none)."""
    if not isinstance(func.body, relax.SeqExpr):
        return func
    graph = _Graph(func)
    plans: dict[relax.Var, Build] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding) and isinstance(binding.value, relax.Call):
                build = graph.match(binding.var, binding.value)
                if build is not None:
                    plans[binding.var] = build
    if not plans:
        return func
    body = _Rewriter(plans).visit_expr(func.body)
    scratch = relax.Function(list(func.params), body, func.ret_ty, func.is_pure, func.attrs)
    cleaned = relax.analysis.remove_all_unused(scratch)
    weights = weight_params(func)
    if not weights:
        return cleaned
    provenance = raw_provenance(func) if func.attrs is not None and PROVENANCE_ATTR in func.attrs else None
    return rebuild_function(func, cleaned.body, weights, provenance)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, plans: dict[relax.Var, Build]) -> None:
        super().__init__()
        self.plans = plans

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        build = self.plans.get(binding.var)
        if build is None:
            super().visit_var_binding_(binding)
            return
        value = build(self.visit_expr)
        if isinstance(binding.var, relax.DataflowVar):
            new_var = self.builder_.emit(value, name_hint=binding.var.name)
        else:
            new_var = self.builder_.emit_output(value, name_hint=binding.var.name)
        self.set_var_remap(binding.var, new_var)


# ---- the function as a graph ------------------------------------------------------------------


@dataclass(frozen=True)
class _Term:
    """``coef * f1 * f2 * ...`` in a sum; no factors for the constant term."""

    coef: float
    factors: tuple[relax.Expr, ...]


class _Graph:
    """Bindings of one function, looked through: values of vars, constants, products, sums."""

    def __init__(self, func: relax.Function) -> None:
        self.values: dict[relax.Var, relax.Expr] = {}
        for block in func.body.blocks:
            for binding in block.bindings:
                if isinstance(binding, relax.VarBinding):
                    self.values[binding.var] = binding.value
        self.weights = {var: value for var, value in weight_params(func)}

    # -- values

    def value(self, expr: relax.Expr) -> relax.Expr:
        seen = 0
        while isinstance(expr, relax.Var) and expr in self.values and seen < 64:
            expr, seen = self.values[expr], seen + 1
        return expr

    def call(self, expr: relax.Expr, *ops: str) -> relax.Call | None:
        value = self.value(expr)
        return value if op_name(value) in ops else None

    def const(self, expr: relax.Expr) -> np.ndarray | None:
        """The value of a constant or a (small) weight parameter."""
        if isinstance(expr, relax.Var) and expr in self.weights:
            tensor = self.weights[expr]
            if int(np.prod([int(d) for d in tensor.shape])) > _MAX_CONST_ELEMENTS:
                return None
            return tensor.numpy()
        value = self.value(expr)
        if isinstance(value, tvm.ir.GenericConst) and isinstance(value.value, tvm.runtime.Tensor):
            if int(np.prod([int(d) for d in value.value.shape])) > _MAX_CONST_ELEMENTS:
                return None
            return value.value.numpy()
        if isinstance(value, relax.Var) and value is not expr:
            return self.const(value)
        return None

    def scalar(self, expr: relax.Expr) -> float | None:
        value = self.const(expr)
        if value is None or value.size != 1 or value.dtype.kind != "f":
            return None
        return float(value.reshape(()))

    def is_weight(self, expr: relax.Expr) -> bool:
        """A constant or a weight parameter (of any size)."""
        return (isinstance(expr, relax.Var) and expr in self.weights) or isinstance(self.value(expr), tvm.ir.GenericConst)

    # -- algebra

    def product(self, expr: relax.Expr) -> tuple[float, list[relax.Expr]]:
        """``expr == c * f1 * f2 * ...``: the scalar constant ``c`` and the other factors, looked for
        through ``multiply`` and division by a scalar constant."""
        scalar = self.scalar(expr)
        if scalar is not None:
            return scalar, []
        call = self.call(expr, "relax.multiply", "relax.divide")
        if call is None:
            return 1.0, [expr]
        a, b = call.args
        if op_name(call) == "relax.divide":
            divisor = self.scalar(b)
            if divisor is None or divisor == 0.0:
                return 1.0, [expr]
            c, factors = self.product(a)
            return c / divisor, factors
        ca, fa = self.product(a)
        cb, fb = self.product(b)
        return ca * cb, fa + fb

    def terms(self, expr: relax.Expr) -> list[_Term]:
        """``expr`` as a sum of scaled products (``add``/``subtract`` split, scalar multiples of
        sums distributed)."""
        scalar = self.scalar(expr)
        if scalar is not None:
            return [_Term(scalar, ())]
        call = self.call(expr, "relax.add", "relax.subtract")
        if call is not None:
            sign = -1.0 if op_name(call) == "relax.subtract" else 1.0
            return self.terms(call.args[0]) + [_Term(sign * t.coef, t.factors) for t in self.terms(call.args[1])]
        c, factors = self.product(expr)
        if len(factors) == 1 and self.call(factors[0], "relax.add", "relax.subtract") is not None:
            return [_Term(c * t.coef, t.factors) for t in self.terms(factors[0])]
        return [_Term(c, tuple(factors))]

    def polynomial(self, expr: relax.Expr) -> tuple[relax.Expr, dict[int, float]] | None:
        """``expr == sum_k coef_k * x**k`` for one ``x``: (x, {k: coef_k}); None otherwise."""
        base: relax.Expr | None = None
        coefs: dict[int, float] = {}
        for term in self.terms(expr):
            degree = 0
            for factor in term.factors:
                x, k = factor, 1
                power = self.call(factor, "relax.power")
                if power is not None:
                    exponent = self.scalar(power.args[1])
                    if exponent is None or exponent != int(exponent) or exponent < 1:
                        return None
                    x, k = power.args[0], int(exponent)
                if base is not None and not x.same_as(base):
                    return None
                base, degree = x, degree + k
            coefs[degree] = coefs.get(degree, 0.0) + term.coef
        return None if base is None else (base, coefs)

    # -- matching

    def match(self, var: relax.Var, call: relax.Call) -> Build | None:
        if not _is_float_tensor(call):
            return None
        for matcher in (self._layer_norm, self._softmax, self._gelu, self._hardswish, self._hardsigmoid,
                        self._silu, self._clip, self._stacked_reduction, self._square, self._root_of_squares):
            build = matcher(call)
            if build is not None:
                return build
        return None

    def _silu(self, call: relax.Call) -> Build | None:
        if op_name(call) != "relax.multiply":
            return None
        c, factors = self.product(call)
        if len(factors) != 2 or not _close(c, 1.0):
            return None
        for x, other in (factors, factors[::-1]):
            sig = self.call(other, "relax.sigmoid")
            if sig is not None and sig.args[0].same_as(x) and _same_type(call, x):
                return functools.partial(_unary, relax.op.nn.silu, x)
        return None

    def _square(self, call: relax.Call) -> Build | None:
        """``power(abs(x), 2)`` (torch's ``norm(p=2)``) -> ``x * x`` (ONNX's ReduceL2)."""
        if op_name(call) != "relax.power" or self.scalar(call.args[1]) != 2.0:
            return None
        absolute = self.call(call.args[0], "relax.abs")
        if absolute is None or not _same_type(call, absolute.args[0]):
            return None
        x = absolute.args[0]
        return lambda remap: relax.op.multiply(remap(x), remap(x))

    def _is_square(self, expr: relax.Expr) -> bool:
        """``x * x``, ``power(x, 2)`` or ``power(abs(x), 2)``: never negative, never -0."""
        mul = self.call(expr, "relax.multiply")
        if mul is not None:
            return mul.args[0].same_as(mul.args[1])
        power = self.call(expr, "relax.power")
        return power is not None and self.scalar(power.args[1]) == 2.0

    def _root_of_squares(self, call: relax.Call) -> Build | None:
        """``power(sum(squares), 0.5)`` (torch's ``norm(p=2)``) -> ``sqrt(sum(squares))`` (ONNX's
        ReduceL2). The sum is +0 or more (or NaN), where the two agree."""
        if op_name(call) != "relax.power" or self.scalar(call.args[1]) != 0.5:
            return None
        total = self.call(call.args[0], "relax.sum")
        if total is None or not self._is_square(total.args[0]) or not _same_type(call, call.args[0]):
            return None
        s = call.args[0]
        return lambda remap: relax.op.sqrt(remap(s))

    def _gelu(self, call: relax.Call) -> Build | None:
        if op_name(call) not in ("relax.multiply", "relax.divide"):
            return None
        c, factors = self.product(call)
        if len(factors) != 2:
            return None
        for x, other in (factors, factors[::-1]):
            if not _same_type(call, x):
                continue
            terms = self.terms(other)
            const = sum(t.coef for t in terms if not t.factors)
            act = [t for t in terms if t.factors]
            if len(act) != 1 or len(act[0].factors) != 1 or not (_close(c * const, 0.5) and _close(c * act[0].coef, 0.5)):
                continue
            inner = self.call(act[0].factors[0], "relax.erf", "relax.tanh")
            if inner is None:
                continue
            poly = self.polynomial(inner.args[0])
            if poly is None or not poly[0].same_as(x):
                continue
            coefs = {k: v for k, v in poly[1].items() if v != 0.0}
            if op_name(inner) == "relax.erf" and set(coefs) == {1} and _close(coefs[1], _SQRT1_2):
                return functools.partial(_unary, relax.op.nn.gelu, x)
            if (op_name(inner) == "relax.tanh" and set(coefs) == {1, 3} and _close(coefs[1], _SQRT_2_PI)
                    and _close(coefs[3], _SQRT_2_PI * _GELU_CUBIC, 1e-4)):
                return functools.partial(_unary, relax.op.nn.gelu_tanh, x)
        return None

    def _clip_parts(self, expr: relax.Expr) -> tuple[relax.Expr, float, float] | None:
        """``expr`` as ``clip(u, lo, hi)``: an ``R.clip``, a minimum/maximum pair of scalars, or a chain
        of them (``clip(clip(u, 0, inf), -inf, 6)``, how torch.export decomposes hardswish)."""
        parts = self._one_clip(expr)
        if parts is None:
            return None
        u, lo, hi = parts
        inner = self._clip_parts(u)
        if inner is not None and max(lo, inner[1]) <= min(hi, inner[2]):
            return inner[0], max(lo, inner[1]), min(hi, inner[2])
        return parts

    def _one_clip(self, expr: relax.Expr) -> tuple[relax.Expr, float, float] | None:
        clip = self.call(expr, "relax.clip")
        if clip is not None:
            lo, hi = (_prim_float(b) for b in clip.args[1:3])
            return None if lo is None or hi is None or lo > hi else (clip.args[0], lo, hi)
        outer = self.call(expr, "relax.minimum", "relax.maximum")
        if outer is None:
            return None
        want = "relax.maximum" if op_name(outer) == "relax.minimum" else "relax.minimum"
        for inner_expr, bound_expr in (outer.args, outer.args[::-1]):
            inner, bound = self.call(inner_expr, want), self.scalar(bound_expr)
            if inner is None or bound is None:
                continue
            for u, other in (inner.args, inner.args[::-1]):
                first = self.scalar(other)
                if first is None:
                    continue
                lo, hi = (first, bound) if want == "relax.maximum" else (bound, first)
                if lo <= hi and _same_type(outer, u):
                    return u, lo, hi
        return None

    def _hardsigmoid_of(self, expr: relax.Expr, scale: float) -> relax.Expr | None:
        """x if ``scale * expr`` is hardsigmoid(x) = clip(x/6 + 1/2, 0, 1), in any spelling."""
        c, factors = self.product(expr)
        if len(factors) != 1:
            return None
        parts = self._clip_parts(factors[0])
        if parts is None:
            return None
        u, lo, hi = parts
        s = scale * c
        poly = self.polynomial(u)
        if poly is None or s <= 0.0 or set(k for k, v in poly[1].items() if v != 0.0) - {0, 1}:
            return None
        slope, offset = poly[1].get(1, 0.0), poly[1].get(0, 0.0)
        if lo == 0.0 and _close(s * hi, 1.0) and _close(s * slope, 1.0 / 6.0) and _close(s * offset, 0.5):
            return poly[0]
        return None

    def _hardsigmoid(self, call: relax.Call) -> Build | None:
        if op_name(call) not in ("relax.clip", "relax.minimum", "relax.maximum", "relax.multiply", "relax.divide"):
            return None
        x = self._hardsigmoid_of(call, 1.0)
        if x is None or not _same_type(call, x):
            return None
        return functools.partial(_unary, _torch_hardsigmoid, x)

    def _hardswish(self, call: relax.Call) -> Build | None:
        if op_name(call) not in ("relax.multiply", "relax.divide"):
            return None
        c, factors = self.product(call)
        if len(factors) != 2:
            return None
        for x, other in (factors, factors[::-1]):
            base = self._hardsigmoid_of(other, c)
            if base is not None and base.same_as(x) and _same_type(call, x):
                return functools.partial(_unary, _torch_hardswish, x)
        return None

    def _clip(self, call: relax.Call) -> Build | None:
        if op_name(call) not in ("relax.minimum", "relax.maximum", "relax.clip"):
            return None
        parts = self._clip_parts(call)
        if parts is None or (op_name(call) == "relax.clip" and parts[0].same_as(call.args[0])):
            return None  # a single clip already
        u, lo, hi = parts
        return functools.partial(_unary, lambda v: relax.op.clip(v, lo, hi), u)

    def _softmax(self, call: relax.Call) -> Build | None:
        if op_name(call) != "relax.divide":
            return None
        num, den = call.args
        exp, total = self.call(num, "relax.exp"), self.call(den, "relax.sum")
        if exp is None or total is None or not bool(total.attrs.keepdims) or total.attrs.axis is None:
            return None
        rank = _ndim(call)
        axes = [normalize_axis(int(a), rank) for a in total.attrs.axis] if rank else []
        if len(axes) != 1 or not self._same_value(total.args[0], num):
            return None
        shifted = exp.args[0]
        x = shifted
        sub = self.call(shifted, "relax.subtract")
        if sub is not None:
            peak = self.call(sub.args[1], "relax.max")
            if (peak is not None and peak.args[0].same_as(sub.args[0]) and bool(peak.attrs.keepdims)
                    and peak.attrs.axis is not None
                    and [normalize_axis(int(a), rank) for a in peak.attrs.axis] == axes):
                x = sub.args[0]
        if not _same_type(call, x):
            return None
        axis = axes[0]
        return functools.partial(_unary, lambda v: relax.op.nn.softmax(v, axis), x)

    def _same_value(self, a: relax.Expr, b: relax.Expr) -> bool:
        """The same var, or the same op on the same arguments (an exporter may compute it twice)."""
        if a.same_as(b):
            return True
        va, vb = self.value(a), self.value(b)
        if not (isinstance(va, relax.Call) and isinstance(vb, relax.Call)) or op_name(va) != op_name(vb):
            return False
        same_attrs = (va.attrs is None and vb.attrs is None) or (
            va.attrs is not None and vb.attrs is not None and tvm_ffi.structural_equal(va.attrs, vb.attrs))
        return (same_attrs and len(va.args) == len(vb.args)
                and all(self._same_value(x, y) for x, y in zip(va.args, vb.args)))

    def _normalized(self, expr: relax.Expr) -> tuple[relax.Expr, list[int], float] | None:
        """``expr == num / sqrt(mean(num**2, axes) + eps)`` (any spelling): (num, axes, eps)."""
        call = self.call(expr, "relax.divide", "relax.multiply")
        if call is None:
            return None
        candidates = []
        if op_name(call) == "relax.divide":
            sqrt = self.call(call.args[1], "relax.sqrt")
            if sqrt is not None:
                candidates.append((call.args[0], sqrt.args[0]))
        else:
            for num, scale in (call.args, call.args[::-1]):
                rsqrt = self.call(scale, "relax.rsqrt")
                if rsqrt is not None:
                    candidates.append((num, rsqrt.args[0]))
                    continue
                recip = self.call(scale, "relax.divide")
                if recip is not None and _close_or_none(self.scalar(recip.args[0]), 1.0):
                    sqrt = self.call(recip.args[1], "relax.sqrt")
                    if sqrt is not None:
                        candidates.append((num, sqrt.args[0]))
                    continue
                power = self.call(scale, "relax.power")
                if power is not None and _close_or_none(self.scalar(power.args[1]), -0.5):
                    candidates.append((num, power.args[0]))
        for num, var_eps in candidates:
            add = self.call(var_eps, "relax.add")
            if add is None:
                continue
            for variance, eps_expr in (add.args, add.args[::-1]):
                eps = self.scalar(eps_expr)
                mean = self.call(variance, "relax.mean")
                if eps is None or mean is None or not bool(mean.attrs.keepdims) or mean.attrs.axis is None:
                    continue
                square = self.call(mean.args[0], "relax.power", "relax.multiply")
                if square is None:
                    continue
                if op_name(square) == "relax.power":
                    if not _close_or_none(self.scalar(square.args[1]), 2.0):
                        continue
                    base = square.args[0]
                elif self._same_value(square.args[0], square.args[1]):
                    base = square.args[0]
                else:
                    continue
                if not self._same_value(base, num):
                    continue
                rank = _ndim(mean.args[0])
                axes = sorted(normalize_axis(int(a), rank) for a in mean.attrs.axis)
                if rank and axes == list(range(rank - len(axes), rank)):
                    return num, axes, eps
        return None

    def _affine(self, call: relax.Call, op: str) -> list[tuple[relax.Expr, relax.Expr]]:
        """(inner, weight) splits of ``call`` = ``op(inner, weight)`` where weight is a weight."""
        if op_name(call) != op:
            return []
        return [(a, b) for a, b in (call.args, call.args[::-1]) if self.is_weight(b) and not self.is_weight(a)]

    def _layer_norm(self, call: relax.Call) -> Build | None:
        if op_name(call) not in ("relax.add", "relax.multiply", "relax.divide"):
            return None
        shapes = []  # (core, gamma, beta) candidates, the largest first
        for inner, beta in self._affine(call, "relax.add"):
            scaled = self.call(inner, "relax.multiply")
            for core, gamma in self._affine(scaled, "relax.multiply") if scaled is not None else []:
                shapes.append((core, gamma, beta))
            shapes.append((inner, None, beta))
        for core, gamma in self._affine(call, "relax.multiply"):
            shapes.append((core, gamma, None))
        shapes.append((call, None, None))
        for core, gamma, beta in shapes:
            found = self._normalized(core)
            if found is None:
                continue
            num, axes, eps = found
            x, kind = num, "rms"
            centered = self.call(num, "relax.subtract")
            if centered is not None:
                mean = self.call(centered.args[1], "relax.mean")
                if (mean is not None and mean.args[0].same_as(centered.args[0]) and bool(mean.attrs.keepdims)
                        and mean.attrs.axis is not None
                        and sorted(normalize_axis(int(a), _ndim(num)) for a in mean.attrs.axis) == axes):
                    x, kind = centered.args[0], "layer"
            if kind == "rms":
                if beta is not None:
                    continue
            if not _same_type(call, x):
                continue
            shape, dtype = static_shape(x.ty), dtype_str(x.ty)
            if shape is None or dtype is None:
                continue
            norm_shape = shape[axes[0]:]
            g, b = self._norm_weight(gamma, norm_shape), self._norm_weight(beta, norm_shape)
            if (gamma is not None and g is None) or (beta is not None and b is None):
                continue
            return _norm_builder(kind, x, g, b, axes, eps, norm_shape, dtype)
        return None

    def _norm_weight(self, expr: relax.Expr | None, norm_shape: tuple[int, ...]) -> relax.Expr | None:
        """``expr`` as a tensor of ``norm_shape`` if it broadcasts over the normalised axes only."""
        if expr is None:
            return None
        shape = static_shape(expr.ty)
        if shape is None or len(shape) < len(norm_shape):
            return None
        lead, tail = shape[: len(shape) - len(norm_shape)], tuple(shape[len(shape) - len(norm_shape):])
        if any(d != 1 for d in lead) or tail != tuple(norm_shape):
            return None
        return expr

    def _stacked_reduction(self, call: relax.Call) -> Build | None:
        name = op_name(call)
        if name not in ("relax.max", "relax.min", "relax.sum", "relax.mean"):
            return None
        if call.attrs.axis is None or [int(a) for a in call.attrs.axis] != [0] or bool(call.attrs.keepdims):
            return None
        stack = self.call(call.args[0], "relax.stack")
        if stack is None or int(stack.attrs.axis) != 0:
            return None
        items = self.value(stack.args[0])
        if not isinstance(items, relax.Tuple) or len(items.fields) < 1:
            return None
        parts = []
        for item in items.fields:
            spread = self.call(item, "relax.broadcast_to")
            parts.append(spread.args[0] if spread is not None else item)
        binary = {"relax.max": relax.op.maximum, "relax.min": relax.op.minimum}.get(name, relax.op.add)
        dtype = dtype_str(call.ty)
        shape = static_shape(call.ty)
        if shape is None:
            return None

        def build(remap: Remap) -> relax.Expr:
            out = remap(parts[0])
            for part in parts[1:]:
                out = binary(out, remap(part))
            if name == "relax.mean" and len(parts) > 1:
                out = relax.op.multiply(out, relax.const(1.0 / len(parts), dtype))
            if len(parts) == 1 or _broadcast_shape([static_shape(p.ty) for p in parts]) != shape:
                out = relax.op.broadcast_to(out, shape)
            return out

        return build


# ---- builders and small helpers ---------------------------------------------------------------


def _unary(op: Callable[[relax.Expr], relax.Expr], x: relax.Expr, remap: Remap) -> relax.Expr:
    """``op`` applied to ``x`` as the rewritten function has it (the builder of a one-input rewrite)."""
    return op(remap(x))


def _torch_hardsigmoid(x: relax.Expr) -> relax.Expr:
    """PyTorch's importer: ``divide(clip(add(x, 3), 0, 6), 6)``."""
    dtype = dtype_str(x.ty) or "float32"
    return relax.op.divide(relax.op.clip(relax.op.add(x, relax.const(3.0, dtype)), 0.0, 6.0), relax.const(6.0, dtype))


def _torch_hardswish(x: relax.Expr) -> relax.Expr:
    """PyTorch's importer: ``multiply(x, divide(clip(add(x, 3), 0, 6), 6))``."""
    return relax.op.multiply(x, _torch_hardsigmoid(x))


def _norm_builder(kind: str, x: relax.Expr, gamma: relax.Expr | None, beta: relax.Expr | None, axes: list[int],
                  eps: float, norm_shape: tuple[int, ...], dtype: str) -> Build:
    def weight(remap: Remap, expr: relax.Expr | None, fill: float) -> relax.Expr:
        if expr is None:
            return relax.const(np.full(norm_shape, fill, dtype), dtype)
        out = remap(expr)
        if static_shape(expr.ty) != tuple(norm_shape):
            out = relax.op.reshape(out, norm_shape)
        return out

    def build(remap: Remap) -> relax.Expr:
        if kind == "layer":
            return relax.op.nn.layer_norm(remap(x), weight(remap, gamma, 1.0), weight(remap, beta, 0.0), axes, eps)
        return relax.op.nn.rms_norm(remap(x), weight(remap, gamma, 1.0), axes, eps)

    return build


def _broadcast_shape(shapes: list[tuple[int, ...] | None]) -> tuple[int, ...] | None:
    if any(s is None for s in shapes):
        return None
    try:
        return tuple(int(d) for d in np.broadcast_shapes(*shapes))  # type: ignore[arg-type]
    except ValueError:
        return None


def _is_float_tensor(expr: relax.Expr) -> bool:
    dtype = dtype_str(expr.ty) if isinstance(expr.ty, relax.TensorType) else None
    return dtype is not None and dtype.startswith(("float", "bfloat"))


def _same_type(a: relax.Expr, b: relax.Expr) -> bool:
    """Both tensors of one static shape and dtype (the rewrite keeps the binding's type)."""
    shape = static_shape(a.ty)
    return shape is not None and shape == static_shape(b.ty) and dtype_str(a.ty) == dtype_str(b.ty)


def _ndim(expr: relax.Expr) -> int:
    shape = static_shape(expr.ty)
    return len(shape) if shape is not None else 0


def _close(a: float, b: float, rtol: float = _RTOL) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)


def _close_or_none(a: float | None, b: float) -> bool:
    return a is not None and _close(a, b)


def _prim_float(value: relax.Expr) -> float | None:
    """The number of a ``R.prim_value`` clip bound."""
    number = getattr(value, "value", None)  # a FloatImm / IntImm, or a PrimValue holding one
    if not isinstance(number, (int, float)):
        number = getattr(number, "value", None)
    return float(number) if isinstance(number, (int, float)) else None
