"""Tuning tasks of a prepared module and how the trial budget is split between them.

MetaSchedule's ``extract_tasks`` already merges structurally equal kernels into one task whose
``weight`` is its number of calls, so a kernel shared by several fused models (or repeated inside
one) is tuned once. Each task's cost is its FLOPs times its calls; tasks below
``min_flops_share`` of the total are left to default schedules, and the budget is split in
proportion to FLOPs share with a floor per tuned task (MetaSchedule needs a handful of trials to
find anything at all). When the floor does not fit, it shrinks to ``MIN_USEFUL_TRIALS``; beyond
that the smallest tasks are dropped first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tvm

# Task statuses (TaskPlan.status / TaskReport.status).
PLANNED = "planned"
SKIPPED_FILTER = "skipped: op_names"
SKIPPED_SHARE = "skipped: FLOPs share"
SKIPPED_BUDGET = "skipped: budget"

# Fewest trials worth a search round: one batch of the first (cost-model-free) round.
MIN_USEFUL_TRIALS = 8


@dataclass
class TaskPlan:
    """One distinct kernel: what it costs and how many trials it gets."""

    name: str
    workload: tvm.IRModule  # the PrimFunc module MetaSchedule tunes
    calls: int  # how many call sites share this kernel
    flops: float  # per call
    share: float = 0.0  # of the module's total FLOPs
    trials: int = 0
    status: str = PLANNED

    @property
    def total_flops(self) -> float:
        return self.flops * self.calls


def kernel_flops(workload: tvm.IRModule) -> float:
    """Estimated FLOPs of one call of a kernel (0 when TVM cannot analyse it)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(workload))
    except Exception:  # opaque/extern kernels: nothing to tune anyway
        return 0.0


def extract(prepared: tvm.IRModule, target: tvm.target.Target) -> list[TaskPlan]:
    """The distinct kernels of a prepared module (one per structural-equality class)."""
    from tvm.s_tir import meta_schedule as ms

    plans = []
    for task in ms.relax_integration.extract_tasks(prepared, target, module_equality="structural"):
        workload = task.dispatched[0]
        plans.append(TaskPlan(task.task_name, workload, int(task.weight), kernel_flops(workload)))
    total = sum(p.total_flops for p in plans)
    for plan in plans:
        plan.share = plan.total_flops / total if total > 0 else 0.0
    return plans


def allocate(
    plans: list[TaskPlan],
    trials: int,
    *,
    op_names: Sequence[str] | None = None,
    min_flops_share: float = 0.01,
    min_trials_per_task: int = 16,
) -> list[TaskPlan]:
    """Set ``trials``/``status`` of every plan; returns the plans to tune, largest share first.

    ``op_names`` keeps only tasks whose name contains one of the strings (MetaSchedule's
    convention); the trials of the tuned tasks add up to exactly ``trials``.
    """
    candidates = []
    for plan in plans:
        plan.trials = 0
        if op_names and not any(op in plan.name for op in op_names):
            plan.status = SKIPPED_FILTER
        elif plan.share <= 0 or plan.share < min_flops_share:
            plan.status = SKIPPED_SHARE
        else:
            plan.status = PLANNED
            candidates.append(plan)
    candidates.sort(key=lambda p: (-p.share, p.name))
    # An untuned conv runs ~10x slower than even a briefly tuned one, so when the budget is
    # short the floor shrinks (down to MIN_USEFUL_TRIALS) before any task is dropped.
    floor = max(1, min(min_trials_per_task, trials))
    if candidates and floor * len(candidates) > trials:
        floor = max(min(MIN_USEFUL_TRIALS, floor), trials // len(candidates))
    while candidates and floor * len(candidates) > trials:
        candidates.pop().status = SKIPPED_BUDGET
    if not candidates:
        return []
    spare = trials - floor * len(candidates)
    share_sum = sum(p.share for p in candidates)
    # Largest-remainder rounding: the spare trials are split exactly, ties to larger tasks.
    exact = [spare * plan.share / share_sum for plan in candidates]
    for plan, value in zip(candidates, exact):
        plan.trials = floor + int(value + 1e-9)
    leftover = trials - sum(p.trials for p in candidates)
    by_remainder = sorted(range(len(candidates)), key=lambda i: -(exact[i] + 1e-9 - int(exact[i] + 1e-9)))
    for i in by_remainder[:leftover]:
        candidates[i].trials += 1
    return candidates
