"""Time to fast: how long a new user tunes before a fused model set no tuning record was made from
runs as fast as ONNX Runtime.

    python bench/time_to_fast.py --sets ocr320,ocr256 --minutes 0,2,5,10,20 --modes on,off \\
        [--work-dir out/time_to_fast] [--target llvm] [--samples 15]

Sets (real third-party ONNX files; no shipped record and no cost-model training example comes
from them): ``ocrS`` = PaddleOCR PP-OCRv4 text detector + mobile v2.0 orientation classifier
(the ONNX files inside ``rapidocr-onnxruntime``) reading one shared ``1x3xSxS`` input, fused
losslessly into one artifact. Sizes other than the ones the zoo's records were made at are the
"input size no record saw" case.

For each set and mode, tuning runs in one work dir in steps up to each ``--minutes`` checkpoint
(``tune(minutes=step)``: the cost model and records carry over from step to step), and after each
checkpoint the fused artifact is built with the records so far and timed, interleaved with ONNX
Runtime (the models one after another, one session each) and OpenVINO when installed, in a fresh
process per checkpoint (timed in the tuning process, every system ran slower at each checkpoint:
ONNX Runtime 47.6 ms at the first, 56.9 ms at the fourth). ``--time-only`` times the artifacts an
earlier run left in ``--work-dir`` again, without tuning or building.
``--modes on``: shipped records (exact and transferred to the new shapes) and the shipped
pre-trained cost model; ``off``: neither (what tuning from scratch gives). Minutes are tuning
wall-clock only; building and timing are not counted. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import gmorph_tvm
from gmorph_tvm.benchmark import measure, onnxruntime_sampler, openvino_sampler, tvm_sampler
from gmorph_tvm.pipeline import fuse_lossless
from gmorph_tvm.tuning import TuneConfig, TuningWarning, tune
from gmorph_tvm.zoo.real import ocr_model_path, text_image


def _set(name: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Model paths and the shared input of a set name such as ``ocr320``."""
    if not name.startswith("ocr") or not name[3:].isdigit():
        raise SystemExit(f"unknown set {name!r}: use ocrS (S: the square input size, e.g. ocr320)")
    size = int(name[3:])
    paths = {kind: str(ocr_model_path(kind)) for kind in ("det", "cls")}
    return paths, {"x": text_image(size, size)}


def _fused(paths: dict[str, str], inputs: dict[str, np.ndarray]):
    shapes = {k: list(v.shape) for k, v in inputs.items()}
    return fuse_lossless(gmorph_tvm.import_models(paths, input_shapes=shapes))


def _time_fresh(artifact_path: Path, name: str, samples: int) -> dict[str, float]:
    """:func:`_time` in a fresh process (sessions and thread pools of earlier checkpoints gone)."""
    out = subprocess.run([sys.executable, __file__, "--time-artifact", str(artifact_path), "--sets", name,
                          "--samples", str(samples)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _time(artifact_path: Path, paths: dict[str, str], inputs: dict[str, np.ndarray], samples: int) -> dict[str, float]:
    runner = gmorph_tvm.load(artifact_path)
    samplers = {
        "fused": tvm_sampler([runner], inputs),
        "ort": onnxruntime_sampler(paths, {name: inputs for name in paths}),
    }
    if importlib.util.find_spec("openvino") is not None:
        samplers["openvino"] = openvino_sampler(paths, {name: inputs for name in paths})
    return {name: timing.median_ms for name, timing in measure(samplers, samples=samples).items()}


def run_set(name: str, modes: list[str], checkpoints: list[float], work_root: Path, target: str,
            samples: int, channels_last: bool | None = None, time_only: bool = False) -> list[str]:
    paths, inputs = _set(name)
    fused = None if time_only else _fused(paths, inputs)
    rows = []
    for mode in modes:
        on = mode == "on"
        work = work_root / f"{name}-{mode}"
        work.mkdir(parents=True, exist_ok=True)
        tuned_minutes, tuned_trials = 0.0, 0
        for minutes in checkpoints:
            step = minutes - tuned_minutes
            out = work / f"fused_{minutes:g}min.so"
            notes = work / f"fused_{minutes:g}min.checkpoint.json"
            if time_only:
                if not out.is_file():
                    continue
                done = json.loads(notes.read_text()) if notes.is_file() else {}
                tuned_trials, build_s = done.get("trials", "-"), done.get("build_s", float("nan"))
            elif step > 0:
                started = time.monotonic()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", TuningWarning)
                    report = tune(fused, target, TuneConfig(minutes=step, shipped_records=on, transfer=on,
                                                            progress=False, channels_last=channels_last),
                                  work_dir=work)
                tuned_trials += report.trials_run
                tuned_minutes = minutes
                print(f"[{name} {mode}] tuned {step:g} min ({time.monotonic() - started:.0f} s wall, "
                      f"{report.trials_run} trials)\n{report.table()}", flush=True)
            if not time_only:
                started = time.monotonic()
                artifact = gmorph_tvm.build(fused, target, tuning_db=work if minutes > 0 else None,
                                            shipped_records=on, channels_last=channels_last)
                artifact.export(out)
                build_s = time.monotonic() - started
                notes.write_text(json.dumps({"trials": tuned_trials, "build_s": build_s}))
            ms = _time_fresh(out, name, samples)
            ov = f"{ms['openvino']:.2f}" if "openvino" in ms else "-"
            rows.append(f"| {name} | {mode} | {minutes:g} | {tuned_trials} | {ms['fused']:.2f} | {ms['ort']:.2f} | "
                        f"{ov} | {ms['ort'] / ms['fused']:.3f}x | {build_s:.0f} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="ocr320,ocr256", help="comma-separated sets (ocrS: PaddleOCR det+cls at SxS)")
    parser.add_argument("--minutes", default="0,2,5,10,20", help="tuning checkpoints in minutes (cumulative)")
    parser.add_argument("--modes", default="on,off", help="on: shipped records + transfer + pre-trained cost model; "
                        "off: tuning from scratch")
    parser.add_argument("--work-dir", default="out/time_to_fast", help="tuning work dirs and artifacts")
    parser.add_argument("--target", default="llvm")
    parser.add_argument("--samples", type=int, default=15, help="interleaved timing samples per system")
    parser.add_argument("--nchw", action="store_true", help="keep convolutions NCHW (channels_last=False) in tuning "
                        "and building")
    parser.add_argument("--time-only", action="store_true", help="time the artifacts of an earlier run in --work-dir")
    parser.add_argument("--time-artifact", help=argparse.SUPPRESS)  # one timing, in this (fresh) process: JSON out
    args = parser.parse_args()
    if args.time_artifact:
        paths, inputs = _set(args.sets)
        print(json.dumps(_time(Path(args.time_artifact), paths, inputs, args.samples)))
        return
    checkpoints = sorted({float(m) for m in args.minutes.split(",")})
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"on", "off"}:
        raise SystemExit("--modes takes on and/or off")
    rows = []
    for name in args.sets.split(","):
        rows += run_set(name, modes, checkpoints, Path(args.work_dir), args.target, args.samples,
                        False if args.nchw else None, args.time_only)
    print("\n| set | records + cost model | tuning min | trials | fused ms | ONNX Runtime ms | OpenVINO ms "
          "| fused vs ORT (speed-up) | build s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
