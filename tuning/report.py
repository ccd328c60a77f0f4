"""What a tuning run did, per task: returned by :func:`gmorph_tvm.tuning.tune`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Outcomes of a task that was meant to be tuned (skips use the statuses in tasks.py).
TUNED = "tuned"
REUSED = "reused"  # the database already held the planned number of trials
SHIPPED = "shipped"  # a record shipped with gmorph-tvm (tuning/records/) covers the planned trials
CRASHED = "crashed"  # the tuning process died (signal / exit) inside this task
FAILED = "failed"  # MetaSchedule raised; nothing usable recorded
TIMED_OUT = "timed out"
# Its whole design space is searched and no schedule of it ran (none generated, or every one
# failed: a gather measured on random indices reads out of bounds): it keeps its default schedule.
NO_SCHEDULE = "no schedule"
# The run ended (time budget, or the scheduler gave the trials to other kernels) before this
# kernel's first search round: it keeps its default schedule (or a transferred one).
NOT_REACHED = "not reached"
FALLBACK_STATUSES = (CRASHED, FAILED, TIMED_OUT)


class TuningWarning(UserWarning):
    """A workload could not be tuned, or a tuned schedule computed wrong results and was dropped:
    the kernel keeps its default schedule."""


@dataclass
class TaskReport:
    name: str
    calls: int
    flops: float  # per call
    share: float  # of the module's FLOPs (all calls)
    status: str
    trials_planned: int = 0
    trials_run: int = 0
    records_reused: int = 0
    records_rejected: int = 0  # measured schedules that computed wrong results (not stored)
    best_us: float | None = None  # best measured latency of one call, this run
    seconds: float = 0.0
    check_seconds: float = 0.0  # spent checking measured schedules' results against the default
    message: str = ""
    shipped: bool = False  # left to the shipped records (a record, or their note that nothing runs)
    # (seconds since tune() started, best us) at each improvement of this run's best.
    improvements: list[tuple[float, float]] = field(default_factory=list)
    # The improvement that gave the final best: the cost model's predicted speed-up of the
    # winning schedule over the best before it (None while the model still predicted at
    # random) and the speed-up measured.
    predicted_gain: float | None = None
    measured_gain: float | None = None
    # Workload hash of the record whose schedule was transferred (remapped to this kernel's
    # extents) and measured first: the search started from it.
    transferred_from: str = ""
    # Measured latency of one call of the kernel's default CPU schedule (what it runs untuned),
    # committed as its first record before its search: ``best_us`` is never above it.
    default_us: float | None = None
    valid_trials: int = 0  # trials of the search that built, ran and were stored


@dataclass
class TuningReport:
    target: dict[str, Any]
    work_dir: str
    trials: int
    seconds: float = 0.0
    tasks: list[TaskReport] = field(default_factory=list)
    shipped_note: str = ""  # which shipped records applied, or why none did

    @property
    def tuned(self) -> list[str]:
        return [t.name for t in self.tasks if t.status in (TUNED, REUSED, SHIPPED)]

    @property
    def shipped(self) -> list[str]:
        """Tasks left to shipped records (not tuned in this run)."""
        return [t.name for t in self.tasks if t.shipped]

    @property
    def fallbacks(self) -> list[str]:
        """Tasks meant to be tuned that keep default schedules (crash, error, timeout)."""
        return [t.name for t in self.tasks if t.status in FALLBACK_STATUSES]

    @property
    def trials_run(self) -> int:
        return sum(t.trials_run for t in self.tasks)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """Markdown table of the tasks, largest FLOPs share first."""
        lines = [
            "| task | calls | MFLOP/call | share | trials (run/planned) | default us | best us | status "
            "| improvements (s: us) | gain predicted / measured |",
            "|---|---:|---:|---:|---:|---:|---:|---|---|---:|",
        ]
        for t in sorted(self.tasks, key=lambda t: -t.share):
            best = f"{t.best_us:.1f}" if t.best_us is not None else "-"
            default = f"{t.default_us:.1f}" if t.default_us is not None else "-"
            steps = ", ".join(f"{at:.0f}: {us:.1f}" for at, us in t.improvements) or "-"
            if t.transferred_from:
                steps = f"transferred, {steps}"
            measured = f"{t.measured_gain:.2f}x" if t.measured_gain is not None else "-"
            predicted = f"{t.predicted_gain:.2f}x" if t.predicted_gain is not None else "random"
            gain = f"{predicted} / {measured}" if t.measured_gain is not None else "-"
            lines.append(
                f"| {t.name} | {t.calls} | {t.flops / 1e6:.2f} | {t.share:.1%} | "
                f"{t.trials_run}/{t.trials_planned} | {default} | {best} | {t.status} | {steps} | {gain} |"
            )
        lines.append(
            f"\n{len(self.tuned)} of {len(self.tasks)} tasks tuned, {self.trials_run} trials in "
            f"{self.seconds:.0f} s; database: {self.work_dir}"
        )
        return "\n".join(lines)
