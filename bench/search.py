"""Accuracy-aware fusion search on the Fashion-MNIST 3-task benchmark (VGG / ResNet / MobileNet).

Prints markdown tables:

1. latency of the chosen fused artifact vs PyTorch eager model-by-model and vs the models compiled
   separately by TVM (untuned, and tuned with the same MetaSchedule budget when --tune-trials > 0);
2. per-task test accuracy before / after;
3. the search with and without the XGBoost predictive filter (same seed and budget): fine-tunes
   done, fine-tunes saved, best latency found, wall time.

With ``--workers 1,2`` it prints instead the scaling of the search with the number of candidates
evaluated at once (1: in this process, no Ray; K > 1: K Ray tasks, torch and TVM pinned to one thread
each): wall time, candidates evaluated, fine-tunes, the chosen plan, and how many tasks were in flight
on average. ``--simulate-workers 8`` adds a run on a local Ray given 8 logical CPUs whatever the
machine has (fake resources): the tasks share the real cores, so wall time says little, but the mean
number in flight shows whether the scheduler keeps every worker busy.

    python bench/search.py --workers 1,2 --simulate-workers 6 --budget 6 --epochs 0.5 --train-samples 1000

Single-threaded runtimes (TVM_NUM_THREADS=1, torch.set_num_threads(1)). ``--clock cpu`` (default)
times with process CPU time, which on a shared machine measures the compute of one inference
instead of how long other jobs held the cores; ``--clock wall`` uses elapsed time.

    python bench/search.py --budget 16 --tune-trials 100
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM starts its thread pool

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=int, default=16)
    p.add_argument("--max-drop", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="annealing", choices=["annealing", "random"])
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--train-samples", type=int, default=8000)
    p.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials (0: untuned only)")
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    p.add_argument("--work-dir", default="out/bench_search")
    p.add_argument("--skip-no-filter", action="store_true", help="only run the search with the filter")
    p.add_argument("--fresh", action="store_true", help="do not resume searches in --work-dir")
    p.add_argument("--workers", default=None, metavar="K1,K2,...",
                   help="scaling table only: the search with each number of parallel candidates (1 = no Ray)")
    p.add_argument("--simulate-workers", type=int, default=0, metavar="K",
                   help="scaling table: also a local Ray with K logical CPUs (fake resources on this machine), "
                        "budget at least 2K")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from gmorph_tvm import import_models
    from gmorph_tvm.lossy import DistillConfig, SearchConfig, TimingConfig, search, tasks
    from gmorph_tvm.lossy.graph import LayerGraph
    from gmorph_tvm.lossy.latency import compile_multimodel, time_artifact, time_torch_eager
    from gmorph_tvm.lossy.mutate import build_fused, to_multimodel
    from gmorph_tvm.lossy.plan import FusionPlan
    from gmorph_tvm.passes import stitch

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)  # noqa: E731
    models, data, summary = tasks.load_benchmark(log=log)
    timing = TimingConfig(number=5, repeat=30, clock=args.clock)
    config = DistillConfig(max_epochs=args.epochs, train_samples=args.train_samples)
    x = data.val_x[:1]

    base = SearchConfig(max_accuracy_drop=args.max_drop, budget=args.budget, sampler=args.sampler, seed=args.seed,
                        resume=not args.fresh, distill_config=config, timing=timing, log=log)
    if args.workers or args.simulate_workers:
        return scaling(args, argv, models, data, base, work, log)
    runs = {}
    for name, predictor in (("with filter", "xgboost"), ("without filter", None)):
        if predictor is None and args.skip_no_filter:
            continue
        log(f"search {name}: budget {args.budget}, seed {args.seed}")
        t0 = time.perf_counter()
        result = search(models, data, base, predictor=predictor, work_dir=work / name.replace(" ", "_"))
        runs[name] = (result, time.perf_counter() - t0)
    chosen = runs["with filter"][0]

    # ---- latencies: eager, separately compiled, unfused merged, fused ------------------------------------
    log("timing PyTorch eager and separately compiled TVM models")
    lat = {"eager": time_torch_eager(models.values(), x, timing)}
    # Same canonical op spelling as the fused modules (stitch canonicalizes), so tuning records match.
    separate = {t: stitch(import_models({t: m}, x)) for t, m in models.items()}
    lat["separate"] = sum(time_artifact(compile_multimodel(mm, "llvm"), timing) for mm in separate.values())
    graphs = {t: LayerGraph.trace(t, m, x) for t, m in models.items()}
    unfused = to_multimodel(build_fused(graphs, FusionPlan()).eval(), x)
    lat["unfused"] = time_artifact(compile_multimodel(unfused, "llvm"), timing)
    lat["fused"] = time_artifact(chosen.artifact, timing)
    tuned = {}
    if args.tune_trials > 0:
        from gmorph_tvm.tuning import tune

        db = work / "tuning"
        t0 = time.perf_counter()
        # One database for all: the unfused module's kernels first, then whatever the fused adds.
        log(f"tuning the unfused models ({args.tune_trials} trials)")
        tune(unfused.bound_module(), "llvm", trials=args.tune_trials, work_dir=db, progress=False)
        if not chosen.plan.is_identity:
            log(f"tuning the fused model ({args.tune_trials} trials; shared kernels reuse records)")
            tune(chosen.multi_model.bound_module(), "llvm", trials=args.tune_trials, work_dir=db, progress=False)
        tuned["seconds"] = time.perf_counter() - t0
        tuned["separate"] = sum(time_artifact(compile_multimodel(mm, "llvm", tuning_db=db), timing) for mm in separate.values())
        tuned["unfused"] = time_artifact(compile_multimodel(unfused, "llvm", tuning_db=db), timing)
        tuned["fused"] = time_artifact(compile_multimodel(chosen.multi_model, "llvm", tuning_db=db), timing)

    # ---- tables ----------------------------------------------------------------------------------------------
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    out = [f"Command: `{cmd}`", "",
           f"Chosen plan: `{chosen.plan.key()}` ({chosen.message})", "",
           f"Latency, batch 1, one thread, {args.clock} clock (min of {timing.repeat} x {timing.number} calls):", "",
           "| variant | untuned (ms) | vs eager | tuned (ms) | vs eager |", "|---|---|---|---|---|"]

    def row(label, key):
        u = lat[key]
        cells = [label, f"{u:.3f}", f"{lat['eager'] / u:.2f}x"]
        if key in tuned:
            cells += [f"{tuned[key]:.3f}", f"{lat['eager'] / tuned[key]:.2f}x"]
        else:
            cells += ["-", "-"]
        return "| " + " | ".join(cells) + " |"

    out.append(row("PyTorch eager, model by model", "eager"))
    out.append(row("TVM, each model compiled separately", "separate"))
    out.append(row("TVM, all models in one module (unfused)", "unfused"))
    out.append(row("TVM, fused plan (this search)", "fused"))
    if tuned:
        out.append(f"\nTuning: {args.tune_trials} trials per module, {tuned['seconds']:.0f} s. Fused vs separately "
                   f"compiled: {lat['separate'] / lat['fused']:.2f}x untuned, {tuned['separate'] / tuned['fused']:.2f}x tuned.")
    out += ["", "Per-task test accuracy (%):", "", "| task | model | original | fused | drop (pt) |", "|---|---|---|---|---|"]
    for t in chosen.test_accuracy:
        out.append(f"| {t} | {tasks.ARCHITECTURES[t][0]} | {chosen.base_test_accuracy[t]:.2f} | "
                   f"{chosen.test_accuracy[t]:.2f} | {chosen.test_drops[t]:+.2f} |")
    out += ["", f"Search (budget {args.budget} plans, seed {args.seed}, {args.sampler}, max drop {args.max_drop} pt):", "",
            "| search | fine-tunes | skipped by filter (rule / pred. drop / pred. latency / measured latency) | aborted by learning curve "
            "| passed val | best val latency (ms) | best speedup vs unfused | chosen plan | wall time (min) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, (res, seconds) in runs.items():
        c, r = res.report["counts"], res.report
        out.append(
            f"| {name} | {c['fine_tuned']} | {c['skipped_rule']} / {c['skipped_predicted_drop']} / {c['skipped_predicted_latency']} / "
            f"{c['skipped_measured_latency']} | {c['aborted']} | {c['passed']} | {r['best_val_latency_ms']:.3f} | "
            f"{r['baseline_latency_ms'] / r['best_val_latency_ms']:.2f}x | `{res.plan.key()}` | {seconds / 60:.1f} |"
        )
    if len(runs) == 2:
        with_f, without = (runs[k][0].report["counts"]["fine_tuned"] for k in ("with filter", "without filter"))
        out.append(f"\nFine-tunes saved by the filter: {1 - with_f / max(1, without):.0%} ({with_f} vs {without}).")
        plans = [runs[k][0].plan.key() for k in ("with filter", "without filter")]
        # Latencies of one plan measured in two searches differ by timing noise only; the plan is what counts.
        out.append("Both searches chose the same plan." if plans[0] == plans[1] else
                   f"The searches chose different plans: `{plans[0]}` with the filter, `{plans[1]}` without.")
    text = "\n".join(out)
    print(text)
    (work / "results.md").write_text(text + "\n")
    (work / "results.json").write_text(json.dumps({"latency_ms": lat, "tuned_ms": tuned, "training": summary}, indent=1))
    return 0


def scaling(args, argv, models, data, base, work, log) -> int:
    """The ``--workers`` table: one fresh search per worker count, same seed, budget and settings."""
    from dataclasses import replace

    from gmorph_tvm.lossy import search

    # Distillation reads train_samples images: the first ones, and only those are shipped to the workers.
    data = data.limited(train=args.train_samples)
    counts = [int(k) for k in args.workers.split(",")] if args.workers else []
    runs = [(f"{k}", k, False, args.budget) for k in counts]
    if args.simulate_workers:  # at least two rounds of proposals, or the workers cannot all be kept busy
        k = args.simulate_workers
        runs.append((f"{k} (simulated)", k, True, max(args.budget, 2 * k)))
    rows = []
    for label, k, simulated, budget in runs:
        log(f"search with {label} worker(s): budget {budget}, seed {args.seed}")
        config = replace(base, workers=k, resume=False, progress=False, budget=budget)
        started_ray = False
        if simulated:
            import ray

            # More logical CPUs than the machine has: Ray schedules k tasks at once on the real cores.
            ray.init(num_cpus=k, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}})
            started_ray = True
        try:
            t0 = time.perf_counter()
            result = search(models, data, config, work_dir=work / f"workers_{k}{'_sim' if simulated else ''}")
            wall = time.perf_counter() - t0
        finally:
            if started_ray:
                ray.shutdown()
        r, c = result.report, result.report["counts"]
        par = r.get("parallel") or {}
        rows.append((label, budget, wall, r["search_seconds"], c["proposed"], c["fine_tuned"], c["passed"],
                     par.get("mean_in_flight"), r["baseline_latency_ms"] / result.latency_ms, result.plan.key(),
                     max(result.test_drops.values())))
        log(f"{label} worker(s): {rows[-1]}")
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    out = [f"Command: `{cmd}`", "",
           f"Search scaling (seed {args.seed}, {args.sampler}, max drop {args.max_drop} pt, "
           f"{args.epochs} epochs on {args.train_samples} images, torch/TVM 1 thread per worker, {os.cpu_count()} CPUs):",
           "", "| workers | budget | wall (min) | search loop (min) | candidates evaluated | fine-tunes | passed val | "
           "mean tasks in flight | speedup of chosen vs unfused | chosen plan | worst test drop (pt) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, budget, wall, loop, proposed, tuned, passed, in_flight, speedup, plan, drop in rows:
        flight = "-" if in_flight is None else f"{in_flight:.2f}"
        out.append(f"| {label} | {budget} | {wall / 60:.1f} | {loop / 60:.1f} | {proposed} | {tuned} | {passed} | {flight} | "
                   f"{speedup:.2f}x | `{plan}` | {drop:.2f} |")
    text = "\n".join(out)
    print(text)
    (work / "scaling.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
