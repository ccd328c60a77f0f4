"""The bundled end-to-end demo behind ``gmorph-tvm demo`` (the README's first command).

Real weights, real data: the bundled Fashion-MNIST task models that share a frozen backbone
(:func:`gmorph_tvm.zoo.pretrained.fmnist_backbone_set`) run on real test images. The demo
imports them, fuses them losslessly, tunes the kernels within a small budget, builds the fused
artifact and the models compiled one by one, checks that every task's outputs equal PyTorch's, and
prints a side-by-side table against PyTorch eager.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .artifact import build, resolve_target
from .benchmark import Row, format_table, time_torch_eager, torch_weight_bytes
from .data import fashion_mnist
from .frontend import import_models
from .pipeline import fuse_lossless
from .runtime import load
from .tuning import tune
from .zoo import pretrained


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_demo(out_dir: str | Path = "out/demo", tune_trials: int = 64, batch: int = 1, num_tasks: int = 4) -> int:
    import torch


    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = resolve_target("llvm")
    models = pretrained.fmnist_backbone_set(num_tasks)
    images = fashion_mnist.load_split("test", limit=max(batch, 256))
    x = images.images[:batch].contiguous()
    _say(f"{len(models)} Fashion-MNIST task models sharing a frozen backbone: {', '.join(models)}")

    started = time.perf_counter()
    mm = import_models(models, x)
    fused = fuse_lossless(mm)
    _say(f"imported and fused: weights {mm.weight_bytes / 1e6:.2f} MB -> {fused.weight_bytes / 1e6:.2f} MB")

    db = out / "tuning"
    if tune_trials > 0:
        _say(f"tuning the separate and the fused kernels ({tune_trials} trials each; database {db})")
        tune(mm.bound_module(), target, trials=tune_trials, work_dir=db)
        tune(fused.bound_module(), target, trials=tune_trials, work_dir=db)
    tuning_db = db if tune_trials > 0 else None

    _say("building the fused artifact and the models one by one")
    fused_path = build(fused, target, tuning_db=tuning_db).export(out / "fused.so")
    separate_paths = {
        task: build(import_models({task: model}, x), target, tuning_db=tuning_db).export(out / f"{task}.so")
        for task, model in models.items()
    }

    fused_runner = load(fused_path)
    separate = {task: load(path) for task, path in separate_paths.items()}
    outputs = fused_runner({"x": x.numpy()})
    with torch.inference_mode():
        reference = {task: m(x).numpy() for task, m in models.items()}
    worst = max(float(np.max(np.abs(outputs[t] - reference[t]))) for t in models)
    _say(f"fused outputs vs PyTorch: max |diff| = {worst:.2e}")
    if worst > 1e-3:
        print(f"error: fused outputs differ from PyTorch by {worst:.3g}", file=sys.stderr)
        return 1

    inputs = {task: (x,) for task in models}
    torch_ms = time_torch_eager(models, inputs)
    sep_ms = sum(r.benchmark({"x": x.numpy()})["median_ms"] for r in separate.values())
    fused_ms = fused_runner.benchmark({"x": x.numpy()})["median_ms"]
    sep_weights = sum(r.manifest["weights"]["bytes"] for r in separate.values())
    rows = [
        Row("PyTorch eager, model by model", torch_ms, torch_weight_bytes(models)),
        Row("TVM, models compiled separately", sep_ms, sep_weights),
        Row("gmorph-tvm fused", fused_ms, fused_runner.manifest["weights"]["bytes"]),
    ]
    print(format_table(rows, baseline=rows[0].system,
                       title=f"{len(models)} Fashion-MNIST tasks, batch {batch}, {target.attrs.get('mcpu', 'cpu')}"))
    preds = {t: outputs[t].argmax(-1) for t in models}
    print("predictions on the first image: " + ", ".join(f"{t}={int(p[0])}" for t, p in preds.items()))
    print(f"artifact: {fused_path}  (gmorph-tvm info {fused_path}; total {time.perf_counter() - started:.0f} s)")
    return 0
