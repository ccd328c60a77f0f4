"""Tune the bundled demo and benchmark models and ship their best records in tuning/records/.

    python scripts/make_records.py --sets demo,B1,C1,B8,C8,A1,A8 --trials-per-task 64
    python scripts/make_records.py --sets demo --mcpu haswell      # the x86_64-avx2 class

Sets (the benchmark recipe's, gmorph_tvm.recipe): ``demo`` (what ``gmorph-tvm demo`` builds: 4
Fashion-MNIST tasks, batch 1, separate and stitch+merge) and ``<A|B|C|E><batch>`` (what
``bench/lossless.py`` builds: separate, stitch, stitch+merge, grouped). Each set is tuned into
``<work-dir>/<class>/<set>`` with every task
that ``tune`` would tune getting ``--trials-per-task`` trials (a re-run continues where it
stopped); after each set the best record per workload of all sets done so far is written to
``tuning/records/<class>/<tvm version>/`` (see gmorph_tvm.tuning.shipped). Measured on this
machine: ``--mcpu`` must name a CPU of a class this machine can run.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from pathlib import Path

import tvm

from gmorph_tvm import recipe
from gmorph_tvm.core.targets import target_dict
from gmorph_tvm.tuning import tune
from gmorph_tvm.tuning.shipped import INDEX_FILE, RECORDS_ROOT, package, target_class
from gmorph_tvm.tuning.tasks import DEFAULT_MIN_FLOPS_SHARE

ROOT = Path(__file__).resolve().parent.parent
# A benchmark set's builds, tuned in this order: at batch 1 set B's separate models are the demo's,
# already shipped when the demo set ran first.
TUNING_ORDER = ("stitch", "stitch+merge", "grouped", "separate")


def _say(msg: str) -> None:
    print(f"[records] {msg}", file=sys.stderr, flush=True)


def set_modules(name: str, variants: set[str] | None = None) -> list[tuple[str, tvm.IRModule]]:
    """The weight-bound modules a set (``demo`` or ``<set><batch>``) tunes, labelled. ``variants``
    (benchmark sets only; default: all of the recipe's) names the builds to make: the others are not
    fused at all."""
    set_name, batch = recipe.parse_label(name)
    imported = recipe.import_set(recipe.load_set(set_name, batch))
    if set_name == recipe.DEMO:
        return recipe.tuning_modules(imported, recipe.DEMO_VARIANTS)
    wanted = set(recipe.VARIANTS) if variants is None else variants
    return recipe.tuning_modules(imported, [v for v in TUNING_ORDER if v in wanted])


def publish(work: Path, out: Path, spec: dict, sets: dict) -> dict:
    """Package ``work`` into ``out`` under a lock: several make_records may run at once."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".make_records.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return package([work], out, tuned_on=spec, sets=sets)


def tune_set(name: str, target: tvm.target.Target, work: Path, per_task: int, population: int,
             reuse_shipped: bool, out: Path, spec: dict, variants: set[str] | None = None,
             min_flops_share: float = DEFAULT_MIN_FLOPS_SHARE, op_names: list[str] | None = None) -> float:
    started = time.perf_counter()
    for label, mod in set_modules(name, variants):
        if (work / "database_workload.json").is_file():  # what is done is shipped to the other runs
            publish(work, out, spec, {})
        # Kernels already shipped (by an earlier set) with enough trials are not tuned again.
        report = tune(mod, target, trials_per_task=per_task, work_dir=work, shipped_records=reuse_shipped,
                      progress=False, population_size=population, min_flops_share=min_flops_share,
                      op_names=op_names)
        planned = sum(1 for t in report.tasks if t.trials_planned)
        _say(f"{name}/{label}: {planned} of {len(report.tasks)} tasks x {per_task} trials: "
             f"{len(report.tuned)} tuned ({len(report.shipped)} already shipped), "
             f"{report.trials_run} trials in {report.seconds:.0f} s")
        publish(work, out, spec, {})
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="demo,B1,C1,B8,C8,A1,A8")
    parser.add_argument("--trials-per-task", type=int, default=64)
    parser.add_argument("--population", type=int, default=64,
                        help="evolutionary-search population (one round per task: its cost model is untrained, "
                        "so a large population costs minutes per task and buys little)")
    parser.add_argument("--mcpu", help="tune for this CPU (default: this machine's)")
    parser.add_argument("--min-flops-share", type=float, default=DEFAULT_MIN_FLOPS_SHARE,
                        help="tune() leaves kernels under this cost share untuned (default: tune()'s); 0 tunes "
                        "every kernel (an untuned kernel runs ~10x slower, so a 0.5%% one becomes 5%% of the time)")
    parser.add_argument("--variants", help="comma-separated builds of a benchmark set to tune (default: all of "
                        f"{', '.join(recipe.VARIANTS)})")
    parser.add_argument("--op-names", help="comma-separated kernel names (substrings, as tune's op_names) to tune; "
                        "the others are left as shipped (e.g. a re-tune of a set's slowest kernels with more trials)")
    parser.add_argument("--work-dir", default=str(ROOT / "out" / "records"))
    parser.add_argument("--out", default=str(RECORDS_ROOT), help="records root (default: the package's)")
    parser.add_argument("--package-only", action="store_true",
                        help="only (re)package the sets' work dirs found under --work-dir")
    args = parser.parse_args(argv)
    spec = target_dict("llvm")
    if args.mcpu:
        spec["mcpu"] = args.mcpu
    target = tvm.target.Target(spec)
    cls = target_class(target)
    out = Path(args.out) / str(cls) / str(tvm.__version__)
    if args.package_only:
        works = sorted(p for p in (Path(args.work_dir) / str(cls)).iterdir() if (p / "database_workload.json").is_file())
        index = package(works, out, tuned_on=spec, sets={})
        _say(f"packaged {', '.join(p.name for p in works)}: {len(index['workloads'])} workloads")
        return 0
    reuse = Path(args.out).resolve() == RECORDS_ROOT.resolve()
    index_file = out / INDEX_FILE
    for name in args.sets.split(","):
        work = Path(args.work_dir) / str(cls) / name
        variants = set(args.variants.split(",")) if args.variants and name != "demo" else None
        if variants and not variants <= set(recipe.VARIANTS):
            parser.error(f"--variants: {', '.join(sorted(variants - set(recipe.VARIANTS)))} not among "
                         f"{', '.join(recipe.VARIANTS)}")
        op_names = args.op_names.split(",") if args.op_names else None
        seconds = tune_set(name, target, work, args.trials_per_task, args.population, reuse, out, spec, variants,
                           args.min_flops_share, op_names)
        entry = {"trials_per_task": args.trials_per_task, "population": args.population, "tuning_s": round(seconds),
                 "min_flops_share": args.min_flops_share}
        if variants:
            entry["variants"] = sorted(variants)
        if op_names:
            entry["op_names"] = op_names
        # A later run on a set (a top-up, a re-tune of some kernels) is added to its entry, not put
        # in its place: the index says how each of the set's records came about.
        old = json.loads(index_file.read_text(encoding="utf-8"))["sets"].get(name) if index_file.is_file() else None
        if old:
            entry = {**old, "then": [*old.get("then", []), entry]}
        index = publish(work, out, spec, sets={name: entry})
        size = sum(f.stat().st_size for f in out.iterdir())
        _say(f"{name} done in {seconds:.0f} s; {out}: {len(index['workloads'])} workloads, {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
