"""Numerical checks of tuned kernels: a schedule must compute what the unscheduled kernel computes.

MetaSchedule measures candidate schedules for speed only; nothing in TVM checks that a tuned
kernel still computes the same values. :func:`check_schedule` does, per kernel (TIR level): it
compiles the workload as is (the default, unscheduled loops) and with the record's trace
applied (layout-rewrite blocks included, so weights are passed in their original layout), runs
both on the same random buffers and compares every buffer afterwards.

* :func:`verified_database` filters a tuning database for one prepared module: every record
  that :func:`gmorph_tvm.tuning.lower` would apply is checked and only the ones that agree are
  kept; :class:`TuningWarning` names each dropped kernel.
* :class:`VerifyingDatabase` wraps the tuning worker's database so that a record is checked
  before it is committed (``tune()``).

Kernels that read integer buffers (indices, masks: random values could index out of bounds)
are not run; they are reported as unverified and left to the whole-module check of the build.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm

from gmorph_tvm.errors import one_line
from gmorph_tvm.tuning.report import TuningWarning

# Largest relative difference (max |tuned - default| / max |default|, per buffer) accepted.
FLOAT32_RTOL = 1e-4
LOW_PRECISION_RTOL = 2e-2  # float16 / bfloat16 kernels
_LOW_PRECISION = ("float16", "bfloat16")


@dataclass
class KernelCheck:
    """Outcome of checking one tuned kernel against its default schedule."""

    name: str
    ok: bool
    error: float | None = None  # max relative difference over all buffers
    message: str = ""
    verified: bool = True  # False: could not be run here (kept, left to the module check)


@dataclass
class VerifiedTuning:
    """Which kernels of a module got tuned schedules, and which records were dropped."""

    applied: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # kernel -> why
    unverified: list[str] = field(default_factory=list)
    checks: list[KernelCheck] = field(default_factory=list)
    seconds: float = 0.0


def normalize_workload(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """The workload module MetaSchedule stores for ``func`` (what database queries use)."""
    return tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")(func)


def apply_record(record: Any) -> tvm.IRModule:
    """The record's workload with its trace applied, exactly as MetaScheduleApplyDatabase does."""
    sch = tvm.s_tir.Schedule(record.workload.mod, debug_mask=0)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch.mod


def check_target(target: tvm.target.Target) -> tvm.target.Target | None:
    """The target kernels are compiled for to be checked on this machine (None: cannot run here).

    CPU kernels are TIR loop nests: a cross target (e.g. an aarch64 board) is checked with the
    same TIR compiled for this machine, which checks the schedule, not the target's codegen.
    """
    if "gpu" in target.keys:
        return target if tvm.cuda(0).exist and target.kind.name == "cuda" else None
    attrs = {"kind": "llvm"}
    if "num-cores" in target.attrs:
        attrs["num-cores"] = int(target.attrs["num-cores"])
    return tvm.target.Target(attrs)


def _device(target: tvm.target.Target):
    return tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def _random_buffers(func: tvm.tirx.PrimFunc, seed: int) -> list[np.ndarray] | None:
    """One random array per buffer parameter; None if a buffer is not floating point."""
    rng = np.random.default_rng(seed)
    arrays = []
    for param in func.params:
        dtype = str(param.dtype)
        if not _is_float(dtype) or dtype == "bfloat16":
            return None
        shape = [int(d) for d in param.shape]
        arrays.append(rng.uniform(-1.0, 1.0, size=shape).astype(dtype))
    return arrays


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| over the entries finite in ``want``; inf where they disagree
    about which entries are finite."""
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(want64)
    if not np.array_equal(finite, np.isfinite(got64)):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = float(np.abs(want64[finite]).max())
    diff = float(np.abs(got64[finite] - want64[finite]).max())
    return diff / scale if scale > 0 else diff


def rtol_for(dtypes: Sequence[str]) -> float:
    return LOW_PRECISION_RTOL if any(d in _LOW_PRECISION for d in dtypes) else FLOAT32_RTOL


class _DefaultRuns:
    """Compiled default-schedule kernels and their outputs, cached per workload."""

    def __init__(self, target: tvm.target.Target, seed: int) -> None:
        self.target, self.seed = target, seed
        self._cache: dict[int, list[tuple[tvm.IRModule, list[np.ndarray] | None, list[np.ndarray] | None]]] = {}

    def get(self, workload: tvm.IRModule):
        import tvm_ffi

        key = tvm_ffi.structural_hash(workload)
        for known, inputs, outputs in self._cache.get(key, []):
            if tvm_ffi.structural_equal(known, workload):
                return inputs, outputs
        inputs = _random_buffers(workload["main"], self.seed)
        outputs = None if inputs is None else _run(_compile(workload, self.target), inputs, self.target)
        self._cache.setdefault(key, []).append((workload, inputs, outputs))
        return inputs, outputs


def _compile(mod: tvm.IRModule, target: tvm.target.Target):
    if "gpu" in target.keys:
        from tvm.s_tir import dlight as dl

        with target:
            mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    return tvm.compile(mod, target=target)


def _run(executable: Any, inputs: list[np.ndarray], target: tvm.target.Target) -> list[np.ndarray]:
    dev = _device(target)
    buffers = [tvm.runtime.tensor(a, dev) for a in inputs]
    executable["main"](*buffers)
    return [b.numpy() for b in buffers]


def check_schedule(
    name: str,
    workload: tvm.IRModule,
    scheduled: tvm.IRModule,
    target: tvm.target.Target,
    *,
    seed: int = 0,
    defaults: _DefaultRuns | None = None,
) -> KernelCheck:
    """Run ``scheduled`` and the unscheduled ``workload`` on the same random buffers and compare.

    ``target`` is where both are compiled and run (see :func:`check_target`).
    """
    defaults = defaults or _DefaultRuns(target, seed)
    try:
        inputs, want = defaults.get(workload)
    except Exception as err:  # noqa: BLE001 - TVM raises many error types
        return KernelCheck(name, True, None, f"default schedule could not be run: {one_line(err, 300)}", verified=False)
    if inputs is None or want is None:
        return KernelCheck(name, True, None, "reads non-float buffers", verified=False)
    try:
        got = _run(_compile(scheduled, target), inputs, target)
    except Exception as err:  # noqa: BLE001 - a record that no longer compiles is not usable
        return KernelCheck(name, False, None, f"tuned schedule does not compile or run: {one_line(err, 300)}")
    rtol = rtol_for([str(p.dtype) for p in workload["main"].params])
    error = max((relative_error(g, w) for g, w in zip(got, want)), default=0.0)
    if error <= rtol:
        return KernelCheck(name, True, error)
    return KernelCheck(name, False, error, f"computes different values (max relative error {error:.3g} > {rtol:g})")


def verified_database(
    database: Any,
    prepared: tvm.IRModule,
    target: tvm.target.Target,
    *,
    exclude: Sequence[str] = (),
    seed: int = 0,
    warn: Callable[[str], None] | None = None,
):
    """An in-memory database holding, for each kernel of ``prepared``, the record ``database``
    would apply if it agrees with the default schedule; plus what was kept and dropped.

    ``exclude``: kernel names whose records are dropped without checking or warning (found faulty
    by the whole-module check, which warns). Kernels that cannot be run here keep their record, listed as unverified.
    """
    from tvm.s_tir import meta_schedule as ms

    started = time.monotonic()
    warn = warn or (lambda message: warnings.warn(message, TuningWarning, stacklevel=4))
    result = VerifiedTuning()
    kept = ms.database.MemoryDatabase(module_equality="structural")
    runner_target = check_target(target)
    defaults = _DefaultRuns(runner_target, seed) if runner_target is not None else None
    for gv, func in prepared.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gv.name_hint
        workload = normalize_workload(func)
        record = database.query_tuning_record(workload, target, name)
        if record is None:
            continue
        if name in exclude:
            result.dropped[name] = "the tuned build computed different results from the untuned one"
            continue  # the caller that found it has said so
        if defaults is None:
            check = KernelCheck(name, True, None, "cannot run kernels of this target here", verified=False)
        else:
            try:
                scheduled = apply_record(record)
            except Exception as err:  # noqa: BLE001 - a trace that no longer applies
                check = KernelCheck(name, False, None, f"its trace does not apply: {one_line(err, 300)}")
            else:
                check = check_schedule(name, record.workload.mod, scheduled, runner_target, seed=seed, defaults=defaults)
        result.checks.append(check)
        if not check.ok:
            result.dropped[name] = check.message
            warn(f"tuning record of kernel {name!r} dropped: the tuned schedule {check.message}; "
                 "it keeps its default schedule")
            continue
        if not check.verified:
            result.unverified.append(name)
        kept.commit_tuning_record(
            ms.database.TuningRecord(
                record.trace, kept.commit_workload(record.workload.mod), record.run_secs, record.target,
                record.args_info,
            )
        )
        result.applied.append(name)
    result.seconds = time.monotonic() - started
    return kept, result


# ---- inside tune(): check before a record is committed -------------------------------------------

FAILED_RUN_SECS = 1e10  # what MetaSchedule stores for a candidate that did not build or run


def verifying_add_to_database(
    database: Any,
    workload: tvm.IRModule,
    target: tvm.target.Target,
    name: str,
    on_reject: Callable[[KernelCheck], None],
    *,
    seed: int = 0,
    stats: dict[str, float] | None = None,
):
    """A measure callback doing MetaSchedule's ``AddToDatabase``, except that a measured schedule
    is committed only if it computes what ``workload``'s default schedule computes; rejected ones
    are passed to ``on_reject``; ``stats["check_seconds"]`` adds up the time spent checking.
    Candidates that failed to build or run are committed as failed,
    as MetaSchedule does (they count as trials and are never applied)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    runner_target = check_target(target)
    defaults = _DefaultRuns(runner_target, seed) if runner_target is not None else None

    @derived_object
    class _VerifiedAddToDatabase(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            from tvm.s_tir import meta_schedule as ms

            started = time.monotonic()

            committed = database.commit_workload(workload)
            for candidate, result in zip(measure_candidates, runner_results):
                run_secs = [float(s) for s in result.run_secs] if result.run_secs is not None else []
                if not run_secs or all(s >= FAILED_RUN_SECS for s in run_secs):
                    run_secs = [FAILED_RUN_SECS]
                elif defaults is not None:
                    check = check_schedule(name, workload, candidate.sch.mod, runner_target, seed=seed, defaults=defaults)
                    if not check.ok:
                        on_reject(check)
                        continue
                database.commit_tuning_record(
                    ms.database.TuningRecord(candidate.sch.trace, committed, run_secs, target, candidate.args_info)
                )
            if stats is not None:
                stats["check_seconds"] = stats.get("check_seconds", 0.0) + time.monotonic() - started

    return _VerifiedAddToDatabase()
