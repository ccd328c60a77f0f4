"""HorizontalMerge's rewriter: re-emits each dataflow block with its accepted regions merged.

For a block with accepted regions, the bindings are emitted in the scheduled order
(:func:`~.schedule.decide`): original bindings as they were (with merged values remapped), each
group's wide op (:meth:`~.base.MergeRule.fuse`), and one ``split`` where a group's branches leave
the region. Merged weights are concatenated at pass time: a new weight parameter (named
``merged.<w1>+<w2>...``, with provenance) where the function takes its weights as parameters, else
a new constant. Unused bindings and parameters are dropped afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from gmorph_tvm.errors import FusionError
from gmorph_tvm.passes._util import merge_entries, raw_provenance, rebuild_function, weight_params
from gmorph_tvm.passes.cost_model import MergeCostModel
from gmorph_tvm.passes.horizontal_merge.analysis import WeightValues, shape_of
from gmorph_tvm.passes.horizontal_merge.base import Group
from gmorph_tvm.passes.horizontal_merge.planner import BlockPlanner
from gmorph_tvm.passes.horizontal_merge.schedule import Node, RegionReport, decide


@dataclass
class _BlockState:
    """A block being re-emitted: its plan, the scheduled order, the wide values emitted so far."""

    planner: BlockPlanner
    order: list[Node]
    wide_vars: dict[int, relax.Expr] = field(default_factory=dict)
    emitted: bool = False


class _Emitter:
    """The :class:`~.base.Emitter` a rule's ``fuse`` gets: the rewriter's builder and state."""

    def __init__(self, rewriter: _Rewriter, state: _BlockState) -> None:
        self._rw, self._state = rewriter, state

    def wide(self, group: int) -> relax.Expr:
        return self._state.wide_vars[group]

    def orig(self, expr: relax.Expr) -> relax.Expr:
        return self._rw.visit_expr(expr)

    def emit(self, expr: relax.Expr) -> relax.Var:
        return self._rw.builder_.emit(expr)

    def weight(self, value: np.ndarray, sources: Sequence[tuple[str, ...]]) -> relax.Expr:
        return self._rw.new_weight(value, sources)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """Re-emits each dataflow block with the accepted regions' wide ops and exit splits.

    The block itself is opened and closed by the default visitor; the first binding visited in a
    block with accepted regions emits the whole scheduled block, the others emit nothing.
    """

    def __init__(self, func: relax.Function, mode: str, cost_model: MergeCostModel, min_branches: int) -> None:
        super().__init__()
        self.mode = mode
        self.cost_model = cost_model
        self.min_branches = min_branches
        self.weights = WeightValues(func)
        self.has_weight_params = bool(weight_params(func))
        self.provenance = raw_provenance(func) if self.has_weight_params else {}
        self.new_params: list[tuple[relax.Var, tvm.runtime.Tensor]] = []
        self.taken = {p.name for p in func.params}
        self.report: list[RegionReport] = []
        self.changed = False
        self._blocks: list[_BlockState | None] = []  # the dataflow blocks being visited, innermost last

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
        planner = BlockPlanner(block, self.weights, self.min_branches).plan()
        decision = decide(planner, self.mode, self.cost_model)
        self.report.extend(decision.reports)
        state = None if decision.order is None else _BlockState(planner, decision.order)
        self._blocks.append(state)
        try:
            new_block = super().visit_dataflow_block_(block)
        finally:
            self._blocks.pop()
        if state is not None:
            self.changed = True
        return new_block

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if not self._replace(binding):
            super().visit_var_binding_(binding)

    def visit_match_cast_(self, binding: relax.MatchCast) -> None:
        if not self._replace(binding):
            super().visit_match_cast_(binding)

    def _replace(self, binding: relax.Binding) -> bool:
        """True if ``binding`` belongs to a block being re-emitted (emitted whole at its first binding)."""
        state = self._blocks[-1] if self._blocks else None
        if state is None or binding.var not in state.planner.graph.pos:
            return False
        if not state.emitted:
            state.emitted = True
            self._emit_block(state)
        return True

    def _emit_block(self, state: _BlockState) -> None:
        em = _Emitter(self, state)
        for kind, item in state.order:
            if kind == "binding":
                original = state.planner.graph.bindings[item]
                if isinstance(original, relax.MatchCast):
                    super().visit_match_cast_(original)
                else:
                    super().visit_var_binding_(original)
            elif kind == "wide":
                self._emit_wide(state, state.planner.groups[item], em)
            else:
                self._emit_exit(state, state.planner.groups[item])

    def _emit_wide(self, state: _BlockState, g: Group, em: _Emitter) -> None:
        var = self.builder_.emit(g.match.emit(em))
        if shape_of(var) != tuple(g.wide_shape()):
            raise FusionError(  # an internal invariant: the rules keep the layout exact
                f"HorizontalMerge: wide {g.op} has shape {shape_of(var)}, expected {tuple(g.wide_shape())}"
            )
        state.wide_vars[g.gid] = var

    def _emit_exit(self, state: _BlockState, g: Group) -> None:
        wide = state.wide_vars[g.gid]
        if len(g.members) == 1:
            parts = [wide]
        else:
            split = self.builder_.emit(relax.op.split(wide, g.split_bounds(), axis=g.axis))
            parts = [relax.TupleGetItem(split, i) for i in range(len(g.members))]
        for member, part in zip(g.members, parts):
            if isinstance(member, relax.DataflowVar):
                new = self.builder_.emit(part)
            else:
                new = self.builder_.emit_output(part)
            self.set_var_remap(member, new)


def merge_function(
    func: relax.Function, mode: str, cost_model: MergeCostModel, min_branches: int
) -> tuple[relax.Function, list[RegionReport]]:
    """``func`` with its accepted regions merged (``func`` itself if none), and every region's report."""
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
