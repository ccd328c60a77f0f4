"""Tuning tasks of a prepared module and how the trial budget is split between them.

MetaSchedule's ``extract_tasks`` already merges structurally equal kernels into one task whose
``weight`` is its number of calls, so a kernel shared by several fused models (or repeated inside
one) is tuned once. A task's cost is a roofline estimate of its time times its calls: its FLOPs,
or ``BYTE_FLOPS`` per byte it reads and writes when that is more (memory-bound kernels:
depthwise convs, pooling, elementwise work do a few FLOPs per byte, so FLOPs alone under-serve
them). Tasks below ``min_flops_share`` of the total cost are left to default schedules, and the
budget is split in proportion to cost share with a floor per tuned task (MetaSchedule needs a
handful of trials to find anything at all). When the floor does not fit, it shrinks to
``MIN_USEFUL_TRIALS`` (one measured batch); beyond that the smallest tasks are dropped first,
each with a note saying so: no tuned task gets fewer than ``MIN_USEFUL_TRIALS`` trials.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tvm

# Task statuses (TaskPlan.status / TaskReport.status).
PLANNED = "planned"
SKIPPED_FILTER = "skipped: op_names"
SKIPPED_SHARE = "skipped: cost share"
SKIPPED_BUDGET = "skipped: budget"

# Tasks under this share of the estimated cost keep default schedules unless told otherwise.
DEFAULT_MIN_FLOPS_SHARE = 0.01
# Fewest trials worth a search round: one batch of the first (cost-model-free) round.
MIN_USEFUL_TRIALS = 8
# Machine balance of the cost estimate: FLOPs a byte of memory traffic is worth. A tuned dense
# 3x3 conv does hundreds of FLOPs per byte moved, a 3x3 depthwise conv about 2, a max pool < 1;
# CPUs sustain roughly 5-20 FLOPs per byte of cache/DRAM bandwidth.
BYTE_FLOPS = 8.0


@dataclass
class TaskPlan:
    """One distinct kernel: what it costs and how many trials it gets."""

    name: str
    workload: tvm.IRModule  # the PrimFunc module MetaSchedule tunes
    calls: int  # how many call sites share this kernel
    flops: float  # per call
    share: float = 0.0  # of the module's total estimated cost (see module docstring)
    trials: int = 0
    status: str = PLANNED
    bytes: float = 0.0  # read and written per call (all buffers once)
    note: str = ""  # why a task is not tuned

    @property
    def total_flops(self) -> float:
        return self.flops * self.calls

    @property
    def cost(self) -> float:
        """Roofline estimate of all calls, in FLOP-equivalents."""
        return max(self.flops, BYTE_FLOPS * self.bytes) * self.calls


def kernel_flops(workload: tvm.IRModule) -> float:
    """Estimated FLOPs of one call of a kernel (0 when TVM cannot analyse it)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(workload))
    except Exception:  # opaque/extern kernels: nothing to tune anyway
        return 0.0


def kernel_bytes(workload: tvm.IRModule) -> float:
    """Bytes of every buffer a kernel takes (inputs, weights and outputs), each counted once."""
    total = 0.0
    for _, func in workload.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        for buf in func.params:  # buffer parameters carry their shape and dtype
            if not hasattr(buf, "shape"):
                continue
            try:
                elems = 1
                for dim in buf.shape:
                    elems *= int(dim)
            except TypeError:  # symbolic shape: unknown traffic
                continue
            total += elems * tvm.DataType(str(buf.dtype)).bits / 8
    return total


def extract(prepared: tvm.IRModule, target: tvm.target.Target) -> list[TaskPlan]:
    """The distinct kernels of a prepared module (one per structural-equality class)."""
    from tvm.s_tir import meta_schedule as ms

    plans = []
    for task in ms.relax_integration.extract_tasks(prepared, target, module_equality="structural"):
        workload = task.dispatched[0]
        plans.append(TaskPlan(task.task_name, workload, int(task.weight), kernel_flops(workload),
                              bytes=kernel_bytes(workload)))
    total = sum(p.cost for p in plans)
    for plan in plans:
        plan.share = plan.cost / total if total > 0 else 0.0
    return plans


def allocate(
    plans: list[TaskPlan],
    trials: int,
    *,
    op_names: Sequence[str] | None = None,
    min_flops_share: float = DEFAULT_MIN_FLOPS_SHARE,
    min_trials_per_task: int = 16,
    trials_per_task: int | None = None,
) -> list[TaskPlan]:
    """Set ``trials``/``status`` of every plan; returns the plans to tune, largest share first.

    ``op_names`` keeps only tasks whose name contains one of the strings (MetaSchedule's
    convention); the trials of the tuned tasks add up to exactly ``trials``. With
    ``trials_per_task``, ``trials`` is ignored: every task that passes the filters gets exactly
    that many (a per-kernel budget that does not depend on how many kernels the module has).
    """
    candidates = []
    for plan in plans:
        plan.trials, plan.note = 0, ""
        if op_names and not any(op in plan.name for op in op_names):
            plan.status = SKIPPED_FILTER
        elif plan.share <= 0 or plan.share < min_flops_share:
            plan.status = SKIPPED_SHARE
            plan.note = f"{plan.share:.1%} of the estimated cost, under min_flops_share {min_flops_share:.1%}"
        else:
            plan.status = PLANNED
            candidates.append(plan)
    candidates.sort(key=lambda p: (-p.share, p.name))
    if trials_per_task is not None:
        for plan in candidates:
            plan.trials = trials_per_task
        return candidates
    # An untuned conv runs ~10x slower than even a briefly tuned one, so when the budget is
    # short the floor shrinks (down to MIN_USEFUL_TRIALS) before any task is dropped.
    floor = max(1, min(min_trials_per_task, trials))
    if candidates and floor * len(candidates) > trials:
        floor = max(min(MIN_USEFUL_TRIALS, floor), trials // len(candidates))
    while candidates and floor * len(candidates) > trials:
        dropped = candidates.pop()
        dropped.status = SKIPPED_BUDGET
        dropped.note = (f"{trials} trials cannot give every task {floor} (one measured batch); "
                        f"raise trials to at least {floor * (len(candidates) + 1)} to tune it")
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
