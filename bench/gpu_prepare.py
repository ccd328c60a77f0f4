"""Build, here on the CPU, everything a GPU check needs, into one folder under 64 MiB.

``bench/gpu_prepare.sh -o DIR`` writes::

    DIR/cases.json        what to check: per set and batch, the separate and fused artifacts,
                          their input files, the PyTorch reference of every task
    DIR/art/<case>/       sm_XX artifacts (.so + manifest + external weights), inputs (.npy) and
                          the outputs PyTorch computed here on the CPU (expected_<task>.npy)
    DIR/ref/<model>.pt    each model as a pickled ``torch.fx.GraphModule``: loads with PyTorch
                          alone (no gmorph-tvm, no TVM) and runs eagerly on any device
    DIR/onnx/<model>.onnx each model for onnxruntime (dynamic batch)
    DIR/runtime/          the runtime bundle (TVM runtime libraries, libcudart, gmorph-run)
    DIR/gpu_check.py      the check itself (PyTorch + numpy; onnxruntime when it loads)

Cases: sets B and C (the lossless benchmark's real-weight Fashion-MNIST sets, 8 models each) at
batch 1 and 8, each as the models compiled one by one ("separate") and as one fused program,
plus the lossy search's chosen plan (``coarse4@6<class10@8`` by default: the plan the search benchmark
(docs/benchmarks.md) chose, built from the bundled task models with adapters fitted by least squares; the
check compares TVM with PyTorch on the same weights, so fine-tuning would not change it).
Set A (MiniLM, 87 MB of fp32 weights per model) does not fit the 64 MiB a GPU visit carries;
``--sets A,B,C`` builds it anyway and ``--max-mib`` decides.

``--device cpu`` builds the same cases for this machine's CPU (a dry run of the whole check).
CUDA artifacts use the default GPU schedules (dlight + Conv2dToGemm): tuning needs the GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.fx

import gmorph_tvm
from gmorph_tvm.data import fashion_mnist
from gmorph_tvm.errors import one_line
from gmorph_tvm.lossy.graph import LayerGraph
from gmorph_tvm.lossy.mutate import Calibration, build_fused, to_multimodel
from gmorph_tvm.lossy.plan import FusionPlan, Share
from gmorph_tvm.lossy.tasks import load_benchmark
from gmorph_tvm.pipeline import fuse_lossless, fuse_separately
from gmorph_tvm.runtime.bundle import bundle_runtime
from gmorph_tvm.zoo import pretrained

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
DEFAULT_PLAN = "coarse4@6<class10@8"
# Host code of a CUDA artifact runs on the GPU box's CPU, which is not this one: a portable x86-64.
PORTABLE_HOST = {"kind": "llvm", "mcpu": "x86-64-v3"}


def _say(msg: str) -> None:
    print(f"[gpu-prepare] {msg}", file=sys.stderr, flush=True)


def target_for(device: str, arch: str) -> dict | str:
    if device == "cpu":
        return "llvm"
    # 48 KiB: the shared memory a block gets without opt-in on every sm_XX (dlight's default, said)
    return {"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
            "host": PORTABLE_HOST}


def parse_plan(key: str) -> FusionPlan:
    """A plan from its key (shares only: ``task@cut<host@cut;...``)."""
    shares = []
    for part in filter(None, key.split(";")):
        try:
            left, right = part.split("<")
            task, cut = left.split("@")
            host, host_cut = right.split("@")
            shares.append(Share(task, int(cut), host, int(host_cut)))
        except ValueError as err:
            raise SystemExit(f"gpu_prepare: cannot read plan part {part!r} (expected TASK@CUT<HOST@CUT)") from err
    return FusionPlan(tuple(shares))


def set_models(name: str, n: int) -> dict[str, torch.nn.Module]:
    if name == "B":
        return pretrained.fmnist_backbone_set(n)
    if name == "C":
        return pretrained.fmnist_netfuse_set(n)
    if name == "A":
        from gmorph_tvm.zoo import minilm  # noqa: PLC0415 - set A is opt-in (transformers + 90 MB)

        return minilm.minilm_task_set(n)
    raise SystemExit(f"gpu_prepare: unknown set {name!r} (A, B or C)")


def set_inputs(name: str, batch: int) -> dict[str, np.ndarray]:
    if name == "A":
        from gmorph_tvm.zoo import minilm  # noqa: PLC0415

        ids, mask = minilm.example_inputs(batch)
        return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    return {"x": fashion_mnist.load_split("test", limit=batch).images.contiguous().numpy()}


class Writer:
    """Everything written under DIR, with the references and ONNX files shared across batches."""

    def __init__(self, out: Path, target) -> None:
        self.out, self.target = out, target
        self.cases: list[dict] = []
        self.references: dict[str, str] = {}

    def reference(self, key: str, model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> dict:
        """The model as a pickled GraphModule (+ ONNX for onnxruntime), written once per ``key``."""
        ref = self.out / "ref" / f"{key}.pt"
        onnx_path = self.out / "onnx" / f"{key}.onnx"
        if key not in self.references:
            ref.parent.mkdir(parents=True, exist_ok=True)
            onnx_path.parent.mkdir(parents=True, exist_ok=True)
            traced = torch.fx.symbolic_trace(model.eval())
            for node in traced.graph.nodes:  # string annotations (PEP 563) do not pickle in torch 2.13
                node.type = None
            traced.recompile()
            with torch.no_grad():
                for want, got in zip(_as_list(model(*example)), _as_list(traced(*example))):
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
            torch.save(traced, ref)
            try:
                names = [f"in{i}" for i in range(len(example))]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model.eval(), example, str(onnx_path), dynamo=False, input_names=names,
                                      dynamic_axes={n: {0: "batch"} for n in names})
                self.references[key] = "onnx/" + onnx_path.name
            except Exception as err:  # noqa: BLE001 - onnxruntime is an optional peer
                _say(f"no ONNX file for {key}: {one_line(err)}")
                self.references[key] = ""
        return {"torch": "ref/" + ref.name, "onnx": self.references[key]}

    def artifact(self, case_dir: Path, name: str, model_like, refs: list[dict], expected: dict[str, str]) -> dict:
        """Build and export one artifact; its record: library, tasks, PyTorch references, expected outputs."""
        start = time.perf_counter()
        path = gmorph_tvm.build(model_like, self.target).export(case_dir / f"{name}.so")
        _say(f"  built {path.relative_to(self.out)} in {time.perf_counter() - start:.1f} s")
        tasks = [t for ref in refs for t in ref["tasks"]]
        return {"library": str(path.relative_to(self.out)), "tasks": tasks, "refs": refs,
                "expected": {t: expected[t] for t in tasks}}

    def case(self, name: str, models: dict[str, torch.nn.Module], inputs: dict[str, np.ndarray], *,
             fused_mm=None, fused_model: torch.nn.Module | None = None) -> dict:
        """One case: every model compiled alone ("separate") and the fused program, with their inputs,
        PyTorch references and the outputs PyTorch computes here on the CPU.

        ``fused_model`` (a lossy plan's FusedModel, returning one output per task of ``models``) is the
        reference of the fused artifact ``fused_mm``; by default the fused artifact is ``models``
        imported together and fused losslessly, so its references are the models themselves.
        """
        case_dir = self.out / "art" / name
        case_dir.mkdir(parents=True, exist_ok=True)
        input_files = {}
        for key, array in inputs.items():
            np.save(case_dir / f"{key}.npy", array)
            input_files[key] = f"art/{name}/{key}.npy"
        example = tuple(torch.from_numpy(a) for a in inputs.values())
        set_name = name.split("_")[0]

        def expected_of(prefix: str, model: torch.nn.Module, tasks: list[str]) -> dict[str, str]:
            with torch.no_grad():
                outs = _as_list(model.eval()(*example))
            files = {}
            for task, out in zip(tasks, outs, strict=True):
                np.save(case_dir / f"expected_{prefix}{task}.npy", out.numpy())
                files[task] = f"art/{name}/expected_{prefix}{task}.npy"
            return files

        model_refs = {t: {"tasks": [t], **self.reference(f"{set_name}_{t}", m, example)} for t, m in models.items()}
        model_expected = {t: f for t, m in models.items() for t, f in expected_of("", m, [t]).items()}
        separate = [self.artifact(case_dir, f"sep_{t}", single, [model_refs[t]], model_expected)
                    for t, single in fuse_separately(models, example).items()]
        if fused_model is None:
            mm, refs, expected = gmorph_tvm.import_models(models, example), list(model_refs.values()), model_expected
        else:
            mm = fused_mm
            refs = [{"tasks": list(models), **self.reference(f"{name}_fused", fused_model, example)}]
            expected = expected_of("fused_", fused_model, list(models))
        fused = self.artifact(case_dir, "fused", fuse_lossless(mm), refs, expected)
        entry = {"name": name, "batch": int(next(iter(inputs.values())).shape[0]), "inputs": input_files,
                 "separate": separate, "fused": fused}
        self.cases.append(entry)
        return entry


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def plan_case(writer: Writer, key: str, batch: int) -> None:
    models, data, _ = load_benchmark(train_if_missing=False)
    x = data.test_x[:batch].contiguous()
    graphs = {t: LayerGraph.trace(t, m, data.val_x[:1]) for t, m in models.items()}
    plan = parse_plan(key)
    plan.validate(graphs)
    calibration = Calibration(graphs, data.train_x[:256])
    fused = build_fused(graphs, plan, calibration).eval()
    multi = to_multimodel(fused, x)
    writer.case(f"plan_b{batch}", dict(models), {"x": x.numpy()}, fused_mm=multi, fused_model=fused)["plan"] = plan.key()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", required=True, help="the folder to write (emptied first)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: sm_XX artifacts for the GPU box; cpu: this CPU (dry run)")
    parser.add_argument("--arch", default="sm_90", help="CUDA arch of the GPU (default sm_90: H100/H200)")
    parser.add_argument("--sets", default="B,C")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--models", type=int, default=8, help="models per set")
    parser.add_argument("--plan", default=DEFAULT_PLAN, help="lossy plan key; 'none' leaves the plan out")
    parser.add_argument("--runner", help="an already built gmorph-run for the bundle (default: build it)")
    parser.add_argument("--max-mib", type=float, default=64.0, help="refuse a folder larger than this")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    writer = Writer(out, target_for(args.device, args.arch))
    batches = [int(b) for b in args.batches.split(",") if b]
    started = time.perf_counter()
    for set_name in [s.strip().upper() for s in args.sets.split(",") if s.strip()]:
        models = set_models(set_name, args.models)
        for batch in batches:
            _say(f"set {set_name}, batch {batch}: {len(models)} models")
            writer.case(f"{set_name}_b{batch}", models, set_inputs(set_name, batch))
    if args.plan != "none":
        for batch in batches:
            _say(f"plan {args.plan}, batch {batch}")
            plan_case(writer, args.plan, batch)
    bundle_runtime("cuda" if args.device == "cuda" else "llvm", out / "runtime", runner=args.runner)
    for script in ("gpu_check.py", "gpu_check.sh"):
        shutil.copy2(HERE / script, out / script)
    (out / "cases.json").write_text(json.dumps({
        "device": args.device, "arch": args.arch if args.device == "cuda" else None,
        "torch_version": torch.__version__, "gmorph_tvm_version": gmorph_tvm.__version__, "cases": writer.cases,
    }, indent=1) + "\n")
    total = check_size(out, args.max_mib)
    _say(f"{out}: {len(writer.cases)} cases, {total / MIB:.1f} MiB, in {time.perf_counter() - started:.0f} s")
    print(out)
    return 0


def check_size(out: Path, max_mib: float) -> int:
    """The folder's size in bytes; SystemExit naming the largest cases when it exceeds ``max_mib``."""
    total = folder_bytes(out)
    if total > max_mib * MIB:
        biggest = sorted(((folder_bytes(p), p.name) for p in (out / "art").iterdir() if p.is_dir()), reverse=True)[:3]
        raise SystemExit(f"gpu_prepare: {out} holds {total / MIB:.1f} MiB, over --max-mib {max_mib:g} "
                         f"(largest cases: {', '.join(f'{n} {b / MIB:.1f} MiB' for b, n in biggest)})")
    return total


if __name__ == "__main__":
    sys.exit(main())
