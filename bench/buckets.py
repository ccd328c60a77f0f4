"""Several batch sizes in one artifact: static batch buckets vs one symbolic batch, side by side.

    python bench/buckets.py --buckets 1,8,32 [--trials 0]

The model is set B's bundled Fashion-MNIST CNN (real weights). "buckets" is gmorph-tvm's
``build({1: mm1, 8: mm8, 32: mm32})``: one entry point per batch size, each lowered (and, with
``--trials``, tuned) for its own static shapes, one copy of the weights. "symbolic" is the same
model exported once with a dynamic batch (``torch.export`` ``Dim("batch", max=...)``), imported by
TVM's frontend with the batch as a symbolic variable and compiled once with TVM's default
pipeline: every kernel is generic in the batch, and MetaSchedule cannot tune such kernels. Both
run the same inputs; the table gives the median ms per batch and the max difference to PyTorch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import gmorph_tvm
from gmorph_tvm.artifact import build, resolve_target
from gmorph_tvm.benchmark import time_callable
from gmorph_tvm.runtime import load
from gmorph_tvm.zoo import pretrained


def symbolic_executable(model, max_batch: int, target):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    batch = torch.export.Dim("batch", min=1, max=max_batch)
    exported = torch.export.export(model, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    mod = from_exported_program(exported, unwrap_unit_return_tuple=True)
    ex = tvm.compile(mod, target=target)
    return relax.VirtualMachine(ex, tvm.cpu())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buckets", default="1,8,32")
    parser.add_argument("--trials", type=int, default=0, help="MetaSchedule trials per bucket (0: untuned)")
    args = parser.parse_args(argv)
    import tvm

    buckets = sorted(int(b) for b in args.buckets.split(","))
    target = resolve_target("llvm")
    model = pretrained.fmnist_base().eval()
    per_batch = {b: gmorph_tvm.import_models({"cls": model}, torch.zeros(b, 1, 28, 28)) for b in buckets}
    with tempfile.TemporaryDirectory() as tmp:
        db = None
        if args.trials:
            db = Path(tmp) / "db"
            for mm in per_batch.values():
                gmorph_tvm.tune(mm, target, trials=args.trials, work_dir=db)
        start = time.perf_counter()
        runner = load(build(per_batch, target, tuning_db=db).export(Path(tmp) / "buckets.so"))
        bucket_build_s = time.perf_counter() - start
        start = time.perf_counter()
        vm = symbolic_executable(model, buckets[-1], target)
        symbolic_build_s = time.perf_counter() - start
        print("| batch | buckets ms | symbolic ms | symbolic / buckets | max abs diff vs PyTorch (buckets / symbolic) |")
        print("|---:|---:|---:|---:|---|")
        rng = np.random.default_rng(0)
        for batch in sorted(set(buckets) | {3}):
            x = rng.standard_normal((batch, 1, 28, 28)).astype("float32")
            with torch.no_grad():
                ref = model(torch.from_numpy(x)).numpy()
            got = runner({"x": x})["cls"]
            tx = tvm.runtime.tensor(x)
            sym = vm["main"](tx).numpy()
            b_ms = time_callable(lambda x=x: runner({"x": x}))
            s_ms = time_callable(lambda tx=tx: vm["main"](tx))
            print(f"| {batch} | {b_ms:.3f} | {s_ms:.3f} | {s_ms / b_ms:.2f}x | "
                  f"{np.abs(got - ref).max():.1e} / {np.abs(sym - ref).max():.1e} |")
        print(f"\nBuild: buckets {bucket_build_s:.1f} s ({len(buckets)} entry points, "
              f"{runner.manifest['weights']['bytes'] / 1e6:.2f} MB of weights once), symbolic {symbolic_build_s:.1f} s. "
              f"Batch 3 runs the batch-8 bucket (padded). Trials per bucket: {args.trials}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
