"""HorizontalMerge: run structurally equal ops of different models as one wide op (the NetFuse idea).

Several models merged into one ``main`` (:func:`gmorph_tvm.import_models`, usually after
:class:`StitchSharedWeights`) still run every model's layers as separate kernels, even where the
layers have the same shape and differ only in their weights. This pass rewrites each Relax
function so that such ops run once, on a *wide* tensor that holds every branch side by side
(concatenated along the channel / feature axis):

* **Same input** — convs (``groups=1``), matmuls with weights, or embedding lookups (``take``)
  that read the same value (the first layer of every model, heads after a stitched trunk) become
  one conv with the output channels concatenated / one matmul with the weight columns
  concatenated / one lookup in the column-concatenated tables; widths may differ per branch.
* **Lockstep** — N branches that read different values of the same shape and continue with the
  same ops: a conv becomes one grouped conv (``groups = N * groups``, weights stacked), a matmul on
  the feature axis becomes one batched matmul (the wide ``(..., N*F)`` tensor is reshaped —
  without a copy — to ``(..., N, 1, F)`` and multiplied with the stacked ``(N, F, O)`` weights).
  Where the branches read different values a ``concat`` builds the wide tensor once.
* The region then follows the branches through whole chains and DAGs, op by op, as long as every
  branch does the same thing: bias adds and other elementwise ops with per-branch weights (the
  weights are concatenated), ``batch_norm``, activations, pooling, reductions and reshapes that keep
  each branch's block contiguous, ``permute_dims``, residual adds and gates of two wide values,
  softmax on another axis, ``layer_norm`` (normalized per branch, the per-branch affine part as a
  wide multiply/add), and matmuls of two wide values batched along the branch axis (attention).
  Only where the branches end or diverge does one ``split`` hand each branch its part.

Not merged (left as they are, correctly): same-input grouped/depthwise convs, lockstep convs or
matmuls whose branches have different shapes, reshapes that interleave the branch axis with a
leading batch dimension (e.g. attention heads at batch > 1), ops whose branches differ.

Merged weights are computed at pass time, so no ``concat`` of weights runs at inference: with
weights as parameters (``main(*inputs, *weights)``, values in attrs ``params``) each merged weight
becomes a new parameter named ``merged.<w1>+<w2>...`` whose attrs ``gmorph.provenance`` entry lists
every original it holds (in concatenation order); parameters no longer used are dropped. With
weights bound as constants, the merged weight is a new constant.

Whether a region is merged is decided by :class:`~gmorph_tvm.passes.cost_model.MergeCostModel`
(``mode="auto"``): saved kernel launches against the bytes the added ``concat``/``split`` copy.
``mode="always"`` merges every region, ``mode="never"`` leaves the module unchanged.

What is preserved: the function signature (except weight parameters, as above), its attrs, and
the results — every rewrite computes the same arithmetic per element (a grouped conv computes each
group exactly as the separate conv; concatenation only moves data), so outputs match the
unmerged module to float32 rounding of the compiled kernels' reduction order.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from ..core.ir import dtype_str, nbytes, normalize_axis, op_name, static_shape
from ._util import merge_entries, raw_provenance, rebuild_function, weight_params
from .cost_model import MergeCost, MergeCostModel, MergeOptionError

MergeMode = Literal["auto", "always", "never"]

# Ops applied per element / per position whose extra operands (if any) are non-tensor attrs.
_UNARY_OPS = frozenset(
    "relax." + name
    for name in (
        "nn.relu", "nn.gelu", "nn.gelu_tanh", "nn.silu", "nn.leakyrelu", "nn.softplus", "nn.selu",
        "sigmoid", "tanh", "clip", "exp", "log", "erf", "sqrt", "rsqrt", "negative", "abs", "square",
        "astype", "floor", "ceil", "round", "sign", "sin", "cos", "trunc",
    )
)
_BINARY_OPS = frozenset(
    "relax." + name
    for name in ("add", "subtract", "multiply", "divide", "maximum", "minimum", "power", "floor_divide")
)
# Pooling ops: layout attr -> channel axis must be the branch axis.
_POOL_OPS = frozenset(
    "relax.nn." + name
    for name in (
        "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    )
)
_REDUCE_OPS = frozenset("relax." + n for n in ("mean", "sum", "max", "min", "prod", "variance", "std"))
_RESHAPE_OPS = frozenset(("relax.reshape", "relax.flatten", "relax.squeeze", "relax.expand_dims"))
_CONV_OPS = {"relax.nn.conv1d": ("NCW", "OIW"), "relax.nn.conv2d": ("NCHW", "OIHW")}
# Ops that remain kernels of their own after FuseOps (what merging saves launches of).
_HEAVY_OPS = frozenset(_CONV_OPS) | {"relax.matmul"} | _POOL_OPS | _REDUCE_OPS | {
    "relax.nn.softmax", "relax.nn.log_softmax", "relax.nn.layer_norm", "relax.take",
}
# Weight-only bindings the pass can evaluate with numpy (to read a weight's value at pass time).
_WEIGHT_LAYOUT_OPS = frozenset(
    ("relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze", "relax.flatten",
     "relax.astype", "relax.broadcast_to")
)


# ---- the pass -----------------------------------------------------------------------------------


@tvm.transform.module_pass(opt_level=0, name="HorizontalMerge")
class HorizontalMerge:
    """Merge same-shaped ops of different models into wide ops (see the module docstring).

    Parameters
    ----------
    mode:
        ``"auto"`` merges a region when ``cost_model`` says it pays, ``"always"`` merges every
        region found, ``"never"`` returns the module unchanged.
    cost_model:
        The launch-vs-copy rule; default :meth:`MergeCostModel.for_target` of ``target``.
    target:
        Target whose default cost numbers to use (``None``: CPU numbers).
    min_branches:
        Smallest number of branches worth a wide op (at least 2).

    After the pass ran, ``last_report`` holds one :class:`RegionReport` per region considered.
    """

    def __init__(
        self,
        mode: MergeMode = "auto",
        cost_model: MergeCostModel | None = None,
        target=None,
        min_branches: int = 2,
    ) -> None:
        if mode not in ("auto", "always", "never"):
            raise MergeOptionError(f"HorizontalMerge: mode must be 'auto', 'always' or 'never', got {mode!r}")
        self.mode = mode
        self.cost_model = cost_model or MergeCostModel.for_target(target)
        self.min_branches = max(2, int(min_branches))
        self.last_report: list[RegionReport] = []

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.last_report = []
        if self.mode == "never":
            return mod
        out = mod.clone()
        for gvar, func in mod.functions_items():
            if not isinstance(func, relax.Function) or (func.attrs and "Primitive" in func.attrs):
                continue
            new_func, report = _merge_function(func, self.mode, self.cost_model, self.min_branches)
            self.last_report.extend(report)
            if new_func is not func:
                out[gvar] = new_func
        return out


@dataclass(frozen=True)
class RegionReport:
    """One merge region: its branches, what merging it saves and costs, and whether it was merged."""

    branches: int
    ops: tuple[str, ...]  # op of each merged tuple, in order
    cost: MergeCost
    saved_us: float
    merged: bool


def horizontal_merge(mm, mode: MergeMode = "auto", cost_model: MergeCostModel | None = None, target=None):
    """``mm`` (a :class:`~gmorph_tvm.MultiModel`) with :class:`HorizontalMerge` applied to its module;
    each merged weight's provenance lists every original weight (task, name) it holds."""
    return mm.apply(HorizontalMerge(mode=mode, cost_model=cost_model, target=target))


# ---- helpers on types ---------------------------------------------------------------------------


def _shape(expr: relax.Expr) -> tuple[int, ...] | None:
    return static_shape(expr.ty, first_field=True)


def _dtype(expr: relax.Expr) -> str | None:
    return dtype_str(expr.ty, first_field=True)


_nbytes, _norm_axis, _op_name = nbytes, normalize_axis, op_name


def _args_of(value: relax.Expr) -> list[relax.Expr]:
    if isinstance(value, relax.Call):
        return list(value.args)
    if isinstance(value, relax.TupleGetItem):
        return [value.tuple_value]
    return []


def _same_kind(a: relax.Expr, b: relax.Expr) -> bool:
    """Same op (or same TupleGetItem index), equal attrs, same arity and result dtype/rank."""
    if isinstance(a, relax.TupleGetItem):
        return isinstance(b, relax.TupleGetItem) and a.index == b.index
    if not (isinstance(a, relax.Call) and isinstance(b, relax.Call)):
        return False
    if not (isinstance(a.op, tvm.ir.Op) and a.op.same_as(b.op)) or len(a.args) != len(b.args):
        return False
    if (a.attrs is None) != (b.attrs is None):
        return False
    return a.attrs is None or bool(tvm_ffi.structural_equal(a.attrs, b.attrs))


def _vars_in(expr: relax.Expr) -> list[relax.Var]:
    found, seen = [], set()

    def visit(node):
        if isinstance(node, relax.Var) and node not in seen:
            seen.add(node)
            found.append(node)

    relax.analysis.post_order_visit(expr, visit)
    return found


# ---- weights: values at pass time ---------------------------------------------------------------


class _Weights:
    """Reads the value of weight-only expressions (weight params, constants, layout ops of them)."""

    def __init__(self, func: relax.Function, bindings: dict[relax.Var, relax.Expr]) -> None:
        self.params = {var: value for var, value in weight_params(func)}
        self.bindings = bindings
        self._cache: dict[relax.Expr, tuple[np.ndarray, tuple[str, ...]] | None] = {}

    def resolve(self, expr: relax.Expr) -> tuple[np.ndarray, tuple[str, ...]] | None:
        """(value, names of the weight params it comes from) or None if not a weight."""
        if expr in self._cache:
            return self._cache[expr]
        result = self._resolve(expr)
        self._cache[expr] = result
        return result

    def _resolve(self, expr):
        if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
            return expr.value.numpy(), ()
        if isinstance(expr, relax.Var):
            if expr in self.params:
                return self.params[expr].numpy(), (expr.name,)
            value = self.bindings.get(expr)
            return None if value is None else self.resolve(value)
        name = _op_name(expr)
        if name not in _WEIGHT_LAYOUT_OPS:
            return None
        inner = self.resolve(expr.args[0])
        out_shape = _shape(expr)
        if inner is None or out_shape is None:
            return None
        value, sources = inner
        if name == "relax.permute_dims":
            axes = expr.attrs.axes
            value = np.transpose(value, None if axes is None else [int(a) for a in axes])
        elif name == "relax.astype":
            value = value.astype(_dtype(expr))
        elif name == "relax.broadcast_to":
            value = np.broadcast_to(value, out_shape)
        else:
            value = np.reshape(value, out_shape)
        if tuple(value.shape) != out_shape:
            return None
        return np.ascontiguousarray(value), sources


# ---- planning: which bindings run as one wide op ------------------------------------------------


@dataclass
class _Cat:
    """How one operand position looks across the branches of a candidate tuple."""

    kind: str  # "wide" (members of a wide tuple), "same", "weight", "distinct"
    args: list[relax.Expr]
    tid: int = -1  # for "wide"
    values: list[np.ndarray] | None = None  # for "weight" (and resolvable "same")
    sources: list[tuple[str, ...]] | None = None


@dataclass
class _Spec:
    """How to compute the wide value of a tuple, and its layout."""

    axis: int
    widths: list[int]
    recipe: Callable[[_Emitter], relax.Expr]
    wide_deps: list[int] = field(default_factory=list)
    orig_deps: list[relax.Var] = field(default_factory=list)
    entry_bytes: int = 0  # bytes copied by concat entries of this recipe
    entries: int = 0


@dataclass
class _Tuple:
    """N bindings (one per branch) computed by one wide op."""

    tid: int
    members: list[relax.Var]
    positions: list[int]
    op: str
    spec: _Spec
    heavy: bool
    is_tuple_typed: bool


class _Emitter:
    """What a recipe may use while the rewriter emits the merged block."""

    def __init__(self, rewriter: _Rewriter) -> None:
        self._rw = rewriter

    def wide(self, tid: int) -> relax.Expr:
        return self._rw.wide_vars[tid]

    def orig(self, var: relax.Expr) -> relax.Expr:
        return self._rw.visit_expr(var)

    def emit(self, expr: relax.Expr) -> relax.Var:
        return self._rw.builder_.emit(expr)

    def weight(self, value: np.ndarray, sources: Sequence[tuple[str, ...]]) -> relax.Expr:
        return self._rw.new_weight(value, sources)


def _concat_weights(values: Sequence[np.ndarray], axis: int) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(values, axis=axis))


class _Planner:
    """Finds merge regions in one dataflow block."""

    def __init__(self, block: relax.DataflowBlock, weights: _Weights, min_branches: int) -> None:
        self.bindings = list(block.bindings)
        self.weights = weights
        self.min_branches = min_branches
        self.pos = {b.var: i for i, b in enumerate(self.bindings)}
        self.users: dict[relax.Var, list[int]] = {}
        self.deps: list[list[int]] = []
        for i, b in enumerate(self.bindings):
            dep = []
            for var in _vars_in(b.value):
                self.users.setdefault(var, []).append(i)
                if var in self.pos:
                    dep.append(self.pos[var])
            self.deps.append(dep)
        self._ancestors: list[int] | None = None
        self.tuples: list[_Tuple] = []
        self.member_of: dict[relax.Var, tuple[int, int]] = {}
        self.claimed: set[int] = set()
        self.claimed_mask = 0  # bitmask of self.claimed
        self.regions: list[list[int]] = []

    # -- queries ---------------------------------------------------------------------------------
    def ancestors(self, i: int) -> int:
        """Bitmask of the bindings binding ``i`` depends on (transitively)."""
        if self._ancestors is None:
            anc = []
            for deps in self.deps:
                mask = 0
                for d in deps:
                    mask |= anc[d] | (1 << d)
                anc.append(mask)
            self._ancestors = anc
        return self._ancestors[i]

    def categorize(self, args: list[relax.Expr]) -> _Cat | None:
        first = args[0]
        if any(isinstance(a, relax.Var) and a in self.member_of for a in args):
            return None  # a wide member in a non-matching position (cross-branch use)
        if all(a.same_as(first) or _struct_equal(a, first) for a in args[1:]):
            resolved = self.weights.resolve(first) if _is_tensor(first) else None
            if resolved is None:
                return _Cat("same", args)
            return _Cat("same", args, values=[resolved[0]] * len(args), sources=[resolved[1]] * len(args))
        resolved = [self.weights.resolve(a) for a in args]
        if all(r is not None for r in resolved):
            return _Cat("weight", args, values=[r[0] for r in resolved], sources=[r[1] for r in resolved])
        shapes = {(_shape(a), _dtype(a)) for a in args}
        if all(isinstance(a, relax.Var) and _is_tensor(a) for a in args) and len(shapes) == 1:
            if None not in next(iter(shapes)):
                return _Cat("distinct", args)
        return None

    # -- seeds and growth ----------------------------------------------------------------------------
    def plan(self) -> None:
        anchors = [i for i, b in enumerate(self.bindings) if self._is_anchor(b.value)]
        # 1. Same input: convs / matmuls reading one value.
        groups: dict[tuple, list[int]] = {}
        for i in anchors:
            key = self._same_input_key(self.bindings[i].value)
            if key is not None:
                groups.setdefault(key, []).append(i)
        for members in sorted(groups.values(), key=lambda m: m[0]):
            members = [i for i in members if i not in self.claimed]
            if len(members) >= self.min_branches:
                self._try_seed(members)
        # 2. Lockstep from different inputs: same op, same shapes, independent of each other.
        groups = {}
        for i in anchors:
            if i in self.claimed:
                continue
            value = self.bindings[i].value
            if value.op.name == "relax.take":
                continue
            key = (value.op.name, _attrs_key(value), _shape(value.args[0]), _shape(value.args[1]), _dtype(value))
            groups.setdefault(key, []).append(i)
        for candidates in sorted(groups.values(), key=lambda m: m[0]):
            remaining = list(candidates)
            while len(remaining) >= self.min_branches:
                chosen = [remaining[0]]
                for i in remaining[1:]:
                    if all(not self._depends(i, j) and not self._depends(j, i) for j in chosen):
                        chosen.append(i)
                if len(chosen) >= self.min_branches and self._try_seed(chosen):
                    remaining = [i for i in remaining if i not in self.claimed]
                else:
                    remaining = remaining[1:]

    def _depends(self, i: int, j: int) -> bool:
        """Binding ``i`` depends (transitively) on binding ``j``."""
        return bool((self.ancestors(i) >> j) & 1)

    def _is_anchor(self, value: relax.Expr) -> bool:
        name = _op_name(value)
        if name == "relax.take":  # embedding lookup: table weight, indices
            table = self.weights.resolve(value.args[0])
            return (
                table is not None and table[0].ndim == 2 and int(value.attrs.axis) == 0
                and isinstance(value.args[1], relax.Var) and self.weights.resolve(value.args[1]) is None
            )
        if name not in _CONV_OPS and name != "relax.matmul":
            return False
        if _shape(value) is None or self.weights.resolve(value.args[1]) is None:
            return False
        return self.weights.resolve(value.args[0]) is None  # weight @ weight is for FoldConstant

    def _same_input_key(self, value: relax.Call) -> tuple | None:
        if value.op.name == "relax.take":
            table = _shape(value.args[0])
            return ("take", value.args[1], table[0], _attrs_key(value), _dtype(value))
        data = value.args[0]
        if not isinstance(data, relax.Var):
            return None
        wshape = _shape(value.args[1])
        if wshape is None:
            return None
        if value.op.name == "relax.matmul":
            if len(wshape) != 2:
                return None
            return ("matmul", data, wshape[0], _attrs_key(value), _dtype(value))
        if int(value.attrs.groups) != 1:
            return None
        return (value.op.name, data, wshape[1:], _attrs_key(value), _dtype(value))

    def _try_seed(self, members: list[int]) -> bool:
        region = len(self.regions)
        calls = [self.bindings[i].value for i in members]
        cats = [self.categorize([c.args[p] for c in calls]) for p in range(len(calls[0].args))]
        if any(c is None for c in cats):
            return False
        spec = self._widen(members, calls, cats)
        if spec is None:
            return False
        self.regions.append([])
        self._add_tuple(members, spec, region)
        self._grow(region)
        return True

    def _add_tuple(self, members: list[int], spec: _Spec, region: int) -> _Tuple:
        value = self.bindings[members[0]].value
        name = _op_name(value) or "TupleGetItem"
        t = _Tuple(
            tid=len(self.tuples),
            members=[self.bindings[i].var for i in members],
            positions=list(members),
            op=name,
            spec=spec,
            heavy=name in _HEAVY_OPS,
            is_tuple_typed=isinstance(self.bindings[members[0]].var.ty, relax.TupleType),
        )
        self.tuples.append(t)
        self.regions[region].append(t.tid)
        for branch, i in enumerate(members):
            self.claimed.add(i)
            self.claimed_mask |= 1 << i
            self.member_of[self.bindings[i].var] = (t.tid, branch)
        return t

    def _grow(self, region: int) -> None:
        queue = list(self.regions[region])
        while queue:
            t = self.tuples[queue.pop(0)]
            for u0 in list(self.users.get(t.members[0], [])):
                if u0 in self.claimed:
                    continue
                members = self._match(u0)
                if members is None:
                    continue
                calls = [self.bindings[i].value for i in members]
                cats = self._categories(calls)
                if cats is None:
                    continue
                spec = self._widen(members, calls, cats)
                if spec is None:
                    continue
                queue.append(self._add_tuple(members, spec, region).tid)

    def _match(self, u0: int) -> list[int] | None:
        """Counterparts of binding ``u0`` (which reads branch-0 members) in the other branches."""
        value0 = self.bindings[u0].value
        args0 = _args_of(value0)
        wide_pos: dict[int, int] = {}
        for p, arg in enumerate(args0):
            if isinstance(arg, relax.Var) and arg in self.member_of:
                tid, branch = self.member_of[arg]
                if branch != 0:
                    return None
                wide_pos[p] = tid
        if not wide_pos:
            return None
        n = {len(self.tuples[tid].members) for tid in wide_pos.values()}
        if len(n) != 1:
            return None
        n = n.pop()
        first_p = min(wide_pos)
        chosen = [u0]
        for branch in range(1, n):
            anchor = self.tuples[wide_pos[first_p]].members[branch]
            found = None
            for ui in self.users.get(anchor, []):
                if ui in self.claimed or ui in chosen:
                    continue
                value = self.bindings[ui].value
                if not _same_kind(value0, value) or _dtype(value) != _dtype(value0):
                    continue
                args = _args_of(value)
                ok = True
                for p, arg in enumerate(args):
                    if p in wide_pos:
                        ok = arg.same_as(self.tuples[wide_pos[p]].members[branch])
                    else:
                        ok = not (isinstance(arg, relax.Var) and arg in self.member_of)
                    if not ok:
                        break
                if ok:
                    found = ui
                    break
            if found is None:
                return None
            chosen.append(found)
        # Non-wide operands must not depend on the region (that would make a cycle).
        region_mask = self.claimed_mask
        for i in chosen:
            for p, arg in enumerate(_args_of(self.bindings[i].value)):
                if p in wide_pos:
                    continue
                for var in _vars_in(arg):
                    j = self.pos.get(var)
                    if j is not None and ((self.ancestors(j) | (1 << j)) & region_mask):
                        return None
        for i in chosen:  # branches must be independent of one another
            if any(self._depends(i, j) for j in chosen if j != i):
                return None
        return chosen

    def _categories(self, calls: list[relax.Expr]) -> list[_Cat] | None:
        cats = []
        for p in range(len(_args_of(calls[0]))):
            args = [_args_of(c)[p] for c in calls]
            if isinstance(args[0], relax.Var) and args[0] in self.member_of:
                cats.append(_Cat("wide", args, tid=self.member_of[args[0]][0]))
                continue
            cat = self.categorize(args)
            if cat is None:
                return None
            cats.append(cat)
        return cats

    # -- op rules ------------------------------------------------------------------------------------
    def _widen(self, members: list[int], calls: list[relax.Expr], cats: list[_Cat]) -> _Spec | None:
        """The wide computation for ``calls`` (one per branch), or None when it cannot merge."""
        out_shapes = [_shape(c) for c in calls]
        if any(s is None for s in out_shapes) and not isinstance(calls[0], relax.TupleGetItem):
            return None
        if isinstance(calls[0], relax.TupleGetItem):
            return self._widen_tuple_get_item(calls, cats)
        name = calls[0].op.name
        if name in _CONV_OPS:
            return self._widen_conv(calls, cats)
        if name == "relax.matmul":
            return self._widen_matmul(calls, cats)
        if name == "relax.take":
            return self._widen_take(calls, cats)
        if name in _BINARY_OPS:  # the wide operand may come second (torch's add(bias, x))
            return self._widen_binary(calls, cats, out_shapes)
        if cats[0].kind != "wide":
            return None
        if name in _UNARY_OPS:
            if any(c.kind != "same" or _is_tensor(c.args[0]) for c in cats[1:]):
                return None
            return self._same_op(calls, cats, self._axis_after_elementwise(cats[0], out_shapes))
        if name == "relax.nn.batch_norm":
            return self._widen_batch_norm(members, calls, cats)
        if name == "relax.nn.layer_norm":
            return self._widen_layer_norm(calls, cats)
        if name in _POOL_OPS:
            layout = str(calls[0].attrs.layout)
            t = self.tuples[cats[0].tid]
            if layout[:2] != "NC" or str(calls[0].attrs.out_layout) != layout or t.spec.axis != 1:
                return None
            return self._same_op(calls, cats, 1)
        if name in _REDUCE_OPS:
            return self._widen_reduce(calls, cats)
        if name in ("relax.nn.softmax", "relax.nn.log_softmax"):
            t = self.tuples[cats[0].tid]
            rank = len(_shape(cats[0].args[0]))
            if _norm_axis(int(calls[0].attrs.axis), rank) == t.spec.axis:
                return None
            return self._same_op(calls, cats, t.spec.axis)
        if name in _RESHAPE_OPS or name == "relax.broadcast_to":
            return self._widen_reshape(calls, cats, out_shapes)
        if name == "relax.permute_dims":
            t = self.tuples[cats[0].tid]
            rank = len(out_shapes[0])
            axes = calls[0].attrs.axes
            axes = list(range(rank))[::-1] if axes is None else [_norm_axis(int(a), rank) for a in axes]
            return self._same_op(calls, cats, axes.index(t.spec.axis))
        return None

    def _axis_after_elementwise(self, cat: _Cat, out_shapes) -> int | None:
        t = self.tuples[cat.tid]
        in_shapes = [_shape(a) for a in cat.args]
        return t.spec.axis if in_shapes == out_shapes else None

    def _same_op(self, calls, cats: list[_Cat], axis: int | None) -> _Spec | None:
        """The op itself on the wide value (other operands identical across branches)."""
        if axis is None:
            return None
        t = self.tuples[cats[0].tid]
        out_shapes = [_shape(c) for c in calls]
        widths = [s[axis] for s in out_shapes]
        if not _layout_ok(out_shapes, axis):
            return None
        call0 = calls[0]
        tid = t.tid

        def recipe(em: _Emitter) -> relax.Expr:
            args = [em.wide(tid)] + [em.orig(a) for a in call0.args[1:]]
            return relax.Call(call0.op, args, call0.attrs, call0.ty_args)

        return _Spec(axis, widths, recipe, wide_deps=[tid], orig_deps=_deps_of(call0.args[1:]))

    def _wide_operand(self, cat: _Cat, axis: int, rank: int, shapes: list[tuple[int, ...]]):
        """Operand getter for a per-branch operand that must be wide along ``axis`` (of ``rank``).

        "wide": the tuple's wide value; "distinct": a concat of the branch values (an entry copy).
        Returns (getter, wide_deps, orig_deps, entry_bytes, entries) or None.
        """
        if cat.kind == "wide":
            t = self.tuples[cat.tid]
            if t.spec.axis != axis or [s[axis] for s in shapes] != t.spec.widths:
                return None
            tid = t.tid
            return (lambda em: em.wide(tid)), [tid], [], 0, 0
        if cat.kind == "distinct":
            args = list(cat.args)
            shape = list(shapes[0])
            shape[axis] = sum(s[axis] for s in shapes)
            nbytes = 2 * _nbytes(shape, _dtype(args[0]))

            def concat(em: _Emitter) -> relax.Expr:
                return em.emit(relax.op.concat([em.orig(a) for a in args], axis=axis))

            return concat, [], list(args), nbytes, 1
        return None

    def _widen_conv(self, calls, cats) -> _Spec | None:
        call0 = calls[0]
        attrs = call0.attrs
        data_layout, kernel_layout = _CONV_OPS[call0.op.name]
        if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != (
            data_layout, kernel_layout, data_layout
        ):
            return None
        wcat = cats[1]
        if wcat.values is None:
            return None
        groups = int(attrs.groups)
        out_dtype = _dtype(call0)
        conv = relax.op.nn.conv2d if call0.op.name == "relax.nn.conv2d" else relax.op.nn.conv1d
        sources = wcat.sources
        out_shapes = [_shape(c) for c in calls]
        if cats[0].kind == "same":  # one input, output channels concatenated
            if groups != 1 or len({v.shape[1:] for v in wcat.values}) != 1:
                return None
            weight = _concat_weights(wcat.values, 0)
            widths = [s[1] for s in out_shapes]
            data = call0.args[0]

            def recipe(em: _Emitter) -> relax.Expr:
                return conv(
                    em.orig(data), em.weight(weight, sources), attrs.strides, attrs.padding, attrs.dilation,
                    1, data_layout, kernel_layout, data_layout, out_dtype,
                )

            return _Spec(1, widths, recipe, orig_deps=[data] if isinstance(data, relax.Var) else [])
        # Lockstep: different inputs of one shape -> one grouped conv.
        in_shapes = [_shape(a) for a in cats[0].args]
        if len({v.shape for v in wcat.values}) != 1 or len(set(in_shapes)) != 1 or len(set(out_shapes)) != 1:
            return None
        operand = self._wide_operand(cats[0], 1, len(in_shapes[0]), in_shapes)
        if operand is None:
            return None
        getter, wide_deps, orig_deps, entry_bytes, entries = operand
        n = len(calls)
        weight = _concat_weights(wcat.values, 0)

        def recipe(em: _Emitter) -> relax.Expr:
            return conv(
                getter(em), em.weight(weight, sources), attrs.strides, attrs.padding, attrs.dilation,
                groups * n, data_layout, kernel_layout, data_layout, out_dtype,
            )

        return _Spec(1, [s[1] for s in out_shapes], recipe, wide_deps, orig_deps, entry_bytes, entries)

    def _widen_matmul(self, calls, cats) -> _Spec | None:
        call0 = calls[0]
        out_dtype = _dtype(call0)
        out_shapes = [_shape(c) for c in calls]
        lhs, rhs = cats
        if rhs.kind == "wide" and lhs.kind == "wide":
            return self._widen_batched_matmul(calls, cats, out_shapes)
        if rhs.values is None or any(v.ndim != 2 for v in rhs.values):
            return None
        rank = len(out_shapes[0])
        if lhs.kind == "same":  # one input, weight columns concatenated
            if len({v.shape[0] for v in rhs.values}) != 1:
                return None
            weight = _concat_weights(rhs.values, 1)
            sources, data = rhs.sources, call0.args[0]

            def recipe(em: _Emitter) -> relax.Expr:
                return relax.op.matmul(em.orig(data), em.weight(weight, sources), out_dtype=out_dtype)

            widths = [s[-1] for s in out_shapes]
            return _Spec(rank - 1, widths, recipe, orig_deps=[data] if isinstance(data, relax.Var) else [])
        # Lockstep on the feature axis: (..., N*F) -> (..., N, 1, F) @ (N, F, O) -> (..., N*O).
        in_shapes = [_shape(a) for a in lhs.args]
        if len({v.shape for v in rhs.values}) != 1 or len(set(in_shapes)) != 1:
            return None
        in_rank = len(in_shapes[0])
        operand = self._wide_operand(lhs, in_rank - 1, in_rank, in_shapes)
        if operand is None:
            return None
        getter, wide_deps, orig_deps, entry_bytes, entries = operand
        n = len(calls)
        features, outs = rhs.values[0].shape
        prefix = list(in_shapes[0][:-1])
        weight = np.ascontiguousarray(np.stack(rhs.values, axis=0))
        sources = rhs.sources

        def recipe(em: _Emitter) -> relax.Expr:
            grouped = em.emit(relax.op.reshape(getter(em), prefix + [n, 1, features]))
            product = em.emit(relax.op.matmul(grouped, em.weight(weight, sources), out_dtype=out_dtype))
            return relax.op.reshape(product, prefix + [n * outs])

        return _Spec(in_rank - 1, [outs] * n, recipe, wide_deps, orig_deps, entry_bytes, entries)

    def _widen_batched_matmul(self, calls, cats, out_shapes) -> _Spec | None:
        """Both operands wide along a batch axis: the matmul itself, on the wide values."""
        rank = len(out_shapes[0])
        axes = set()
        for cat in cats:
            t = self.tuples[cat.tid]
            r = len(_shape(cat.args[0]))
            if t.spec.axis >= r - 2:
                return None
            axes.add(t.spec.axis + rank - r)
            if [_shape(a)[t.spec.axis] for a in cat.args] != [s[t.spec.axis + rank - r] for s in out_shapes]:
                return None
        if len(axes) != 1:
            return None
        axis = axes.pop()
        if not _layout_ok(out_shapes, axis):
            return None
        call0, (lt, rt) = calls[0], (cats[0].tid, cats[1].tid)

        def recipe(em: _Emitter) -> relax.Expr:
            return relax.Call(call0.op, [em.wide(lt), em.wide(rt)], call0.attrs)

        return _Spec(axis, [s[axis] for s in out_shapes], recipe, wide_deps=[lt, rt])

    def _widen_binary(self, calls, cats, out_shapes) -> _Spec | None:
        rank = len(out_shapes[0])
        axis = None
        for cat in cats:
            if cat.kind == "wide":
                t = self.tuples[cat.tid]
                aligned = t.spec.axis + rank - len(_shape(cat.args[0]))
                if axis is not None and aligned != axis:
                    return None
                axis = aligned
        if axis is None or not _layout_ok(out_shapes, axis):
            return None
        widths = [s[axis] for s in out_shapes]
        getters, wide_deps, orig_deps = [], [], []
        entry_bytes = entries = 0
        for cat in cats:
            shapes = [_shape(a) for a in cat.args] if _is_tensor(cat.args[0]) else None
            if cat.kind == "wide":
                r = len(shapes[0])
                a = axis - (rank - r)
                if [s[a] for s in shapes] != widths or self.tuples[cat.tid].spec.widths != widths:
                    return None  # would broadcast along the branch axis
                tid = cat.tid
                getters.append(lambda em, tid=tid: em.wide(tid))
                wide_deps.append(tid)
            elif cat.kind == "same" and (shapes is None or _broadcasts_along(shapes[0], axis, rank)):
                arg = cat.args[0]
                getters.append(lambda em, arg=arg: em.orig(arg))
                orig_deps.extend(_deps_of([arg]))
            elif cat.values is not None:  # per-branch weights -> one concatenated weight
                value = _stack_elementwise_operand(cat.values, axis, rank, out_shapes)
                if value is None:
                    return None
                sources = cat.sources
                getters.append(lambda em, value=value, sources=sources: em.weight(value, sources))
            elif cat.kind == "distinct" and shapes == out_shapes:
                operand = self._wide_operand(cat, axis, rank, shapes)
                if operand is None:
                    return None
                getter, _, deps, nbytes, count = operand
                getters.append(getter)
                orig_deps.extend(deps)
                entry_bytes += nbytes
                entries += count
            else:
                return None
        call0 = calls[0]

        def recipe(em: _Emitter) -> relax.Expr:
            return relax.Call(call0.op, [g(em) for g in getters], call0.attrs)

        return _Spec(axis, widths, recipe, wide_deps, orig_deps, entry_bytes, entries)

    def _widen_batch_norm(self, members, calls, cats) -> _Spec | None:
        t = self.tuples[cats[0].tid]
        call0 = calls[0]
        in_shapes = [_shape(a) for a in cats[0].args]
        rank = len(in_shapes[0])
        if _norm_axis(int(call0.attrs.axis), rank) != t.spec.axis:
            return None
        for var in (self.bindings[i].var for i in members):
            for ui in self.users.get(var, []):
                use = self.bindings[ui].value
                if not (isinstance(use, relax.TupleGetItem) and use.index == 0):
                    return None  # mean/var outputs are per branch: keep BN separate
        params = []
        for cat in cats[1:]:
            if cat.values is None or any(v.ndim != 1 for v in cat.values):
                return None
            params.append((_concat_weights(cat.values, 0), cat.sources))
        tid = t.tid

        def recipe(em: _Emitter) -> relax.Expr:
            args = [em.wide(tid)] + [em.weight(v, s) for v, s in params]
            return relax.Call(call0.op, args, call0.attrs)

        return _Spec(t.spec.axis, list(t.spec.widths), recipe, wide_deps=[tid])

    def _widen_take(self, calls, cats) -> _Spec | None:
        """Embedding lookups of one index tensor: one lookup in the column-concatenated tables."""
        table, indices = cats
        if indices.kind != "same" or table.values is None or len({v.shape[0] for v in table.values}) != 1:
            return None
        if any(v.ndim != 2 for v in table.values) or int(calls[0].attrs.axis) != 0:
            return None
        merged, sources, call0 = _concat_weights(table.values, 1), table.sources, calls[0]
        out_shapes = [_shape(c) for c in calls]
        axis = len(out_shapes[0]) - 1

        def recipe(em: _Emitter) -> relax.Expr:
            return relax.Call(call0.op, [em.weight(merged, sources), em.orig(call0.args[1])], call0.attrs)

        return _Spec(axis, [s[-1] for s in out_shapes], recipe, orig_deps=_deps_of([call0.args[1]]))

    def _widen_layer_norm(self, calls, cats) -> _Spec | None:
        """Layer norm without its affine part on the wide value, then per-branch scale and shift.

        Normalizing over the branch axis itself (features last) first reshapes ``(..., N*F)`` to
        ``(..., N, F)`` so each branch is normalized on its own.
        """
        t = self.tuples[cats[0].tid]
        call0, attrs = calls[0], calls[0].attrs
        in_shape = _shape(cats[0].args[0])
        rank, n = len(in_shape), len(calls)
        axes = sorted(_norm_axis(int(a), rank) for a in attrs.axes)
        gamma, beta = cats[1], cats[2]
        if gamma.values is None or beta.values is None or any(_shape(a) != in_shape for a in cats[0].args):
            return None
        norm_shape = [in_shape[d] for d in axes]
        dtype = _dtype(call0)
        axis = t.spec.axis
        if axis in axes:
            if axes != [rank - 1] or axis != rank - 1 or len(set(t.spec.widths)) != 1:
                return None
            split_shape = list(in_shape[:-1]) + [n, in_shape[-1]]
            work_axes = [rank]
            scale = np.stack([v.reshape(norm_shape) for v in gamma.values]).reshape(split_shape[-2:])
            shift = np.stack([v.reshape(norm_shape) for v in beta.values]).reshape(split_shape[-2:])
        else:
            split_shape, work_axes = None, axes
            full = [in_shape[d] if d in axes else 1 for d in range(rank)]
            out_shapes = [in_shape] * n
            scale = _stack_elementwise_operand([v.reshape(full) for v in gamma.values], axis, rank, out_shapes)
            shift = _stack_elementwise_operand([v.reshape(full) for v in beta.values], axis, rank, out_shapes)
            if scale is None or shift is None:
                return None
        scale_sources, shift_sources = gamma.sources, beta.sources
        ones, zeros = np.ones(norm_shape, dtype), np.zeros(norm_shape, dtype)
        tid, wide_shape = t.tid, list(in_shape)
        wide_shape[axis] *= n

        def recipe(em: _Emitter) -> relax.Expr:
            value = em.wide(tid)
            if split_shape is not None:
                value = em.emit(relax.op.reshape(value, split_shape))
            value = em.emit(relax.op.nn.layer_norm(
                value, relax.const(ones), relax.const(zeros), work_axes, attrs.epsilon, True, True
            ))
            if bool(attrs.scale):
                value = em.emit(relax.op.multiply(value, em.weight(scale, scale_sources)))
            if bool(attrs.center):
                value = em.emit(relax.op.add(value, em.weight(shift, shift_sources)))
            return relax.op.reshape(value, wide_shape) if split_shape is not None else value

        return _Spec(axis, list(t.spec.widths), recipe, wide_deps=[tid])

    def _widen_tuple_get_item(self, calls, cats) -> _Spec | None:
        t = self.tuples[cats[0].tid]
        if not t.is_tuple_typed or calls[0].index != 0:
            return None
        tid = t.tid

        def recipe(em: _Emitter) -> relax.Expr:
            return relax.TupleGetItem(em.wide(tid), 0)

        return _Spec(t.spec.axis, list(t.spec.widths), recipe, wide_deps=[tid])

    def _widen_reduce(self, calls, cats) -> _Spec | None:
        t = self.tuples[cats[0].tid]
        call0 = calls[0]
        rank = len(_shape(cats[0].args[0]))
        if call0.attrs.axis is None:
            return None
        axes = {_norm_axis(int(a), rank) for a in call0.attrs.axis}
        if t.spec.axis in axes:
            return None
        axis = t.spec.axis
        if not bool(call0.attrs.keepdims):
            axis -= sum(1 for a in axes if a < t.spec.axis)
        return self._same_op(calls, cats, axis)

    def _widen_reshape(self, calls, cats, out_shapes) -> _Spec | None:
        t = self.tuples[cats[0].tid]
        in_shapes = [_shape(a) for a in cats[0].args]
        if calls[0].op.name == "relax.broadcast_to" and in_shapes != out_shapes:
            return None
        if len(set(in_shapes)) != 1 or len(set(out_shapes)) != 1 or len(set(t.spec.widths)) != 1:
            return None
        src, dst = in_shapes[0], out_shapes[0]
        prefix = int(np.prod(src[: t.spec.axis], dtype=np.int64))
        # The branch blocks stay contiguous for any split of the dims after a prefix of equal size;
        # take the innermost such axis (so (1, C) -> (1, C, 1, 1) keeps axis 1).
        axis = None
        for a in range(len(dst)):
            if int(np.prod(dst[:a], dtype=np.int64)) == prefix and dst[a] > 0:
                axis = a
        if axis is None:
            return None
        n = len(calls)
        shape = list(dst)
        shape[axis] *= n
        tid = t.tid

        def recipe(em: _Emitter) -> relax.Expr:
            return relax.op.reshape(em.wide(tid), shape)

        return _Spec(axis, [dst[axis]] * n, recipe, wide_deps=[tid])


def _layout_ok(shapes: list[tuple[int, ...]], axis: int) -> bool:
    """Branch shapes agree except along ``axis`` (so the wide value is their concatenation)."""
    ranks = {len(s) for s in shapes}
    if len(ranks) != 1 or not 0 <= axis < ranks.pop():
        return False
    rest = {s[:axis] + s[axis + 1:] for s in shapes}
    return len(rest) == 1


def _broadcasts_along(shape: tuple[int, ...], axis: int, rank: int) -> bool:
    """An operand of ``shape`` (right-aligned to ``rank``) has size 1 (or no dim) at ``axis``."""
    a = axis - (rank - len(shape))
    return a < 0 or shape[a] == 1


def _stack_elementwise_operand(values, axis: int, rank: int, out_shapes) -> np.ndarray | None:
    """Per-branch operands of an elementwise op -> one operand for the wide value."""
    parts = []
    for value, out in zip(values, out_shapes):
        if value.ndim > rank:
            return None
        value = value.reshape((1,) * (rank - value.ndim) + value.shape)
        for d in range(rank):
            if value.shape[d] not in (1, out[d]):
                return None
        parts.append(value)
    target = []
    for d in range(rank):
        target.append(None if d == axis else max(p.shape[d] for p in parts))
    stacked = []
    for value, out in zip(parts, out_shapes):
        shape = [out[d] if d == axis else target[d] for d in range(rank)]
        stacked.append(np.broadcast_to(value, shape))
    return _concat_weights(stacked, axis)


def _deps_of(exprs) -> list[relax.Var]:
    out = []
    for e in exprs:
        out.extend(_vars_in(e))
    return out


def _is_tensor(expr: relax.Expr) -> bool:
    return isinstance(expr.ty, relax.TensorType)


def _struct_equal(a: relax.Expr, b: relax.Expr) -> bool:
    if isinstance(a, relax.Var) or isinstance(b, relax.Var):
        return a.same_as(b)
    return bool(tvm_ffi.structural_equal(a, b))


def _attrs_key(call: relax.Call) -> int:
    return 0 if call.attrs is None else int(tvm_ffi.structural_hash(call.attrs))


# ---- rewriting ----------------------------------------------------------------------------------


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """Re-emits each dataflow block with the accepted regions' wide ops and exit splits."""

    def __init__(self, func: relax.Function, mode: str, cost_model: MergeCostModel, min_branches: int) -> None:
        super().__init__()
        self.func = func
        self.mode = mode
        self.cost_model = cost_model
        self.min_branches = min_branches
        bindings = {}
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    bindings[b.var] = b.value
        self.weights = _Weights(func, bindings)
        self.has_weight_params = bool(weight_params(func))
        self.provenance = raw_provenance(func) if self.has_weight_params else {}
        self.new_params: list[tuple[relax.Var, tvm.runtime.Tensor]] = []
        self.taken = {p.name for p in func.params}
        self.wide_vars: dict[int, relax.Expr] = {}
        self.report: list[RegionReport] = []
        self.changed = False

    # -- weights ---------------------------------------------------------------------------------
    def new_weight(self, value: np.ndarray, sources: Sequence[tuple[str, ...]]) -> relax.Expr:
        names = list(dict.fromkeys(n for group in sources for n in group))
        if not (self.has_weight_params and names):
            return relax.const(value)
        shown = names if len(names) <= 4 else names[:2] + ["..."] + names[-1:]
        base = "merged." + "+".join(shown)
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        var = relax.Var(name, relax.TensorType(value.shape, str(value.dtype)))
        self.new_params.append((var, tvm.runtime.tensor(np.ascontiguousarray(value))))
        self.provenance[name] = merge_entries(*(self.provenance.get(n, []) for n in names))
        return var

    # -- blocks ----------------------------------------------------------------------------------
    def visit_dataflow_block_(self, block: relax.DataflowBlock) -> relax.BindingBlock:
        planner = _Planner(block, self.weights, self.min_branches)
        planner.plan()
        accepted = self._accept(planner)
        order = None
        while accepted:
            order = self._schedule(planner, accepted)
            if order is not None:
                break
            # A cycle through ops outside the regions: give up the last region.
            dropped, accepted = accepted[-1], accepted[:-1]
            index = self._report_index[dropped]
            self.report[index] = dataclasses.replace(self.report[index], merged=False)
        if not accepted:
            return super().visit_dataflow_block_(block)
        self.changed = True
        self.builder_._begin_dataflow_block()
        em = _Emitter(self)
        for kind, item in order:
            if kind == "binding":
                self.visit_binding(planner.bindings[item])
            elif kind == "wide":
                self._emit_wide(planner.tuples[item], em)
            else:
                self._emit_exit(planner.tuples[item])
        return self.builder_._end_block()

    def _accept(self, planner: _Planner) -> list[int]:
        accepted = []
        self._report_index = {}
        for region, tids in enumerate(planner.regions):
            if not tids:
                continue
            tuples = [planner.tuples[t] for t in tids]
            exits = [t for t in tuples if _needs_exit(planner, t, set(tids))]
            saved = sum(len(t.members) - 1 for t in tuples if t.heavy)
            added = sum(t.spec.entries for t in tuples) + len(exits)
            copies = tuple(t.spec.entry_bytes for t in tuples if t.spec.entries) + tuple(
                2 * _wide_bytes(t) for t in exits
            )
            cost = MergeCost(saved, added, copies)
            # A tuple value (batch_norm) leaving the region cannot be split: never merge that.
            merged = not any(t.is_tuple_typed for t in exits) and (
                self.mode == "always" or self.cost_model.pays(cost)
            )
            self._report_index[region] = len(self.report)
            self.report.append(
                RegionReport(len(tuples[0].members), tuple(t.op for t in tuples), cost, self.cost_model.saved_us(cost), merged)
            )
            if merged:
                accepted.append(region)
        return accepted

    def _schedule(self, planner: _Planner, accepted: list[int]):
        """Topological order of kept bindings, wide ops and exit splits (None if cyclic)."""
        active = {tid for r in accepted for tid in planner.regions[r]}
        members = {}
        for tid in active:
            for var in planner.tuples[tid].members:
                members[var] = tid
        nodes: dict[tuple[str, int], list[tuple[str, int]]] = {}
        priority: dict[tuple[str, int], float] = {}
        exits: set[int] = set()

        def dep_of(var: relax.Var):
            if var in members:
                exits.add(members[var])
                return ("exit", members[var])
            if var in planner.pos:
                return ("binding", planner.pos[var])
            return None

        for i, b in enumerate(planner.bindings):
            if b.var in members:
                continue
            nodes[("binding", i)] = [d for d in map(dep_of, _vars_in(b.value)) if d is not None]
            priority[("binding", i)] = i
        for tid in active:
            t = planner.tuples[tid]
            deps = [("wide", d) for d in t.spec.wide_deps]
            deps += [d for d in map(dep_of, t.spec.orig_deps) if d is not None]
            nodes[("wide", tid)] = deps
            priority[("wide", tid)] = max(t.positions)
        for tid in active:  # members used after the block (outputs) also need their exit
            t = planner.tuples[tid]
            if any(not isinstance(v, relax.DataflowVar) for v in t.members):
                exits.add(tid)
        for tid in exits:
            nodes[("exit", tid)] = [("wide", tid)]
            priority[("exit", tid)] = max(planner.tuples[tid].positions) + 0.5
        if any(planner.tuples[tid].is_tuple_typed for tid in exits):
            return None
        # Kahn's algorithm, preferring the original binding order.
        indegree = {n: 0 for n in nodes}
        users: dict[tuple, list[tuple]] = {n: [] for n in nodes}
        for n, deps in nodes.items():
            for d in set(deps):
                indegree[n] += 1
                users[d].append(n)
        ready = [(priority[n], n) for n, deg in indegree.items() if deg == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            _, n = heapq.heappop(ready)
            order.append(n)
            for u in users[n]:
                indegree[u] -= 1
                if indegree[u] == 0:
                    heapq.heappush(ready, (priority[u], u))
        return order if len(order) == len(nodes) else None

    def _emit_wide(self, t: _Tuple, em: _Emitter) -> None:
        expr = t.spec.recipe(em)
        var = self.builder_.emit(expr)
        expected = list(_shape(t.members[0]))
        expected[t.spec.axis] = sum(t.spec.widths)
        if _shape(var) != tuple(expected):
            raise RuntimeError(  # an internal invariant: the rules above keep the layout exact
                f"HorizontalMerge: wide {t.op} has shape {_shape(var)}, expected {tuple(expected)}"
            )
        self.wide_vars[t.tid] = var

    def _emit_exit(self, t: _Tuple) -> None:
        wide = self.wide_vars[t.tid]
        if len(t.members) == 1:
            parts = [wide]
        else:
            bounds = list(itertools.accumulate(t.spec.widths))[:-1]
            split = self.builder_.emit(relax.op.split(wide, bounds, axis=t.spec.axis))
            parts = [relax.TupleGetItem(split, i) for i in range(len(t.members))]
        for member, part in zip(t.members, parts):
            if isinstance(member, relax.DataflowVar):
                new = self.builder_.emit(part)
            else:
                new = self.builder_.emit_output(part)
            self.set_var_remap(member, new)


def _needs_exit(planner: _Planner, t: _Tuple, region: set[int]) -> bool:
    region_members = {v for tid in region for v in planner.tuples[tid].members}
    for var in t.members:
        if not isinstance(var, relax.DataflowVar):
            return True
        for ui in planner.users.get(var, []):
            if planner.bindings[ui].var not in region_members:
                return True
    return False


def _wide_bytes(t: _Tuple) -> int:
    shape = list(_shape(t.members[0]))
    shape[t.spec.axis] = sum(t.spec.widths)
    return _nbytes(shape, _dtype(t.members[0]))


def _merge_function(func: relax.Function, mode: str, cost_model: MergeCostModel, min_branches: int):
    rewriter = _Rewriter(func, mode, cost_model, min_branches)
    new_func = rewriter.visit_expr(func)
    if not rewriter.changed:
        return func, rewriter.report
    new_func = relax.analysis.remove_all_unused(new_func)
    if rewriter.has_weight_params or rewriter.new_params:
        weights = weight_params(func) + rewriter.new_params
        prov = rewriter.provenance if rewriter.has_weight_params else None
        new_func = rebuild_function(func, new_func.body, weights, prov)
    return new_func, rewriter.report
