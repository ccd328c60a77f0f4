"""What HorizontalMerge reads off a dataflow block before planning: types, weights and dependencies.

* helpers on the static types of values (shape, dtype; readers of :mod:`gmorph_tvm.core.ir` applied
  to an expression) and on calls (operands, whether two calls are the same kind of op);
* :class:`WeightValues`: the value of a weight-only expression at pass time (a weight parameter, a
  constant, or layout ops of them), so merged weights can be concatenated before run time;
* :class:`BlockGraph`: who uses and who depends on each binding of a block, so that the planner
  only puts bindings in lockstep that are independent of one another;
* :class:`Operand` and :func:`categorize`: how one operand position looks across the branches of a
  candidate group (the same value, per-branch weights, per-branch values of one type, or members
  of a group that already runs wide).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from gmorph_tvm.core.ir import dtype_str, op_name, static_shape
from gmorph_tvm.errors import FusionError
from gmorph_tvm.passes._util import weight_params

# Weight-only bindings the pass can evaluate with numpy (to read a weight's value at pass time).
_WEIGHT_LAYOUT_OPS = frozenset(
    ("relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze", "relax.flatten",
     "relax.astype", "relax.broadcast_to")
)


# ---- helpers on types ---------------------------------------------------------------------------


def shape_of(expr: relax.Expr) -> tuple[int, ...] | None:
    """Static shape of ``expr``'s tensor type (of its first field for a tuple), or None when unknown
    / symbolic: :func:`gmorph_tvm.core.ir.static_shape` of the expression's type."""
    return static_shape(expr.ty, first_field=True)


def known_shape(expr: relax.Expr) -> tuple[int, ...]:
    """:func:`shape_of` where the planner has already checked that the shape is static."""
    shape = shape_of(expr)
    if shape is None:
        raise FusionError(f"HorizontalMerge: {expr.ty} has no static shape")  # an internal invariant
    return shape


def dtype_of(expr: relax.Expr) -> str | None:
    """dtype string of ``expr``'s tensor type (first field of a tuple): :func:`gmorph_tvm.core.ir.dtype_str`."""
    return dtype_str(expr.ty, first_field=True)


def known_dtype(expr: relax.Expr) -> str:
    """:func:`dtype_of` of a value the planner has already checked to be a tensor."""
    dtype = dtype_of(expr)
    if dtype is None:
        raise FusionError(f"HorizontalMerge: {expr.ty} is not a tensor")  # an internal invariant
    return dtype


def args_of(value: relax.Expr) -> list[relax.Expr]:
    """The operands of a call, or the tuple of a TupleGetItem."""
    if isinstance(value, relax.Call):
        return list(value.args)
    if isinstance(value, relax.TupleGetItem):
        return [value.tuple_value]
    return []


def same_kind(a: relax.Expr, b: relax.Expr) -> bool:
    """Same op (or same TupleGetItem index), equal attrs, same arity."""
    if isinstance(a, relax.TupleGetItem):
        return isinstance(b, relax.TupleGetItem) and a.index == b.index
    if not (isinstance(a, relax.Call) and isinstance(b, relax.Call)):
        return False
    if not (isinstance(a.op, tvm.ir.Op) and a.op.same_as(b.op)) or len(a.args) != len(b.args):
        return False
    if (a.attrs is None) != (b.attrs is None):
        return False
    return a.attrs is None or bool(tvm_ffi.structural_equal(a.attrs, b.attrs))


def attrs_key(call: relax.Call) -> int:
    """Hash of a call's attrs (0 without attrs): calls with equal attrs get equal keys."""
    return 0 if call.attrs is None else int(tvm_ffi.structural_hash(call.attrs))


def is_tensor(expr: relax.Expr) -> bool:
    return isinstance(expr.ty, relax.TensorType)


def vars_in(expr: relax.Expr) -> list[relax.Var]:
    """Every distinct variable ``expr`` reads, in post order."""
    found, seen = [], set()

    def visit(node):
        if isinstance(node, relax.Var) and node not in seen:
            seen.add(node)
            found.append(node)

    relax.analysis.post_order_visit(expr, visit)
    return found


def vars_of_all(exprs: Sequence[relax.Expr]) -> list[relax.Var]:
    out = []
    for e in exprs:
        out.extend(vars_in(e))
    return out


def _struct_equal(a: relax.Expr, b: relax.Expr) -> bool:
    if isinstance(a, relax.Var) or isinstance(b, relax.Var):
        return a.same_as(b)
    return bool(tvm_ffi.structural_equal(a, b))


# ---- weights: values at pass time ---------------------------------------------------------------


class WeightValues:
    """Reads the value of weight-only expressions (weight params, constants, layout ops of them)."""

    def __init__(self, func: relax.Function) -> None:
        self.params = {var: value for var, value in weight_params(func)}
        self.bindings: dict[relax.Var, relax.Expr] = {}
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    self.bindings[b.var] = b.value
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
        name = op_name(expr)
        if name not in _WEIGHT_LAYOUT_OPS:
            return None
        inner = self.resolve(expr.args[0])
        out_shape = shape_of(expr)
        if inner is None or out_shape is None:
            return None
        value, sources = inner
        if name == "relax.permute_dims":
            axes = expr.attrs.axes
            value = np.transpose(value, None if axes is None else [int(a) for a in axes])
        elif name == "relax.astype":
            value = value.astype(dtype_of(expr))
        elif name == "relax.broadcast_to":
            value = np.broadcast_to(value, out_shape)
        else:
            value = np.reshape(value, out_shape)
        if tuple(value.shape) != out_shape:
            return None
        return np.ascontiguousarray(value), sources


# ---- dependencies inside one block --------------------------------------------------------------


class BlockGraph:
    """Bindings of one dataflow block with their users and (transitive) dependencies."""

    def __init__(self, block: relax.DataflowBlock) -> None:
        self.bindings = list(block.bindings)
        self.pos = {b.var: i for i, b in enumerate(self.bindings)}
        self.users: dict[relax.Var, list[int]] = {}
        self.deps: list[list[int]] = []
        for i, b in enumerate(self.bindings):
            dep = []
            for var in vars_in(b.value):
                self.users.setdefault(var, []).append(i)
                if var in self.pos:
                    dep.append(self.pos[var])
            self.deps.append(dep)
        self._ancestors: list[int] | None = None

    def value(self, i: int) -> relax.Expr:
        return self.bindings[i].value

    def var(self, i: int) -> relax.Var:
        return self.bindings[i].var

    def users_of(self, var: relax.Var) -> list[int]:
        """Indices of the bindings that read ``var``."""
        return self.users.get(var, [])

    def ancestors(self, i: int) -> int:
        """Bitmask of the bindings binding ``i`` depends on (transitively)."""
        if self._ancestors is None:
            anc: list[int] = []
            for deps in self.deps:
                mask = 0
                for d in deps:
                    mask |= anc[d] | (1 << d)
                anc.append(mask)
            self._ancestors = anc
        return self._ancestors[i]

    def depends(self, i: int, j: int) -> bool:
        """Binding ``i`` depends (transitively) on binding ``j``."""
        return bool((self.ancestors(i) >> j) & 1)

    def independent(self, indices: Sequence[int]) -> bool:
        """No binding of ``indices`` depends on another one of them."""
        return not any(self.depends(i, j) for i in indices for j in indices if j != i)


# ---- operands across branches -------------------------------------------------------------------


@dataclass
class Operand:
    """How one operand position looks across the branches of a candidate group.

    ``kind``: ``"wide"`` (members of a group already running wide, ``group`` its id), ``"same"``
    (one value for all branches), ``"weight"`` (per-branch weights, ``values``/``sources`` read at
    pass time) or ``"distinct"`` (per-branch values of one tensor type, known only at run time).
    A ``"same"`` weight also carries its value.
    """

    kind: str
    args: list[relax.Expr]
    group: int = -1
    values: list[np.ndarray] | None = None
    sources: list[tuple[str, ...]] | None = None

    def shapes(self) -> list[tuple[int, ...] | None]:
        return [shape_of(a) for a in self.args]


def categorize(
    args: list[relax.Expr], weights: WeightValues, is_member: Callable[[relax.Expr], bool]
) -> Operand | None:
    """The :class:`Operand` of ``args`` (one per branch, none in a wide group), or None if unusable."""
    first = args[0]
    if any(isinstance(a, relax.Var) and is_member(a) for a in args):
        return None  # a wide member in a non-matching position (cross-branch use)
    if all(a.same_as(first) or _struct_equal(a, first) for a in args[1:]):
        resolved = weights.resolve(first) if is_tensor(first) else None
        if resolved is None:
            return Operand("same", args)
        return Operand("same", args, values=[resolved[0]] * len(args), sources=[resolved[1]] * len(args))
    each = [weights.resolve(a) for a in args]
    found = [r for r in each if r is not None]
    if len(found) == len(each):
        return Operand("weight", args, values=[r[0] for r in found], sources=[r[1] for r in found])
    types = {(shape_of(a), dtype_of(a)) for a in args}
    if all(isinstance(a, relax.Var) and is_tensor(a) for a in args) and len(types) == 1 and None not in next(iter(types)):
        return Operand("distinct", args)
    return None
