"""Train the cost model that ships beside the records (``tuning/records/cost_model.npz``).

    python -m gmorph_tvm.tuning.pretrain --out tuning/records/cost_model.npz WORK_DIR [WORK_DIR ...]

Every measured candidate of the MetaSchedule databases in the given folders (tuning work dirs,
which keep every measured run, and the shipped record folders of every CPU class, which keep the
best one per kernel) becomes a training example: the candidate's trace is replayed on its
workload, MetaSchedule's ``per-store-feature`` features are extracted from the scheduled TIR
(target-independent: loop structure, vectorisation, memory access), and its measured time is the
label, grouped by workload as :class:`XGBModel` trains (throughput relative to the workload's
best). The result is saved with :func:`gmorph_tvm.tuning.cost_model.save`; every tuning run
loads it when its work dir has no model of its own and keeps training it on its measurements.

Never train it on the models a benchmark measures time-to-fast on (``bench/time_to_fast.py``):
the table would then stop measuring what a new user gets.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gmorph_tvm.tuning import cost_model

_FAILED_S = 1e10


def _mean_s(record: Any) -> float:
    secs = [float(s) for s in (record.run_secs or [])]
    mean = sum(secs) / len(secs) if secs else _FAILED_S
    return min(mean, _FAILED_S)


def _databases(directories: Iterable[str | os.PathLike]):
    from tvm.s_tir import meta_schedule as ms

    for directory in directories:
        directory = Path(directory)
        if not (directory / "database_tuning_record.json").is_file():
            continue
        yield directory, ms.database.JSONDatabase(
            path_workload=str(directory / "database_workload.json"),
            path_tuning_record=str(directory / "database_tuning_record.json"),
            module_equality="structural", allow_missing=False,
        )


def add_examples(model: Any, directories: Sequence[str | os.PathLike], target: Any = None) -> dict[str, int]:
    """Add every measured record of the databases in ``directories`` to ``model``'s data;
    returns counts (records, workloads, records whose trace no longer replays)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.utils import shash2hex

    from gmorph_tvm.tuning.intrinsics import register_for_target

    target = tvm.target.Target(target or {"kind": "llvm"})
    register_for_target(target)  # TuneContext imports the intrinsics: only this target's family
    counts = {"records": 0, "workloads": 0, "skipped": 0}
    extractor = model.extractor
    for _, database in _databases(directories):
        groups: dict[str, list[Any]] = {}
        for record in database.get_all_tuning_records():
            groups.setdefault(str(record.workload.as_json()[0]), []).append(record)
        for records in groups.values():
            workload = records[0].workload.mod
            context = ms.TuneContext(mod=workload, target=target, task_name="pretrain")
            candidates, seconds = [], []
            for record in records:
                try:
                    sch = tvm.s_tir.Schedule(workload, debug_mask=0)
                    record.trace.apply_to_schedule(sch, remove_postproc=False)
                except Exception:  # noqa: BLE001 - a trace of an older TVM: no example
                    counts["skipped"] += 1
                    continue
                candidates.append(ms.MeasureCandidate(sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod)))
                seconds.append(_mean_s(record))
            if not candidates:
                continue
            features = [f.numpy().astype("float32") for f in extractor.extract_from(context, candidates)]
            keep = [i for i, f in enumerate(features) if len(f)]
            cost_model.add_measurements(model, shash2hex(context.mod), [features[i] for i in keep],
                                        [seconds[i] for i in keep])
            counts["records"] += len(keep)
            counts["workloads"] += 1
    return counts


def train(directories: Sequence[str | os.PathLike], out: str | os.PathLike, target: Any = None) -> dict[str, int]:
    """Train a fresh model on ``directories`` and save it to ``out``; returns the counts."""
    model = cost_model.new_model()
    counts = add_examples(model, directories, target)
    if not counts["records"]:
        raise ValueError(f"no measured records in {', '.join(map(str, directories))}")
    cost_model.retrain(model)
    cost_model.save(model, out)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directories", nargs="+", help="tuning work dirs / record folders")
    parser.add_argument("--out", default=str(cost_model.SHIPPED_FILE), help="model file (default: the shipped one)")
    args = parser.parse_args(argv)
    counts = train(args.directories, args.out)
    print(f"trained on {counts['records']} measured schedules of {counts['workloads']} workload(s) "
          f"({counts['skipped']} traces skipped): {args.out} ({np.round(Path(args.out).stat().st_size / 1e6, 2)} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
