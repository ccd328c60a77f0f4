"""Every option of a tuning run: :func:`gmorph_tvm.tuning.tune` takes one :class:`TuneConfig`.

``tune(mod, target, config=TuneConfig(trials=200), work_dir="db")``; keyword arguments named like
a field (``tune(mod, target, trials=200, work_dir="db")``) override the config's field, as
:func:`gmorph_tvm.search` does with :class:`~gmorph_tvm.SearchConfig`. Invalid values raise
:class:`~gmorph_tvm.errors.TuningError` when the config is made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from gmorph_tvm.errors import TuningError
from gmorph_tvm.tuning.tasks import DEFAULT_MIN_FLOPS_SHARE

# Candidates per search round on a budget in minutes alone. A round of 64 with a population of 512
# took about 90 s per kernel on 2 cores (generating, building and measuring), so 3 minutes searched
# one kernel of EfficientNet-Lite0; rounds of 16 with a population of 128 searched three (two
# convolutions came out 2.5x and 1.4x faster than their default schedules).
MINUTES_TRIALS_PER_ROUND = 16
DEFAULT_TRIALS_PER_ROUND = 64


@dataclass
class TuneConfig:
    """Options of :func:`gmorph_tvm.tuning.tune` (the database folder is its own argument)."""

    #: Total measurements over all tuned kernels; the task scheduler gives them to the kernels
    #: where they pay (see :mod:`gmorph_tvm.tuning.tuner`).
    trials: int | None = None
    #: Instead of ``trials``: every tuned kernel gets exactly this many (the total grows with
    #: the number of kernels).
    trials_per_task: int | None = None
    #: Wall-clock budget in minutes: the search stops then and keeps the best schedules found so
    #: far. Alone (no ``trials``), tuning runs until the clock says stop.
    minutes: float | None = None
    #: Only kernels whose name contains one of these strings (MetaSchedule's convention).
    op_names: Sequence[str] | None = None
    #: Kernels under this share of the estimated cost keep default schedules.
    min_flops_share: float = DEFAULT_MIN_FLOPS_SHARE
    #: Fewest trials a tuned kernel is planned (shrinks to one measured batch on a short budget).
    min_trials_per_task: int = 16
    #: Show a progress bar.
    progress: bool = True
    #: MetaSchedule runner / builder objects (e.g. an ``RPCRunner``); picklable with cloudpickle.
    runner: Any = None
    builder: Any = None
    #: Seed of the search.
    seed: int = 0
    #: A kernel whose search runs longer than this is stopped (it keeps what it found).
    task_timeout_s: float | None = None
    #: Candidates measured per search round of one kernel (at most; default: 64 for a trial budget,
    #: :data:`MINUTES_TRIALS_PER_ROUND` for a budget in minutes alone).
    trials_per_round: int | None = None
    #: Population of the evolutionary search (default: 8x a kernel's trials within [64, 512];
    #: on a budget in minutes alone, 8x the round).
    population_size: int | None = None
    #: ``"host:port"`` of a TVM RPC tracker and the device ``key``: measure on its boards.
    tracker: str | tuple[str, int] | None = None
    key: str | None = None
    #: Use the records shipped with gmorph-tvm (exact and transferred) and its pre-trained cost model.
    shipped_records: bool = True
    #: A kernel with no record of its own is first measured with the schedule of the nearest
    #: kernel of the same structure (another shape), remapped and verified: the search starts there.
    transfer: bool = True
    #: Convolution layout, as :func:`gmorph_tvm.build` takes it (default: NHWC on CPUs).
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        for name in ("trials", "trials_per_task"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise TuningError(f"the number of tuning {name} must be >= 0 (an integer), got {value!r}")
        if self.trials is not None and self.trials_per_task is not None:
            raise TuningError("give tune() either trials (a total) or trials_per_task, not both")
        if self.minutes is not None and (isinstance(self.minutes, bool) or not isinstance(self.minutes, (int, float))
                                         or not self.minutes > 0):
            raise TuningError(f"the tuning budget in minutes must be a number > 0, got {self.minutes!r}")
        if not 0 <= self.min_flops_share < 1:
            raise TuningError(f"min_flops_share must be in [0, 1), got {self.min_flops_share}")
        if self.tracker is not None and self.runner is not None:
            raise TuningError("give tune() either a runner or a tracker, not both")
        if isinstance(self.op_names, str):
            self.op_names = [self.op_names]

    @staticmethod
    def with_overrides(config: TuneConfig | None, overrides: Mapping[str, Any]) -> TuneConfig:
        """``config`` (default: all defaults) with the fields named in ``overrides`` replaced."""
        names = {f.name for f in fields(TuneConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TuningError(
                f"unknown tuning option(s) {', '.join(unknown)}; TuneConfig has {', '.join(sorted(names))}"
            )
        if config is None:
            return TuneConfig(**overrides)
        if not isinstance(config, TuneConfig):
            raise TuningError(f"config must be a gmorph_tvm.TuneConfig, not {type(config).__name__}")
        return replace(config, **overrides)
