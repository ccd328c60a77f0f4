"""The GPU check, run on the GPU machine from the folder ``bench/gpu_prepare.sh`` wrote.

Needs PyTorch and numpy only (onnxruntime and ``torch.compile`` are timed when they load); no
TVM: artifacts run with the folder's runtime bundle (``runtime/gmorph-run``). For every case
(set x batch, and the lossy plan):

1. every artifact's outputs against PyTorch on the same device (max abs diff / max abs of the
   reference <= 1e-4) and against the outputs PyTorch computed when the folder was prepared;
2. latency, median of ``--repeat`` calls after warm-up: TVM separate (the models one by one),
   TVM fused, PyTorch eager model by model, ``torch.compile`` model by model, onnxruntime model
   by model;
3. device memory: what the fused run holds on the GPU (gmorph-run's count) and PyTorch's peak.

Writes one markdown table (``--out``, default DIR/results.md) and prints it. ``--device cpu``
runs the same check on the CPU (the dry run). Exit status 1 when any output mismatches.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TOLERANCE = 1e-4


def _say(msg: str) -> None:
    print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12))


class Check:
    def __init__(self, folder: Path, device: str, repeat: int, warmup: int, use_compile: bool, budget_s: float):
        self.dir, self.device, self.repeat, self.warmup = folder, device, repeat, warmup
        self.torch_device = torch.device("cuda" if device == "cuda" else "cpu")
        self.use_compile, self.deadline = use_compile, time.monotonic() + budget_s
        self.failures: list[str] = []
        self._refs: dict[str, torch.nn.Module] = {}
        self._ort = self._ort_providers()

    # ---- peers -----------------------------------------------------------------------------------
    def _ort_providers(self) -> list[str] | None:
        try:
            import onnxruntime as ort  # noqa: PLC0415 - optional peer
        except ImportError:
            return None
        want = "CUDAExecutionProvider" if self.device == "cuda" else "CPUExecutionProvider"
        return [want] if want in ort.get_available_providers() else None

    def reference(self, rel: str) -> torch.nn.Module:
        if rel not in self._refs:
            model = torch.load(self.dir / rel, weights_only=False, map_location="cpu")
            self._refs[rel] = model.eval().to(self.torch_device)
        return self._refs[rel]

    def _sync(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize()

    def time_fn(self, fn) -> float:
        """Median milliseconds of ``fn()`` over ``repeat`` calls after ``warmup``."""
        for _ in range(self.warmup):
            fn()
        self._sync()
        samples = []
        for _ in range(self.repeat):
            start = time.perf_counter()
            fn()
            self._sync()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    def torch_inputs(self, case: dict) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(np.load(self.dir / f)).to(self.torch_device) for f in case["inputs"].values())

    # ---- TVM -------------------------------------------------------------------------------------
    def run_artifact(self, art: dict, case: dict) -> dict:
        """gmorph-run on ``art``: outputs (by task), median ms, device MiB (None on the CPU)."""
        with tempfile.TemporaryDirectory() as outputs:
            cmd = [str(self.dir / "runtime" / "gmorph-run"), str(self.dir / art["library"]), "--device", self.device,
                   "--repeat", str(self.repeat), "--warmup", str(self.warmup), "--save-outputs", outputs]
            for name, rel in case["inputs"].items():
                cmd += ["--input", f"{name}={self.dir / rel}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"gmorph-run {art['library']} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
            got = {t: np.load(Path(outputs) / f"{t}.npy") for t in art["tasks"]}
        latency = re.search(r"^latency: median (\S+) ms", proc.stdout, re.M)
        memory = re.search(r"^memory: device (\S+) MiB", proc.stdout, re.M)
        return {"outputs": got, "ms": float(latency.group(1)), "device_mib": float(memory.group(1)) if memory else None}

    def reference_outputs(self, ref: dict, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        """The outputs of reference ``ref`` on ``inputs``, computed on this device."""
        with torch.no_grad():
            outs = self.reference(ref["torch"])(*inputs)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        return [out.float().cpu().numpy() for out in outs]

    def check_outputs(self, case: dict, art: dict, got: dict[str, np.ndarray],
                      reference: dict[str, list[np.ndarray]]) -> float:
        """Worst relative error of ``got`` against PyTorch on this device (``reference``: outputs by
        reference file, each computed once per case) and the prepared outputs."""
        worst = 0.0
        for ref in art["refs"]:
            for task, out in zip(ref["tasks"], reference[ref["torch"]], strict=True):
                for want, what in ((out, f"PyTorch {self.device}"),
                                   (np.load(self.dir / art["expected"][task]), "PyTorch at prepare time")):
                    err = rel_err(got[task], want)
                    worst = max(worst, err)
                    if not err <= TOLERANCE:
                        self.failures.append(f"{case['name']} {art['library']} task {task}: relative error "
                                             f"{err:.2e} against {what}")
        return worst

    # ---- one case --------------------------------------------------------------------------------
    def case(self, case: dict) -> dict:
        row: dict = {"case": case["name"], "batch": case["batch"]}
        inputs = self.torch_inputs(case)
        reference = {ref["torch"]: self.reference_outputs(ref, inputs)
                     for art in [*case["separate"], case["fused"]] for ref in art["refs"]}
        sep_ms, sep_err = 0.0, 0.0
        for art in case["separate"]:
            result = self.run_artifact(art, case)
            sep_ms += result["ms"]
            sep_err = max(sep_err, self.check_outputs(case, art, result["outputs"], reference))
        fused = self.run_artifact(case["fused"], case)
        row.update(tvm_separate_ms=sep_ms, tvm_fused_ms=fused["ms"], tvm_device_mib=fused["device_mib"],
                   max_rel_err_separate=sep_err,
                   max_rel_err_fused=self.check_outputs(case, case["fused"], fused["outputs"], reference))
        # Peers run the original models one by one (the separate artifacts' references).
        models = [self.reference(ref["torch"]) for art in case["separate"] for ref in art["refs"]]
        if self.torch_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            row["torch_eager_ms"] = self.time_fn(lambda: [m(*inputs) for m in models])
        row["torch_device_mib"] = (torch.cuda.max_memory_allocated() / 2**20
                                   if self.torch_device.type == "cuda" else None)
        row["torch_compile_ms"] = self._compiled_ms(models, inputs)
        row["ort_ms"] = self._ort_ms(case)
        return row

    def _compiled_ms(self, models, inputs) -> float | str:
        if not self.use_compile:
            return "off"
        if time.monotonic() > self.deadline:
            return "skipped (time budget)"
        try:
            compiled = [torch.compile(m) for m in models]
            with torch.no_grad():
                return self.time_fn(lambda: [m(*inputs) for m in compiled])
        except Exception as err:  # noqa: BLE001 - an optional peer: say why it is missing
            return f"n/a ({type(err).__name__})"

    def _ort_ms(self, case: dict) -> float | str:
        if self._ort is None:
            return "n/a (no onnxruntime" + ("-gpu)" if self.device == "cuda" else ")")
        import onnxruntime as ort  # noqa: PLC0415

        arrays = [np.load(self.dir / f) for f in case["inputs"].values()]
        runs = []
        for art in case["separate"]:
            for ref in art["refs"]:
                if not ref.get("onnx"):
                    return "n/a (no ONNX file)"
                options = ort.SessionOptions()
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                sess = ort.InferenceSession(str(self.dir / ref["onnx"]), options, providers=self._ort)
                feed = {i.name: a for i, a in zip(sess.get_inputs(), arrays)}
                runs.append((sess, feed))
        return self.time_fn(lambda: [s.run(None, f) for s, f in runs])


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 1e-2 else f"{value:.3f}"
    return str(value)


def render(rows: list[dict], meta: dict, device_name: str, failures: list[str]) -> str:
    head = ["case", "batch", "TVM separate ms", "TVM fused ms", "PyTorch eager ms", "torch.compile ms",
            "onnxruntime ms", "fused vs eager", "fused vs separate", "max rel err (sep / fused)",
            "TVM fused device MiB", "PyTorch device MiB"]
    lines = [f"GPU check on {device_name} ({meta['device']}"
             + (f", artifacts for {meta['arch']}" if meta.get("arch") else "") + f"), PyTorch {torch.__version__}, "
             f"prepared with PyTorch {meta['torch_version']}, gmorph-tvm {meta['gmorph_tvm_version']}; "
             "median ms of one call of every model (peers: model by model).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        speed = r["torch_eager_ms"] / r["tvm_fused_ms"] if r["tvm_fused_ms"] else float("nan")
        lines.append("| " + " | ".join([
            r["case"], str(r["batch"]), _fmt(r["tvm_separate_ms"]), _fmt(r["tvm_fused_ms"]), _fmt(r["torch_eager_ms"]),
            _fmt(r["torch_compile_ms"]), _fmt(r["ort_ms"]), f"{speed:.2f}x",
            f"{r['tvm_separate_ms'] / r['tvm_fused_ms']:.2f}x",
            f"{r['max_rel_err_separate']:.1e} / {r['max_rel_err_fused']:.1e}",
            _fmt(r["tvm_device_mib"]), _fmt(r["torch_device_mib"]),
        ]) + " |")
    lines += ["", "All outputs match PyTorch (<= 1e-4 relative)." if not failures else
              f"{len(failures)} MISMATCHES:"] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="what bench/gpu_prepare.sh wrote")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: what the folder was prepared for")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="stop starting torch.compile runs after this many seconds (the visit is short)")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--out", help="write the table here (default: FOLDER/results.md)")
    args = parser.parse_args(argv)

    folder = Path(args.folder).resolve()
    meta = json.loads((folder / "cases.json").read_text())
    device = args.device or meta["device"]
    if device == "cuda" and meta["device"] != "cuda":
        raise SystemExit(f"gpu_check: {folder} was prepared for {meta['device']}; rerun gpu_prepare.sh --device cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: PyTorch sees no CUDA device here; use --device cpu for a dry run")
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} threads)"
    check = Check(folder, device, args.repeat, args.warmup, not args.no_compile, args.budget_s)
    wanted = set(args.cases.split(",")) if args.cases else None
    rows = []
    started = time.perf_counter()
    for case in meta["cases"]:
        if wanted is None or case["name"] in wanted:
            _say(f"{case['name']} ...")
            rows.append(check.case(case))
    table = render(rows, meta, device_name, check.failures)
    out = Path(args.out) if args.out else folder / "results.md"
    out.write_text(table)
    print(table)
    _say(f"{len(rows)} cases in {time.perf_counter() - started:.0f} s; table in {out}")
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
