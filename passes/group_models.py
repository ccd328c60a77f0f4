"""GroupModels: partition many tasks into groups that are each fused on their own (the MTS idea).

With tens of models, one module where everything is merged wide can overwhelm the device (memory,
registers, one huge kernel per layer). This module decides which tasks of a
:class:`~gmorph_tvm.MultiModel` go together and cuts the MultiModel into one MultiModel per group:

* :func:`group_tasks` — the partition. Tasks that share weights stay together (they share a
  prefix: stitched weights listed for several tasks in the provenance, computation on weights
  shared by several tasks' outputs, or weights of identical content); tasks of the same
  architecture are placed next to each other (so :class:`HorizontalMerge` can run them in
  lockstep); groups are then filled in that order up to ``max_group_size`` tasks and optional
  FLOP / weight-byte budgets, with sizes balanced (10 tasks at most 8 per group -> 5 + 5). The
  size comes from a rule (:data:`DEFAULT_MAX_GROUP_SIZE`), from measurement on the target
  (``latency=``: each candidate size is timed, e.g. built and run by
  :func:`gmorph_tvm.grouping.measured_latency`, the fastest total wins), or from the
  user (``groups=[[...], ...]`` is validated and returned, each group in the MultiModel's task
  order).
* :func:`split_into_groups` — one MultiModel per group: ``main`` returns only the group's outputs,
  dead computation is removed, and only the inputs and weights the group uses are kept (with their
  provenance). Each can then go through the fusion passes and be built on its own.

What is preserved: every task's outputs are computed exactly as in the input MultiModel (the
group's ``main`` is the original graph restricted to what its outputs need).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from gmorph_tvm.core.ir import op_name, static_shape, tensor_nbytes
from gmorph_tvm.errors import GmorphError
from gmorph_tvm.frontend.multimodel import MultiModel
from gmorph_tvm.passes._util import content_key, same_content, weight_params

# Tasks per group when neither the user nor measurement decides: a conservative rule of thumb (wide
# ops of 8 branches keep per-kernel size modest); gmorph_tvm.grouping.measured_latency finds the best size for a target.
DEFAULT_MAX_GROUP_SIZE = 8
_MIN_SHARED_ELEMENTS = 64  # smaller identical weights (zero biases, fresh BN stats) prove nothing


class GroupingError(GmorphError, ValueError):
    """A task grouping was given bad options or names unknown / repeated tasks."""


@dataclass(frozen=True)
class TaskCost:
    """Work of one task alone: FLOPs of the ops its outputs need, bytes of the weights they read."""

    flops: int
    weight_bytes: int


# ---- analysis of main -------------------------------------------------------------------------


class _Graph:
    """Bindings of ``main`` with, for each, the set of tasks whose outputs need it (a bitmask)."""

    def __init__(self, mm: MultiModel) -> None:
        func = mm.mod["main"]
        self.tasks = mm.task_names
        self.bindings = [b for block in func.body.blocks for b in block.bindings]
        self.weights = {var: value for var, value in weight_params(func)}
        index = {b.var: i for i, b in enumerate(self.bindings)}
        self.vars_of = [_vars_in(b.value) for b in self.bindings]
        self.mask = [0] * len(self.bindings)
        outputs = _output_fields(func)
        for t, task in enumerate(self.tasks):
            for i in mm.output_index(task):
                for var in _vars_in(outputs[i]):
                    if var in index:
                        self.mask[index[var]] |= 1 << t
        for i in range(len(self.bindings) - 1, -1, -1):
            for var in self.vars_of[i]:
                if var in index:
                    self.mask[index[var]] |= self.mask[i]
        self.flops = [_flops(b.value) for b in self.bindings]
        self.weight_mask: dict[relax.Var, int] = {}
        for i, vars_ in enumerate(self.vars_of):
            for var in vars_:
                if var in self.weights:
                    self.weight_mask[var] = self.weight_mask.get(var, 0) | self.mask[i]

    def cost(self, task_mask: int) -> TaskCost:
        flops = sum(f for f, m in zip(self.flops, self.mask) if m & task_mask)
        nbytes = sum(
            tensor_nbytes(self.weights[var]) for var, m in self.weight_mask.items() if m & task_mask
        )
        return TaskCost(int(flops), int(nbytes))

    def signature(self, t: int) -> tuple:
        """Architecture of task ``t`` alone: its ops and result shapes, in order."""
        bit = 1 << t
        sig = []
        for b, m in zip(self.bindings, self.mask):
            if m & bit and op_name(b.value) is not None:
                sig.append((op_name(b.value), _shape(b.var)))
        return tuple(sig)

    def sharing_pairs(self, mm: MultiModel) -> list[tuple[int, int]]:
        """Pairs of tasks that share weights (so they share a prefix worth computing once)."""
        pos = {name: t for t, name in enumerate(self.tasks)}
        pairs = []
        # Computation on a weight needed by several tasks (a stitched trunk).
        for m in self.weight_mask.values():
            pairs.extend(_pairs_of_mask(m))
        # Stitched weights listed for several tasks.
        for entries in mm.provenance.values():
            owners = sorted({pos[task] for task, _ in entries if task in pos})
            pairs.extend(zip(owners, owners[1:]))
        # Identical weights not (yet) stitched.
        buckets: dict[tuple, list[tuple[tvm.runtime.Tensor, int]]] = {}
        for var, value in self.weights.items():
            m = self.weight_mask.get(var, 0)
            if m == 0 or int(np.prod([int(d) for d in value.shape])) < _MIN_SHARED_ELEMENTS:
                continue
            owner = (m & -m).bit_length() - 1
            for other, other_owner in buckets.setdefault(content_key(value), []):
                if other_owner != owner and same_content(other, value):
                    arr = value.numpy()
                    if arr.size and arr.max() != arr.min():
                        pairs.append((other_owner, owner))
            buckets[content_key(value)].append((value, owner))
        return pairs


def task_costs(mm: MultiModel) -> dict[str, TaskCost]:
    """FLOPs and weight bytes of each task on its own."""
    graph = _Graph(mm)
    return {name: graph.cost(1 << t) for t, name in enumerate(graph.tasks)}


# ---- partition --------------------------------------------------------------------------------


def group_tasks(
    mm: MultiModel,
    max_group_size: int | None = None,
    *,
    flops_budget: int | None = None,
    weight_budget_bytes: int | None = None,
    groups: Sequence[Sequence[str]] | None = None,
    latency: Callable[[MultiModel], float] | None = None,
    candidate_sizes: Sequence[int] | None = None,
) -> list[list[str]]:
    """Partition the tasks of ``mm`` into groups (see the module docstring).

    Parameters
    ----------
    max_group_size:
        Most tasks per group; default :data:`DEFAULT_MAX_GROUP_SIZE` (or measured).
    flops_budget, weight_budget_bytes:
        Most FLOPs / weight bytes per group (shared work counted once). A set of tasks that share
        weights is never split to meet a budget; it forms a group of its own.
    groups:
        Explicit partition chosen by the user: validated (known tasks, each exactly once) and
        returned with each group in the MultiModel's task order.
    latency, candidate_sizes:
        With ``latency`` (seconds per run of one group's MultiModel, e.g.
        :func:`gmorph_tvm.grouping.measured_latency`, which fuses, compiles and times it on this
        machine) each candidate group size (default 1, 2, 4, 8, ... up to all tasks) is
        partitioned and the size with the smallest total latency of all groups wins.
    """
    names = mm.task_names
    if groups is not None:
        return _validated(groups, names)
    if max_group_size is not None and (not isinstance(max_group_size, int) or max_group_size < 1):
        raise GroupingError(f"max_group_size must be a positive int, got {max_group_size!r}")
    if latency is not None:
        if max_group_size is not None:
            raise GroupingError("give either max_group_size or latency, not both")
        return _measure_best(mm, flops_budget, weight_budget_bytes, latency, candidate_sizes)
    graph = _Graph(mm)
    return _partition(mm, graph, max_group_size or DEFAULT_MAX_GROUP_SIZE, flops_budget, weight_budget_bytes)


def _validated(groups: Sequence[Sequence[str]], names: list[str], complete: bool = True) -> list[list[str]]:
    """Groups as lists in the MultiModel's task order; unknown or repeated tasks are errors."""
    seen: set[str] = set()
    out = []
    for group in groups:
        if isinstance(group, str) or not len(group):
            raise GroupingError(f"each group must be a non-empty list of task names, got {group!r}")
        for task in group:
            if task not in names:
                raise GroupingError(f"group names unknown task {task!r}; tasks are {', '.join(names)}")
            if task in seen:
                raise GroupingError(f"task {task!r} is in more than one group")
            seen.add(task)
        out.append([t for t in names if t in set(group)])
    missing = [t for t in names if t not in seen]
    if complete and missing:
        raise GroupingError(f"task {missing[0]!r} is in no group; every task needs a group")
    return out


def _partition(mm: MultiModel, graph: _Graph, max_size: int, flops_budget, weight_budget) -> list[list[str]]:
    n = len(graph.tasks)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in graph.sharing_pairs(mm):
        parent[find(a)] = find(b)
    components: dict[int, list[int]] = {}
    for t in range(n):
        components.setdefault(find(t), []).append(t)
    # Same architectures next to each other (lockstep merging), otherwise task order.
    signatures: dict[tuple, int] = {}
    order_key = {}
    for root, members in components.items():
        sig = graph.signature(members[0])
        order_key[root] = (signatures.setdefault(sig, len(signatures)), members[0])
    ordered = [components[r] for r in sorted(components, key=lambda r: order_key[r])]
    # Balance: 10 tasks with at most 8 per group -> groups of 5.
    target_size = math.ceil(n / math.ceil(n / max_size))
    units: list[list[int]] = []
    for members in ordered:  # a sharing set larger than a group is cut in task order
        for start in range(0, len(members), max_size):
            units.append(members[start:start + max_size])
    groups: list[list[int]] = []
    current: list[int] = []
    for unit in units:
        candidate = current + unit
        if current and (
            len(candidate) > target_size
            or _over_budget(graph, candidate, flops_budget, weight_budget)
        ):
            groups.append(current)
            candidate = list(unit)
        current = candidate
    if current:
        groups.append(current)
    return [[graph.tasks[t] for t in sorted(group)] for group in groups]


def _over_budget(graph: _Graph, tasks: list[int], flops_budget, weight_budget) -> bool:
    if flops_budget is None and weight_budget is None:
        return False
    cost = graph.cost(sum(1 << t for t in tasks))
    return (flops_budget is not None and cost.flops > flops_budget) or (
        weight_budget is not None and cost.weight_bytes > weight_budget
    )


# ---- measurement ------------------------------------------------------------------------------


def _measure_best(mm, flops_budget, weight_budget, latency, candidate_sizes) -> list[list[str]]:
    graph = _Graph(mm)
    n = len(graph.tasks)
    if candidate_sizes is None:
        candidate_sizes = sorted({min(n, 2**k) for k in range(0, max(1, n).bit_length() + 1)})
    sizes = sorted({int(s) for s in candidate_sizes if int(s) >= 1})
    if not sizes:
        raise GroupingError(f"candidate_sizes must hold positive ints, got {list(candidate_sizes)!r}")
    best, best_time, seen = None, math.inf, set()
    for size in sizes:
        groups = _partition(mm, graph, size, flops_budget, weight_budget)
        key = tuple(tuple(g) for g in groups)
        if key in seen:
            continue
        seen.add(key)
        total = sum(latency(sub) for sub in split_into_groups(mm, groups))
        if total < best_time:
            best, best_time = groups, total
    assert best is not None  # sizes is not empty and the first partition always improves on inf
    return best


# ---- splitting ----------------------------------------------------------------------------------


def split_into_groups(mm: MultiModel, groups: Sequence[Sequence[str]]) -> list[MultiModel]:
    """One MultiModel per group: only the group's outputs, computation, inputs and weights."""
    groups = _validated(groups, mm.task_names, complete=False)
    return [_restrict(mm, group) for group in groups]


def _restrict(mm: MultiModel, tasks: list[str]) -> MultiModel:
    func = mm.mod["main"]
    num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(func.params)
    keep = [i for t in tasks for i in mm.output_index(t)]
    # main(*params) -> full(*params)[keep...], then inline the old main and drop what is dead.
    bb = relax.BlockBuilder()
    full = bb.add_func(
        relax.Function(func.params, func.body, func.ret_ty, func.is_pure).without_attr("global_symbol"),
        "full_model",
    )
    params = [relax.Var(p.name, p.ty) for p in func.params]
    with bb.function("main", params):
        with bb.dataflow():
            result = bb.emit(relax.Call(full, params))
            out = bb.emit_output(relax.Tuple([relax.TupleGetItem(result, i) for i in keep]))
        bb.emit_func_output(out)
    mod = relax.transform.InlinePrivateFunctions()(bb.get())
    mod = relax.transform.CanonicalizeBindings()(mod)
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    new_main = mod["main"]
    used = set(relax.analysis.free_vars(new_main.body))
    values = list(func.attrs["params"]) if func.attrs and "params" in func.attrs else []
    input_params = [p for p in new_main.params[:num_input] if p in used]
    weight_pairs = [
        (p, values[i]) for i, p in enumerate(new_main.params[num_input:]) if p in used and i < len(values)
    ]
    attrs = dict(func.attrs) if func.attrs else {}
    new_func = relax.Function(
        input_params + [p for p, _ in weight_pairs], new_main.body, new_main.ret_ty, new_main.is_pure
    )
    for key, value in attrs.items():
        if key not in ("params", "num_input", "gmorph.provenance"):
            new_func = new_func.with_attr(key, value)
    new_func = new_func.with_attr("num_input", len(input_params))
    if "params" in attrs:
        new_func = new_func.with_attr("params", [v for _, v in weight_pairs])
    weight_names = {p.name for p, _ in weight_pairs}
    if "gmorph.provenance" in attrs:
        prov_attr = {str(k): list(v) for k, v in attrs["gmorph.provenance"].items() if str(k) in weight_names}
        new_func = new_func.with_attr("gmorph.provenance", prov_attr)
    out_mod = tvm.IRModule({"main": new_func.with_attr("global_symbol", "main")})
    input_names = {p.name for p in input_params}
    inputs = [spec for spec in mm.inputs if spec.name in input_names]
    weights = {p.name: v for p, v in weight_pairs}
    provenance = {name: list(entries) for name, entries in mm.provenance.items() if name in weight_names}
    task_infos = [mm.task(t) for t in tasks]
    return MultiModel(out_mod, weights, inputs, task_infos, provenance)


# ---- small helpers ----------------------------------------------------------------------------


def _output_fields(func: relax.Function) -> list[relax.Expr]:
    """The flat output expressions of ``main`` (fields of the returned tuple)."""
    body = func.body
    ret = body.body
    bound = {b.var: b.value for block in body.blocks for b in block.bindings}
    while isinstance(ret, relax.Var) and ret in bound and isinstance(bound[ret], (relax.Tuple, relax.Var)):
        ret = bound[ret]
    if isinstance(ret, relax.Tuple):
        return list(ret.fields)
    return [ret]


def _vars_in(expr: relax.Expr) -> list[relax.Var]:
    found: list[relax.Var] = []

    def visit(node):
        if isinstance(node, relax.Var):
            found.append(node)

    relax.analysis.post_order_visit(expr, visit)
    return found


def _pairs_of_mask(mask: int) -> list[tuple[int, int]]:
    bits = [i for i in range(mask.bit_length()) if (mask >> i) & 1]
    return list(zip(bits, bits[1:]))


def _shape(expr) -> tuple | None:
    return static_shape(expr.ty)


def _flops(value: relax.Expr) -> int:
    """Rough FLOPs of one binding: 2*MACs for conv/matmul, one per output element otherwise."""
    name = op_name(value)
    if name is None:
        return 0
    out = static_shape(value.ty, first_field=True)
    if out is None:
        return 0
    elements = int(np.prod(out, dtype=np.int64))
    if name.startswith("relax.nn.conv") and "transpose" not in name:
        weight = _shape(value.args[1])
        if weight is not None:
            return 2 * elements * int(np.prod(weight[1:], dtype=np.int64))
    if name == "relax.matmul":
        lhs = _shape(value.args[0])
        if lhs:
            return 2 * elements * lhs[-1]
    if name in ("relax.reshape", "relax.permute_dims", "relax.squeeze", "relax.expand_dims"):
        return 0
    return elements


