"""Activation layout of the convolutions: NCHW (what the importers produce) vs NHWC, on CPU.

    python bench/layout.py --set C --batch 1 --trials-per-task 32 [--work-dir out/layout]

Builds one 8-model benchmark set (the recipe's sets B and C, gmorph_tvm.recipe), fused losslessly
(stitch+merge), twice: with the importers' NCHW convolutions (``channels_last=False``) and as
CPU builds now lower them (``gmorph_tvm.passes.ChannelsLast``: every conv2d NHWC / OHWI, weights
transposed once at build time). Each layout is tuned here with the same ``--trials-per-task``
trials per kernel and no shipped records (the databases are kept in ``--work-dir``: a re-run
reuses them). Both outputs are checked against PyTorch; both builds and ONNX Runtime
(non-spinning sessions, model by model) are timed interleaved; one markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from gmorph_tvm import recipe
from gmorph_tvm.artifact import build, resolve_target
from gmorph_tvm.benchmark import measure, tvm_sampler
from gmorph_tvm.runtime import load
from gmorph_tvm.tuning import tune


def _say(msg: str) -> None:
    print(f"[layout] {msg}", file=sys.stderr, flush=True)


def run(set_name: str, batch: int, per_task: int, work: Path, samples: int) -> str:
    target = resolve_target("llvm")
    bench_set = recipe.load_set(set_name, batch)
    models, feed = bench_set.models, bench_set.feed
    reference = bench_set.reference()
    peer = recipe.PEERS["ort-nospin"]
    peer_inputs = recipe.PeerInputs(bench_set, bench_set.export_onnx(work))
    (fused,) = recipe.builds(recipe.import_set(bench_set), "stitch+merge")
    builds = {}
    for layout, channels_last in (("NCHW", False), ("NHWC", True)):
        db = work / f"{layout.lower()}_tuning"
        start = time.perf_counter()
        report = tune(fused, target, trials_per_task=per_task, work_dir=db, progress=False,
                      shipped_records=False, channels_last=channels_last)
        _say(f"{layout}: {len(report.tuned)} kernels tuned, {report.trials_run} trials in "
             f"{time.perf_counter() - start:.0f} s")
        artifact = build(fused, target, tuning_db=db, shipped_records=False, channels_last=channels_last)
        builds[f"gmorph-tvm fused, {layout} ({per_task} trials/kernel)"] = artifact.export(work / f"{layout.lower()}.so")
    runners = {label: load(path) for label, path in builds.items()}
    errors = {label: recipe.max_relative_error(recipe.run_artifacts([str(path)], feed), reference)
              for label, path in builds.items()}
    systems = {peer.label: peer.sampler(peer_inputs)}
    systems.update({label: tvm_sampler([r], feed) for label, r in runners.items()})
    timings = measure(systems, samples=samples)
    ort = timings[peer.label].median_ms
    lines = [f"**Set {set_name}, batch {batch}** ({target.attrs['mcpu']}, {len(models)} models)", "",
             "| system | median ms | ± | min ms | vs ONNX Runtime | max rel. error vs PyTorch |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, t in timings.items():
        err = f"{errors[label]:.1e}" if label in errors else "-"
        lines.append(f"| {label} | {t.median_ms:.3f} | {t.spread_pct:.0f}% | {min(t.samples_ms):.3f} | "
                     f"{ort / t.median_ms:.2f}x | {err} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="C", choices=["B", "C"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--trials-per-task", type=int, default=32)
    parser.add_argument("--samples", type=int, default=31)
    parser.add_argument("--work-dir", help="keep the exports and both layouts' tuning databases here")
    args = parser.parse_args(argv)
    if args.work_dir:
        work = Path(args.work_dir) / f"{args.set}{args.batch}"
        work.mkdir(parents=True, exist_ok=True)
        print(run(args.set, args.batch, args.trials_per_task, work, args.samples))
    else:
        with tempfile.TemporaryDirectory(prefix="layout_") as tmp:
            print(run(args.set, args.batch, args.trials_per_task, Path(tmp), args.samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
