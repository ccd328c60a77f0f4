"""HorizontalMerge's planner: finds the merge regions of one dataflow block.

A region starts from a *seed*: N anchor calls (ops with weights, :meth:`MergeRule.seed_keys`) that
either read one value (same input) or have the same op, attrs and shapes and are independent of
one another (lockstep). The region then grows from each group to the users of its branch-0
member, as long as every branch has a counterpart binding of the same kind that reads its own
branch's member in the same operand positions, the branches stay independent, and a rule
(:func:`~.base.rules_for`) can compute the N bindings as one wide op. The planner only decides
what *could* merge; :mod:`.schedule` decides what does, and in which order it is emitted.
"""

from __future__ import annotations

from tvm import relax

from gmorph_tvm.core.ir import op_name
from gmorph_tvm.passes.horizontal_merge import rules as _rules  # noqa: F401  (registers the op rules)
from gmorph_tvm.passes.horizontal_merge.analysis import (
    BlockGraph,
    Operand,
    WeightValues,
    args_of,
    categorize,
    dtype_of,
    same_kind,
    shape_of,
    vars_in,
)
from gmorph_tvm.passes.horizontal_merge.base import TUPLE_GET_ITEM, Candidate, Group, Match, rules_for


class BlockPlanner:
    """Finds merge regions in one dataflow block: groups of N lockstep bindings, each one wide op.

    After :meth:`plan`, ``groups`` holds every group and ``regions`` the group ids of each region
    (a connected set of groups between one entry and its exits).
    """

    def __init__(self, block: relax.DataflowBlock, weights: WeightValues, min_branches: int) -> None:
        self.graph = BlockGraph(block)
        self.weights = weights
        self.min_branches = min_branches
        self.groups: list[Group] = []
        self.member_of: dict[relax.Var, tuple[int, int]] = {}  # var -> (group id, branch)
        self.claimed: set[int] = set()
        self.claimed_mask = 0  # bitmask of self.claimed
        self.regions: list[list[int]] = []

    # -- what rules may ask (PlanView) ----------------------------------------------------------
    def group(self, gid: int) -> Group:
        return self.groups[gid]

    def users_of(self, var: relax.Var) -> list[relax.Expr]:
        return [self.graph.value(i) for i in self.graph.users_of(var)]

    # -- seeds -------------------------------------------------------------------------------------
    def plan(self) -> BlockPlanner:
        graph = self.graph
        anchors = []
        for i, b in enumerate(graph.bindings):
            for rule in rules_for(b.value):
                keys = rule.seed_keys(b.value, self.weights)
                if keys is not None:
                    anchors.append((i, keys))
                    break
        # 1. Same input: anchors reading one value.
        groups: dict[tuple, list[int]] = {}
        for i, (same, _) in anchors:
            if same is not None:
                groups.setdefault(same, []).append(i)
        for members in sorted(groups.values(), key=lambda m: m[0]):
            members = [i for i in members if i not in self.claimed]
            if len(members) >= self.min_branches:
                self._try_seed(members)
        # 2. Lockstep from different inputs: same op, same shapes, independent of each other.
        groups = {}
        for i, (_, lockstep) in anchors:
            if i not in self.claimed and lockstep is not None:
                groups.setdefault(lockstep, []).append(i)
        for candidates in sorted(groups.values(), key=lambda m: m[0]):
            remaining = list(candidates)
            while len(remaining) >= self.min_branches:
                chosen = [remaining[0]]
                for i in remaining[1:]:
                    if all(not graph.depends(i, j) and not graph.depends(j, i) for j in chosen):
                        chosen.append(i)
                if len(chosen) >= self.min_branches and self._try_seed(chosen):
                    remaining = [i for i in remaining if i not in self.claimed]
                else:
                    remaining = remaining[1:]
        return self

    def _try_seed(self, members: list[int]) -> bool:
        region = len(self.regions)
        calls = [self.graph.value(i) for i in members]
        each = [self._categorize([c.args[p] for c in calls]) for p in range(len(calls[0].args))]
        operands = [o for o in each if o is not None]
        if len(operands) != len(each):
            return False
        match = self._widen(members, calls, operands)
        if match is None:
            return False
        self.regions.append([])
        self._add_group(members, match, region)
        self._grow(region)
        return True

    # -- growth ------------------------------------------------------------------------------------
    def _grow(self, region: int) -> None:
        queue = list(self.regions[region])
        while queue:
            g = self.groups[queue.pop(0)]
            for u0 in list(self.graph.users_of(g.members[0])):
                if u0 in self.claimed:
                    continue
                members = self._counterparts(u0)
                if members is None:
                    continue
                calls = [self.graph.value(i) for i in members]
                operands = self._operands(calls)
                if operands is None:
                    continue
                match = self._widen(members, calls, operands)
                if match is None:
                    continue
                queue.append(self._add_group(members, match, region).gid)

    def _counterparts(self, u0: int) -> list[int] | None:
        """Binding ``u0`` (which reads branch-0 members) and its counterpart in each other branch."""
        graph = self.graph
        value0 = graph.value(u0)
        args0 = args_of(value0)
        wide_pos: dict[int, int] = {}
        for p, arg in enumerate(args0):
            if isinstance(arg, relax.Var) and arg in self.member_of:
                gid, branch = self.member_of[arg]
                if branch != 0:
                    return None
                wide_pos[p] = gid
        if not wide_pos:
            return None
        counts = {len(self.groups[gid].members) for gid in wide_pos.values()}
        if len(counts) != 1:
            return None
        n = counts.pop()
        first_p = min(wide_pos)
        chosen = [u0]
        for branch in range(1, n):
            anchor = self.groups[wide_pos[first_p]].members[branch]
            found = None
            for ui in graph.users_of(anchor):
                if ui in self.claimed or ui in chosen:
                    continue
                value = graph.value(ui)
                if not same_kind(value0, value) or dtype_of(value) != dtype_of(value0):
                    continue
                if self._reads_branch(args_of(value), wide_pos, branch):
                    found = ui
                    break
            if found is None:
                return None
            chosen.append(found)
        # Non-wide operands must not depend on the region (that would make a cycle).
        region_mask = self.claimed_mask
        for i in chosen:
            for p, arg in enumerate(args_of(graph.value(i))):
                if p in wide_pos:
                    continue
                for var in vars_in(arg):
                    j = graph.pos.get(var)
                    if j is not None and ((graph.ancestors(j) | (1 << j)) & region_mask):
                        return None
        if not graph.independent(chosen):  # branches must be independent of one another
            return None
        return chosen

    def _reads_branch(self, args: list[relax.Expr], wide_pos: dict[int, int], branch: int) -> bool:
        """``args`` read ``branch``'s members exactly in the wide positions, and no member elsewhere."""
        for p, arg in enumerate(args):
            if p in wide_pos:
                ok = arg.same_as(self.groups[wide_pos[p]].members[branch])
            else:
                ok = not (isinstance(arg, relax.Var) and arg in self.member_of)
            if not ok:
                return False
        return True

    def _operands(self, calls: list[relax.Expr]) -> list[Operand] | None:
        operands = []
        for p in range(len(args_of(calls[0]))):
            args = [args_of(c)[p] for c in calls]
            if isinstance(args[0], relax.Var) and args[0] in self.member_of:
                operands.append(Operand("wide", args, group=self.member_of[args[0]][0]))
                continue
            operand = self._categorize(args)
            if operand is None:
                return None
            operands.append(operand)
        return operands

    def _categorize(self, args: list[relax.Expr]) -> Operand | None:
        return categorize(args, self.weights, self.member_of.__contains__)

    # -- rules ---------------------------------------------------------------------------------------
    def _widen(self, members: list[int], calls: list[relax.Expr], operands: list[Operand]) -> Match | None:
        """The wide computation for ``calls`` (one per branch) from the first rule that matches."""
        shapes = [shape_of(c) for c in calls]
        out_shapes = [s for s in shapes if s is not None]
        if len(out_shapes) != len(shapes) and not isinstance(calls[0], relax.TupleGetItem):
            return None
        cand = Candidate([self.graph.var(i) for i in members], calls, operands, out_shapes)
        for rule in rules_for(calls[0]):
            if rule.needs_wide_input and not (operands and operands[0].kind == "wide"):
                continue
            match = rule.match(cand, self)
            if match is not None:
                return match
        return None

    def _add_group(self, members: list[int], match: Match, region: int) -> Group:
        value = self.graph.value(members[0])
        g = Group(
            gid=len(self.groups),
            members=[self.graph.var(i) for i in members],
            positions=list(members),
            op=op_name(value) or TUPLE_GET_ITEM,
            match=match,
            heavy=match.rule.heavy,
            is_tuple_typed=isinstance(self.graph.var(members[0]).ty, relax.TupleType),
        )
        self.groups.append(g)
        self.regions[region].append(g.gid)
        for branch, i in enumerate(members):
            self.claimed.add(i)
            self.claimed_mask |= 1 << i
            self.member_of[self.graph.var(i)] = (g.gid, branch)
        return g
