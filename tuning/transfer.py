"""Tuning records that transfer to new shapes: a kernel with no record of its own borrows the
schedule of the nearest kernel of the same structure.

A record applies only to the workload it was tuned on (structural equality, shapes included),
so a new input size or channel count leaves every kernel on its default schedule. Two kernels
are *structurally equal up to extents* when their TIR is the same once every integer literal is
abstracted (:func:`structure_key`): same blocks (anchor op, epilogue), same buffer layout, same
index expressions; only extents, strides or paddings differ. For a kernel without an exact record,
:func:`transfer_record` takes the records of the kernels with its structure key, nearest extents
first (:func:`extent_distance`), and replays each one's trace on the new kernel with every tile
decision (``SamplePerfectTile``) remapped to divisors of the new loop extents
(:func:`remap_tile`), runs the target's postprocessors (vectorize/parallel/unroll rewrite, weight
layout rewrite) as the search does, and checks the result against the kernel's default schedule
on random inputs (:func:`gmorph_tvm.tuning.verify.check_schedule`). The first that replays,
passes the postprocessors and computes the same values is used. CPU (llvm) targets only: GPU
kernels keep dlight's default schedules until tuned.

:func:`transferred_database` does this for every kernel of a prepared module and returns an
in-memory database to apply after the exact ones, with a report per kernel: ``exact`` (a record
of its own), ``transferred`` (from which workload) or ``default``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import tvm

from gmorph_tvm.errors import one_line
from gmorph_tvm.tuning.default_schedules import is_default_record

EXACT = "exact"
TRANSFERRED = "transferred"
DEFAULT = "default"

# An integer literal standing alone (not part of a name such as float32 or conv2d_nhwc).
_INT = re.compile(r"(?<![\w.])\d+(?![\w.])")
# At most this many candidate records are replayed per kernel (nearest first).
MAX_TRIES = 3


def _script(workload: tvm.IRModule) -> str:
    """The kernel's TVMScript with its parameter buffers named by position (``lv2`` in one
    model is ``lv`` in another)."""
    func = workload["main"]
    text = func.without_attr("global_symbol").script() if func.attrs and "global_symbol" in func.attrs \
        else func.script()
    names = [str(getattr(param, "name", "")) for param in func.params]  # parameters are buffers
    for index, name in enumerate(names):
        if name:
            text = re.sub(rf"\b{re.escape(name)}\b", f"arg_{index}_", text)
    return text


def structure_key(workload: tvm.IRModule) -> str:
    """The kernel's TIR with every integer literal replaced by ``#``: equal for kernels that
    differ only in extents (shape, channels, batch, stride, padding)."""
    return _INT.sub("#", _script(workload))


def _extents(workload: tvm.IRModule) -> list[int]:
    return [int(m) for m in _INT.findall(_script(workload))]


def extent_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """How far two kernels of the same structure are: summed |log ratio| of their literals."""
    return sum(abs(math.log1p(x) - math.log1p(y)) for x, y in zip(a, b))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def remap_tile(old: Sequence[int], extent: int, max_innermost: int = -1) -> list[int]:
    """Tile factors of ``extent`` shaped like ``old`` (a factorisation of another extent):
    from the innermost out, each factor is the divisor of what is left nearest (in log scale) to
    the old factor; the outermost takes the rest. The product is ``extent``."""
    factors = [1] * len(old)
    left = max(1, int(extent))
    for j in range(len(old) - 1, 0, -1):
        want = max(1, int(old[j]))
        choices = _divisors(left)
        if j == len(old) - 1 and max_innermost > 0:
            choices = [d for d in choices if d <= max_innermost] or [1]
        best = min(choices, key=lambda d: (abs(math.log(d) - math.log(want)), -d))
        factors[j] = best
        left //= best
    factors[0] = left
    return factors


def replay(record: Any, workload: tvm.IRModule, target: tvm.target.Target) -> tvm.s_tir.Schedule:
    """``record``'s trace replayed on ``workload`` with tile decisions remapped to its extents,
    then the target's postprocessors (as MetaSchedule's search applies them). Raises if the trace
    does not replay or a postprocessor rejects the schedule."""
    from tvm.s_tir import meta_schedule as ms

    sch = tvm.s_tir.Schedule(workload, debug_mask=0)

    def decide(inst: Any, inputs: list[Any], attrs: list[Any], decision: Any) -> Any:
        if inst.kind.name == "SamplePerfectTile" and decision is not None:
            extent = int(sch.get(inputs[0]).extent)
            old = [int(x) for x in decision]
            max_inner = int(attrs[1]) if len(attrs) > 1 else -1
            if math.prod(old) != extent:
                return remap_tile(old, extent, max_inner)
        return decision

    record.trace.apply_to_schedule(sch, remove_postproc=True, decision_provider=decide)
    if target.kind.name != "llvm":
        raise ValueError("schedules are transferred between CPU kernels only")
    # The LLVM postprocessors need nothing from a TuneContext (whose constructor imports every
    # tensor intrinsic: minutes on a busy machine), so they are run as they are.
    sch.enter_postproc()
    for postproc in ms.postproc.Postproc.create("llvm"):
        if not postproc.apply(sch):
            raise ValueError(f"postprocessor {type(postproc).__name__} rejects the replayed schedule")
    return sch


@dataclass
class Source:
    """A record that may lend its schedule: its workload's structure key and literals."""

    record: Any
    key: str
    extents: list[int]
    seconds: float


def collect_sources(databases: Iterable[Any]) -> dict[str, list[Source]]:
    """The best record of every workload in ``databases`` (JSON or memory databases), by
    structure key. A database that cannot list its records is skipped."""
    best: dict[str, Any] = {}
    for database in databases:
        try:
            records = database.get_all_tuning_records()
        except Exception:  # noqa: BLE001 - e.g. a union database: nothing to list
            continue
        for record in records:
            secs = [float(s) for s in (record.run_secs or [])]
            mean = sum(secs) / len(secs) if secs else float("inf")
            if not mean < 1e9 or is_default_record(record):
                continue  # failed to build or run; a default schedule (no decisions to remap)
            workload_key = str(record.workload.as_json()[0])
            if workload_key not in best or mean < best[workload_key][1]:
                best[workload_key] = (record, mean)
    sources: dict[str, list[Source]] = {}
    for record, mean in best.values():
        mod = record.workload.mod
        try:
            key, extents = structure_key(mod), _extents(mod)
        except Exception:  # noqa: BLE001 - a workload that does not print: not a source
            continue
        sources.setdefault(key, []).append(Source(record, key, extents, mean))
    return sources


@dataclass
class Transfer:
    """A schedule transferred to one kernel: the replayed schedule and where it came from."""

    schedule: tvm.s_tir.Schedule
    source: Source
    error: float | None = None
    tried: list[str] = field(default_factory=list)  # why nearer sources did not transfer


def transfer_record(
    name: str,
    workload: tvm.IRModule,
    target: tvm.target.Target,
    sources: dict[str, list[Source]],
    *,
    defaults: Any = None,
    max_tries: int = MAX_TRIES,
) -> Transfer | None:
    """The nearest source record whose trace replays on ``workload`` and computes what its
    default schedule computes (None: none does). ``defaults``: verify's cache of default runs."""
    from gmorph_tvm.tuning.verify import _DefaultRuns, check_schedule, check_target

    try:
        key, extents = structure_key(workload), _extents(workload)
    except Exception:  # noqa: BLE001
        return None
    candidates = sorted(sources.get(key, []), key=lambda s: extent_distance(s.extents, extents))
    candidates = [s for s in candidates if s.extents != extents]  # an exact record is not a transfer
    runner_target = check_target(target)
    tried: list[str] = []
    for source in candidates[:max_tries]:
        try:
            sch = replay(source.record, workload, target)
        except Exception as err:  # noqa: BLE001 - TVM raises many error types
            tried.append(f"does not replay: {one_line(err, 200)}")
            continue
        if runner_target is None:
            return Transfer(sch, source, None, tried)  # cannot run here: the build's check decides
        if defaults is None:
            defaults = _DefaultRuns(runner_target, 0)
        check = check_schedule(name, workload, sch.mod, runner_target, defaults=defaults)
        if check.ok and check.verified:
            return Transfer(sch, source, check.error, tried)
        tried.append(check.message or "not verified")
    return None


@dataclass
class TransferReport:
    """Per kernel of a module: ``exact`` / ``transferred`` / ``default``, and sources used."""

    kinds: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # kernel -> source workload's hash

    def counts(self) -> dict[str, int]:
        return {kind: sum(1 for k in self.kinds.values() if k == kind) for kind in (EXACT, TRANSFERRED, DEFAULT)}

    def summary(self) -> str:
        c = self.counts()
        return (f"{c[EXACT]} kernel(s) ran exact records, {c[TRANSFERRED]} transferred ones, "
                f"{c[DEFAULT]} default schedules")


def source_databases(target: tvm.target.Target, tuning_db: Any = None, shipped_records: bool = True) -> list[Any]:
    """The databases whose records may lend schedules: the user's ``tuning_db`` folder (when it
    holds one) and the records shipped for ``target``'s class. (A union database cannot list its
    records, so :func:`transferred_database` takes these as ``sources``.)"""
    from pathlib import Path

    from tvm.s_tir import meta_schedule as ms

    from gmorph_tvm.tuning.shipped import lookup

    folders = [Path(tuning_db)] if tuning_db is not None else []
    if shipped_records and lookup(target).directory is not None:
        folders.append(lookup(target).directory)
    out = []
    for folder in folders:
        workload, records = folder / "database_workload.json", folder / "database_tuning_record.json"
        if workload.is_file() and records.is_file():
            out.append(ms.database.JSONDatabase(path_workload=str(workload), path_tuning_record=str(records),
                                                module_equality="structural", allow_missing=False))
    return out


def transferred_database(
    prepared: tvm.IRModule,
    target: tvm.target.Target,
    databases: Sequence[Any],
    *,
    sources: Sequence[Any] | None = None,
    estimate_seconds: bool = True,
    exclude: Iterable[str] = (),
) -> tuple[Any, TransferReport]:
    """An in-memory MetaSchedule database with a transferred, verified record for every kernel
    of ``prepared`` (the output of :func:`gmorph_tvm.tuning.prepare`) that has no record in
    ``databases``, and the exact / transferred / default report per kernel.

    Apply it after the exact databases (``OrderedUnionDatabase(*databases, transferred)``): a
    kernel with a record of its own keeps it. ``sources``: the databases to borrow from
    (default ``databases``; see :func:`source_databases` when ``databases`` is a union). Its records' ``run_secs`` are the source's scaled
    by the kernels' FLOP ratio (an estimate; never measured here).
    """
    from tvm.s_tir import meta_schedule as ms

    from gmorph_tvm.tuning.tasks import kernel_flops
    from gmorph_tvm.tuning.verify import _DefaultRuns, check_target, normalize_workload

    exclude = set(exclude)
    out = ms.database.MemoryDatabase(module_equality="structural")
    report = TransferReport()
    found_sources: dict[str, list[Source]] | None = None
    runner_target = check_target(target)
    defaults = _DefaultRuns(runner_target, 0) if runner_target is not None else None
    for gv, func in prepared.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gv.name_hint
        if name in exclude:  # its record was dropped (or blamed by the whole-module check): default schedule
            report.kinds[name] = DEFAULT
            continue
        workload = normalize_workload(func)
        if any(db.query_tuning_record(workload, target, name) is not None for db in databases):
            report.kinds[name] = EXACT
            continue
        if found_sources is None:
            found_sources = collect_sources(databases if sources is None else sources)
        found = transfer_record(name, workload, target, found_sources, defaults=defaults)
        if found is None:
            report.kinds[name] = DEFAULT
            continue
        seconds = found.source.seconds
        if estimate_seconds:
            old, new = kernel_flops(found.source.record.workload.mod), kernel_flops(workload)
            if old > 0 and new > 0:
                seconds *= new / old
        out.commit_tuning_record(ms.database.TuningRecord(
            found.schedule.trace, out.commit_workload(workload), [seconds], target,
            ms.arg_info.ArgInfo.from_prim_func(func),
        ))
        report.kinds[name] = TRANSFERRED
        report.sources[name] = str(found.source.record.workload.as_json()[0])
    return out, report
