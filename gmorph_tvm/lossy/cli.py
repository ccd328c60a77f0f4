"""``gmorph-tvm search``: the accuracy-aware fusion search from the command line.

    gmorph-tvm search --budget 16 --max-drop 1.0 -o fused.so                  # Fashion-MNIST 3 tasks
    gmorph-tvm search --model age=age.pt2 --model gender=gender.pt2 --data faces.pt -o fused.so
    gmorph-tvm search --model age=age_state.pt --arch age=mypkg.nets:age_net ... --workers 4

``--model NAME=FILE`` takes a ``torch.export`` program (``.pt2``, exported in eval mode with a
dynamic batch dimension: ``torch.export.save(torch.export.export(model.eval(), (x,),
dynamic_shapes={"x": {0: torch.export.Dim("batch")}}), FILE)``), or a state dict with ``--arch
NAME=module:callable`` (the callable, taking no arguments, builds the architecture). A whole
module saved with ``torch.save(model, FILE)`` is only loaded with ``--trust-pickle``: unpickling it
runs whatever code the file names (see :mod:`gmorph_tvm.lossy.modelfile`). ``--data`` takes a file
saved with ``torch.save({"train_x", "val_x", "test_x": float32 [N, ...], "train_y", "val_y",
"test_y": {task: int64 [N]}}, FILE)``, read with ``weights_only=True``. Without ``--model`` the
bundled Fashion-MNIST benchmark (:mod:`gmorph_tvm.lossy.tasks`) is used. Everything goes to
``--work-dir`` (resumable): the candidate checkpoint, ``report.json``, ``pareto.png``; the chosen
artifact is exported to ``-o``. ``--workers N`` evaluates N candidates at once as Ray tasks
(:mod:`gmorph_tvm.lossy.parallel`; ``pip install ray``), ``--ray-address`` joins a cluster.

:func:`add_search_arguments` declares the arguments; this module imports neither torch nor the
search until :func:`run_search_cli` runs, so building the CLI's parser stays light.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import SearchError

TRUST_PICKLE_HELP = (
    "load --model files that are whole pickled modules (torch.save(model)); unpickling runs any code the file "
    "names, before anything is checked, so use it only for files you made or trust (default: refused; prefer "
    ".pt2 or a state dict with --arch)"
)


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    """The ``search`` subcommand's arguments (imports nothing heavy)."""
    p.add_argument("--model", action="append", default=[], metavar="NAME=FILE",
                   help="a task model (repeat per task): a torch.export program (.pt2), or a state dict (.pt, "
                        ".safetensors) with --arch; default: the Fashion-MNIST 3 tasks")
    p.add_argument("--arch", action="append", default=[], metavar="NAME=MODULE:CALLABLE",
                   help="the architecture of task NAME, whose --model file is a state dict: MODULE:CALLABLE() "
                        "(no arguments) builds it, e.g. torchvision.models:resnet18")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    p.add_argument("--data", default=None, metavar="FILE", help="torch.save'd dict of splits and labels (with --model)")
    p.add_argument("--max-drop", type=float, default=1.0, help="max accuracy drop per task, in points (default 1.0)")
    p.add_argument("--budget", type=int, default=16, help="candidate plans to propose (default 16)")
    p.add_argument("--predictor", default="xgboost", choices=["xgboost", "linear", "none"],
                   help="predictive filter (default xgboost; none = fine-tune every candidate)")
    p.add_argument("--sampler", default="annealing", choices=["annealing", "random"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", default="llvm", help="target preset or JSON dict (default llvm)")
    p.add_argument("--work-dir", default="out/search", help="checkpoint / report directory (default out/search)")
    p.add_argument("--fresh", action="store_true", help="ignore a previous search in --work-dir instead of resuming")
    p.add_argument("--epochs", type=float, default=3.0, help="max distillation epochs per candidate")
    p.add_argument("--train-samples", type=int, default=8000, help="training images used for distillation")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="latency clock: wall (default) or cpu (process CPU time; single-threaded runtime)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS", help="stop proposing after this long")
    p.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials for the final pick (default 0)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="candidates fine-tuned, compiled and timed at once, as Ray tasks (needs ray; default 1: in "
                        "this process, no Ray)")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="Ray cluster to run candidates on (default: a local one started by ray.init())")
    p.add_argument("--ray-timing-resource", default=None, metavar="NAME",
                   help="Ray resource a node holding the target device advertises (ray start --resources "
                        "'{\"NAME\": 1}'): compile + time run there, one at a time per unit")
    p.add_argument("-o", "--output", default=None, help="export the chosen fused artifact here (.so or .tar)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _pairs(specs: list[str], flag: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise SearchError(f"{flag} expects NAME={what}, got {spec!r}")
        if name in out:
            raise SearchError(f"{flag} names task {name!r} twice")
        out[name] = value
    return out


def _load_models(specs: list[str], arch_specs: list[str] | None = None, trust_pickle: bool = False):
    from .modelfile import load_model_file

    paths = _pairs(specs, "--model", "FILE")
    archs = _pairs(arch_specs or [], "--arch", "MODULE:CALLABLE")
    unknown = sorted(set(archs) - set(paths))
    if unknown:
        raise SearchError(f"--arch names {', '.join(map(repr, unknown))}, which no --model names")
    return {name: load_model_file(name, path, arch=archs.get(name), trust_pickle=trust_pickle)
            for name, path in paths.items()}


def _torch_load_data(path: str):
    """The --data file, read with ``weights_only=True`` (tensors and containers only; runs no code)."""
    import torch

    if not Path(path).is_file():
        raise SearchError(f"data file {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SearchError(f"data file {path!r} is not readable by torch.load ({type(err).__name__}: {err})") from err


def _load_data(path: str):
    from .data import MultiTaskData

    obj = _torch_load_data(path)
    if not isinstance(obj, dict):
        raise SearchError(f"data file {path!r} holds a {type(obj).__name__}, not a dict of splits")
    keys = ("train_x", "val_x", "test_x", "train_y", "val_y", "test_y")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise SearchError(f"data file {path!r} lacks {', '.join(missing)}")
    return MultiTaskData(*(obj[k] for k in keys))


def run_search_cli(args: argparse.Namespace) -> int:
    import torch

    from . import tasks
    from .distill import DistillConfig
    from .driver import SearchConfig, search
    from .latency import TimingConfig

    arch = getattr(args, "arch", [])
    if args.model:
        if not args.data:
            raise SearchError("--model needs --data (the splits and labels to fine-tune and check on)")
        models = _load_models(args.model, arch, getattr(args, "trust_pickle", False))
        data = _load_data(args.data)
    else:
        if args.data or arch:
            raise SearchError(f"{'--data' if args.data else '--arch'} needs --model (without them the Fashion-MNIST "
                              "benchmark is used)")

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
        workers=getattr(args, "workers", 1), ray_address=getattr(args, "ray_address", None),
        ray_timing_resource=getattr(args, "ray_timing_resource", None),
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
