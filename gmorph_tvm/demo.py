"""The bundled end-to-end demo behind ``gmorph-tvm demo`` (the README's first command).

Real weights, real data: the bundled Fashion-MNIST task models that share a frozen backbone
(the benchmark recipe's ``demo`` set, :mod:`gmorph_tvm.recipe`) run on real test images. The demo
imports them, fuses them losslessly, tunes the kernels within a small budget (kernels with
tuning records shipped for this machine's CPU class are not tuned again: it says which), builds
the fused artifact and the models compiled one by one, checks that every task's outputs equal
PyTorch's, reports each task's accuracy on the test images it loads, and prints a side-by-side
table against the recipe's peers (PyTorch eager on 1 thread and on all cores, ONNX Runtime's
default and non-spinning sessions, OpenVINO when installed), all timed interleaved: median and
spread of many samples. Speedups are over the same models compiled separately by TVM (the
baseline fusion is measured against: same compiler, same kernels' tuning, no fusion), with ONNX
Runtime's best session kind beside it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from . import recipe
from .artifact import build, resolve_target
from .benchmark import Row, format_table, measure, tvm_sampler
from .data import fashion_mnist
from .runtime import load
from .zoo import pretrained

NUM_TEST_IMAGES = 256


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _tuning(reports) -> str:
    """One line saying which kernels the shipped records covered and what was tuned."""
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
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = resolve_target("llvm")
    demo = recipe.load_set(recipe.DEMO, batch, num_tasks)
    models = demo.models
    images = fashion_mnist.load_split("test", limit=max(batch, NUM_TEST_IMAGES))
    _say(f"{len(models)} Fashion-MNIST task models sharing a frozen backbone: {', '.join(models)}")

    imported = recipe.import_set(demo)
    (fused,) = recipe.builds(imported, "stitch+merge")
    _say(f"imported and fused: weights {imported.mm.weight_bytes / 1e6:.2f} MB -> {fused.weight_bytes / 1e6:.2f} MB")

    db = out / "tuning"
    if tune_trials > 0:
        _say(f"tuning the separate and the fused kernels ({tune_trials} trials each; database {db})")
        _say(_tuning(recipe.tune_variants(imported, recipe.DEMO_VARIANTS, target, db, trials=tune_trials, progress=True)))
    tuning_db = db if tune_trials > 0 else None

    _say("building the fused artifact and the models one by one")
    fused_path = build(fused, target, tuning_db=tuning_db).export(out / "fused.so")
    separate_paths = recipe.build_variant(imported, "separate", target, out, tuning_db=tuning_db)
    onnx_paths = demo.export_onnx(out)

    fused_runner = load(fused_path)
    separate = [load(path) for path in separate_paths]
    feed = demo.feed
    outputs = fused_runner(feed)
    reference = demo.reference()
    worst = max(float(np.max(np.abs(outputs[t] - reference[t]))) for t in models)
    _say(f"fused outputs vs PyTorch: max |diff| = {worst:.2e}")
    if worst > 1e-3:
        print(f"error: fused outputs differ from PyTorch by {worst:.3g}", file=sys.stderr)
        return 1

    peers = recipe.peers()
    _say(f"timing every system interleaved ({samples} samples each)")
    peer_inputs = recipe.PeerInputs(demo, onnx_paths)
    fused_label = recipe.variant_label("stitch+merge")
    systems = {
        **recipe.peer_samplers(peers, peer_inputs),
        recipe.SEPARATE_LABEL: tvm_sampler(separate, feed),
        fused_label: tvm_sampler([fused_runner], feed),
    }
    timings = measure(systems, samples=samples)
    weights = {peer.label: peer.weight_bytes(peer_inputs) for peer in peers}
    weights[recipe.SEPARATE_LABEL] = recipe.weight_bytes_of(separate)
    weights[fused_label] = recipe.weight_bytes_of([fused_runner])
    rows = [Row.timed(name, timings[name], weights[name]) for name in systems]
    print(table(rows, f"{len(models)} Fashion-MNIST tasks, batch {batch}, {target.attrs.get('mcpu', 'cpu')}, "
                      f"{recipe.CORES} cores; median of {samples} interleaved samples, ± half the 10-90% range"))

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


def table(rows: list[Row], title: str) -> str:
    """The demo's table: speedups over the models compiled separately by TVM (the same compiler
    without fusion, the steadiest row: PyTorch on all cores swung by ±1554 % in one run), with ONNX
    Runtime's best session kind beside it. The title says what the speedups divide by."""
    fastest_ort = recipe.best(rows)
    title += ". Speedups: over the models compiled separately by TVM"
    if fastest_ort is not None:
        title += f", and over ONNX Runtime's best ({fastest_ort.system.removeprefix(recipe.ONNX_RUNTIME + ', ')})"
    return format_table(rows, baseline=recipe.SEPARATE_LABEL, title=title,
                        compare=fastest_ort.system if fastest_ort else None,
                        compare_label="best ONNX Runtime" if fastest_ort else None)
