"""The bundled end-to-end demo behind ``gmorph-tvm demo`` (the README's first command).

Real weights, real data: the bundled Fashion-MNIST task models that share a frozen backbone
(:func:`gmorph_tvm.zoo.pretrained.fmnist_backbone_set`) run on real test images. The demo
imports them, fuses them losslessly, tunes the kernels within a small budget (kernels with
tuning records shipped for this machine's CPU class are not tuned again: it says which), builds
the fused artifact and the models compiled one by one, checks that every task's outputs equal
PyTorch's, reports each task's accuracy on the test images it loads, and prints a side-by-side
table against PyTorch eager (1 thread and all cores) and ONNX Runtime (default sessions and
sessions that do not spin), all timed interleaved: median and spread of many samples.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from .artifact import build, resolve_target
from .benchmark import (
    Row,
    format_table,
    measure,
    onnxruntime_sampler,
    torch_sampler,
    torch_weight_bytes,
    tvm_sampler,
)
from .data import fashion_mnist
from .frontend import import_models
from .pipeline import fuse_lossless, fuse_separately
from .runtime import load
from .tuning import tune
from .zoo import pretrained

NUM_TEST_IMAGES = 256


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _tuning(modules, target, trials: int, db: Path) -> str:
    """Tune what the shipped records do not cover; one line saying which were used."""
    reports = [tune(m.bound_module(), target, trials=trials, work_dir=db, progress=True) for m in modules]
    planned = [t for r in reports for t in r.tasks if t.trials_planned > 0]
    shipped = [t for t in planned if t.shipped]
    ran = sum(r.trials_run for r in reports)
    if planned and len(shipped) == len(planned):
        return f"used shipped tuning records for all {len(planned)} kernels it would tune ({reports[0].shipped_note})"
    if shipped:
        return (f"used shipped tuning records for {len(shipped)} of {len(planned)} kernels "
                f"({reports[0].shipped_note}); tuned the rest: {ran} trials")
    return f"tuned {len(planned)} kernels, {ran} trials ({reports[0].shipped_note})"


def _accuracy(runner, models, images, batch: int) -> dict[str, float]:
    """Each task's accuracy on ``images`` (the fused artifact, ``batch`` images per call)."""
    correct = dict.fromkeys(models, 0)
    n = (len(images.labels) // batch) * batch
    for start in range(0, n, batch):
        out = runner({"x": images.images[start:start + batch].contiguous().numpy()})
        for task in models:
            labels = fashion_mnist.TASKS[pretrained.label_task_of(task)](images.labels[start:start + batch])
            correct[task] += int((out[task].argmax(-1) == labels.numpy()).sum())
    return {task: correct[task] / n for task in models}


def run_demo(out_dir: str | Path = "out/demo", tune_trials: int = 64, batch: int = 1, num_tasks: int = 4,
             samples: int = 31) -> int:
    import torch

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = resolve_target("llvm")
    cores = os.cpu_count() or 1
    models = pretrained.fmnist_backbone_set(num_tasks)
    images = fashion_mnist.load_split("test", limit=max(batch, NUM_TEST_IMAGES))
    x = images.images[:batch].contiguous()
    _say(f"{len(models)} Fashion-MNIST task models sharing a frozen backbone: {', '.join(models)}")

    mm = import_models(models, x)
    fused = fuse_lossless(mm)
    _say(f"imported and fused: weights {mm.weight_bytes / 1e6:.2f} MB -> {fused.weight_bytes / 1e6:.2f} MB")

    db = out / "tuning"
    if tune_trials > 0:
        _say(f"tuning the separate and the fused kernels ({tune_trials} trials each; database {db})")
        # The separate models' kernels: every model canonicalised as its own build is, none shared.
        _say(_tuning([fuse_lossless(mm, stitch=False, merge="never"), fused], target, tune_trials, db))
    tuning_db = db if tune_trials > 0 else None

    _say("building the fused artifact and the models one by one")
    fused_path = build(fused, target, tuning_db=tuning_db).export(out / "fused.so")
    separate_paths = {
        task: build(single, target, tuning_db=tuning_db).export(out / f"{task}.so")
        for task, single in fuse_separately(models, x).items()
    }
    onnx_paths = {}
    for task, model in models.items():
        onnx_paths[task] = str(out / f"{task}.onnx")
        torch.onnx.export(model, (x,), onnx_paths[task], dynamo=False, opset_version=17, input_names=["x"])

    fused_runner = load(fused_path)
    separate = [load(path) for path in separate_paths.values()]
    outputs = fused_runner({"x": x.numpy()})
    with torch.inference_mode():
        reference = {task: m(x).numpy() for task, m in models.items()}
    worst = max(float(np.max(np.abs(outputs[t] - reference[t]))) for t in models)
    _say(f"fused outputs vs PyTorch: max |diff| = {worst:.2e}")
    if worst > 1e-3:
        print(f"error: fused outputs differ from PyTorch by {worst:.3g}", file=sys.stderr)
        return 1

    _say(f"timing every system interleaved ({samples} samples each)")
    feed = {"x": x.numpy()}
    inputs = {task: (x,) for task in models}
    systems = {
        "PyTorch eager, 1 thread": torch_sampler(models, inputs, threads=1),
        f"PyTorch eager, {cores} threads": torch_sampler(models, inputs, threads=cores),
        "ONNX Runtime, default sessions": onnxruntime_sampler(onnx_paths, {t: feed for t in models}),
        "ONNX Runtime, allow_spinning=0": onnxruntime_sampler(onnx_paths, {t: feed for t in models}, spinning=False),
        "TVM, models compiled separately": tvm_sampler(separate, feed),
        "gmorph-tvm fused": tvm_sampler([fused_runner], feed),
    }
    timings = measure(systems, samples=samples)
    torch_bytes = torch_weight_bytes(models)
    onnx_bytes = sum(Path(p).stat().st_size for p in onnx_paths.values())
    weights = {
        "PyTorch eager, 1 thread": torch_bytes,
        f"PyTorch eager, {cores} threads": torch_bytes,
        "ONNX Runtime, default sessions": onnx_bytes,
        "ONNX Runtime, allow_spinning=0": onnx_bytes,
        "TVM, models compiled separately": sum(r.manifest["weights"]["bytes"] for r in separate),
        "gmorph-tvm fused": fused_runner.manifest["weights"]["bytes"],
    }
    rows = [Row.timed(name, timings[name], weights[name]) for name in systems]
    print(format_table(rows, baseline=rows[1].system, compare="TVM, models compiled separately",
                       title=f"{len(models)} Fashion-MNIST tasks, batch {batch}, {target.attrs.get('mcpu', 'cpu')}, "
                             f"{cores} cores; median of {samples} interleaved samples, ± half the 10-90% range"))

    accuracy = _accuracy(fused_runner, models, images, batch)
    n_images = (len(images.labels) // batch) * batch
    print(f"\naccuracy of the fused artifact on {n_images} Fashion-MNIST test images:")
    first = int(images.labels[0])
    for task in models:
        label_task = fashion_mnist.TASKS[pretrained.label_task_of(task)]
        predicted = label_task.class_names[int(outputs[task][0].argmax())]
        truth = label_task.class_names[label_task.mapping[first]]
        print(f"  {task:<16} {accuracy[task]:6.1%}   first image: {predicted!r} (true: {truth!r})")
    print(f"\nartifact: {fused_path}  (gmorph-tvm info {fused_path}; total {time.perf_counter() - started:.0f} s)")
    return 0
