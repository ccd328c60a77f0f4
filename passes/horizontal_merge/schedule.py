"""Which planned regions HorizontalMerge merges, and the order in which the merged block is emitted.

Each region found by :class:`~.planner.BlockPlanner` is weighed by the cost model (kernel launches
saved against the ``concat``/``split`` copies added) and reported as a :class:`RegionReport`.
The accepted regions are then scheduled: a topological order of the kept original bindings, the
wide ops and the exit splits (where a branch's value leaves the region), preferring the original
binding order. If that order is cyclic (through ops outside the regions), the last accepted region
is given up (reported as not merged) until it is not.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass

from tvm import relax

from gmorph_tvm.passes.cost_model import MergeCost, MergeCostModel
from gmorph_tvm.passes.horizontal_merge.analysis import vars_in
from gmorph_tvm.passes.horizontal_merge.base import Group
from gmorph_tvm.passes.horizontal_merge.planner import BlockPlanner

Node = tuple[str, int]  # ("binding", index) | ("wide", group id) | ("exit", group id)


@dataclass(frozen=True)
class RegionReport:
    """One merge region: its branches, what merging it saves and costs, and whether it was merged."""

    branches: int
    ops: tuple[str, ...]  # op of each merged group, in order
    cost: MergeCost
    saved_us: float
    merged: bool


@dataclass
class BlockDecision:
    """What to emit for one block: ``order`` (None: the block stays as it is) and the reports."""

    order: list[Node] | None
    reports: list[RegionReport]


def decide(planner: BlockPlanner, mode: str, cost_model: MergeCostModel) -> BlockDecision:
    """Accept regions by ``mode`` (``"always"`` or the cost rule) and schedule the accepted ones."""
    reports: list[RegionReport] = []
    accepted: list[int] = []
    report_index: dict[int, int] = {}
    for region, gids in enumerate(planner.regions):
        if not gids:
            continue
        groups = [planner.groups[g] for g in gids]
        exits = [g for g in groups if _needs_exit(planner, g, set(gids))]
        saved = sum(len(g.members) - 1 for g in groups if g.heavy)
        added = sum(g.match.entries for g in groups) + len(exits)
        copies = tuple(g.match.entry_bytes for g in groups if g.match.entries) + tuple(
            2 * g.wide_bytes() for g in exits
        )
        cost = MergeCost(saved, added, copies)
        # A tuple value (batch_norm) leaving the region cannot be split: never merge that.
        merged = not any(g.is_tuple_typed for g in exits) and (mode == "always" or cost_model.pays(cost))
        report_index[region] = len(reports)
        reports.append(
            RegionReport(len(groups[0].members), tuple(g.op for g in groups), cost, cost_model.saved_us(cost), merged)
        )
        if merged:
            accepted.append(region)
    # A group whose inputs are another group's wide result needs that group merged too: drop regions
    # that read a region left unmerged (by the cost rule), until none does.
    while True:
        active = {gid for r in accepted for gid in planner.regions[r]}
        orphaned = [r for r in accepted
                    if any(d not in active for gid in planner.regions[r] for d in planner.groups[gid].match.wide_deps)]
        if not orphaned:
            break
        for region in orphaned:
            index = report_index[region]
            reports[index] = dataclasses.replace(reports[index], merged=False)
        accepted = [r for r in accepted if r not in orphaned]
    order = None
    while accepted:
        order = schedule(planner, accepted)
        if order is not None:
            break
        # A cycle through ops outside the regions: give up the last region.
        dropped, accepted = accepted[-1], accepted[:-1]
        index = report_index[dropped]
        reports[index] = dataclasses.replace(reports[index], merged=False)
    return BlockDecision(order if accepted else None, reports)


def schedule(planner: BlockPlanner, accepted: list[int]) -> list[Node] | None:
    """Topological order of kept bindings, wide ops and exit splits (None if cyclic)."""
    graph = planner.graph
    active = {gid for r in accepted for gid in planner.regions[r]}
    members = {}
    for gid in active:
        for var in planner.groups[gid].members:
            members[var] = gid
    nodes: dict[Node, list[Node]] = {}
    priority: dict[Node, float] = {}
    exits: set[int] = set()

    def dep_of(var: relax.Var) -> Node | None:
        if var in members:
            exits.add(members[var])
            return ("exit", members[var])
        if var in graph.pos:
            return ("binding", graph.pos[var])
        return None

    for i, b in enumerate(graph.bindings):
        if b.var in members:
            continue
        nodes[("binding", i)] = [d for d in map(dep_of, vars_in(b.value)) if d is not None]
        priority[("binding", i)] = i
    for gid in active:
        g = planner.groups[gid]
        deps = [("wide", d) for d in g.match.wide_deps]
        deps += [d for d in map(dep_of, g.match.orig_deps) if d is not None]
        nodes[("wide", gid)] = deps
        priority[("wide", gid)] = max(g.positions)
    for gid in active:  # members used after the block (outputs) also need their exit
        if any(not isinstance(v, relax.DataflowVar) for v in planner.groups[gid].members):
            exits.add(gid)
    for gid in exits:
        nodes[("exit", gid)] = [("wide", gid)]
        priority[("exit", gid)] = max(planner.groups[gid].positions) + 0.5
    if any(planner.groups[gid].is_tuple_typed for gid in exits):
        return None
    # Kahn's algorithm, preferring the original binding order.
    indegree = {n: 0 for n in nodes}
    users: dict[Node, list[Node]] = {n: [] for n in nodes}
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


def _needs_exit(planner: BlockPlanner, g: Group, region: set[int]) -> bool:
    region_members = {v for gid in region for v in planner.groups[gid].members}
    for var in g.members:
        if not isinstance(var, relax.DataflowVar):
            return True
        for ui in planner.graph.users_of(var):
            if planner.graph.var(ui) not in region_members:
                return True
    return False
