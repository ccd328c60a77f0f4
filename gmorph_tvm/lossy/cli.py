"""``gmorph-tvm search``: the accuracy-aware fusion search from the command line.

    gmorph-tvm search --budget 16 --max-drop 1.0 -o fused.so                  # Fashion-MNIST 3 tasks
    gmorph-tvm search --model age=age.pt --model gender=gender.pt --data faces.pt -o fused.so

``--model NAME=FILE`` takes a whole module saved with ``torch.save(model, FILE)``; ``--data`` a file
saved with ``torch.save({"train_x", "val_x", "test_x": float32 [N, ...], "train_y", "val_y",
"test_y": {task: int64 [N]}}, FILE)``. Without them the bundled Fashion-MNIST benchmark
(:mod:`gmorph_tvm.lossy.tasks`) is used. Everything goes to ``--work-dir`` (resumable): the
candidate checkpoint, ``report.json``, ``pareto.png``; the chosen artifact is exported to ``-o``.
The arguments are declared in :mod:`gmorph_tvm.cli` (so building the parser imports no torch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import SearchError
from . import tasks
from .data import MultiTaskData
from .distill import DistillConfig
from .driver import SearchConfig, search
from .latency import TimingConfig


def _torch_load(path: str, *, weights_only: bool, missing: str, unreadable: str):
    """``torch.load(path)`` on the CPU; a missing or unreadable file raises SearchError with the
    ``missing`` / ``unreadable`` message (the latter followed by the loader's own error)."""
    import torch

    if not Path(path).is_file():
        raise SearchError(missing)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:
        raise SearchError(f"{unreadable} ({type(err).__name__}: {err})") from err


def _load_models(specs: list[str]):
    import torch

    models = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SearchError(f"--model expects NAME=FILE, got {spec!r}")
        # Whole pickled modules, so weights_only must be off: only load files you trust.
        model = _torch_load(
            path, weights_only=False,
            missing=f"model {name!r}: file {path!r} does not exist",
            unreadable=f"model {name!r}: {path!r} is not a torch.save'd module",
        )  # fmt: skip
        if not isinstance(model, torch.nn.Module):
            raise SearchError(f"model {name!r}: {path!r} holds a {type(model).__name__}, not a torch.nn.Module")
        models[name] = model
    return models


def _load_data(path: str):
    obj = _torch_load(
        path, weights_only=True,
        missing=f"data file {path!r} does not exist",
        unreadable=f"data file {path!r} is not readable by torch.load",
    )  # fmt: skip
    keys = ("train_x", "val_x", "test_x", "train_y", "val_y", "test_y")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise SearchError(f"data file {path!r} lacks {', '.join(missing)}")
    return MultiTaskData(*(obj[k] for k in keys))


def run_search_cli(args: argparse.Namespace) -> int:
    import torch


    if args.model:
        if not args.data:
            raise SearchError("--model needs --data (the splits and labels to fine-tune and check on)")
        models, data = _load_models(args.model), _load_data(args.data)
    else:
        if args.data:
            raise SearchError("--data needs --model (without them the Fashion-MNIST benchmark is used)")

        models, data, _ = tasks.load_benchmark(log=lambda m: print(f"[gmorph-tvm] {m}", file=sys.stderr))
    target = json.loads(args.target) if args.target.strip().startswith("{") else args.target
    if args.clock == "cpu":
        torch.set_num_threads(1)
    config = SearchConfig(
        max_accuracy_drop=args.max_drop, budget=args.budget, predictor=args.predictor,
        sampler=args.sampler, seed=args.seed, work_dir=args.work_dir, resume=not args.fresh, target=target,
        distill_config=DistillConfig(max_epochs=args.epochs, train_samples=args.train_samples),
        timing=TimingConfig(clock=args.clock), time_budget_s=args.time_budget, tune_trials=args.tune_trials,
        progress=not args.quiet, log=lambda m: print(f"[gmorph-tvm] {m}", file=sys.stderr),
    )  # fmt: skip
    result = search(models, data, config)
    counts = result.report["counts"]
    print(f"plan: {result.plan.key()}")
    print(f"latency: {result.latency_ms:.4f} ms ({result.report['chosen']['speedup_vs_unfused']:.2f}x vs unfused)")
    print("test accuracy: " + ", ".join(
        f"{t} {result.base_test_accuracy[t]:.2f}% -> {a:.2f}%" for t, a in result.test_accuracy.items()))
    print(f"candidates: {counts['proposed']} proposed, {counts['fine_tuned']} fine-tuned, "
          f"{counts['fine_tunes_saved']} fine-tunes saved by the filter")
    print(f"report: {Path(args.work_dir) / 'report.json'}")
    if args.output:
        path = result.artifact.export(args.output)
        print(f"artifact: {path}")
    return 0
