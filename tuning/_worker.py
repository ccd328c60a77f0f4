"""Tuning worker: runs MetaSchedule's search for a list of tasks in its own process.

Started by :func:`gmorph_tvm.tuning.tune` as ``python -m gmorph_tvm.tuning._worker SPEC``. The
search (TuneContext, cost model, mutators) runs in-process in MetaSchedule and has crashed with
segfaults before (apache-tvm-ffi 0.1.15), so it runs here: a crash costs the parent one task,
not the user's process. Tasks run one after the other, each with its own trial budget, writing
to the shared JSON database in the work dir.

Protocol: the parent reads one JSON object per line from this process's stdout (``ready``,
``start``, ``measured``, ``done``, ``error``); everything else the process prints (MetaSchedule,
XGBoost, compilers) goes to ``<work_dir>/logs/worker.log``.

Fault injection for tests: ``GMORPH_TVM_TUNING_CRASH_TASK=<task name>`` makes the worker die
with SIGSEGV when it starts that task, exactly like a crash inside MetaSchedule.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from gmorph_tvm.errors import one_line

CRASH_TASK_ENV = "GMORPH_TVM_TUNING_CRASH_TASK"


def build_without_intrinsics(mod, target, _params):
    """MetaSchedule's default build minus its ``import tvm.s_tir.tensor_intrin`` (35-90 s here).

    Runs in LocalBuilder's worker processes, which are restarted for every batch; the schedule
    is already applied, so lowering needs no intrinsic registry. Pickled by value (this module
    runs as ``__main__``), so the builder workers never import gmorph_tvm.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _event_writer() -> Callable[..., None]:
    """Keep the real stdout for events; send fd 1/2 (C++ and Python output) to the log."""
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")

    def emit(event: str, **fields: Any) -> None:
        events.write(json.dumps({"event": event, **fields}) + "\n")
        events.flush()

    return emit


def _redirect_output(log_path: str) -> None:
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", closefd=False)


def _setup_logging(log_dir: str) -> logging.Logger:
    """MetaSchedule's loggers write to files in log_dir, never to the console."""
    formatter = logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger("tvm.s_tir.meta_schedule")
    root.setLevel(logging.INFO)
    root.propagate = False
    handler = logging.FileHandler(os.path.join(log_dir, "meta_schedule.log"))
    handler.setFormatter(formatter)
    root.addHandler(handler)
    return root


def _task_logger(log_dir: str, task_name: str) -> logging.Logger:
    logger = logging.getLogger(f"tvm.s_tir.meta_schedule.gmorph_task.{task_name}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.FileHandler(os.path.join(log_dir, f"task_{task_name}.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
        logger.addHandler(handler)
    return logger


def _progress_callback(emit: Callable[..., None], task_name: str):
    """A MeasureCallback reporting each measured batch (count, best latency) to the parent."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def __init__(self) -> None:
            super().__init__()
            self.best_s: float | None = None
            self.measured = 0
            self.failed = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            for build, run in zip(builder_results, runner_results):
                if build.error_msg is not None or run.error_msg is not None or not run.run_secs:
                    self.failed += 1
                    continue
                secs = sum(float(s) for s in run.run_secs) / len(run.run_secs)
                self.best_s = secs if self.best_s is None else min(self.best_s, secs)
            self.measured += len(measure_candidates)
            emit(
                "measured",
                task=task_name,
                count=len(measure_candidates),
                best_us=None if self.best_s is None else self.best_s * 1e6,
                failed=self.failed,
            )

    return _Progress()


def _load_pickled(blob: str | None):
    if blob is None:
        return None
    import cloudpickle

    return cloudpickle.loads(base64.b64decode(blob))


def run(spec: dict[str, Any], emit: Callable[..., None]) -> None:
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from gmorph_tvm.tuning.intrinsics import register_for_target
    from gmorph_tvm.tuning.remote import make_export, make_runner
    from gmorph_tvm.tuning.verify import verifying_add_to_database

    target = tvm.target.Target(spec["target"])
    register_for_target(target)
    work_dir, log_dir = spec["work_dir"], os.path.join(spec["work_dir"], "logs")
    _setup_logging(log_dir)
    database = ms.database.JSONDatabase(work_dir=work_dir, module_equality="structural")
    board = spec.get("board_export")
    builder = _load_pickled(spec.get("builder")) or ms.builder.LocalBuilder(
        f_build=build_without_intrinsics,
        # A board (aarch64 Jetson, CUDA) gets a .so linked by the cross compiler, with SASS.
        f_export=make_export(board["cxx"], board["arch"], board["board_cuda"]) if board else None,
        timeout_sec=spec.get("build_timeout_s", 60.0),
    )
    if spec.get("rpc"):  # every board registered with the tracker under the key, in parallel
        runner = make_runner(spec["rpc"])
    else:
        runner = _load_pickled(spec.get("runner")) or ms.runner.LocalRunner(
            timeout_sec=spec.get("run_timeout_s", 60.0)
        )
    logging.getLogger("tvm.s_tir.meta_schedule").info(
        "gmorph-tvm runner: %s", f"RPCRunner via tracker {spec['rpc']['host']}:{spec['rpc']['port']} key "
        f"{spec['rpc']['key']!r}, {spec['rpc']['max_workers']} board(s)" if spec.get("rpc") else type(runner).__name__
    )
    crash_task = os.environ.get(CRASH_TASK_ENV)
    emit("ready")
    for task in spec["tasks"]:
        name, trials = task["name"], int(task["trials"])
        emit("start", task=name, trials=trials)
        if crash_task == name:
            os.kill(os.getpid(), signal.SIGSEGV)
        started = time.monotonic()
        try:
            context = ms.TuneContext(
                mod=tvm.ir.load_json(task["workload"]),  # the same workload as `workload` below
                target=target,
                space_generator="post-order-apply",
                search_strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=int(task.get("population_size", 512))
                ),
                task_name=name,
                logger=_task_logger(log_dir, name),
                rand_state=int(task["seed"]),
                num_threads=spec.get("num_threads", "physical"),
            ).clone()
            progress = _progress_callback(emit, name)
            workload = tvm.ir.load_json(task["workload"])
            rejected = []

            def reject(check, name=name, rejected=rejected):
                rejected.append(check)
                emit("rejected", task=name, message=check.message, error=check.error)

            # MetaSchedule's AddToDatabase, but a schedule is checked against the default one first.
            check_stats: dict[str, float] = {}
            verified_add = verifying_add_to_database(database, workload, target, name, reject, stats=check_stats)
            callbacks = [
                cb for cb in ms.measure_callback.MeasureCallback.create("default")
                if "AddToDatabase" not in type(cb).__name__
            ]
            ms.tune.tune_tasks(
                tasks=[context],
                task_weights=[1.0],
                work_dir=work_dir,
                max_trials_global=trials,
                max_trials_per_task=trials,
                num_trials_per_iter=min(trials, spec.get("trials_per_round", 64)),
                builder=builder,
                runner=runner,
                database=database,
                cost_model=ms.cost_model.XGBModel(num_tuning_cores=context.num_threads),
                measure_callbacks=[verified_add, *callbacks, progress],
                task_scheduler="round-robin",
            )
            emit(
                "done",
                task=name,
                trials=progress.measured,
                failed=progress.failed,
                best_us=None if progress.best_s is None else progress.best_s * 1e6,
                seconds=time.monotonic() - started,
                check_seconds=check_stats.get("check_seconds", 0.0),
            )
        except Exception as err:  # a Python-level failure: report it, keep going
            traceback.print_exc()
            emit("error", task=name, message=one_line(err))


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as spec_file:
        spec = json.load(spec_file)
    os.makedirs(os.path.join(spec["work_dir"], "logs"), exist_ok=True)
    emit = _event_writer()
    _redirect_output(os.path.join(spec["work_dir"], "logs", "worker.log"))
    run(spec, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
