"""The ``gmorph-tvm`` command line.

    gmorph-tvm build a.onnx b.pt2 [--names age,gender] [--input-shape x=1,3,64,64] [--input-map b.input.1=x]
                     [--target llvm] [--fuse] -o out.so [--tune-trials N [--tracker HOST:PORT --key KEY]]
    gmorph-tvm run out.so --input x=x.npy [--save-outputs DIR]
    gmorph-tvm info out.so
    gmorph-tvm bench out.so [--rpc HOST:PORT | --tracker HOST:PORT --key KEY] [--compare b.so ...]
    gmorph-tvm search --budget 8 --max-drop 1.0 -o fused.so
    gmorph-tvm demo

Exit codes: 0 success, 1 a gmorph-tvm error (bad model, input, target...; one line on stderr),
2 bad command line (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import GmorphError, InputSpecError, one_line


def _parse_shape(text: str) -> tuple[str, list[int]]:
    """``x=1,3,32,32`` -> ("x", [1, 3, 32, 32])."""
    name, sep, dims = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,..., got {text!r}")
    parts = [d.strip() for d in dims.replace("x", ",").split(",")]
    if parts == [""]:
        raise argparse.ArgumentTypeError(f"empty shape in {text!r}: give every dimension, e.g. {name}=1,3,32,32")
    try:
        shape = [int(d) for d in parts]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"bad shape in {text!r}: dimensions must be integers") from err
    if any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"bad shape in {text!r}: dimensions must be positive")
    return name, shape


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _unique(pairs: Sequence[tuple[str, object]] | None, what: str) -> dict:
    """NAME=VALUE options as a dict; a NAME given twice is an error, not "last one wins"."""
    out: dict = {}
    for name, value in pairs or []:
        if name in out:
            raise InputSpecError(f"{what} {name!r} is given twice")
        out[name] = value
    return out


def _parse_input_map(text: str) -> tuple[str, str]:
    """``TASK.INPUT=SHARED`` -> ("TASK.INPUT", "SHARED"); INPUT may itself hold dots (``input.1``)."""
    key, sep, shared = text.rpartition("=")
    task, dot, name = key.partition(".")
    if not sep or not shared or not dot or not task or not name:
        raise argparse.ArgumentTypeError(f"expected TASK.INPUT=SHARED (e.g. cls.input.1=x), got {text!r}")
    return key, shared


def _parse_input(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {text!r}")
    return name, path


def _parse_buckets(text: str) -> list[int]:
    try:
        sizes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise InputSpecError(f"--batch-buckets {text!r}: give batch sizes >= 1, e.g. 1,8,32")
    return sizes


def _parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _task_names(models: Sequence[str], names: str | None) -> list[str]:
    if names:
        out = [n.strip() for n in names.split(",")]
        if len(out) != len(models):
            raise InputSpecError(f"--names gives {len(out)} name(s) for {len(models)} model(s)")
        duplicates = sorted({n for n in out if out.count(n) > 1})
        if duplicates:
            raise InputSpecError(f"--names gives task name {duplicates[0]!r} more than once; every model needs its own")
        return out
    out = []
    for path in models:
        stem = Path(path).stem.replace(".", "_")
        name, k = stem, 1
        while name in out:
            k += 1
            name = f"{stem}_{k}"
        out.append(name)
    return out


def _load_npy(name: str, path: str):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError as err:
        raise InputSpecError(f"input {name!r}: file {path!r} does not exist") from err
    except Exception as err:
        raise InputSpecError(f"input {name!r}: {path!r} is not a readable .npy file ({err})") from err


def _progress(msg: str) -> None:
    print(f"[gmorph-tvm] {msg}", file=sys.stderr, flush=True)


# ---- commands ---------------------------------------------------------------------------------


def _cmd_build(args: argparse.Namespace) -> int:
    from .artifact import build, resolve_target
    from .frontend import import_models
    from .pipeline import fuse_lossless
    from .tuning.pipeline import has_database

    target = resolve_target(args.target)  # a bad target fails before any slow work
    if (args.tracker or args.key) and not (args.tune_trials or args.tune_minutes):
        raise InputSpecError("--tracker/--key measure tuning trials on boards; give --tune-trials N or --tune-minutes M too")
    if args.tune_minutes is not None and not args.tune_minutes > 0:
        raise InputSpecError(f"--tune-minutes must be > 0, got {args.tune_minutes}")
    if args.tracker and not args.key:
        raise InputSpecError("--tracker needs --key (the device key the boards registered with)")
    names = _task_names(args.models, args.names)
    shapes = _unique(args.input_shape, "--input-shape for input")
    buckets = _parse_buckets(args.batch_buckets) if args.batch_buckets else [None]
    if args.batch_buckets and not shapes:
        raise InputSpecError("--batch-buckets needs --input-shape for every input (its first dimension, the "
                             "batch, is replaced by each bucket's size)")
    models: dict = {}
    for batch in buckets:
        batch_shapes = {k: [batch, *v[1:]] for k, v in shapes.items()} if batch is not None else shapes
        label = f" at batch {batch}" if batch is not None else ""
        _progress(f"importing {len(names)} model(s){label}: {', '.join(names)}")
        mm = import_models(dict(zip(names, args.models)), input_shapes=batch_shapes or None,
                           input_map=dict(args.input_map or []) or None)
        if args.fuse:
            _progress("fusing (canonicalise, stitch shared weights, merge compatible ops)")
            mm = fuse_lossless(mm, merge=args.merge)
        models[batch] = mm
    tuning_db = args.tuning_db
    if args.tune_trials or args.tune_minutes:
        from .tuning import TuneConfig, tune
        from .tuning.target_key import target_key

        # Records are kept per target: the default database directory is keyed by it.
        tuning_db = tuning_db or str(Path(str(Path(args.output).with_suffix("")) + ".tuning") / target_key(target))
        where = f" on the boards under key {args.key!r} at tracker {args.tracker[0]}:{args.tracker[1]}" if args.tracker else ""
        tracker = f"{args.tracker[0]}:{args.tracker[1]}" if args.tracker else None
        # --tune-minutes is the whole build's budget: the buckets share it.
        minutes = args.tune_minutes / len(models) if args.tune_minutes else None
        budget = " and ".join(([f"{args.tune_trials} trials"] if args.tune_trials else [])
                              + ([f"{minutes:g} minutes"] if minutes else []))
        for batch, mm in models.items():  # each bucket's own workloads, one database
            _progress(f"tuning{'' if batch is None else f' batch {batch}'} with {budget}{where}, "
                      f"database {tuning_db}")
            config = TuneConfig(trials=args.tune_trials or None, minutes=minutes, tracker=tracker, key=args.key)
            tune(mm.bound_module(), target, config, work_dir=tuning_db)
    if tuning_db is not None and not (args.tune_trials or args.tune_minutes) and not has_database(tuning_db):
        # A new database folder: nothing to apply yet; tuning (--tune-trials N) fills it later.
        Path(tuning_db).mkdir(parents=True, exist_ok=True)
        _progress(f"no tuning records in {tuning_db} yet: building with default schedules "
                  "(give --tune-trials N to tune into it)")
    _progress(f"building for target {args.target} ({args.weights} weights)")
    artifact = build(models if args.batch_buckets else models[None], target, tuning_db=tuning_db,
                     weights=args.weights, dump_ir=args.dump_ir, transfer_records=args.transfer_records)
    schedules = artifact.manifest["tuning"].get("schedules", {})
    if schedules:
        _progress(f"kernels: {schedules['exact']} with exact tuning records, {schedules['transferred']} with records "
                  f"transferred from other shapes, {schedules['default']} with default schedules")
    path = artifact.export(args.output)
    _progress(f"wrote {path} and its manifest")
    print(path)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from .runtime import load

    save_dir = _output_dir(args.save_outputs) if args.save_outputs else None
    runner = load(args.artifact, device=args.device)
    inputs = {name: _load_npy(name, path) for name, path in _unique(args.input, "--input").items()}
    if not inputs:
        raise InputSpecError(
            "no inputs given; pass --input NAME=FILE.npy for "
            + ", ".join(f"{s['name']} {s['dtype']}{s['shape']}" for s in runner.manifest["inputs"])
        )
    outputs = runner(inputs)
    for task, value in outputs.items():
        arrays = value if isinstance(value, list) else [value]
        for i, arr in enumerate(arrays):
            label = task if len(arrays) == 1 else f"{task}:{i}"
            flat = np.asarray(arr).ravel()
            head = ", ".join(f"{v:.5g}" for v in flat[:6])
            print(f"{label}: {arr.dtype}{list(arr.shape)} [{head}{', ...' if flat.size > 6 else ''}] sum={flat.sum():.6g}")
            if save_dir is not None:
                target = save_dir / f"{label.replace(':', '_')}.npy"
                try:
                    np.save(target, arr)
                except OSError as err:
                    raise InputSpecError(f"--save-outputs: cannot write {target}: {err.strerror}") from err
    return 0


def _output_dir(text: str) -> Path:
    """The --save-outputs directory, created; checked before the (maybe slow) run."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise InputSpecError(f"--save-outputs {text}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputSpecError(f"--save-outputs {text}: cannot create the directory ({err.strerror})") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputSpecError(f"--save-outputs {text}: the directory is not writable")
    return path


def _cmd_info(args: argparse.Namespace) -> int:
    # Torch- and TVM-free readers only: `info` must stay light (tests/test_lint.py checks it).
    from .core.device_code import describe_device_code
    from .core.manifest import read_manifest

    manifest = read_manifest(args.artifact)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"artifact: {args.artifact}")
    print(f"target:   {json.dumps(manifest.get('target'))}")
    print(f"device:   {manifest.get('device')}   gmorph-tvm {manifest.get('package_version')}")
    for spec in manifest["inputs"]:
        print(f"input     {spec['name']}: {spec['dtype']}{spec['shape']}")
    for task in manifest["tasks"]:
        outs = ", ".join(f"{o['name']}: {o['dtype']}{o['shape']}" for o in task["outputs"])
        print(f"task      {task['name']} ({task['source']}, sha256 {task['source_sha256'][:12]}): {outs}")
    cuda = manifest.get("cuda")
    if cuda:
        board = f", for {cuda['jetpack']} (CUDA {cuda['board_cuda']})" if cuda.get("jetpack") else ""
        print(f"cuda:     {cuda.get('arch')} {cuda.get('device_code')} made by CUDA {cuda.get('toolkit', '?')}, "
              f"needs a driver >= {cuda.get('cuda_min_driver', '?')}{board}")
    weights = manifest.get("weights", {})
    if weights:
        where = f", in {weights['file']} (sha256 {weights.get('sha256', '')[:12]})" if weights.get("file") else ""
        print(f"weights:  {weights.get('count')} tensors, {weights.get('bytes', 0) / 1e6:.3f} MB, "
              f"{weights.get('storage', 'embedded')}{where}")
    if manifest.get("batch_buckets"):
        print(f"batches:  {', '.join(map(str, manifest['batch_buckets']))} (one entry point each; smaller batches "
              "padded up to the next)")
    elif len(manifest.get("entries") or []) > 1:
        print(f"groups:   {', '.join(e['function'] for e in manifest['entries'])}")
    library = Path(args.artifact).with_name(manifest["library"])
    if manifest["device"] == "cuda" and library.is_file():
        code = describe_device_code(library)
        print(f"cuda:     {manifest.get('cuda', {}).get('arch')}, SASS {', '.join(code['sass']) or 'none'}, "
              f"PTX {', '.join(code['ptx']) or 'none'}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .runtime.rpc import artifact_table, local_benchmark, remote_benchmark

    if args.tracker and not args.key:
        raise InputSpecError("--tracker needs --key (the device key the boards registered with)")
    if args.rpc and args.tracker:
        raise InputSpecError("give either --rpc or --tracker, not both")
    if args.rpc or args.tracker:
        rows = remote_benchmark(args.artifact, rpc=args.rpc, tracker=args.tracker, key=args.key,
                                number=args.number, repeat=args.repeat, compare=args.compare or [])
    else:
        rows = local_benchmark(args.artifact, number=args.number, repeat=args.repeat, compare=args.compare or [])
    print(artifact_table(rows))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out_dir=args.out_dir, tune_trials=args.tune_trials, batch=args.batch)


def _cmd_bundle_runtime(args: argparse.Namespace) -> int:
    from .runtime.bundle import bundle_runtime

    out = bundle_runtime(args.target, args.output, runner=args.runner)
    total = json.loads((out / "BUNDLE.json").read_text(encoding="utf-8"))["total_bytes"]
    print(f"runtime bundle for {args.target}: {out} ({total / 2**20:.1f} MiB); run: {out}/gmorph-run MODEL.so --input x=x.npy")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from .lossy.cli import run_search_cli

    return run_search_cli(args)


def _add_search_arguments(p: argparse.ArgumentParser) -> None:
    # Declared beside the search (gmorph_tvm.lossy.cli imports no torch at module level).
    from .lossy.cli import add_search_arguments

    add_search_arguments(p)



def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmorph-tvm",
        description="Fuse several DNNs that read the same input into one fast multi-task TVM program.",
    )
    parser.add_argument("--version", action="version", version=f"gmorph-tvm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("build", help="import models (ONNX .onnx, torch.export .pt2) and build one artifact")
    p.add_argument("models", nargs="+", help="model files: .onnx or .pt2 (torch.export.save)")
    p.add_argument("--names", help="comma-separated task names, one per model (default: file stems)")
    p.add_argument("--input-shape", action="append", type=_parse_shape, metavar="NAME=D1,D2,...",
                   help="static shape of an input with symbolic dims, ONNX or .pt2 (repeatable)")
    p.add_argument("--input-map", action="append", type=_parse_input_map, metavar="TASK.INPUT=SHARED",
                   help="model TASK's input INPUT is the shared input SHARED (repeatable), e.g. cls.input.1=x")
    p.add_argument("--target", default="llvm", help="preset (llvm, cuda, cuda:sm_XX, jetson-orin, jetson-xavier, "
                   "jetson-nano, aarch64) or a JSON target dict (default: llvm for this host)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="run the lossless fusion pipeline (default: on)")
    p.add_argument("--merge", choices=["auto", "always", "never"], default="auto",
                   help="horizontal merging of compatible ops (default: auto, by the cost rule)")
    p.add_argument("--tune-trials", type=int, default=0, metavar="N", help="MetaSchedule trials (0: no tuning)")
    p.add_argument("--tune-minutes", type=float, metavar="M",
                   help="tune for at most M minutes of wall clock and keep the best found (with or without "
                        "--tune-trials)")
    p.add_argument("--tuning-db", metavar="DIR", help="tuning database to reuse and extend "
                   "(default: <output>.tuning/<target key>)")
    p.add_argument("--tracker", type=_parse_hostport, metavar="HOST:PORT",
                   help="tune on the boards registered with this TVM RPC tracker (with --key)")
    p.add_argument("--key", help="device key the boards registered with the tracker")
    p.add_argument("--weights", choices=["external", "embedded"], default="external",
                   help="external: code-only library + <stem>.weights.safetensors, mapped at load (default); "
                        "embedded: one file with the weights inside the library")
    p.add_argument("--batch-buckets", metavar="B1,B2,...",
                   help="one entry point per batch size (e.g. 1,8,32) sharing one copy of the weights; needs "
                        "--input-shape (the first dimension is the batch)")
    p.add_argument("--transfer-records", action="store_true",
                   help="kernels without a tuning record run the verified record of the nearest kernel of the same "
                        "structure at other extents (default: their default schedule)")
    p.add_argument("--dump-ir", metavar="DIR",
                   help="write the module after every phase of the compiler pipeline to DIR (TVMScript)")
    p.add_argument("-o", "--output", required=True, help="output library (.so, or .tar to link on the device)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("run", help="run an artifact on .npy inputs and print each task's outputs")
    p.add_argument("artifact")
    p.add_argument("--input", action="append", type=_parse_input, metavar="NAME=FILE.npy")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--save-outputs", metavar="DIR", help="also save every output as DIR/<task>.npy")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("info", help="print an artifact's manifest")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print the raw manifest JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="time an artifact here, or on a remote board over TVM RPC (--rpc / --tracker)")
    p.add_argument("artifact")
    p.add_argument("--rpc", type=_parse_hostport, metavar="HOST:PORT", help="a TVM RPC server")
    p.add_argument("--tracker", type=_parse_hostport, metavar="HOST:PORT", help="a TVM RPC tracker")
    p.add_argument("--key", help="device key registered with the tracker")
    p.add_argument("--compare", nargs="+", metavar="ARTIFACT", help="other artifacts to time alongside")
    p.add_argument("--number", type=_positive_int, default=20, help="calls per measurement (>= 1)")
    p.add_argument("--repeat", type=_positive_int, default=5, help="measurements (>= 1)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("bundle-runtime", help="copy the TVM runtime libraries + gmorph-run into a folder for TVM-less machines")
    p.add_argument("--target", default="llvm", choices=["llvm", "cuda", "jetson-orin"])
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--runner", metavar="FILE", help="an already built gmorph-run (default: build it with CMake)")
    p.set_defaults(func=_cmd_bundle_runtime)

    p = sub.add_parser("demo", help="the bundled end-to-end demo: import, fuse, tune, build, run, compare")
    p.add_argument("--out-dir", default="out/demo")
    p.add_argument("--tune-trials", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("search", help="accuracy-aware fusion search (GMorph): .pt2 or state dict + --arch models, "
                       "or the Fashion-MNIST tasks")
    _add_search_arguments(p)
    p.set_defaults(func=_cmd_search)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    command = "gmorph-tvm"
    try:  # Ctrl-C while the parser imports torch/TVM is one line too, not a traceback
        parser = _build_parser()
        args = parser.parse_args(argv)
        command = f"gmorph-tvm {args.command}"
        return int(args.func(args) or 0)
    except GmorphError as err:
        text = str(err) if "\n" not in str(err) else one_line(err, limit=2000)
        print(f"{command}: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
