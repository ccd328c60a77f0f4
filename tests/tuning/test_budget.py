"""A tuning budget in minutes: tune(minutes=M) stops at the wall clock and keeps the best so far."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import tvm
from tvm import relax

from gmorph_tvm.tuning import TuningWarning, lower, tune
from gmorph_tvm.tuning.report import NOT_REACHED, TUNED
from gmorph_tvm.tuning.tuner import deadline_grace_s

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})


def _conv_module() -> tvm.IRModule:
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 16, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = relax.const(rng.standard_normal((16, 8, 3, 3)).astype("float32"))
            out = bb.emit_output(relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=1)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.slow  # ~1 min: the budget plus the worker's start
def test_a_budget_in_minutes_stops_at_the_wall_clock(tmp_path):
    minutes = 0.5
    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TuningWarning)
        report = tune(_conv_module(), TARGET, minutes=minutes, work_dir=tmp_path, op_names=["conv2d"],
                      progress=False, shipped_records=False)
    took = time.monotonic() - started
    # No trial budget: only the clock stopped it (the candidates in flight may finish first).
    assert took <= 60 * minutes + deadline_grace_s(minutes) + 15, (took, report.table())
    (task,) = [t for t in report.tasks if "conv2d" in t.name]
    assert task.status in (TUNED, NOT_REACHED), report.table()
    if task.status == TUNED:  # what it found is kept, with the time of each improvement
        assert task.trials_run > 0 and task.improvements and task.improvements[-1][1] == task.best_us
        assert all(0 < at <= took for at, _ in task.improvements)
    assert report.trials == report.trials_run  # the report says what the clock allowed
    lower(_conv_module(), TARGET, database_dir=tmp_path)  # the database is intact


def test_minutes_alone_is_a_budget_and_must_be_positive(tmp_path):
    from gmorph_tvm.errors import TuningError

    with pytest.raises(TuningError, match="minutes must be a number > 0"):
        tune(_conv_module(), TARGET, minutes=-1, work_dir=tmp_path)


@pytest.mark.parametrize("budget, per_round, population", [
    ({"minutes": 5}, 16, 128),  # on the clock: small rounds, so the time reaches more kernels
    ({"trials": 256}, 64, 512),  # a trial budget: MetaSchedule-sized rounds
    ({"minutes": 5, "trials_per_round": 32, "population_size": 96}, 32, 96),  # the caller's choice wins
])
def test_a_budget_in_minutes_searches_in_small_rounds(tmp_path, monkeypatch, budget, per_round, population):
    """A round of 64 with a population of 512 took 92 s per kernel on 2 cores: 3 minutes searched one
    kernel of EfficientNet-Lite0. On the clock alone the rounds are 16 (population 128)."""
    from gmorph_tvm.tuning import tuner

    seen = {}

    def capture(task_specs, base_spec, *args, **kwargs):
        seen.update(base=base_spec, tasks=task_specs)
        return set()

    monkeypatch.setattr(tuner, "_run_workers", capture)
    tune(_conv_module(), TARGET, work_dir=tmp_path, op_names=["conv2d"], progress=False, shipped_records=False,
         **budget)
    assert seen["base"]["trials_per_round"] == per_round
    assert {spec["population_size"] for spec in seen["tasks"].values()} == {population}
