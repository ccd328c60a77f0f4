"""Real models from the wild (gmorph_tvm.zoo.real): do they import, match, and how fast do they run beside their peers?

    python bench/zoo.py [--models ocr_det,effnet_onnx_legacy,...] [--fused] [--tune-trials N]
                        [--before-after] [--threads T] [--samples N]

For every model of the zoo (PaddleOCR det/cls/rec ONNX from rapidocr-onnxruntime, EfficientNet-Lite0
torch + both torch ONNX exporters, all-MiniLM-L6-v2 BertModel torch + both ONNX exports, Silero VAD),
imported alone exactly as a user has it (the ONNX files as exported; only static input shapes
given): whether it imports, the max relative error (max |err| / max |ref|) of the untuned llvm
build against onnxruntime (ONNX) or PyTorch (torch) and whether it is <= 1e-4, then latencies
(ms, medians of interleaved samples, every system on the same input in the same rounds):

* ``TVM untuned``: ``gmorph_tvm.build(..., shipped_records=False)``: a new model, no record
  applies (the build's default schedules);
* ``TVM tuned``: with ``--tune-trials N`` (default 64), MetaSchedule with N trials for that
  model, shipped records still off; ``--tune-trials 0`` leaves the column out (``-``);
* ``ORT``: ONNX Runtime, default session (spinning pool threads) and ``ORT nospin``
  (``session.intra_op.allow_spinning=0``); ``OpenVINO``: the file compiled for CPU, latency hint
  (ONNX rows; ``-`` when openvino is not installed); ``PyTorch``: eager, for torch rows.
* ``--before-after``: two more columns for the same lowering (``gmorph_tvm.tuning.prepare``):
  ``plain loops`` (every kernel as legalization wrote it: untuned CPU builds before default
  schedules) and ``default sched``
  (:class:`gmorph_tvm.tuning.default_schedules.DefaultCPUSchedules`, as the build applies it).

TVM, ONNX Runtime, OpenVINO and PyTorch run on ``--threads`` threads (default: every physical core
the process may use, as ``import gmorph_tvm`` sets TVM_NUM_THREADS). ``--fused`` adds one row per
group of models reading the same input (``input_map`` joins torch's default input names), fused
losslessly and built as one artifact, against the sum of the group's reference runtimes.

``--sweep`` then imports every ``.onnx`` file found in the installed packages (site-packages, less
onnx's per-operator test cases) with symbolic dims set to 1 (first) / 64 (others; Silero VAD: one
512-sample chunk), and prints per file the ops that neither TVM nor gmorph-tvm converts and the
import result (one line).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

PARSER = argparse.ArgumentParser(description=__doc__.split("\n")[0])
PARSER.add_argument("--models", help="comma-separated zoo names (default: all)")
PARSER.add_argument("--fused", action="store_true", help="also build each input group as one fused artifact")
PARSER.add_argument("--tune-trials", type=int, default=64,
                    help="MetaSchedule trials per model for the tuned column (0: no tuning; default 64)")
PARSER.add_argument("--before-after", action="store_true",
                    help="also time the untuned lowering with plain loops and with DefaultCPUSchedules")
PARSER.add_argument("--threads", type=int, default=None,
                    help="threads for TVM, onnxruntime, OpenVINO and PyTorch (default: the physical cores)")
PARSER.add_argument("--samples", type=int, default=15, help="interleaved timing rounds (median reported)")
PARSER.add_argument("--sweep", action="store_true",
                    help="also try every .onnx file shipped in installed packages and list unsupported ops")
PARSER.add_argument("--work-dir", default=None, help="exports and tuning databases (default: a temp dir)")
ARGS = PARSER.parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads is not None:
    os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from gmorph_tvm import build, import_models  # noqa: E402
from gmorph_tvm.benchmark import (  # noqa: E402
    measure,
    onnxruntime_sampler,
    openvino_sampler,
    torch_sampler,
)
from gmorph_tvm.core.targets import resolve_target  # noqa: E402
from gmorph_tvm.core.threads import physical_cores  # noqa: E402
from gmorph_tvm.core.timing import calls_to_last, time_main  # noqa: E402
from gmorph_tvm.errors import GmorphError  # noqa: E402
from gmorph_tvm.frontend.onnx_convert import unsupported_ops  # noqa: E402
from gmorph_tvm.pipeline import fuse_lossless  # noqa: E402
from gmorph_tvm.tuning import prepare  # noqa: E402
from gmorph_tvm.tuning.default_schedules import DefaultCPUSchedules  # noqa: E402
from gmorph_tvm.zoo import real  # noqa: E402

TOL = 1e-4
SYSTEMS = ["TVM untuned", "TVM tuned", "plain loops", "default sched", "ORT", "ORT nospin", "OpenVINO", "PyTorch"]


def _vm_sampler(executable, args: list):
    """Seconds per ``main`` call of a compiled Relax executable, timed by TVM (no Python in the loop)."""
    vm = relax.VirtualMachine(executable, tvm.cpu())
    number = calls_to_last(lambda: vm["main"](*args), 0.02)
    return lambda: time_main(vm, tvm.cpu(), args, number=number, repeat=1)["median_ms"] / 1e3


def _artifact_sampler(artifact, arrays):
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays] + artifact.weight_args()
    return _vm_sampler(artifact.executable, args)


def _before_after_samplers(mod: tvm.IRModule, arrays) -> dict:
    """The untuned CPU lowering (``prepare``: kernels as legalization wrote them) compiled with
    plain loops and with the default CPU schedules (what the pipeline's apply_tuning phase does
    when no record applies)."""
    target = resolve_target("llvm")
    plain = prepare(mod, target)
    with target:
        scheduled = tvm.transform.Sequential([
            DefaultCPUSchedules(target),
            relax.transform.SplitLayoutRewritePreproc(),  # the weight re-layouts, folded at build time
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination(),
        ])(plain)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    return {"plain loops": _vm_sampler(tvm.compile(plain, target=target), args),
            "default sched": _vm_sampler(tvm.compile(scheduled, target=target), args)}


def _peer_samplers(members: list[real.RealModel], threads: int) -> dict:
    samplers = {}
    onnx = {m.name: str(m.model) for m in members if m.source == "onnx"}
    feeds = {m.name: dict(zip(m.input_names, m.inputs)) for m in members}
    if onnx and len(onnx) == len(members):
        samplers["ORT"] = onnxruntime_sampler(onnx, feeds, threads=threads)
        samplers["ORT nospin"] = onnxruntime_sampler(onnx, feeds, threads=threads, spinning=False)
        try:
            import openvino  # noqa: F401
        except ImportError:
            pass
        else:
            samplers["OpenVINO"] = openvino_sampler(onnx, feeds)
    torch_models = {m.name: m.model for m in members if m.source == "torch"}
    if torch_models and len(torch_models) == len(members):
        samplers["PyTorch"] = torch_sampler(torch_models, {m.name: m.inputs for m in members}, threads=threads)
    return samplers


def _errors(outputs: dict, members: list[real.RealModel]) -> float:
    worst = 0.0
    for m in members:
        got = outputs[m.name]
        got = got if isinstance(got, list) else [got]
        for g, want in zip(got, m.reference()):
            worst = max(worst, real.max_rel_err(g, want) if g.shape == want.shape else float("inf"))
    return worst


def _row(label, source, members, work: Path, args, fused: bool) -> dict:
    row = {"model": label, "source": source, "imports": "no", "max rel err": "-", "matches": "-",
           **{f"{s} ms": "-" for s in SYSTEMS}, "note": ""}
    shared = real.GROUPS[members[0].group] if fused else members[0].input_names
    examples = {m.name: tuple(torch.from_numpy(a) for a in m.inputs) for m in members if m.source == "torch"}
    shapes = {name: list(a.shape) for name, a in zip(shared, members[0].inputs)}
    start = time.perf_counter()
    try:
        mm = import_models({m.name: m.model for m in members}, examples or None, input_shapes=shapes,
                           input_map=real.input_map_for(members) if fused else None)
    except GmorphError as err:
        row["note"] = str(err)[:160]
        return row
    row["imports"] = f"yes ({time.perf_counter() - start:.1f} s)"
    if fused:
        mm = fuse_lossless(mm)
    arrays = members[0].inputs
    # A new model: no shipped record applies to it (they were made from the zoo's models).
    artifact = build(mm, "llvm", shipped_records=False)
    err = _errors(artifact.run(dict(zip(shared, arrays))), members)
    row["max rel err"] = f"{err:.1e}"
    row["matches"] = "yes" if err <= TOL else "NO"
    samplers = {"TVM untuned": _artifact_sampler(artifact, arrays)}
    notes = []
    if args.tune_trials:
        from gmorph_tvm.tuning import tune

        db = work / f"tune_{label.replace(' ', '_')}"
        # Shipped records and transfers off here too: the build below ignores them (a new model).
        tune(mm.bound_module(), "llvm", trials=args.tune_trials, work_dir=db, progress=False, shipped_records=False,
             transfer=False)
        tuned = build(mm, "llvm", tuning_db=db, shipped_records=False)
        terr = _errors(tuned.run(dict(zip(shared, arrays))), members)
        samplers["TVM tuned"] = _artifact_sampler(tuned, arrays)
        if terr > TOL:
            notes.append(f"tuned WRONG: {terr:.1e}")
    if args.before_after:
        samplers.update(_before_after_samplers(mm.bound_module(), arrays))
    samplers.update(_peer_samplers(members, args.threads))
    timings = measure(samplers, samples=args.samples)
    for system, timing in timings.items():
        row[f"{system} ms"] = f"{timing.median_ms:.2f}"
    ref = next((timings[s].median_ms for s in ("ORT", "PyTorch") if s in timings), None)
    if ref:
        notes.append(f"untuned {timings['TVM untuned'].median_ms / ref:.2f}x of {'ORT' if 'ORT' in timings else 'PyTorch'}")
    row["note"] = "; ".join(notes)
    return row


def _table(rows: list[dict]) -> str:
    cols = [c for c in rows[0] if any(str(r.get(c, "-")) != "-" for r in rows) or c in ("model", "note")]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["| " + " | ".join(c.ljust(widths[c]) for c in cols) + " |",
             "|" + "|".join("-" * (widths[c] + 2) for c in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]).ljust(widths[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _shipped_onnx_files() -> list[Path]:
    import site

    skip = ("backend/test/data/node", "backend/test/data/pytorch", "backend/test/data/simple")
    files = set()
    for root in site.getsitepackages():
        files.update(p for p in Path(root).rglob("*.onnx") if not any(s in str(p) for s in skip))
    return sorted(files)


# (package, input) -> shape where 1/64 makes no sense: Silero VAD reads 512-sample 16 kHz chunks.
SWEEP_SHAPES = {("silero_vad", "input"): [1, 512], ("silero_vad", "state"): [2, 1, 128]}


def _sweep() -> list[dict]:
    import onnx

    rows = []
    for path in _shipped_onnx_files():
        model = onnx.load(str(path))
        inits = {i.name for i in model.graph.initializer}
        shapes = {}
        for inp in (i for i in model.graph.input if i.name not in inits):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                    for d in inp.type.tensor_type.shape.dim]
            guess = [d if d is not None else (1 if k == 0 else 64) for k, d in enumerate(dims)]
            shapes[inp.name] = SWEEP_SHAPES.get((path.parent.parent.name, inp.name), guess)
        missing = unsupported_ops(model.graph)
        try:
            import_models({"m": str(path)}, input_shapes=shapes)
            result = "imports"
        except GmorphError as err:
            result = str(err).replace(str(path), path.name)[:150]
        label = "/".join(path.parts[-3:])
        rows.append({"file": label, "unsupported ops": ", ".join(missing) or "-", "import": result})
        print(f"[sweep] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def main(args) -> int:
    args.threads = args.threads or physical_cores()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gmorph_zoo_"))
    only = set(args.models.split(",")) if args.models else None
    models = real.zoo_models(work, only=only)
    rows = []
    for m in models:
        try:
            rows.append(_row(m.name, m.source, [m], work, args, fused=False))
        except Exception as err:  # a bench keeps going; the row says what broke
            traceback.print_exc()
            rows.append({"model": m.name, "source": m.source, "imports": "?", "max rel err": "-", "matches": "-",
                         **{f"{s} ms": "-" for s in SYSTEMS}, "note": f"{type(err).__name__}: {str(err)[:120]}"})
        print(f"[zoo] {rows[-1]}", file=sys.stderr, flush=True)
    if args.fused:
        for group in real.GROUPS:
            members = [m for m in models if m.group == group]
            if len(members) > 1:
                rows.append(_row(f"fused {group} ({len(members)})", "+".join(sorted({m.source for m in members})),
                                 members, work, args, fused=True))
                print(f"[zoo] {rows[-1]}", file=sys.stderr, flush=True)
    print(_table(rows))
    if args.sweep:
        print()
        print(_table(_sweep()))
    return 0 if all(r["matches"] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))
