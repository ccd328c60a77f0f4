"""Tuning worker: runs MetaSchedule's search for a list of tasks in its own process.

Started by :func:`gmorph_tvm.tuning.tune` as ``python -m gmorph_tvm.tuning._worker SPEC``. The
search (TuneContext, cost model, mutators) runs in-process in MetaSchedule and has crashed with
segfaults before (apache-tvm-ffi 0.1.15), so it runs here: a crash costs the parent one task,
not the user's process. All tasks are searched in one ``tune_tasks`` call with ONE cost model
(:mod:`gmorph_tvm.tuning.cost_model`: loaded from the work dir or the shipped pre-trained one,
saved after every measured batch) and a gradient task scheduler (:func:`_scheduler`) that also
enforces per-task caps and the wall-clock deadline, writing to the JSON database in the work dir.

Protocol: the parent reads one JSON object per line from this process's stdout (``ready``,
``start`` before each search round of a task, ``measured`` after it, ``rejected``, and one
``done`` per task at the end); everything else the process prints (MetaSchedule,
XGBoost, compilers) goes to ``<work_dir>/logs/worker.log``.

Fault injection for tests: ``GMORPH_TVM_TUNING_CRASH_TASK=<task name>`` makes the worker die
with SIGSEGV when the scheduler first picks that task, exactly like a crash inside MetaSchedule.
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


class _RunState:
    """What the scheduler and the measure callbacks of one worker share, per task (by index)."""

    def __init__(self, spec: dict[str, Any], emit: Callable[..., None]) -> None:
        tasks = spec["tasks"]
        self.emit = emit
        self.names = [t["name"] for t in tasks]
        self.caps = [int(t["trials"]) for t in tasks]  # most trials each task may get in this worker
        self.weights = [float(t.get("weight", 1.0)) for t in tasks]
        self.budget = int(spec.get("trials_global", sum(self.caps)))
        self.deadline = spec.get("deadline")  # epoch seconds, or None
        self.clock_zero = float(spec.get("clock_zero", time.time()))  # tune()'s start (report times)
        n = len(tasks)
        self.measured, self.failed = [0] * n, [0] * n
        self.best_s: list[float | None] = [None] * n
        self.history: list[list[float]] = [[] for _ in range(n)]  # best seconds after each batch
        self.seconds = [0.0] * n
        self.batch_started = 0.0
        self.predicted: list[Any] = [None] * n  # predicted scores of the batch being measured
        self.gain: list[dict[str, Any] | None] = [None] * n  # the decisive improvement
        self.stopped_by_us: set[int] = set()
        self.exhausted: set[int] = set()
        self.out_of_time = False

    @property
    def total_measured(self) -> int:
        return sum(self.measured)


def _predict_callback(state: _RunState, cost_model: Any, warmup: int):
    """First measure callback: the cost model's scores of a batch before it learns from it."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Predict(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            state.predicted[task_id] = None
            if cost_model.data_size < warmup or cost_model.booster is None or not len(measure_candidates):
                return  # still predicting at random: nothing to compare
            try:
                context = task_scheduler.tasks_[task_id].ctx
                state.predicted[task_id] = list(cost_model.predict(context, list(measure_candidates)))
            except Exception:  # noqa: BLE001 - a report detail, never worth a failed batch
                traceback.print_exc()

    return _Predict()


def _per_task_callback(callbacks: list[Any]):
    """A measure callback that hands each batch to the callback of its task (``callbacks[task_id]``)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _PerTask(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            callbacks[task_id].apply(task_scheduler, task_id, measure_candidates, builder_results, runner_results)

    return _PerTask()


def _progress_callback(state: _RunState, cost_model: Any, save_model: Callable[[], None]):
    """Last measure callback: counts, best latency, time to each improvement, predicted vs
    measured gain; reports each batch to the parent and saves the cost model."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            before = state.best_s[task_id]
            batch_best, batch_best_i, valid = None, None, 0
            for i, (build, run) in enumerate(zip(builder_results, runner_results)):
                if build.error_msg is not None or run.error_msg is not None or not run.run_secs:
                    state.failed[task_id] += 1
                    continue
                valid += 1
                secs = sum(float(s) for s in run.run_secs) / len(run.run_secs)
                if batch_best is None or secs < batch_best:
                    batch_best, batch_best_i = secs, i
            improved = batch_best is not None and (before is None or batch_best < before)
            if improved:
                state.best_s[task_id] = batch_best
                scores = state.predicted[task_id]
                if before is not None and scores is not None and batch_best_i is not None:
                    # XGBModel scores are throughput relative to the best measured (1.0): the
                    # score of the schedule that won is the gain the model predicted for it.
                    state.gain[task_id] = {"predicted": float(scores[batch_best_i]),
                                           "measured": before / batch_best}
            if state.best_s[task_id] is not None:
                state.history[task_id].append(state.best_s[task_id])
            state.measured[task_id] += len(measure_candidates)
            state.seconds[task_id] += time.time() - state.batch_started
            best = state.best_s[task_id]
            state.emit(
                "measured",
                task=state.names[task_id],
                count=len(measure_candidates),
                valid=valid,
                best_us=None if best is None else best * 1e6,
                improved=improved,
                at_s=time.time() - state.clock_zero,
                failed=state.failed[task_id],
            )
            save_model()

    return _Progress()


def _scheduler(state: _RunState, seed: Callable[[int], None] | None = None):
    """MetaSchedule's gradient task scheduler (Ansor's), plus per-task caps and a deadline.

    First every task gets one batch (round robin), then the task whose best latency x calls is
    expected to drop most per trial (alpha x recent slope + (1 - alpha) x best / batches): time
    goes to the kernels where it pays. Each pick is reported to the parent (``start``), so a
    crash in the search is charged to the task being searched. Past the deadline no task is
    picked: the batches in flight are measured and the run ends with what it found. ``seed``
    runs on a task when it is first picked, before its first batch (transferred and default
    schedules).
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler, TaskScheduler

    alpha, window = 0.2, 3

    @derived_object
    class _GradientWithDeadline(PyTaskScheduler):
        def __init__(self) -> None:
            super().__init__()
            self.pending: set[int] = set()
            self.tried: set[int] = set()

        def _gradient(self, i: int) -> float:
            history = state.history[i]
            if not history:
                return float("inf")  # nothing valid measured yet: worth a batch
            best, n = history[-1], len(history)
            slope = (history[-1 - window] - best) / window if n > window else 0.0
            return (alpha * slope + (1 - alpha) * best / n) * state.weights[i]

        def next_task_id(self) -> int:
            outer = self._outer()
            for i in sorted(self.pending):  # measure what is in flight: its results decide
                if not outer.tasks_[i].is_terminated:
                    self.join_running_task(i)
            self.pending.clear()
            for i, record in enumerate(outer.tasks_):
                if record.is_terminated:
                    if i not in state.stopped_by_us and state.measured[i] < state.caps[i]:
                        state.exhausted.add(i)  # the search had no candidate left
                    continue
                if state.measured[i] >= state.caps[i]:
                    state.stopped_by_us.add(i)
                    TaskScheduler.terminate_task(outer, i)
            if state.deadline is not None and time.time() >= state.deadline:
                state.out_of_time = True
                return -1
            if state.total_measured >= state.budget:
                return -1
            alive = [i for i, record in enumerate(outer.tasks_) if not record.is_terminated]
            if not alive:
                return -1
            fresh = [i for i in alive if i not in self.tried]
            chosen = fresh[0] if fresh else max(alive, key=lambda i: (self._gradient(i), -i))
            first = chosen not in self.tried
            self.tried.add(chosen)
            self.pending.add(chosen)
            state.batch_started = time.time()
            state.emit("start", task=state.names[chosen])
            if first and seed is not None:
                seed(chosen)
                state.batch_started = time.time()
            return chosen

    return _GradientWithDeadline()


def _load_pickled(blob: str | None):
    if blob is None:
        return None
    import cloudpickle

    return cloudpickle.loads(base64.b64decode(blob))


def _load_cost_model(spec: dict[str, Any], num_threads: Any):
    """The run's cost model: the work dir's (an earlier worker or run), else the shipped
    pre-trained one, else a fresh one."""
    from gmorph_tvm.tuning import cost_model as cm

    threads = num_threads if isinstance(num_threads, int) else None
    model = cm.new_model(threads, int(spec.get("cost_model_warmup", cm.WARMUP_SAMPLES)))
    for path in spec.get("cost_model_from", []):
        if not os.path.isfile(path):
            continue
        try:
            count = cm.load(model, path)
        except Exception as err:  # noqa: BLE001 - an unreadable model costs its knowledge, not the run
            logging.getLogger("tvm.s_tir.meta_schedule").warning("cost model %s ignored: %s", path, one_line(err))
            model = cm.new_model(threads, int(spec.get("cost_model_warmup", cm.WARMUP_SAMPLES)))
            continue
        logging.getLogger("tvm.s_tir.meta_schedule").info("cost model from %s: %d measurements", path, count)
        break
    return model


def _measure_seed(state, index, sch, context, database, builder, runner, model, target, save_model,
                  **fields: Any) -> float | None:
    """Build and run one schedule of task ``index`` outside its search (a transferred record, the
    default CPU schedule), commit it as a record and teach the cost model; returns its seconds
    (None when it did not build or run). Not a trial of the task's budget."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from gmorph_tvm.tuning.verify import FAILED_RUN_SECS

    workload = context.mod
    candidate = ms.MeasureCandidate(sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True))
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    if built.error_msg is not None:
        return None
    # The runner wants a device name ("cpu"), as MetaSchedule's task scheduler gives it, not the
    # target kind ("llvm": the runner raised "Unknown device" and every seed measured as failed).
    device = str(tvm.runtime.Device(target.get_target_device_type(), 0)).split(":")[0]
    (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, device, candidate.args_info)])
    result = future.result()
    ms.utils.remove_build_dir(built.artifact_path)
    secs = [float(s) for s in result.run_secs] if result.run_secs else [FAILED_RUN_SECS]
    database.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, database.commit_workload(workload), secs, target, candidate.args_info))
    model.update(context, [candidate], [result])
    mean = sum(secs) / len(secs)
    state.seconds[index] += time.time() - state.batch_started
    ran = result.error_msg is None and mean < FAILED_RUN_SECS
    improved = ran and (state.best_s[index] is None or mean < state.best_s[index])
    if improved:
        state.best_s[index] = mean
        state.history[index].append(mean)
    state.emit("measured", task=state.names[index], count=0, best_us=state.best_s[index] and state.best_s[index] * 1e6,
               improved=improved, at_s=time.time() - state.clock_zero, failed=state.failed[index], **fields)
    save_model()
    return mean if ran else None


def _transfer_sources(directories: list[str]):
    """Records that lend their schedules to kernels of other extents, by structure key."""
    from tvm.s_tir import meta_schedule as ms

    from gmorph_tvm.tuning import transfer

    databases = []
    for directory in directories:
        try:
            databases.append(ms.database.JSONDatabase(
                path_workload=os.path.join(directory, "database_workload.json"),
                path_tuning_record=os.path.join(directory, "database_tuning_record.json"),
                module_equality="structural", allow_missing=False,
            ))
        except Exception:  # noqa: BLE001 - an unreadable folder lends nothing
            traceback.print_exc()
    return transfer.collect_sources(databases)


def _seeder(spec, state, contexts, database, builder, runner, model, target, save_model):
    """``seed(index)``, called when the scheduler first picks a task, before its first batch:

    * a task marked ``transfer`` (no record of its own) is measured with the nearest structurally
      equal record's schedule remapped to its extents (:mod:`gmorph_tvm.tuning.transfer`, verified
      there);
    * a CPU kernel is measured with its default schedule (:mod:`gmorph_tvm.tuning.default_schedules`,
      what a build without a record runs), unless the database already holds it.

    Both are committed as records: the best record, which a build applies, is then never slower, as
    measured, than what the kernel runs untuned (a short search often is: the tuning test's 8 trials
    lost 1.7x to it; so are transferred schedules: EfficientNet-Lite0 at 96x96 ran 5.6 ms on set E's
    records transferred against 2.9 ms on default schedules), the cost model learns both, and the
    report shows the default's time beside the best. Lazily, per task: a run that never reaches a
    kernel leaves its database entry empty, and the kernel keeps its default schedule."""
    from gmorph_tvm.tuning import transfer
    from gmorph_tvm.tuning.default_schedules import is_default_record, record_schedule

    sources: list[Any] = []  # computed on first use

    def seed(index: int) -> None:
        context, task = contexts[index], spec["tasks"][index]
        workload = context.mod
        if task.get("transfer") and spec.get("transfer_from"):
            if not sources:
                sources.append(_transfer_sources(spec["transfer_from"]))
            state.batch_started = time.time()
            state.emit("seed", task=state.names[index])  # a crash here is this task's
            found = transfer.transfer_record(state.names[index], workload, target, sources[0])
            if found is not None:
                _measure_seed(state, index, found.schedule, context, database, builder, runner, model, target,
                              save_model, transferred=str(found.source.record.workload.as_json()[0]))
        if target.kind.name != "llvm" or not spec.get("seed_default", True):
            return
        if database.has_workload(workload) and any(
                is_default_record(r) for r in database.get_top_k(database.commit_workload(workload), 1 << 20)):
            return
        state.batch_started = time.time()
        state.emit("seed", task=state.names[index])
        made = record_schedule(workload, target)
        if made is None:
            return
        sch, rule = made
        secs = _measure_seed(state, index, sch, context, database, builder, runner, model, target, save_model,
                             default_rule=rule)
        if secs is not None:
            state.emit("default", task=state.names[index], us=secs * 1e6, rule=rule)

    return seed


def run(spec: dict[str, Any], emit: Callable[..., None]) -> None:
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from gmorph_tvm.tuning import cost_model as cm
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
    num_threads = spec.get("num_threads", "physical")
    state = _RunState(spec, emit)
    contexts, checks, stats = [], [], []
    for index, task in enumerate(spec["tasks"]):
        name = task["name"]
        workload = tvm.ir.load_json(task["workload"])
        contexts.append(ms.TuneContext(
            mod=tvm.ir.load_json(task["workload"]),  # the same workload as `workload` below
            target=target,
            space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=int(task.get("population_size", 512))
            ),
            task_name=name,
            logger=_task_logger(log_dir, name),
            rand_state=int(task["seed"]),
            num_threads=num_threads,
        ).clone())

        def reject(check, name=name):
            emit("rejected", task=name, message=check.message, error=check.error)

        # MetaSchedule's AddToDatabase, but a schedule is checked against the default one first.
        stats.append({})
        checks.append(verifying_add_to_database(database, workload, target, name, reject, stats=stats[index]))
    model = _load_cost_model(spec, contexts[0].num_threads if contexts else None)
    state_path = os.path.join(work_dir, cm.STATE_FILE)
    warmup = int(spec.get("cost_model_warmup", cm.WARMUP_SAMPLES))

    def save_model() -> None:
        if model.data_size:
            cm.save(model, state_path)

    scheduler = _scheduler(state, _seeder(spec, state, contexts, database, builder, runner, model, target,
                                          save_model))
    if crash_task in state.names:  # fault injection: die when the scheduler first picks it
        crash_index = state.names.index(crash_task)
        emit_plain = state.emit

        def emit_and_crash(event: str, **fields: Any) -> None:
            emit_plain(event, **fields)
            if event == "start" and fields.get("task") == state.names[crash_index]:
                os.kill(os.getpid(), signal.SIGSEGV)

        state.emit = emit_and_crash
    callbacks = [
        cb for cb in ms.measure_callback.MeasureCallback.create("default")
        if "AddToDatabase" not in type(cb).__name__
    ]
    emit("ready")
    if contexts:
        per_round = max(1, min(int(spec.get("trials_per_round", 64)), max(state.caps)))
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=state.weights,
            work_dir=work_dir,
            max_trials_global=state.budget,
            max_trials_per_task=max(state.caps),
            num_trials_per_iter=per_round,
            builder=builder,
            runner=runner,
            database=database,
            cost_model=model,
            measure_callbacks=[
                _predict_callback(state, model, warmup), _per_task_callback(checks), *callbacks,
                _progress_callback(state, model, save_model),
            ],
            task_scheduler=scheduler,
        )
    for index, name in enumerate(state.names):
        best = state.best_s[index]
        emit(
            "done",
            task=name,
            trials=state.measured[index],
            failed=state.failed[index],
            best_us=None if best is None else best * 1e6,
            seconds=state.seconds[index],
            check_seconds=stats[index].get("check_seconds", 0.0),
            exhausted=index in state.exhausted and state.measured[index] < state.caps[index],
            out_of_time=state.out_of_time,
            gain=state.gain[index],
        )


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
