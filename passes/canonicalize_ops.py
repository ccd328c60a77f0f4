"""CanonicalizeOps: spell every operator one way, so models from different frontends compare equal.

TVM's PyTorch and ONNX frontends import the same network with different spellings, which defeats
structural comparison (``EliminateCommonSubexpr``, :class:`StitchSharedWeights`). This pass
rewrites each Relax function of the module to one canonical form:

* exporters' decompositions (``x * sigmoid(x)``, GELU, hardswish, layer norm, softmax, ...
  written as chains of elementwise ops) become the op PyTorch's importer emits
  (:class:`~gmorph_tvm.passes.recompose_ops.RecomposeOps`, run first);
* index lookups are written one way: embedding lookups ``take(w, ids, mode="wrap")`` (ONNX's
  negative-index ``where`` and torch's int32 cast + flatten folded in), gathers of compile-time
  indices that read every element once, in order, become ``reshape``, ``and`` with all-true a ``broadcast_to``
  (:class:`~gmorph_tvm.passes.canonicalize_gathers.CanonicalizeGathers`, run second);
* chains of layout ops become the one op they amount to: ``torch.export``'s ``broadcast_to`` +
  ``reshape`` + 3-D ``matmul`` becomes ONNX's 4-D ``matmul``, ``reshape``/``permute_dims`` pairs
  one op (:class:`~gmorph_tvm.passes.collapse_layout_chains.CollapseLayoutChains`, run third);
* ``out_dtype`` left unset (ONNX) is filled in with the call's result dtype (PyTorch's spelling);
* negative axes become positive, and axis lists whose order does not matter are sorted
  (reductions, ``squeeze``, ``expand_dims``, ``strided_slice`` with its begin/end/strides);
  ``None`` reduction axes become the explicit list of all axes;
* ``add`` / ``multiply`` put the weight-like operand (a constant, a weight parameter, or a value
  computed from those only) second: PyTorch's ``add(bias, x)`` becomes ONNX's ``add(x, bias)``;
* ``clip`` bounds become float64 immediates of their value in the data dtype (the kernel casts
  them to it: torch's ``relu6`` writes integers, ``clamp`` doubles, ONNX float32 values);
* ``epsilon`` attrs are rounded to the data dtype, the precision kernels add them in; the
  ``momentum`` of an inference ``batch_norm`` (unused) is set to 0.1;
* layout-only ops on constants (``reshape``, ``permute_dims``, ``expand_dims``, ``squeeze``) are
  folded into the constant (a byte copy);
* inference ``batch_norm`` directly after ``conv1d/2d/3d`` (optionally with its bias add) is folded
  into the convolution, as PyTorch's ONNX exporter does: ``conv(x, W*s) + B'``. The folded values
  are computed with PyTorch's own kernels in the exporter's exact operation order
  (``torch/csrc/jit/passes/onnx/eval_peephole.cpp``), so a backbone exported to ONNX by the same
  PyTorch build gets bit-identical weights and stitches with its PyTorch import. Folding is skipped
  where it would break sharing: when convs using the same weight content are followed by different
  batch-norm statistics (frozen backbone, fine-tuned BN), or one of them is not followed by BN.

What is preserved: every rewrite except the recomposition and the BN fold is exact. The index
lookups become ``mode="wrap"`` takes: every in-range read keeps its value and the out-of-bounds
reads of ``mode="fast"`` become defined (see CanonicalizeGathers); the others do the same
arithmetic in the same order (operand swaps only for ``add``/``multiply``, which are commutative
in IEEE arithmetic). The
recomposed ops compute the chains' function in their own order (float rounding; see RecomposeOps). The
BN fold changes rounding only: ``conv(x, W*s) + B'`` differs from ``(conv(x, W) + b - mean) * s +
beta`` by float32 rounding (about 1e-7 relative). Weight parameters are kept as parameters (folded
weights become new parameters named ``<conv weight>.bnfold`` / ``<bias>.bnfold``, with provenance
attr ``gmorph.provenance`` listing every original they were computed from); constants stay
constants. Weight parameters no longer used are removed from the signature and attrs ``params``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from gmorph_tvm.core.ir import dtype_str, normalize_axis, op_name, static_shape
from gmorph_tvm.passes._util import (
    PROVENANCE_ATTR,
    content_key,
    merge_entries,
    num_inputs,
    raw_provenance,
    rebuild_function,
    weight_params,
)
from gmorph_tvm.passes.canonicalize_gathers import CanonicalizeGathers
from gmorph_tvm.passes.collapse_layout_chains import CollapseLayoutChains
from gmorph_tvm.passes.recompose_ops import RecomposeOps

_CONV_OPS = ("relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d")
_COMMUTATIVE_OPS = ("relax.add", "relax.multiply")
_LAYOUT_OPS = ("relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze")
_FOLDABLE_DTYPES = ("float16", "float32", "float64")

# attrs type key -> [(field, kind, rank source)]; kind: "axis" (one int), "sorted" (list whose
# order does not matter), "list" (order matters); rank "in" = first argument, "out" = result.
_AXIS_FIELDS: dict[str, list[tuple[str, str, str]]] = {
    "relax.attrs.StatisticalAttrs": [("axis", "sorted", "in")],
    "relax.attrs.ArgmaxArgminAttrs": [("axis", "axis", "in")],
    "relax.attrs.ArgsortAttrs": [("axis", "axis", "in")],
    "relax.attrs.SortAttrs": [("axis", "axis", "in")],
    "relax.attrs.TopKAttrs": [("axis", "axis", "in")],
    "relax.attrs.ScanopAttrs": [("axis", "axis", "in")],
    "relax.attrs.FlipAttrs": [("axis", "axis", "in")],
    "relax.attrs.GatherElementsAttrs": [("axis", "axis", "in")],
    "relax.attrs.ScatterElementsAttrs": [("axis", "axis", "in")],
    "relax.attrs.RepeatAttrs": [("axis", "axis", "in")],
    "relax.attrs.TakeAttrs": [("axis", "axis", "in")],
    "relax.attrs.SoftmaxAttrs": [("axis", "axis", "in")],
    "relax.attrs.SplitAttrs": [("axis", "axis", "in")],
    "relax.attrs.ConcatAttrs": [("axis", "axis", "out")],
    "relax.attrs.StackAttrs": [("axis", "axis", "out")],
    "relax.attrs.BatchNormAttrs": [("axis", "axis", "in")],
    "relax.attrs.PReluAttrs": [("axis", "axis", "in")],
    "relax.attrs.SqueezeAttrs": [("axis", "sorted", "in")],
    "relax.attrs.ExpandDimsAttrs": [("axis", "sorted", "out")],
    "relax.attrs.LayerNormAttrs": [("axes", "list", "in")],
    "relax.attrs.RMSNormAttrs": [("axes", "list", "in")],
    "relax.attrs.GroupNormAttrs": [("channel_axis", "axis", "in"), ("axes", "list", "in")],
    "relax.attrs.InstanceNormAttrs": [("channel_axis", "axis", "in"), ("axes", "list", "in")],
    "relax.attrs.PermuteDimsAttrs": [("axes", "list", "in")],
}
# Canonical momentum of an inference batch_norm (where it has no effect): PyTorch's default.
_INFERENCE_MOMENTUM = 0.1
# Reductions where axis=None means "all axes" (made explicit).
_ALL_AXES_WHEN_NONE = ("relax.attrs.StatisticalAttrs",)


@tvm.transform.module_pass(opt_level=0, name="CanonicalizeOps")
class CanonicalizeOps:
    """Rewrite every Relax function to the canonical operator spelling (see module docstring).

    Parameters
    ----------
    fold_batch_norm:
        Fold inference batch norm into the preceding convolution (default True).
    """

    def __init__(self, fold_batch_norm: bool = True) -> None:
        self.fold_batch_norm = fold_batch_norm

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = cast(tvm.transform.Pass, RecomposeOps())(mod)  # exporters' decompositions -> torch's ops first
        mod = cast(tvm.transform.Pass, CanonicalizeGathers())(mod)  # index lookups, one spelling
        mod = cast(tvm.transform.Pass, CollapseLayoutChains())(mod)  # torch.export's layout glue -> one op
        out = mod.clone()
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                out[gvar] = canonicalize_function(func, self.fold_batch_norm)
        # Inline the constants that folded layout ops left bound to vars, as FoldConstant does,
        # and drop the bindings that leaves unused.
        out = relax.transform.CanonicalizeBindings()(out)
        for gvar, func in out.functions_items():
            if isinstance(func, relax.Function):
                out[gvar] = relax.analysis.remove_all_unused(func)
        return out


def canonicalize_function(func: relax.Function, fold_batch_norm: bool = True) -> relax.Function:
    """The canonical form of one Relax function (what :class:`CanonicalizeOps` does per function)."""
    weights = weight_params(func)
    provenance = raw_provenance(func) if weights else None
    plans = _plan_bn_folds(func, weights, provenance) if fold_batch_norm else {}
    rewriter = _Canonicalizer(weights, plans)
    visited = rewriter.visit_expr(func)
    # New weights go right after the weight they replace, so weight order follows the models.
    new_after: dict[relax.Var, list[tuple[relax.Var, tvm.runtime.Tensor]]] = {}
    for plan in plans.values():
        for var, value, _ in plan.new_params:
            new_after.setdefault(plan.anchor, []).append((var, value))
    all_weights = []
    for var, value in weights:
        all_weights.append((var, value))
        all_weights.extend(new_after.get(var, []))
    if provenance is not None:
        for plan in plans.values():
            for var, _, entries in plan.new_params:
                provenance[var.name] = entries
    # Drop bindings the fold left dead before deciding which weights are still used.
    scratch = relax.Function(
        list(func.params)[: num_inputs(func)] + [v for v, _ in all_weights],
        visited.body,
        func.ret_ty,
        func.is_pure,
        func.attrs,
    )
    cleaned = relax.analysis.remove_all_unused(scratch)
    if not weights and not any(p.new_params for p in plans.values()):
        return relax.Function(list(func.params), cleaned.body, func.ret_ty, func.is_pure, func.attrs)
    had_provenance = func.attrs is not None and PROVENANCE_ATTR in func.attrs
    return rebuild_function(func, cleaned.body, all_weights, provenance if (had_provenance or plans) else None)


# ---- batch-norm folding: planning ----------------------------------------------------------------


@dataclass
class _FoldPlan:
    conv: relax.Call  # the original conv call
    data: relax.Expr  # the conv's data operand (original graph)
    shape: tuple[int, ...]  # bias broadcast shape (1, C, 1, ...)
    weight: tvm.ir.GenericConst | relax.Var
    bias: tvm.ir.GenericConst | relax.Var
    anchor: relax.Var | None  # weight param after which new params are listed
    new_params: list[tuple[relax.Var, tvm.runtime.Tensor, list[str]]]


def _plan_bn_folds(
    func: relax.Function,
    weights: list[tuple[relax.Var, tvm.runtime.Tensor]],
    provenance: dict[str, list[str]] | None,
) -> dict[relax.Var, _FoldPlan]:
    if not isinstance(func.body, relax.SeqExpr):
        return {}
    values: dict[relax.Var, relax.Expr] = {}
    consumers: dict[relax.Var, list[relax.Var]] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                continue
            values[binding.var] = binding.value
            for used in relax.analysis.free_vars(binding.value):
                consumers.setdefault(used, []).append(binding.var)
    outputs = set(relax.analysis.free_vars(func.body.body))
    weight_of = {var: value for var, value in weights}

    def sole_consumer(var: relax.Var) -> relax.Var | None:
        users = consumers.get(var, [])
        return users[0] if len(users) == 1 and var not in outputs else None

    def weight_ref(expr: relax.Expr, allow_layout: bool = False) -> tuple[tvm.runtime.Tensor, relax.Var | None] | None:
        """(value, weight param or None for a constant) of a weight operand."""
        if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
            return expr.value, None
        if isinstance(expr, relax.Var) and expr in weight_of:
            return weight_of[expr], expr
        if allow_layout and isinstance(expr, relax.Var) and expr in values:
            value = values[expr]
            if isinstance(value, relax.Call) and op_name(value) in ("relax.reshape", "relax.expand_dims"):
                inner = weight_ref(value.args[0])
                if inner is not None:
                    return inner
        return None

    candidates = []  # (bn var, conv call, conv var, bias ref or None, bn refs, eps)
    for bn_var, value in values.items():
        if not (isinstance(value, relax.Call) and op_name(value) == "relax.nn.batch_norm"):
            continue
        attrs = value.attrs
        data_ndim = _ndim(value.args[0])
        if bool(attrs.training) or data_ndim is None or int(attrs.axis) % data_ndim != 1:
            continue
        users = consumers.get(bn_var, [])
        if bn_var in outputs or not users or not all(
            isinstance(values.get(u), relax.TupleGetItem) and int(values[u].index) == 0 for u in users
        ):
            continue
        data = value.args[0]
        bias = None
        if not isinstance(data, relax.Var) or sole_consumer(data) is None or data not in values:
            continue
        producer = values[data]
        if isinstance(producer, relax.Call) and op_name(producer) == "relax.add":
            conv_var = bias_expr = None
            for a, b in (tuple(producer.args), tuple(producer.args)[::-1]):
                if isinstance(a, relax.Var) and isinstance(values.get(a), relax.Call) and op_name(values[a]) in _CONV_OPS:
                    conv_var, bias_expr = a, b
                    break
            if conv_var is None or bias_expr is None or bias_expr is conv_var or sole_consumer(conv_var) != data:
                continue
            bias = weight_ref(bias_expr, allow_layout=True)
            bias_shape = static_shape(bias_expr.ty)
            if bias is None or bias_shape is None:
                continue
        elif isinstance(producer, relax.Call) and op_name(producer) in _CONV_OPS:
            conv_var = data
        else:
            continue
        conv = values[conv_var]
        cattrs = conv.attrs
        if not (
            str(cattrs.data_layout).startswith("NC")
            and str(cattrs.kernel_layout).startswith("OI")
            and str(cattrs.out_layout or cattrs.data_layout).startswith("NC")
        ):
            continue
        weight = weight_ref(conv.args[1])
        if weight is None:
            continue
        channels = int(weight[0].shape[0])
        ndim = _ndim(conv_var)
        dtype = str(weight[0].dtype)
        if dtype not in _FOLDABLE_DTYPES or ndim is None:
            continue
        if bias is not None and (_numel(bias[0]) != channels or bias_shape is None
                                 or not _per_channel_shape(bias_shape, channels, ndim)):
            continue
        bn_refs = [weight_ref(arg) for arg in value.args[1:5]]
        if any(r is None or tuple(r[0].shape) != (channels,) or str(r[0].dtype) != dtype for r in bn_refs):
            continue
        if bias is not None and str(bias[0].dtype) != dtype:
            continue
        candidates.append((bn_var, conv, conv_var, weight, bias, bn_refs, float(attrs.epsilon), attrs))

    if not candidates:
        return {}

    # Never fold where it breaks sharing: all convs using one weight content must be folded
    # with identical batch norms (and biases), or none is.
    convs_per_content: dict[tuple, int] = {}
    for value in values.values():
        if isinstance(value, relax.Call) and op_name(value) in _CONV_OPS:
            ref = weight_ref(value.args[1])
            if ref is not None:
                key = _array_key(ref[0])
                convs_per_content[key] = convs_per_content.get(key, 0) + 1
    groups: dict[tuple, list] = {}
    for cand in candidates:
        groups.setdefault(_array_key(cand[3][0]), []).append(cand)

    plans: dict[relax.Var, _FoldPlan] = {}
    taken = {p.name for p in func.params}
    for key, group in groups.items():
        if len(group) != convs_per_content.get(key, 0):
            continue
        signatures = {_bn_signature(c) for c in group}
        if len(signatures) != 1:
            continue
        for bn_var, conv, conv_var, weight, bias, bn_refs, eps, attrs in group:
            gamma, beta, mean, var = (ref[0].numpy() for ref in bn_refs)
            gamma = gamma if bool(attrs.scale) else np.ones_like(gamma)
            beta = beta if bool(attrs.center) else np.zeros_like(beta)
            conv_bias = None if bias is None else bias[0].numpy().reshape(-1)
            new_w, new_b = fold_conv_batch_norm(weight[0].numpy(), conv_bias, gamma, beta, mean, var, eps)
            ndim = _ndim(conv_var)
            assert ndim is not None  # candidates only hold convs of known rank
            shape = (1, new_b.shape[0]) + (1,) * (ndim - 2)
            w_var = weight[1]
            if w_var is None:  # constants stay constants
                plans[bn_var] = _FoldPlan(
                    conv, conv.args[0], shape, relax.const(new_w), relax.const(new_b.reshape(shape)), None, []
                )
                continue
            prov = provenance or {}

            def entries_of(ref, prov=prov):
                return prov.get(ref[1].name, []) if ref is not None and ref[1] is not None else []

            w_name = _fresh(f"{w_var.name}.bnfold", taken)
            b_source = bias[1] if bias is not None and bias[1] is not None else bn_refs[1][1]
            b_name = _fresh(f"{(b_source if b_source is not None else w_var).name}.bnfold", taken)
            w_new = relax.Var(w_name, relax.TensorType(new_w.shape, str(new_w.dtype)))
            b_new = relax.Var(b_name, relax.TensorType(new_b.shape, str(new_b.dtype)))
            used_bn = [bn_refs[0] if bool(attrs.scale) else None, bn_refs[1] if bool(attrs.center) else None]
            w_entries = merge_entries(entries_of(weight), entries_of(used_bn[0]), entries_of(bn_refs[3]))
            b_entries = merge_entries(
                entries_of(bias), entries_of(used_bn[1]), entries_of(used_bn[0]),
                entries_of(bn_refs[2]), entries_of(bn_refs[3]),
            )
            plans[bn_var] = _FoldPlan(
                conv,
                conv.args[0],
                shape,
                w_new,
                b_new,
                w_var,
                [
                    (w_new, tvm.runtime.tensor(new_w), w_entries),
                    (b_new, tvm.runtime.tensor(new_b), b_entries),
                ],
            )
    return plans


def fold_conv_batch_norm(
    weight: np.ndarray,
    bias: np.ndarray | None,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Folded ``(W', B')`` of ``batch_norm(conv(x, W) [+ b])``, bit-identical to torch's ONNX export.

    Same operations in the same order as ``fuseConvBatchNorm`` in PyTorch's
    ``torch/csrc/jit/passes/onnx/eval_peephole.cpp``, on torch's CPU kernels (its ``sqrt`` is not
    correctly rounded, so numpy would differ by an ulp and the ONNX copy would not stitch).
    """
    import torch  # torch is a dependency; imported here so the pass module loads without it

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, copy=True))

    std = t(var).add(eps).sqrt()
    scale = t(gamma).div(std)
    new_w = t(weight).mul(scale.reshape((-1,) + (1,) * (weight.ndim - 1)))
    if bias is not None:
        new_b = t(bias).sub(t(mean)).mul(scale).add(t(beta))
    else:
        new_b = t(beta).sub(t(mean).mul(scale))
    return new_w.numpy(), new_b.numpy()


def _bn_signature(cand) -> tuple:
    _, _, _, _, bias, bn_refs, eps, attrs = cand
    parts = [eps, bool(attrs.scale), bool(attrs.center), None if bias is None else _array_key(bias[0])]
    parts.extend(_array_key(ref[0]) for ref in bn_refs)
    return tuple(parts)


def _array_key(value: tvm.runtime.Tensor) -> tuple:
    # Planning only decides *whether* to fold (never what is shared), so a hash key suffices.
    return content_key(value)


def _numel(value: tvm.runtime.Tensor) -> int:
    return int(np.prod([int(d) for d in value.shape], dtype=np.int64))


def _per_channel_shape(shape: tuple[int, ...], channels: int, ndim: int) -> bool:
    """Whether a tensor of ``shape`` broadcasts over (N, C, ...) as one value per channel."""
    if len(shape) > ndim:
        return False
    padded = (1,) * (ndim - len(shape)) + tuple(shape)
    return padded == (1, channels) + (1,) * (ndim - 2)


def _fresh(name: str, taken: set[str]) -> str:
    candidate, suffix = name, 1
    while candidate in taken:
        candidate, suffix = f"{name}{suffix}", suffix + 1
    taken.add(candidate)
    return candidate


# ---- the rewriter ---------------------------------------------------------------------------------


def _ndim(expr: relax.Expr) -> int | None:
    ty = expr.ty
    if isinstance(ty, relax.TensorType) and ty.ndim >= 0:
        return int(ty.ndim)
    return None


def _replace_attrs(attrs: tvm.ir.Attrs, **changes) -> tvm.ir.Attrs:
    info = type(attrs).__tvm_ffi_type_info__
    fields = {f.name: getattr(attrs, f.name) for f in info.fields}
    fields.update(changes)
    return tvm.ir.make_node(info.type_key, **fields)


@relax.expr_functor.mutator
class _Canonicalizer(relax.PyExprMutator):
    def __init__(self, weights: list[tuple[relax.Var, tvm.runtime.Tensor]], plans: dict[relax.Var, _FoldPlan]) -> None:
        super().__init__()
        self.weight_vars = {var for var, _ in weights}
        self.plans = plans
        self.fold_result: dict[relax.Var, relax.Var] = {}  # folded bn var -> result var
        self.weight_like_memo: dict[relax.Var, bool] = {}

    # -- bindings: batch-norm folding --
    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        plan = self.plans.get(binding.var)
        if plan is not None:
            self.fold_result[binding.var] = self._emit_fold(plan)
            return
        value = binding.value
        if isinstance(value, relax.TupleGetItem) and value.tuple_value in self.fold_result:
            result = self.fold_result[value.tuple_value]
            if isinstance(binding.var, relax.DataflowVar):
                self.set_var_remap(binding.var, result)
            else:  # a dataflow output: keep the var, bind it to the folded result
                self.builder_.emit_normalized(relax.VarBinding(binding.var, result))
            return
        super().visit_var_binding_(binding)

    def _emit_fold(self, plan: _FoldPlan) -> relax.Var:
        data = self.visit_expr(plan.data)
        conv = plan.conv
        attrs = _replace_attrs(conv.attrs, out_dtype=dtype_str(conv.ty))
        conv_var = self.builder_.emit(relax.Call(conv.op, [data, plan.weight], attrs, conv.ty_args))
        bias = plan.bias
        if isinstance(bias, relax.Var):  # as the frontends spell a conv bias parameter
            bias = self.builder_.emit(relax.op.reshape(bias, plan.shape))
        return self.builder_.emit(relax.op.add(conv_var, bias))

    # -- calls: per-op canonical spelling --
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        name = op_name(call)
        if name is None:
            return call
        folded = self._fold_layout_of_constant(call, name)
        if folded is not None:
            return folded
        if name == "relax.strided_slice":
            return self._canonical_strided_slice(call)
        if name == "relax.clip":
            call = self._canonical_clip(call)
        if name in _COMMUTATIVE_OPS and len(call.args) == 2:
            lhs, rhs = call.args
            if self._weight_like(lhs) and not self._weight_like(rhs):
                call = relax.Call(call.op, [rhs, lhs], call.attrs, call.ty_args)
        if call.attrs is not None:
            new_attrs = self._canonical_attrs(call)
            if new_attrs is not None:
                call = relax.Call(call.op, call.args, new_attrs, call.ty_args)
        return call

    def _canonical_clip(self, call: relax.Call) -> relax.Call:
        """Float bounds as float64 immediates of their value in the data dtype: the kernel casts them
        to it (torch's ``relu6`` writes ``clip(x, 0, 6)`` with integers, ``hardtanh`` 0.0 / 6.0;
        torch's ``clamp(min=1e-9)`` a double, ONNX a float32)."""
        dtype = dtype_str(call.args[0].ty)
        if dtype not in ("float16", "float32", "float64"):
            return call
        bounds = []
        for bound in call.args[1:3]:
            number = getattr(bound, "value", None)
            if not isinstance(number, (int, float)):
                return call
            bounds.append(tvm.tirx.FloatImm("float64", float(np.array(number, dtype=dtype))))
        if all(tvm_ffi.structural_equal(b, n) for b, n in zip(call.args[1:3], bounds)):
            return call
        return relax.Call(call.op, [call.args[0], *bounds], call.attrs, call.ty_args)

    def _canonical_attrs(self, call: relax.Call) -> tvm.ir.Attrs | None:
        attrs = call.attrs
        info = getattr(type(attrs), "__tvm_ffi_type_info__", None)
        if info is None:
            return None
        names = {f.name for f in info.fields}
        changes: dict[str, Any] = {}
        if "out_dtype" in names and attrs.out_dtype is None:
            dtype = dtype_str(call.ty)
            if dtype:
                changes["out_dtype"] = dtype
        if "epsilon" in names and call.args:
            # Kernels add epsilon in the data dtype, so only its value in that dtype matters
            # (torch passes 1e-5 as a double, ONNX stores it as float32 9.99999974e-06).
            dtype = dtype_str(call.args[0].ty)
            if dtype in ("float16", "float32"):
                eps = float(attrs.epsilon)
                rounded = float(np.array(eps, dtype=dtype))
                if rounded != eps:
                    changes["epsilon"] = rounded
        if info.type_key == "relax.attrs.BatchNormAttrs" and not bool(attrs.training):
            # momentum only updates running statistics in training (torch says 0.1, ONNX 0.9).
            if float(attrs.momentum) != _INFERENCE_MOMENTUM:
                changes["momentum"] = _INFERENCE_MOMENTUM
        for field, kind, source in _AXIS_FIELDS.get(info.type_key, []):
            rank = _ndim(call) if source == "out" else _ndim(call.args[0]) if call.args else None
            if source == "out" and rank is None and call.args:
                rank = _ndim(call.args[0])
            if rank is None or rank < 0:
                continue
            current = getattr(attrs, field)
            if current is None:
                if kind == "sorted" and info.type_key in _ALL_AXES_WHEN_NONE:
                    changes[field] = list(range(rank))
                continue
            if kind == "axis":
                new_axis = normalize_axis(current, rank)
                if new_axis != int(current):
                    changes[field] = new_axis
                continue
            old = [int(a) for a in current]
            new = [normalize_axis(a, rank) for a in old]
            if kind == "sorted":
                new = sorted(new)
            if new != old:
                changes[field] = new
        return _replace_attrs(attrs, **changes) if changes else None

    def _canonical_strided_slice(self, call: relax.Call) -> relax.Expr:
        rank = _ndim(call.args[0])
        parts = []
        for arg in call.args[1:]:
            if not isinstance(arg, relax.Tuple) or not all(isinstance(e, tvm.tirx.IntImm) for e in arg.fields):
                return call
            parts.append([int(e.value) for e in arg.fields])
        if rank is None or len(parts) < 3:
            return call
        axes = [normalize_axis(a, rank) for a in parts[0]]
        order = sorted(range(len(axes)), key=lambda i: axes[i])
        if axes == parts[0] and order == list(range(len(axes))):
            return call
        begin, end = [parts[1][i] for i in order], [parts[2][i] for i in order]
        strides = [parts[3][i] for i in order] if len(parts) > 3 else None
        new = relax.op.strided_slice(
            call.args[0], [axes[i] for i in order], begin, end, strides, bool(call.attrs.assume_inbound)
        )
        return self.builder_.normalize(new)

    def _fold_layout_of_constant(self, call: relax.Call, name: str) -> relax.Expr | None:
        if name not in _LAYOUT_OPS or not call.args or not isinstance(call.args[0], tvm.ir.GenericConst):
            return None
        value = call.args[0].value
        if not isinstance(value, tvm.runtime.Tensor):
            return None
        out_shape = static_shape(call.ty)
        if out_shape is None:
            return None
        arr = value.numpy()
        if name == "relax.permute_dims":
            axes = call.attrs.axes
            arr = np.transpose(arr, None if axes is None else [int(a) for a in axes])
        arr = np.ascontiguousarray(arr).reshape(out_shape)
        return relax.const(arr, str(value.dtype))

    def _weight_like(self, expr: relax.Expr) -> bool:
        """A constant, a weight parameter, or a value computed from those only."""
        if isinstance(expr, tvm.ir.GenericConst):
            return True
        if not isinstance(expr, relax.Var):
            return False
        if expr in self.weight_vars:
            return True
        if expr in self.weight_like_memo:
            return self.weight_like_memo[expr]
        value = self.lookup_binding(expr)
        result = False
        if isinstance(value, tvm.ir.GenericConst):
            result = True
        elif op_name(value) is not None:
            tensor_args = [a for a in value.args if isinstance(a.ty, (relax.TensorType, relax.TupleType))]
            result = bool(tensor_args) and all(self._weight_like(a) for a in tensor_args)
        elif isinstance(value, relax.TupleGetItem):
            result = self._weight_like(value.tuple_value)
        self.weight_like_memo[expr] = result
        return result
