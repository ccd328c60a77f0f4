"""The vocabulary of HorizontalMerge's op rules, and their registry (as Inductor's group-batch fusion).

A rule (:class:`MergeRule`, one per op family, in :mod:`.rules`) is asked about a
:class:`Candidate`: N bindings, one per branch, computing the same op (same attrs) on operands
categorised by :func:`~.analysis.categorize`. :meth:`MergeRule.match` says whether the N calls can
run as one wide op, and if so returns a :class:`Match`: the layout of the wide result (the branch
axis and each branch's width along it), what it reads (wide values of earlier groups, original
values, copies made by an entry ``concat``) and what :meth:`MergeRule.fuse` needs to emit it.
:meth:`MergeRule.fuse` emits the wide op through an :class:`Emitter` and returns its value.

Anchor rules (ops with weights) also start regions: :meth:`MergeRule.seed_keys` says which calls
may seed one and which seeds belong together. :func:`register_rule` adds a rule class to the
registry, :func:`rules_for` finds the rules of a call.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tvm import relax

from gmorph_tvm.core.ir import nbytes, op_name
from gmorph_tvm.passes.horizontal_merge.analysis import (
    Operand,
    WeightValues,
    known_dtype,
    known_shape,
    vars_of_all,
)

TUPLE_GET_ITEM = "TupleGetItem"  # the registry key of ``relax.TupleGetItem`` (not an op)


# ---- what rules see and produce -----------------------------------------------------------------


class Emitter(Protocol):
    """What :meth:`MergeRule.fuse` may use while the rewriter emits the merged block."""

    def wide(self, group: int) -> relax.Expr:
        """The wide value of an earlier group."""

    def orig(self, expr: relax.Expr) -> relax.Expr:
        """An original expression, with merged values remapped."""

    def emit(self, expr: relax.Expr) -> relax.Var:
        """Bind ``expr`` to a new variable of the block."""

    def weight(self, value: np.ndarray, sources: Sequence[tuple[str, ...]]) -> relax.Expr:
        """A merged weight computed at pass time (a new parameter, or a constant)."""


class PlanView(Protocol):
    """What :meth:`MergeRule.match` may ask the planner."""

    def group(self, gid: int) -> Group:
        """A group already planned (one wide op)."""

    def users_of(self, var: relax.Var) -> list[relax.Expr]:
        """Values of the bindings that read ``var``."""


@dataclass
class Candidate:
    """N bindings (one per branch) that might run as one wide op."""

    vars: list[relax.Var]
    calls: list[relax.Expr]
    operands: list[Operand]
    out_shapes: list[tuple[int, ...]]  # static (TupleGetItem: of its tensor)

    @property
    def call(self) -> relax.Expr:
        return self.calls[0]


@dataclass(eq=False)
class Match:
    """How to compute the wide value of a candidate, and its layout.

    ``axis``/``widths``: the branches' results sit side by side along ``axis`` of the wide value,
    branch ``i`` taking ``widths[i]``. ``wide_deps``: groups whose wide values it reads;
    ``orig_deps``: original variables it reads; ``entries``/``entry_bytes``: ``concat`` copies it adds
    to build a wide operand from per-branch values. ``data``: what the rule's ``fuse`` needs.
    """

    rule: MergeRule
    axis: int
    widths: list[int]
    data: dict[str, Any]
    wide_deps: list[int] = field(default_factory=list)
    orig_deps: list[relax.Var] = field(default_factory=list)
    entry_bytes: int = 0
    entries: int = 0

    def emit(self, em: Emitter) -> relax.Expr:
        return self.rule.fuse(self, em)


@dataclass
class Group:
    """N bindings (one per branch) computed by one wide op."""

    gid: int
    members: list[relax.Var]
    positions: list[int]
    op: str
    match: Match
    heavy: bool
    is_tuple_typed: bool

    @property
    def axis(self) -> int:
        return self.match.axis

    @property
    def widths(self) -> list[int]:
        return self.match.widths

    def wide_shape(self) -> list[int]:
        shape = list(known_shape(self.members[0]))
        shape[self.axis] = sum(self.widths)
        return shape

    def wide_bytes(self) -> int:
        return nbytes(self.wide_shape(), known_dtype(self.members[0]))

    def split_bounds(self) -> list[int]:
        return list(itertools.accumulate(self.widths))[:-1]


# ---- operand sources: what a fused op reads -------------------------------------------------------


class Source:
    """One operand of a fused op, produced at emission time."""

    def get(self, em: Emitter) -> relax.Expr:
        raise NotImplementedError


@dataclass(eq=False)
class WideSource(Source):
    gid: int

    def get(self, em: Emitter) -> relax.Expr:
        return em.wide(self.gid)


@dataclass(eq=False)
class OrigSource(Source):
    expr: relax.Expr

    def get(self, em: Emitter) -> relax.Expr:
        return em.orig(self.expr)


@dataclass(eq=False)
class WeightSource(Source):
    value: np.ndarray
    sources: Sequence[tuple[str, ...]]

    def get(self, em: Emitter) -> relax.Expr:
        return em.weight(self.value, self.sources)


@dataclass(eq=False)
class ConcatSource(Source):
    """Per-branch values concatenated along ``axis`` (an entry copy into the region)."""

    args: list[relax.Expr]
    axis: int

    def get(self, em: Emitter) -> relax.Expr:
        return em.emit(relax.op.concat([em.orig(a) for a in self.args], axis=self.axis))


@dataclass
class Feed:
    """A per-branch operand read as one wide operand: its source and what it costs."""

    source: Source
    wide_deps: list[int]
    orig_deps: list[relax.Var]
    entry_bytes: int = 0
    entries: int = 0


def wide_feed(operand: Operand, axis: int, shapes: list[tuple[int, ...]], plan: PlanView) -> Feed | None:
    """A per-branch operand that must be wide along ``axis``: a group's wide value, or a concat."""
    if operand.kind == "wide":
        g = plan.group(operand.group)
        if g.axis != axis or [s[axis] for s in shapes] != g.widths:
            return None
        return Feed(WideSource(g.gid), [g.gid], [])
    if operand.kind == "distinct":
        args = list(operand.args)
        shape = list(shapes[0])
        shape[axis] = sum(s[axis] for s in shapes)
        return Feed(ConcatSource(args, axis), [], list(args), 2 * nbytes(shape, known_dtype(args[0])), 1)
    return None


def concat_weights(values: Sequence[np.ndarray], axis: int) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(values, axis=axis))


def layout_ok(shapes: list[tuple[int, ...]], axis: int) -> bool:
    """Branch shapes agree except along ``axis`` (so the wide value is their concatenation)."""
    ranks = {len(s) for s in shapes}
    if len(ranks) != 1 or not 0 <= axis < ranks.pop():
        return False
    rest = {s[:axis] + s[axis + 1:] for s in shapes}
    return len(rest) == 1


def broadcasts_along(shape: tuple[int, ...], axis: int, rank: int) -> bool:
    """An operand of ``shape`` (right-aligned to ``rank``) has size 1 (or no dim) at ``axis``."""
    a = axis - (rank - len(shape))
    return a < 0 or shape[a] == 1


def stack_elementwise_operand(values, axis: int, rank: int, out_shapes) -> np.ndarray | None:
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
    target = [max(p.shape[d] for p in parts) for d in range(rank)]  # (unused along ``axis``)
    stacked = []
    for value, out in zip(parts, out_shapes):
        shape = [out[d] if d == axis else target[d] for d in range(rank)]
        stacked.append(np.broadcast_to(value, shape))
    return concat_weights(stacked, axis)


# ---- the rule interface and registry ----------------------------------------------------------


class MergeRule:
    """One op family. Subclasses set ``ops`` and implement :meth:`match` (and :meth:`fuse` unless
    the wide op is the original op applied to ``data["operands"]``)."""

    ops: frozenset[str] = frozenset()
    #: the op stays a kernel of its own after FuseOps: merging N of them saves N-1 launches
    heavy: bool = False
    #: the rule only continues a region: the first operand must already be wide
    needs_wide_input: bool = True

    def match(self, cand: Candidate, plan: PlanView) -> Match | None:
        """How ``cand``'s calls run as one wide op, or None when they cannot."""
        raise NotImplementedError

    def fuse(self, match: Match, em: Emitter) -> relax.Expr:
        """The wide op (default: the original op on ``data["operands"]``)."""
        call = match.data["call"]
        args = [s.get(em) for s in match.data["operands"]]
        return relax.Call(call.op, args, call.attrs, call.ty_args)

    # -- anchors ----------------------------------------------------------------------------------
    def seed_keys(self, value: relax.Call, weights: WeightValues) -> tuple[tuple | None, tuple | None] | None:
        """None if ``value`` cannot seed a region; else (same-input key, lockstep key), either None.

        Calls with equal same-input keys read one value; calls with equal lockstep keys have the
        same op, attrs and shapes (and may read different values)."""
        return None

    # -- shared recipes -------------------------------------------------------------------------------
    def same_op(self, cand: Candidate, plan: PlanView, axis: int | None) -> Match | None:
        """The op itself on the wide value (other operands identical across branches)."""
        if axis is None:
            return None
        g = plan.group(cand.operands[0].group)
        widths = [s[axis] for s in cand.out_shapes]
        if not layout_ok(cand.out_shapes, axis):
            return None
        call0 = cand.call
        operands = [WideSource(g.gid)] + [OrigSource(a) for a in call0.args[1:]]
        return Match(self, axis, widths, {"call": call0, "operands": operands},
                     wide_deps=[g.gid], orig_deps=vars_of_all(call0.args[1:]))


_REGISTRY: dict[str, list[MergeRule]] = {}


def register_rule(cls: type[MergeRule]) -> type[MergeRule]:
    """Class decorator: add one instance of ``cls`` to the registry, for each of its ``ops``."""
    rule = cls()
    for name in cls.ops:
        _REGISTRY.setdefault(name, []).append(rule)
    return cls


def rules_for(expr: relax.Expr) -> list[MergeRule]:
    """The rules registered for ``expr``'s op (or for TupleGetItem), in registration order."""
    name = TUPLE_GET_ITEM if isinstance(expr, relax.TupleGetItem) else op_name(expr)
    return _REGISTRY.get(name, []) if name is not None else []


def registered_rules() -> list[MergeRule]:
    """Every registered rule, once each."""
    return list({id(r): r for rules in _REGISTRY.values() for r in rules}.values())


def op_names(prefix: str, names: str) -> frozenset[str]:
    """``op_names("relax.", "add exp")`` -> ``{"relax.add", "relax.exp"}``."""
    return frozenset(prefix + n for n in names.split())
