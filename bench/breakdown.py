"""Where the time goes: per-kernel time of TVM (separate and fused) against ONNX Runtime.

    python bench/breakdown.py --set demo --batch 1
    python bench/breakdown.py --set C --batch 8 --tuning-db out/lossless/C8/tuning

For every system on the same models and input:
  * TVM: ``main`` timed with ``time_evaluator`` (no Python in the loop); each kernel call the VM
    makes (seen through ``vm.set_instrument``) timed on its own with ``time_evaluator`` on the
    very arguments the VM passed it, with all cores and with one thread. "VM overhead" is the
    whole call minus the sum of its kernels: the interpreter, storage allocation, argument checks
    and thread-pool wake-ups between kernels. "1-thread gain" is what running every kernel that
    is faster single-threaded (tiny kernels: a parallel launch costs more than they do) on one
    thread would save.
  * ONNX Runtime (one session per model, run one after another; default sessions and sessions
    with ``session.intra_op.allow_spinning=0``): ``SessionOptions.enable_profiling`` gives each
    node's kernel time and each run's ``model_run`` time (the total here, summed over the models;
    profiling itself adds about a microsecond a node); "overhead" is ``model_run`` minus nodes.
Kernels are built with the records shipped for this machine's class plus ``--tuning-db``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tvm

from gmorph_tvm import recipe
from gmorph_tvm.artifact import resolve_target
from gmorph_tvm.core.timing import seconds_per_call, time_main
from gmorph_tvm.runtime import load

TINY_US = 20.0  # kernels under this are "tiny": launch and wake-up costs are of their order


def _say(msg: str) -> None:
    print(f"[breakdown] {msg}", file=sys.stderr, flush=True)


@dataclass
class Breakdown:
    system: str
    total_ms: float
    kernel_ms: float
    kernels: int
    tiny: int = 0
    tiny_ms: float = 0.0
    single_thread_gain_ms: float | None = None
    spread_pct: float = 0.0
    top: list[tuple[str, float, int]] = field(default_factory=list)  # (kernel, ms per run, calls)
    vm_builtins: int | None = None  # TVM: VM builtin calls per run (allocation, checks, tuples)

    @property
    def overhead_ms(self) -> float:
        return self.total_ms - self.kernel_ms


def _config_threads(n: int) -> None:
    tvm.get_global_func("runtime.config_threadpool")(1, n)


def _capture_calls(runner, args) -> tuple[list[tuple[str, list]], int]:
    """Every kernel the VM calls in one run of ``main``, with the arguments it passed, and the
    number of VM builtin calls (allocation, shape checks, tuple handling) around them."""
    calls: list[tuple[str, list]] = []
    builtins = [0]

    def instrument(func, name, before_run, ret_value, *call_args):
        if before_run and str(name).startswith("vm.builtin."):
            builtins[0] += 1
        elif before_run:
            calls.append((str(name), list(call_args)))
        return 0

    runner.vm.set_instrument(instrument)
    try:
        runner.vm["main"](*args)
    finally:
        runner.vm.set_instrument(lambda *a: 0)
    return calls, builtins[0]


def _kernel_us(lib, name: str, args: list, dev) -> float:
    return time_main(lib, dev, args, number=20, repeat=5, min_repeat_ms=5, func=name)["median_ms"] * 1e3


def tvm_breakdown(system: str, paths: list[str], feed: dict[str, np.ndarray], cores: int) -> Breakdown:
    per_kernel: dict[str, list[float]] = defaultdict(list)
    total_ms, kernel_us, single_gain_us, samples = 0.0, 0.0, 0.0, []
    count, vm_calls = 0, 0
    for path in paths:
        runner = load(path)
        names = [s["name"] for s in runner.manifest["inputs"]]
        args = [tvm.runtime.tensor(feed[n], runner.device) for n in names] + runner.weight_args("main")
        _config_threads(cores)
        timing = runner.benchmark({n: feed[n] for n in names}, number=50, repeat=15)
        total_ms += timing["median_ms"]
        samples.append(timing["std_ms"] / timing["median_ms"] if timing["median_ms"] else 0.0)
        lib = tvm.runtime.load_module(path).imports[0]
        calls, builtins = _capture_calls(runner, args)
        vm_calls += builtins
        for name, call_args in calls:
            multi = _kernel_us(lib, name, call_args, runner.device)
            _config_threads(1)
            single = _kernel_us(lib, name, call_args, runner.device)
            _config_threads(cores)
            per_kernel[name].append(multi)
            kernel_us += multi
            single_gain_us += max(0.0, multi - single)
            count += 1
    flat = [t for ts in per_kernel.values() for t in ts]
    top = sorted(((n, sum(ts) / 1e3, len(ts)) for n, ts in per_kernel.items()), key=lambda r: -r[1])[:6]
    bd = Breakdown(system, total_ms, kernel_us / 1e3, count, sum(t < TINY_US for t in flat),
                   sum(t for t in flat if t < TINY_US) / 1e3, single_gain_us / 1e3,
                   100 * max(samples, default=0.0), top)
    bd.vm_builtins = vm_calls
    return bd


def ort_breakdown(system: str, onnx_paths: list[str], feed: dict[str, np.ndarray], spinning: bool,
                  runs: int, workdir: Path) -> Breakdown:
    import onnxruntime as ort

    sessions = []
    for i, path in enumerate(onnx_paths):
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(workdir / f"ort_{'spin' if spinning else 'nospin'}_{i}")
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        sessions.append((sess, {i.name: feed[i.name] for i in sess.get_inputs()}))
    def run_all() -> None:
        for sess, inputs in sessions:
            sess.run(None, inputs)

    seconds_per_call(run_all, 10)  # warm-up
    totals = seconds_per_call(run_all, 1, runs)
    per_kernel: dict[str, list[float]] = defaultdict(list)
    run_us, node_us, count = 0.0, 0.0, 0
    for sess, _ in sessions:
        events = json.loads(Path(sess.end_profiling()).read_text())
        model_runs = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
        run_us += statistics.median(model_runs) if model_runs else 0.0
        by_node: dict[str, list[float]] = defaultdict(list)
        op_of: dict[str, str] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                node = e["name"][: -len("_kernel_time")]
                by_node[node].append(float(e["dur"]))
                op_of[node] = e.get("args", {}).get("op_name", "?")
        for node, durs in by_node.items():  # medians over all runs (profiling adds ~1 us a node)
            med = statistics.median(durs)
            node_us += med
            per_kernel[op_of[node]].append(med)
            count += 1
    flat = [t for ts in per_kernel.values() for t in ts]
    top = sorted(((n, sum(ts) / 1e3, len(ts)) for n, ts in per_kernel.items()), key=lambda r: -r[1])[:6]
    wall_ms = statistics.median(totals) * 1e3
    spread = 100 * (np.percentile(totals, 90) - np.percentile(totals, 10)) / 2 / statistics.median(totals)
    bd = Breakdown(system, run_us / 1e3, node_us / 1e3, count, sum(t < TINY_US for t in flat),
                   sum(t for t in flat if t < TINY_US) / 1e3, None, float(spread), top)
    bd.wall_ms = wall_ms  # type: ignore[attr-defined]  # session.run from Python, profiling on
    return bd


def render(title: str, rows: list[Breakdown]) -> str:
    lines = [f"**{title}**", "",
             ("| system | total ms | kernels ms | overhead ms | kernels | VM builtins | tiny (<20 us) | tiny ms "
              "| 1-thread gain ms |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gain = f"{r.single_thread_gain_ms:.3f}" if r.single_thread_gain_ms is not None else "-"
        builtins = str(r.vm_builtins) if r.vm_builtins is not None else "-"
        lines.append(f"| {r.system} | {r.total_ms:.3f} | {r.kernel_ms:.3f} | {r.overhead_ms:.3f} | {r.kernels} | "
                     f"{builtins} | {r.tiny} | {r.tiny_ms:.3f} | {gain} |")
    lines += ["", "Largest kernels (ms per run, calls):", ""]
    for r in rows:
        lines.append(f"- {r.system}: " + "; ".join(f"{n} {ms:.3f} ({c})" for n, ms, c in r.top[:4]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="demo", choices=recipe.SETS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tuning-db", help="a tuning work dir applied before the shipped records")
    parser.add_argument("--runs", type=int, default=200, help="ONNX Runtime runs profiled")
    parser.add_argument("--work-dir", help="keep artifacts here (default: a temporary directory)")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    bench_set = recipe.load_set(args.set, args.batch)
    models, feed = bench_set.models, bench_set.feed
    target = resolve_target("llvm")
    with tempfile.TemporaryDirectory(prefix="breakdown_") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        onnx_paths = list(bench_set.export_onnx(work).values())
        _say(f"building {len(models)} separate models and the fused one")
        imported = recipe.import_set(bench_set)
        sep = recipe.build_variant(imported, "separate", target, work, tuning_db=args.tuning_db)
        fused = recipe.build_variant(imported, "stitch+merge", target, work, tuning_db=args.tuning_db)
        _say("timing")
        rows = [
            tvm_breakdown(recipe.SEPARATE_LABEL, sep, feed, cores),
            tvm_breakdown(recipe.variant_label("stitch+merge"), fused, feed, cores),
            ort_breakdown(recipe.PEERS["ort"].label, onnx_paths, feed, True, args.runs, work),
            ort_breakdown(recipe.PEERS["ort-nospin"].label, onnx_paths, feed, False, args.runs, work),
        ]
    title = (f"Set {args.set}, batch {args.batch}: {len(models)} models, {target.attrs['mcpu']}, {cores} cores "
             f"(`python bench/breakdown.py {' '.join(sys.argv[1:] if argv is None else argv)}`)")
    print(render(title, rows))
    for r in rows:
        if hasattr(r, "wall_ms"):
            print(f"\n{r.system}: total is ORT's own model_run; from Python (sess.run per model) {r.wall_ms:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
