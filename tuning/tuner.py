"""MetaSchedule tuning of a whole (fused) Relax module, isolated from the caller's process.

``tune`` prepares the module exactly as :func:`gmorph_tvm.tuning.lower` will, extracts its
distinct kernels (identical kernels of different models are one task), splits the trial budget
by estimated cost share (FLOPs, or memory traffic where that dominates), and runs the search in a worker
subprocess (``_worker.py``) that appends to a JSON
database in ``work_dir``. If the worker dies inside a task (segfault, abort, OOM) or the task
raises or times out, that kernel is reported with a :class:`TuningWarning` naming it and simply
has no records, so it keeps its default schedule; a fresh worker carries on with the other tasks.

Every measured schedule is run against the kernel's default schedule on random inputs before
it is committed (:func:`gmorph_tvm.tuning.verify.verifying_add_to_database`); one that computes
different values is not stored, and the task's report counts it (``records_rejected``, with a
:class:`TuningWarning`).

Trials already in the database count towards each task's budget, so re-running with the same
work dir and budget tunes nothing again, and a larger budget only runs the difference (when
that is at least one measured batch, ``MIN_USEFUL_TRIALS``). A task whose search stopped short of
its trials used up its design space (a transpose has a handful of schedules, a gather one): the
work dir notes it (:func:`~gmorph_tvm.tuning.shipped.read_exhausted`, shipped records too) and it
is not searched again, whatever the budget.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tvm

from gmorph_tvm.core.targets import host_is_native, is_cuda, resolve_target, target_dict
from gmorph_tvm.errors import TuningError
from gmorph_tvm.frontend.multimodel import MultiModel, bind_weights
from gmorph_tvm.tuning import cost_model
from gmorph_tvm.tuning import report as rpt
from gmorph_tvm.tuning.config import DEFAULT_TRIALS_PER_ROUND, MINUTES_TRIALS_PER_ROUND, TuneConfig
from gmorph_tvm.tuning.ffi_guard import ensure_ir_json_works
from gmorph_tvm.tuning.pipeline import DATABASE_FILES, has_database, open_database, prepare
from gmorph_tvm.tuning.remote import export_spec, runner_spec
from gmorph_tvm.tuning.report import TaskReport, TuningReport, TuningWarning
from gmorph_tvm.tuning.shipped import lookup as lookup_shipped
from gmorph_tvm.tuning.shipped import note_exhausted, read_exhausted, workload_hash
from gmorph_tvm.tuning.target_key import claim_work_dir
from gmorph_tvm.tuning.tasks import MIN_USEFUL_TRIALS, TaskPlan, allocate, extract

# The trial budget of a run bounded by minutes alone (the clock stops it long before).
UNLIMITED_TRIALS = 1_000_000


def deadline_grace_s(minutes: float) -> float:
    """How long past the deadline the worker may take to measure the candidates in flight
    before it is stopped (what it committed so far stays): a tenth of the budget, 10-60 s."""
    return min(60.0, max(10.0, 6.0 * minutes))


def _resolve(target: Any) -> tvm.target.Target:
    return resolve_target(target)


def _target_spec(target: tvm.target.Target) -> dict[str, Any]:
    return target_dict(target)


def _pickled(obj: Any, what: str) -> str | None:
    if obj is None:
        return None
    import cloudpickle

    try:
        return base64.b64encode(cloudpickle.dumps(obj)).decode("ascii")
    except Exception as err:
        raise TuningError(f"the {what} given to tune() cannot be sent to the tuning process: {err}") from err


def _records_in_database(work_dir: Path, plans: Sequence[TaskPlan]) -> dict[str, int]:
    """Valid tuning records already stored per task name."""
    if not has_database(work_dir):
        return {}
    database = open_database(work_dir)
    counts = {}
    for plan in plans:
        if database.has_workload(plan.workload):
            workload = database.commit_workload(plan.workload)  # existing entry: no write
            counts[plan.name] = len(database.get_top_k(workload, max(plan.trials, 1)))
    return counts


def _repair_json_lines(work_dir: Path) -> None:
    """Drop a torn last line a crashed worker may have left in the database files."""
    for name in DATABASE_FILES:
        path = work_dir / name
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        good = []
        for line in lines:
            try:
                json.loads(line)
                good.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue
        if good != lines:
            path.write_text("".join(good), encoding="utf-8")


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class _WorkerRun:
    """One worker process tuning a list of tasks; yields its events."""

    def __init__(self, spec: dict[str, Any], spec_path: Path) -> None:
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        env = dict(os.environ)  # same interpreter, same installed gmorph_tvm
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gmorph_tvm.tuning._worker", str(spec_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # the worker logs to work_dir/logs/worker.log
            stdin=subprocess.DEVNULL,
            env=env,
            # Own process group: killing it also ends MetaSchedule's builder/runner workers.
            start_new_session=True,
        )
        self.selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.buffer = b""

    def events(self, poll_s: float = 1.0):
        """Yield parsed events, or None every ``poll_s`` without one; ends when the worker exits."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            if not self.selector.select(timeout=poll_s):
                yield None
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self.buffer += chunk
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue
        self.proc.wait()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and any pool processes left
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        self.selector.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _worker_log_tail(work_dir: Path, lines: int = 3) -> str:
    log = work_dir / "logs" / "worker.log"
    if not log.is_file():
        return ""
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-lines:]
    return " | ".join(tail)


def _module_to_tune(model: MultiModel | tvm.IRModule) -> tvm.IRModule:
    if isinstance(model, MultiModel):
        return model.bound_module()
    if isinstance(model, tvm.IRModule):
        return bind_weights(model)
    raise TuningError(f"tune() takes a MultiModel or a tvm.IRModule, not {type(model).__name__}")


def tune(
    mod: MultiModel | tvm.IRModule,
    target: Any,
    config: TuneConfig | None = None,
    *,
    work_dir: str | os.PathLike,
    **overrides: Any,
) -> TuningReport:
    """Tune the kernels of ``mod`` with MetaSchedule into the database in ``work_dir``.

    ``mod``: what :func:`gmorph_tvm.import_models` or :func:`gmorph_tvm.fuse` returns (a
    :class:`~gmorph_tvm.MultiModel`, tuned as its ``bound_module()``), or a Relax IRModule (weights
    kept as parameters with attrs ``params`` are bound as constants first).
    ``target``: preset name, dict or ``tvm.target.Target``. ``config``: a :class:`TuneConfig`
    (its fields, e.g. ``trials=200``, may also be given as keywords, overriding it): ``trials``
    (total measurements over all tasks), ``trials_per_task`` or ``minutes`` (a wall-clock budget)
    say how long to search; tasks under ``min_flops_share`` of the estimated cost or not matching
    ``op_names`` (substrings of task names) are left untuned. Never raises for a crash inside one
    task: see :class:`TuningWarning`.

    ``population_size`` of the evolutionary search defaults to 8x a task's trials within
    [64, 512].

    ``tracker`` (``"host:port"``) and ``key``: measure on every board registered with that TVM
    RPC tracker under ``key``, one parallel session per board (see :mod:`.remote`); candidates for
    a foreign host CPU are linked with its cross compiler. The work dir is stamped with the
    target: records of another target are never mixed in (see :mod:`.target_key`).
    ``channels_last``: the convolution layout, as :func:`gmorph_tvm.build` takes it (default: NHWC
    on CPUs); tune and build with the same value, or the records do not match the kernels.
    """
    started, clock_zero = time.monotonic(), time.time()  # the minutes budget runs from the call
    cfg = TuneConfig.with_overrides(config, overrides)
    mod = _module_to_tune(mod)
    target = _resolve(target)
    if cfg.trials is None and cfg.trials_per_task is None and cfg.minutes is None:
        raise TuningError("give tune() either trials (a total) or trials_per_task (or a budget in minutes)")
    trials, trials_per_task = cfg.trials, cfg.trials_per_task
    deadline = clock_zero + 60.0 * cfg.minutes if cfg.minutes is not None else None
    only_minutes = trials is None and trials_per_task is None  # the clock alone decides
    if only_minutes:
        trials = UNLIMITED_TRIALS
    runner, tracker = cfg.runner, cfg.tracker
    rpc = runner_spec(tracker, cfg.key) if tracker is not None else None
    board_export = export_spec(target) if rpc is not None else None
    if runner is None and rpc is None:
        _check_local_runner_can_measure(target)
    ensure_ir_json_works()
    work_dir = Path(work_dir).resolve()
    try:
        (work_dir / "logs").mkdir(parents=True, exist_ok=True)
        for name in DATABASE_FILES:  # an empty database is valid: lower() then just uses defaults
            (work_dir / name).touch()
        claim_work_dir(work_dir, target)
    except OSError as err:
        raise TuningError(f"cannot create the tuning work dir {work_dir}: {err.strerror}") from err

    plans = extract(prepare(mod, target, channels_last=cfg.channels_last), target)
    selected = allocate(
        plans, trials or 0, op_names=cfg.op_names, min_flops_share=cfg.min_flops_share,
        min_trials_per_task=cfg.min_trials_per_task, trials_per_task=trials_per_task,
    )
    if trials is None:
        trials = sum(p.trials for p in selected)
    reports = {
        p.name: TaskReport(p.name, p.calls, p.flops, p.share, p.status, trials_planned=p.trials, message=p.note)
        for p in plans
    }
    if only_minutes:  # no trial plan: the clock and the task scheduler decide
        for task in reports.values():
            task.trials_planned = 0
    existing = _records_in_database(work_dir, selected)
    used_up = read_exhausted(work_dir)
    shipped = lookup_shipped(target) if cfg.shipped_records else None
    to_run: list[tuple[TaskPlan, int]] = []
    for plan in selected:
        task = reports[plan.name]
        reused = min(existing.get(plan.name, 0), plan.trials)
        task.records_reused = reused
        # A top-up of less than one measured batch costs a whole search round (minutes) for
        # next to nothing: records that close to the plan count as enough.
        enough = plan.trials - MIN_USEFUL_TRIALS + 1 if plan.trials > MIN_USEFUL_TRIALS else plan.trials
        if only_minutes:  # on the clock, time goes to kernels with no record at all
            enough = 1
        searched = used_up.get(workload_hash(plan.workload))
        if searched is not None and reused < enough:  # an earlier run here searched all there is
            if reused:
                task.status, task.message = rpt.REUSED, f"its whole design space ({searched} schedules) is searched"
            else:
                task.status = rpt.NO_SCHEDULE
                task.message = f"an earlier run searched its whole design space ({searched} schedules): none ran"
        elif reused >= enough:
            task.status = rpt.REUSED
        elif shipped is not None and shipped.covers(plan.workload, enough):
            task.status, task.shipped = rpt.SHIPPED, True
            if not shipped.trials(plan.workload):
                task.status, task.message = rpt.NO_SCHEDULE, "the shipped records' search found no schedule that runs"
        else:
            to_run.append((plan, plan.trials - reused))

    # One worker run for all tasks: one cost model, and the task scheduler gives the trials to
    # the kernels where they pay (caps: trials_per_task's exact count, else the whole budget).
    budget = sum(n for _, n in to_run)
    per_round = _trials_per_round(
        cfg.trials_per_round or (MINUTES_TRIALS_PER_ROUND if only_minutes else DEFAULT_TRIALS_PER_ROUND),
        [n for _, n in to_run], trials_per_task)
    base_spec = {
        "target": _target_spec(target),
        "work_dir": str(work_dir),
        "runner": _pickled(runner, "runner"),
        "builder": _pickled(cfg.builder, "builder"),
        "rpc": rpc,
        "board_export": board_export,
        "trials_per_round": per_round,
        "deadline": deadline,
        "clock_zero": clock_zero,
        "cost_model_from": _cost_models(work_dir, cfg.shipped_records),
        # Where a kernel without records of its own borrows a schedule of another shape.
        "transfer_from": [str(work_dir)] + ([str(shipped.directory)] if shipped is not None and shipped.directory else []),
    }
    task_specs = {
        plan.name: {
            "name": plan.name,
            "trials": n if trials_per_task is not None else budget,
            "weight": float(plan.calls),
            "seed": (cfg.seed + zlib.crc32(plan.name.encode()) + existing.get(plan.name, 0)) % (2**31 - 1),
            "workload": tvm.ir.save_json(plan.workload),
            "population_size": cfg.population_size or min(512, max(64, 8 * min(n, per_round if only_minutes else n))),
            "transfer": cfg.transfer and target.kind.name == "llvm" and not existing.get(plan.name, 0),
        }
        for plan, n in to_run
    }
    if task_specs:
        ended_short = _run_workers(task_specs, base_spec, budget, work_dir, reports, cfg.progress, cfg.task_timeout_s)
        if ended_short:  # those searches had no unmeasured candidate left
            note_exhausted(work_dir, {
                workload_hash(plan.workload): reports[plan.name].records_reused + reports[plan.name].trials_run
                for plan, _ in to_run if plan.name in ended_short
            })
    if only_minutes:
        trials = sum(t.trials_run for t in reports.values())

    result = TuningReport(_target_spec(target), str(work_dir), trials, tasks=list(reports.values()))
    result.shipped_note = shipped.note if shipped is not None else "shipped tuning records not used"
    result.seconds = time.monotonic() - started
    return result


def _trials_per_round(most: int, planned: Sequence[int], trials_per_task: int | None) -> int:
    """Candidates per search round: ``most``, but small enough that the first round (one batch per
    kernel) takes at most half the budget, so the scheduler has the rest to give where it pays."""
    if not planned:
        return most
    if trials_per_task is not None:
        return max(1, min(most, max(planned)))
    return max(1, min(most, max(MIN_USEFUL_TRIALS, sum(planned) // (2 * len(planned)))))


def _cost_models(work_dir: Path, shipped_records: bool) -> list[str]:
    """Cost model files the worker tries in order: this work dir's, then the shipped one."""
    paths = [str(work_dir / cost_model.STATE_FILE)]
    shipped = cost_model.shipped_model_path() if shipped_records else None
    if shipped is not None:
        paths.append(str(shipped))
    return paths


def _check_local_runner_can_measure(target: tvm.target.Target) -> None:
    """Fail early (not with one warning per task) when kernels cannot run on this machine."""
    if not host_is_native(target):
        raise TuningError(
            f"cannot measure kernels for target {target_dict(target)} on this machine; pass "
            "runner=tvm.s_tir.meta_schedule.runner.RPCRunner(...) for a remote device"
        )
    if is_cuda(target) and not tvm.cuda(0).exist:
        raise TuningError(
            "no CUDA GPU on this machine to measure tuned kernels; tune on the GPU machine or pass "
            "runner=tvm.s_tir.meta_schedule.runner.RPCRunner(...)"
        )


def _fall_back(reports: dict[str, TaskReport], name: str, status: str, why: str) -> None:
    task = reports[name]
    task.status, task.message = status, why
    warnings.warn(
        f"tuning workload {name!r} {why}; it keeps its default schedule", TuningWarning, stacklevel=4
    )


def _run_workers(
    task_specs: dict[str, dict[str, Any]],
    base_spec: dict[str, Any],
    budget: int,
    work_dir: Path,
    reports: dict[str, TaskReport],
    progress: bool,
    task_timeout_s: float | None,
) -> set[str]:
    """Run the tasks in worker processes, filling ``reports``; returns the tasks whose search
    ran out of candidates (design space used up).

    One worker searches all tasks with one cost model. It announces each search round
    (``start``); if it dies, the task of that round falls back (crashed) and a fresh worker
    carries on with the others, from the cost model the first one saved. A round longer than
    ``task_timeout_s`` stops that task the same way. Past the deadline (plus
    :func:`deadline_grace_s` for the measurements in flight) the worker is stopped and every
    task keeps what it found.
    """
    from tqdm import tqdm

    remaining = list(task_specs)
    ended_short: set[str] = set()
    deadline = base_spec.get("deadline")
    grace_s = deadline_grace_s((deadline - base_spec["clock_zero"]) / 60.0) if deadline is not None else 0.0
    bar = tqdm(
        total=budget if deadline is None else None,
        unit="trial",
        desc="tuning",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    log_hint = work_dir / "logs"
    try:
        while remaining:
            run_so_far = sum(reports[n].trials_run for n in task_specs)
            if run_so_far >= budget or (deadline is not None and time.time() >= deadline):
                for name in remaining:
                    _out_of_budget(reports[name], deadline is not None and time.time() >= deadline)
                break
            for name in [n for n in remaining if reports[n].trials_run >= task_specs[n]["trials"]]:
                _out_of_budget(reports[name], False)  # done before an earlier worker died
                remaining.remove(name)
            if not remaining:
                break
            tasks = [dict(task_specs[name], trials=task_specs[name]["trials"] - reports[name].trials_run,
                          transfer=task_specs[name].get("transfer") and not reports[name].trials_run)
                     for name in remaining]
            spec = dict(base_spec, tasks=tasks, trials_global=budget - run_so_far)
            worker = _WorkerRun(spec, work_dir / "logs" / "worker_spec.json")
            current: str | None = None
            current_since = 0.0
            before = len(remaining)
            stopped_at_deadline = False
            try:
                for event in worker.events():
                    if event is None:
                        if current and task_timeout_s and time.monotonic() - current_since > task_timeout_s:
                            worker.kill()
                            _fall_back(reports, current, rpt.TIMED_OUT, f"timed out after {task_timeout_s:.0f} s")
                            remaining.remove(current)
                            current = None
                            break
                        if deadline is not None and time.time() > deadline + grace_s:
                            worker.kill()
                            stopped_at_deadline = True
                            break
                        continue
                    kind, name = event.get("event"), event.get("task")
                    if kind in ("start", "seed"):
                        current, current_since = name, time.monotonic()
                        bar.set_description(f"tuning {name}")
                    elif kind == "measured" and name in reports:
                        task = reports[name]
                        task.trials_run += int(event["count"])
                        task.valid_trials += int(event.get("valid", 0))
                        task.best_us = event.get("best_us")
                        if event.get("transferred"):
                            task.transferred_from = event["transferred"]
                        if event.get("improved") and task.best_us is not None:
                            task.improvements.append((round(float(event.get("at_s", 0.0)), 2), task.best_us))
                        bar.update(int(event["count"]))
                    elif kind == "default" and name in reports:
                        reports[name].default_us = float(event["us"])
                    elif kind == "rejected" and name in reports:
                        reports[name].records_rejected += 1
                        reports[name].message = f"rejected schedule: {event.get('message', '')}"
                    elif kind == "done" and name in reports:
                        if event.get("exhausted"):
                            ended_short.add(name)
                        _finish(reports[name], event, log_hint)
                        remaining.remove(name)
                        current = None
            finally:
                worker.close()
            returncode = worker.proc.returncode
            if stopped_at_deadline:
                for name in remaining:
                    _out_of_budget(reports[name], True)
                remaining = []
            elif current is not None:  # died inside a task: that task falls back, others go on
                reports[current].seconds += time.monotonic() - current_since
                _fall_back(
                    reports, current, rpt.CRASHED,
                    f"crashed the tuning process ({_signal_name(returncode)}; log in {log_hint})",
                )
                remaining.remove(current)
                _repair_json_lines(work_dir)
            elif remaining and len(remaining) == before:
                # The worker ended without touching any task (broken install?): give up on them.
                why = (
                    f"was not tuned: the tuning process exited early ({_signal_name(returncode)}: "
                    f"{_worker_log_tail(work_dir)})"
                )
                for name in remaining:
                    _fall_back(reports, name, rpt.FAILED, why)
                remaining = []
            bar.refresh()
    finally:
        bar.close()
    return ended_short


def _warn_rejected(task: TaskReport) -> None:
    if task.records_rejected:
        warnings.warn(
            f"tuning workload {task.name!r}: {task.records_rejected} measured schedule(s) computed "
            f"different values from the default schedule and were not stored ({task.message})",
            TuningWarning,
            stacklevel=4,
        )


def _finish(task: TaskReport, event: dict[str, Any], log_hint: Path) -> None:
    """Status of a task from the worker's ``done`` event."""
    _warn_rejected(task)
    task.seconds += float(event.get("seconds", 0.0))
    task.check_seconds += float(event.get("check_seconds", 0.0))
    gain = event.get("gain")
    if gain:
        task.predicted_gain, task.measured_gain = gain.get("predicted"), gain.get("measured")
    if event.get("best_us") is not None:  # the search's best, or the default schedule measured first
        task.best_us = event["best_us"]
    if task.valid_trials:  # this worker's search, or an earlier worker's of this run, ran schedules
        task.status = rpt.TUNED
    elif event.get("exhausted") and not event.get("trials") and not task.trials_run:
        task.status = rpt.NO_SCHEDULE
        task.message = "MetaSchedule generated no schedule to search: it keeps its default one"
    elif not task.trials_run:
        _out_of_budget(task, bool(event.get("out_of_time")))
    else:
        task.status, task.message = rpt.FAILED, f"found no valid schedule (see {log_hint})"
        warnings.warn(f"tuning workload {task.name!r} {task.message}; it keeps its default schedule",
                      TuningWarning, stacklevel=4)


def _out_of_budget(task: TaskReport, out_of_time: bool) -> None:
    """A task the run ended before (the clock or the trial budget): what it found, or nothing."""
    if task.valid_trials:
        task.status = rpt.TUNED
        if out_of_time:
            task.message = "stopped at the time budget"
    elif not task.trials_run:
        task.status = rpt.NOT_REACHED
        task.message = ("the time budget ran out before its turn" if out_of_time
                        else "the task scheduler spent the trials on other kernels")
