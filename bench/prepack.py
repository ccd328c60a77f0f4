"""Tuned CPU weight layouts: packed at build time (what ships) vs packed at load time.

    python bench/prepack.py --width 1024 --depth 4 --batch 8 --trials 32

MetaSchedule's tuned CPU kernels may read a weight in a blocked layout (RewriteLayout). Either the
build evaluates that re-layout once and writes the packed weights into the weights file (what
``gmorph_tvm.build`` does), or the file keeps the plain layout and the loader runs the re-layout
kernels (``SplitLayoutRewritePreproc`` kernels, lifted by TVM's ``LiftTransformParams`` into
``main_transform_params``) on the mapped plain weights, keeps the packed results and drops the
plain pages. Both are measured in fresh processes: peak resident memory added by loading and three
calls (VmHWM minus the size after importing the runtime), load time, and the outputs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import gmorph_tvm
from gmorph_tvm.artifact import build, resolve_target
from gmorph_tvm.core.weights_file import write_weights
from gmorph_tvm.passes import LiftWeights
from gmorph_tvm.tuning.pipeline import has_database, open_database, prepare

PROBE = r"""
import json, sys, time, mmap
import numpy as np
kind, lib, weights, x_path, out_path = sys.argv[1:6]
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
import tvm, tvm_ffi
from tvm import relax
from gmorph_tvm.runtime import load
from gmorph_tvm.core.weights_file import read_weights
base = status("VmRSS")
start = time.perf_counter()
if kind == "build":
    runner = load(lib)
    call = lambda x: runner({"x": x})["big"]
else:
    vm = relax.VirtualMachine(tvm.runtime.load_module(lib), tvm.cpu())
    wf = read_weights(weights, json.load(open(weights + ".json")))  # checked like load() checks
    raw = [tvm_ffi.from_dlpack(wf.array(e), require_alignment=64) for e in wf.entries]
    packed = vm["main_transform_params"](raw)
    packed = [packed[i] for i in range(len(packed))]
    del raw
    for e in wf.entries:
        wf.release(e)
    call = lambda x: vm["main"](tvm.runtime.tensor(x), *packed)[0].numpy()
load_s = time.perf_counter() - start
x = np.load(x_path)
for _ in range(3):
    out = call(x)
np.save(out_path, out)
print(json.dumps({"peak_mb": (status("VmHWM") - base) / 1e6, "load_s": load_s}))
"""


class BigMLP(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])

    def forward(self, x):
        return self.layers(x)


def load_time_packed(mm, target, db: Path, lib: Path, weights: Path) -> tuple[int, int]:
    """Build the variant that packs at load time; (plain weight bytes, packed weight bytes)."""
    import tvm
    from tvm import relax

    low = prepare(mm.bound_module(), target)
    with target, open_database(db):
        low = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(low)
    with target:
        low = relax.transform.SplitLayoutRewritePreproc()(low)
    lift = LiftWeights()
    low = lift(low)  # plain weights -> parameters; the re-layout kernels now read parameters
    low = relax.transform.LiftTransformParams()(low)
    ex = tvm.compile(low, target=target)
    ex.export_library(str(lib))
    plain = [(n, v.numpy()) for n, v in lift.lifted()]
    record = write_weights(weights, plain)
    Path(str(weights) + ".json").write_text(json.dumps(record))
    packed_shapes = [tuple(int(d) for d in p.ty.shape.values) for p in low["main"].params[1:]]
    packed_bytes = sum(int(np.prod(shape)) * 4 for shape in packed_shapes)
    rewritten = sum(1 for shape in packed_shapes if shape not in {a.shape for _, a in plain})
    return rewritten, packed_bytes


def probe(kind, lib, weights, x, tmp) -> dict:
    np.save(tmp / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", PROBE, kind, str(lib), str(weights), str(tmp / "x.npy"),
                           str(tmp / f"{kind}.npy")], capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["out"] = np.load(tmp / f"{kind}.npy")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--work-dir", help="keep the tuning database here")
    args = parser.parse_args(argv)
    target = resolve_target("llvm")
    model = BigMLP(args.width, args.depth).eval()
    x = torch.randn(args.batch, args.width)
    with torch.no_grad():
        ref = model(x).numpy()
    mm = gmorph_tvm.import_models({"big": model}, x)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        db = Path(args.work_dir) if args.work_dir else tmp / "db"
        start = time.perf_counter()
        if not has_database(db):  # a kept --work-dir is reused as is
            gmorph_tvm.tune(mm, target, trials=args.trials, work_dir=db)
        tune_s = time.perf_counter() - start
        lib_a = build(mm, target, tuning_db=db).export(tmp / "build_packed.so")
        rewritten, packed_bytes = load_time_packed(mm, target, db, tmp / "load_packed.so", tmp / "plain.safetensors")
        rows = {"build": probe("build", lib_a, "", x.numpy(), tmp),
                "load": probe("load", tmp / "load_packed.so", tmp / "plain.safetensors", x.numpy(), tmp)}
        print(f"Weights: {mm.weight_bytes / 1e6:.1f} MB plain, {packed_bytes / 1e6:.1f} MB as the tuned kernels read "
              f"them ({rewritten} tensors in a tuned blocked layout); tuning {tune_s:.0f} s ({args.trials} trials), "
              f"batch {args.batch}.\n")
        print("| weights packed | peak MB | load s | max abs diff vs PyTorch |")
        print("|---|---:|---:|---:|")
        for kind, label in (("build", "at build time (shipped)"), ("load", "at load time")):
            r = rows[kind]
            print(f"| {label} | {r['peak_mb']:.1f} | {r['load_s']:.3f} | {np.abs(r['out'] - ref).max():.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
