"""Tuning records shipped with gmorph-tvm, looked up by target class and TVM version.

``tuning/records/<class>/<tvm version>/`` holds a MetaSchedule JSON database (the best record
per workload) and ``index.json`` (how many trials each workload was tuned with, on which CPU,
and which workloads' design spaces the search used up: more trials would find nothing new).
The class is what a schedule depends on, not the exact CPU: the vector ISA the target's
``mcpu``/``mattr`` enable (asked from LLVM), e.g. ``x86_64-avx512`` for Zen 4/5, Ice Lake,
Sapphire/Emerald Rapids, ``x86_64-avx2`` for Haswell .. Zen 3. Records tuned on one CPU of a
class are valid on every other (a schedule is loop transformations; workloads are matched by
structural equality), though not necessarily optimal there.

:func:`lookup` says which folder applies to a target, or why none does (no records for the
class, or records only for other TVM versions): the note the callers print.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm

from gmorph_tvm.core.targets import cpu_arch, machine_arch

RECORDS_ROOT = Path(__file__).resolve().parent / "records"
INDEX_FILE = "index.json"
_DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")
# In a tuning work dir: the workloads whose search ran out of new candidates (see read_exhausted).
EXHAUSTED_FILE = "exhausted.json"

# x86-64-v4's AVX-512 subset: what MetaSchedule's 512-bit vector schedules rely on.
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
# A real CPU per class, for tuning records of a class this machine can run but is not
# (``-mcpu`` of that class, measured here).
CLASS_MCPU = {"x86_64-avx512": "skylake-avx512", "x86_64-avx2": "haswell"}


def _cpu_features(target: tvm.target.Target) -> set[str]:
    get = tvm.get_global_func("target.llvm_get_cpu_features", allow_missing=True)
    if get is None:
        return set()
    try:
        return {str(f) for f in get(target)}
    except Exception:  # noqa: BLE001 - unknown mcpu for this LLVM: no features to go on
        return set()


def target_arch(target: tvm.target.Target) -> str:
    """The CPU architecture of an llvm target: its ``mtriple``'s first part, or this machine's."""
    triple = str(target.attrs["mtriple"]) if "mtriple" in target.attrs else ""
    return cpu_arch(triple.split("-")[0]) if triple else machine_arch()


def target_class(target: tvm.target.Target) -> str | None:
    """``x86_64-avx512`` / ``x86_64-avx2`` / ``x86_64-sse`` / ``aarch64-sve`` / ``aarch64-dotprod``
    / ``aarch64-neon`` for CPU (llvm) targets; ``cuda-sm_XX`` for CUDA; None for anything else."""
    if target.kind.name == "cuda":
        return f"cuda-{target.attrs['arch']}" if "arch" in target.attrs else None
    if target.kind.name != "llvm":
        return None
    arch = target_arch(target)
    if arch not in ("x86_64", "aarch64"):
        return arch or None  # LLVM is only asked about CPUs it knows (a bad triple crashes it)
    features = _cpu_features(target)
    if arch == "x86_64":
        if all(f in features for f in _AVX512):
            return "x86_64-avx512"
        if "avx2" in features and "fma" in features:
            return "x86_64-avx2"
        return "x86_64-sse"
    if arch == "aarch64":
        for level in ("sve", "dotprod"):
            if level in features:
                return f"aarch64-{level}"
        return "aarch64-neon"
    return None


@dataclass
class Lookup:
    """Which shipped records apply to a target: ``directory`` (None when none do) and why."""

    target_class: str | None
    tvm_version: str
    directory: Path | None = None
    note: str = ""
    index: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str | None:
        return f"{self.target_class}/{self.tvm_version}" if self.directory is not None else None

    def trials(self, workload: tvm.IRModule) -> int:
        """Trials the shipped record of ``workload`` was tuned with (0: no shipped record)."""
        entry = self.index.get("workloads", {}).get(workload_hash(workload))
        return int(entry["trials"]) if entry else 0

    def covers(self, workload: tvm.IRModule, trials: int) -> bool:
        """Whether the shipped records stand for ``trials`` trials of ``workload``: tuned with at
        least that many, or its whole design space searched (then more trials find nothing)."""
        return self.trials(workload) >= trials or workload_hash(workload) in self.index.get("exhausted", {})


def workload_hash(workload: tvm.IRModule) -> str:
    """The structural hash MetaSchedule's JSON database stores for ``workload``."""
    from tvm.s_tir import meta_schedule as ms

    return str(ms.database.Workload(workload).as_json()[0])


def _merge_searched(into: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    """``into`` (changed in place) with ``more``'s used-up searches; a workload keeps the larger count."""
    for key, count in more.items():
        into[key] = max(count, into.get(key, 0))
    return into


def read_exhausted(directory: str | os.PathLike) -> dict[str, int]:
    """The workloads (hash -> candidates measured) whose design space a search in the tuning work
    dir ``directory`` used up: it stopped short of its trials because no unmeasured candidate was
    left (a transpose has a handful of schedules, a gather none that runs), so re-running it costs a search
    round for nothing. An unreadable file counts as empty: those tasks are simply searched again."""
    try:
        data = json.loads((Path(directory) / EXHAUSTED_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def note_exhausted(directory: str | os.PathLike, found: dict[str, int]) -> None:
    """Add ``found`` (workload hash -> candidates measured) to ``directory``'s used-up searches."""
    path = Path(directory) / EXHAUSTED_FILE
    merged = _merge_searched(read_exhausted(directory), found)
    staging = path.with_name(f"{path.name}.new{os.getpid()}")
    staging.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    staging.replace(path)


def lookup(target: tvm.target.Target, root: Path | None = None) -> Lookup:
    """The shipped records for ``target``'s class and this TVM version, or a note why there are none."""
    root = RECORDS_ROOT if root is None else root
    cls, version = target_class(target), str(tvm.__version__)
    found = Lookup(cls, version)
    if cls is None:
        found.note = f"no shipped tuning records for {target.kind.name} targets"
        return found
    here = root / cls / version
    if (here / INDEX_FILE).is_file() and all((here / n).is_file() for n in _DATABASE_FILES):
        try:
            found.index = json.loads((here / INDEX_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            found.note = f"shipped tuning records in {here} ignored: unreadable {INDEX_FILE} ({err})"
            return found
        found.directory = here
        tuned_on = found.index.get("tuned_on", {}).get("mcpu", "?")
        found.note = f"shipped tuning records {cls}/{version} (tuned on {tuned_on})"
        return found
    versions = sorted(p.name for p in (root / cls).iterdir() if p.is_dir()) if (root / cls).is_dir() else []
    if versions:
        found.note = (f"shipped tuning records for {cls} ignored: they are for TVM {', '.join(versions)}, "
                      f"this is TVM {version}")
    else:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        found.note = (f"no shipped tuning records for target class {cls}"
                      + (f" (shipped: {', '.join(classes)})" if classes else ""))
    return found




def _mean_s(record) -> float:
    """Mean measured seconds; inf for a candidate that failed to build or run (MetaSchedule
    stores those with no times, or 1e10 s)."""
    secs = [float(s) for s in (record.run_secs or [])]
    mean = sum(secs) / len(secs) if secs else float("inf")
    return mean if mean < 1e9 else float("inf")


def package(work_dirs: list[Path], out_dir: Path, *, tuned_on: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    """Write the best record per workload of the tuning databases in ``work_dirs`` (and of the
    records already in ``out_dir``) to ``out_dir`` with its ``index.json``; returns the index.

    A workload's ``trials`` is the most candidates any one database measured for it (failed
    ones included: they were trials): what :func:`gmorph_tvm.tuning.tune` compares with the
    trials it plans. ``exhausted`` gathers the work dirs' used-up searches (:func:`read_exhausted`),
    records or not: tune() does not search those again.
    """
    from tvm.s_tir import meta_schedule as ms

    best: dict[str, Any] = {}  # workload hash -> (record, trials)
    old_index: dict[str, Any] = {}
    sources = list(work_dirs)
    if (out_dir / INDEX_FILE).is_file():
        old_index = json.loads((out_dir / INDEX_FILE).read_text(encoding="utf-8"))
        sources.insert(0, out_dir)
    exhausted = {str(k): int(v) for k, v in old_index.get("exhausted", {}).items()}
    for work in work_dirs:
        _merge_searched(exhausted, read_exhausted(work))
    for source in sources:
        db = ms.database.JSONDatabase(
            path_workload=str(source / _DATABASE_FILES[0]),
            path_tuning_record=str(source / _DATABASE_FILES[1]),
            module_equality="structural",
            allow_missing=False,
        )
        per_workload: dict[str, list] = {}
        for record in db.get_all_tuning_records():
            per_workload.setdefault(str(record.workload.as_json()[0]), []).append(record)
        for key, records in per_workload.items():
            top = min(records, key=_mean_s)
            if _mean_s(top) == float("inf"):
                continue  # nothing valid: the kernel keeps its default schedule
            trials = len(records)
            if source == out_dir:
                trials = int(old_index.get("workloads", {}).get(key, {}).get("trials", trials))
            if key not in best or _mean_s(top) < _mean_s(best[key][0]):
                best[key] = (top, max(trials, best.get(key, (None, 0))[1]))
            else:
                best[key] = (best[key][0], max(trials, best[key][1]))
    staging = out_dir.with_name(f"{out_dir.name}.new{os.getpid()}")
    if staging.exists():
        for f in staging.iterdir():
            f.unlink()
    staging.mkdir(parents=True, exist_ok=True)
    fresh = ms.database.JSONDatabase(work_dir=str(staging), module_equality="structural")
    workloads = {}
    for key, (record, trials) in sorted(best.items()):
        workload = fresh.commit_workload(record.workload.mod)
        fresh.commit_tuning_record(
            ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)
        )
        workloads[key] = {"trials": trials, "best_us": round(_mean_s(record) * 1e6, 3)}
    index = {
        "tvm": str(tvm.__version__),
        "class": target_class(tvm.target.Target(tuned_on)),
        "tuned_on": tuned_on,
        "sets": {**old_index.get("sets", {}), **sets},
        "workloads": workloads,
        "exhausted": dict(sorted(exhausted.items())),
    }
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (*_DATABASE_FILES, INDEX_FILE):
        (staging / name).replace(out_dir / name)
    staging.rmdir()
    return index
