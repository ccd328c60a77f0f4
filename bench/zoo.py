"""Real models from the wild (gmorph_tvm.zoo.real): do they import, match, and how fast do they run?

    python bench/zoo.py [--models ocr_det,effnet_torch,...] [--fused] [--tune-trials N] [--threads 1]

For every model of the zoo (PaddleOCR det/cls/rec ONNX from rapidocr-onnxruntime, EfficientNet-Lite0
torch + both torch ONNX exporters, all-MiniLM-L6-v2 BertModel torch + both ONNX exports), imported
alone exactly as a user has it (only static input shapes given): whether it imports, the max
relative error (max |err| / max |ref|) of the untuned llvm build against onnxruntime (ONNX) or
PyTorch (torch) and whether it is <= 1e-4, TVM untuned ms, TVM tuned ms (``--tune-trials N``:
MetaSchedule with N trials for that model; "-" without), and the reference runtime's ms
(onnxruntime for ONNX files, PyTorch eager for torch modules). ``--fused`` adds one row per group
of models reading the same input (``input_map`` joins torch's default input names), fused
losslessly and built as one artifact, against the sum of the group's reference runtimes.
Latencies are medians; TVM via ``vm.time_evaluator``.

``--sweep`` then imports every ``.onnx`` file found in the installed packages (site-packages, less
onnx's per-operator test cases) with symbolic dims set to 1 (first) / 64 (others; Silero VAD: one
512-sample chunk), and prints per
file the ops that neither TVM nor gmorph-tvm converts and the import result (one line).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PARSER = argparse.ArgumentParser(description=__doc__.split("\n")[0])
PARSER.add_argument("--models", help="comma-separated zoo names (default: all)")
PARSER.add_argument("--fused", action="store_true", help="also build each input group as one fused artifact")
PARSER.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per model (0: no tuning)")
PARSER.add_argument("--threads", type=int, default=1, help="threads for TVM, onnxruntime and PyTorch")
PARSER.add_argument("--sweep", action="store_true",
                    help="also try every .onnx file shipped in installed packages and list unsupported ops")
PARSER.add_argument("--work-dir", default=None, help="exports and tuning databases (default: a temp dir)")
ARGS = PARSER.parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from gmorph_tvm import (
    build,  # noqa: E402
    import_models,  # noqa: E402
)
from gmorph_tvm.benchmark import time_callable  # noqa: E402
from gmorph_tvm.errors import GmorphError  # noqa: E402
from gmorph_tvm.frontend.onnx_convert import unsupported_ops  # noqa: E402
from gmorph_tvm.pipeline import fuse_lossless  # noqa: E402
from gmorph_tvm.zoo import real  # noqa: E402

TOL = 1e-4


def _tvm_ms(artifact, arrays) -> float:
    vm = relax.VirtualMachine(artifact.executable, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays] + artifact.weight_args()
    timer = vm.time_evaluator("main", tvm.cpu(), number=5, repeat=7, min_repeat_ms=100)
    return float(timer(*args).median) * 1e3


def _ref_ms(m: real.RealModel, threads: int) -> float:
    if m.source == "torch":
        args = tuple(torch.from_numpy(a) for a in m.inputs)

        def run():
            with torch.inference_mode():
                m.model(*args)

        return time_callable(run, repeat=15)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(m.model), opts, providers=["CPUExecutionProvider"])
    feed = dict(zip(m.input_names, m.inputs))
    return time_callable(lambda: sess.run(None, feed), repeat=15)


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
           "TVM ms": "-", "TVM tuned ms": "-", "ref ms": "-", "note": ""}
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
    artifact = build(mm, "llvm")
    arrays = members[0].inputs
    err = _errors(artifact.run(dict(zip(shared, arrays))), members)
    row["max rel err"] = f"{err:.1e}"
    row["matches"] = "yes" if err <= TOL else "NO"
    row["TVM ms"] = f"{_tvm_ms(artifact, arrays):.2f}"
    row["ref ms"] = f"{sum(_ref_ms(m, args.threads) for m in members):.2f}"
    if args.tune_trials:
        from gmorph_tvm.tuning import tune

        db = work / f"tune_{label}"
        tune(mm.bound_module(), "llvm", trials=args.tune_trials, work_dir=db, progress=False)
        tuned = build(mm, "llvm", tuning_db=db)
        terr = _errors(tuned.run(dict(zip(shared, arrays))), members)
        row["TVM tuned ms"] = f"{_tvm_ms(tuned, arrays):.2f}" + ("" if terr <= TOL else f" (WRONG: {terr:.1e})")
    return row


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
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
                         "TVM ms": "-", "TVM tuned ms": "-", "ref ms": "-",
                         "note": f"{type(err).__name__}: {str(err)[:120]}"})
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
