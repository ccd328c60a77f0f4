"""gmorph_tvm.pipeline: the composed lossless fusion, checked against PyTorch on real weights."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import tvm
from helpers import run_relax
from torch import nn
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx
from tvm.relax.frontend.torch import from_exported_program

from gmorph_tvm import import_models
from gmorph_tvm.data import fashion_mnist
from gmorph_tvm.passes._util import count_ops
from gmorph_tvm.pipeline import TVM_PIPELINE, fuse_grouped, fuse_lossless, lossless_passes
from gmorph_tvm.zoo import pretrained


def _setup(n=3, batch=2):
    models = pretrained.fmnist_backbone_set(n)
    x = fashion_mnist.load_split("test", limit=batch).images
    return models, x, import_models(models, x)


def test_fuse_lossless_matches_pytorch_and_shares_the_frozen_backbone():
    models, x, mm = _setup()
    fused = fuse_lossless(mm)
    with torch.no_grad():
        expected = [m(x).numpy() for m in models.values()]
    for got, want in zip(run_relax(fused.bound_module(), [x.numpy()]), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The frozen prefix (3 convs) runs once instead of once per task.
    before = count_ops(mm.mod)["relax.nn.conv2d"]
    after = count_ops(fused.mod)["relax.nn.conv2d"]
    assert before == 4 * len(models) and after <= before - (len(models) - 1) * 3
    assert fused.weight_bytes < mm.weight_bytes
    # A stored weight of the backbone stands for the same parameter of every task.
    shared = [name for name, prov in fused.provenance.items() if len({t for t, _ in prov}) == len(models)]
    assert shared, "no weight is recorded as shared by all tasks"


def test_lossless_passes_is_a_plain_tvm_pass():
    _, x, mm = _setup(n=2)
    seq = lossless_passes(merge="never")
    assert isinstance(seq, tvm.transform.Pass)
    out = tvm.transform.Sequential([seq])(mm.mod)
    assert count_ops(out)["relax.nn.conv2d"] < count_ops(mm.mod)["relax.nn.conv2d"]


def test_fuse_grouped_respects_explicit_groups():
    models, x, mm = _setup(n=3)
    names = list(models)
    parts = fuse_grouped(mm, groups=[[names[0]], names[1:]])
    assert [p.task_names for p in parts] == [[names[0]], names[1:]]
    with torch.no_grad():
        for part in parts:
            outs = run_relax(part.bound_module(), [x.numpy()])
            for task, got in zip(part.task_names, outs):
                np.testing.assert_allclose(got, models[task](x).numpy(), rtol=1e-5, atol=1e-5)


# ---- relax_pipeline="gmorph": the fusion inside a plain tvm.compile -------------------------------


class _TwoConvNet(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def _merge_by_hand(mods: list[tvm.IRModule], names: list[str]) -> tvm.IRModule:
    """TVM's own modules in one ``main(x)`` returning every model's output (no gmorph-tvm code)."""
    bb = relax.BlockBuilder()
    gvars = [bb.add_func(m["main"].without_attr("global_symbol"), n) for m, n in zip(mods, names)]
    x = relax.Var("x", mods[0]["main"].params[0].ty)
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = [bb.emit(relax.Call(gv, [x])) for gv in gvars]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return relax.transform.InlinePrivateFunctions()(bb.get())


def _conv_kernel_calls(mod: tvm.IRModule) -> int:
    """Calls of conv PrimFuncs in a lowered ``main`` (one per conv kernel launch)."""
    calls = 0

    def visit(node):
        nonlocal calls
        if isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.GlobalVar) and "conv2d" in node.op.name_hint:
            calls += 1

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return calls


def test_tvm_compile_with_the_gmorph_pipeline_fuses_a_plain_two_model_module():
    x = torch.randn(1, 3, 16, 16)
    torch_net, onnx_net = _TwoConvNet(0).eval(), _TwoConvNet(1).eval()
    mod_torch = from_exported_program(torch.export.export(torch_net, (x,)), unwrap_unit_return_tuple=True)
    buf = io.BytesIO()
    torch.onnx.export(onnx_net, (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
    mod_onnx = from_onnx(onnx.load_from_string(buf.getvalue()), shape_dict={"x": [1, 3, 16, 16]})
    mod = _merge_by_hand([mod_torch, mod_onnx], ["a", "b"])

    target = tvm.target.Target({"kind": "llvm"})
    with target:  # what tvm.compile runs for each relax_pipeline
        fused, plain = relax.get_pipeline(TVM_PIPELINE)(mod), relax.get_pipeline("default")(mod)
    assert _conv_kernel_calls(plain) == 4
    assert _conv_kernel_calls(fused) == 2  # the first convs read x: one conv; the second ones: one grouped conv
    assert not tvm_pipeline_left_dataflow(fused)  # the whole pipeline ran, finalize included

    outputs = {}
    for pipeline in (TVM_PIPELINE, "default"):
        vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=pipeline), tvm.cpu())
        outputs[pipeline] = [o.numpy() for o in vm["main"](tvm.runtime.tensor(x.numpy()))]
    with torch.no_grad():
        expected = [torch_net(x).numpy(), onnx_net(x).numpy()]
    for got, default, want in zip(outputs[TVM_PIPELINE], outputs["default"], expected):
        np.testing.assert_allclose(got, default, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_gmorph_pipeline_is_registered_when_fuse_is_first_used():
    code = (
        "import gmorph_tvm\n"
        "from tvm import relax\n"
        "assert 'gmorph' not in relax.pipeline.PIPELINE_MAP\n"
        "gmorph_tvm.fuse\n"
        "print(relax.get_pipeline('gmorph', merge='never').info.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "GmorphRelaxPipeline", out.stderr[-2000:]


def tvm_pipeline_left_dataflow(mod: tvm.IRModule) -> bool:
    from gmorph_tvm.tuning.pipeline import needs_finalize

    return needs_finalize(mod)


# ---- one pipeline object behind build() and relax_pipeline="gmorph" -------------------------------


class _ClampNet(nn.Module):
    """relu, relu6 (clip) and max: the ops whose NaN semantics the lowering fixes."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        y = torch.nn.functional.relu6(self.c1(x))
        z = torch.maximum(torch.relu(self.c2(y)), y)
        return self.fc(z.mean((2, 3)))


@tvm.instrument.pass_instrument
class _KernelsAfterTuning:
    """The PrimFuncs of every module leaving the pipeline's apply_tuning phase (structural hashes)."""

    def __init__(self):
        self.kernels: list[list[int]] = []

    def run_after_pass(self, mod, info):
        if info.name == "gmorph.apply_tuning":
            import tvm_ffi

            self.kernels.append(sorted(tvm_ffi.structural_hash(f.without_attr("global_symbol"))
                                       for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)))


def _two_model_module():
    import gmorph_tvm

    x = torch.randn(1, 3, 12, 12)
    x[0, 0, 3:5, 3:5] = float("nan")  # NaN in -> NaN out, the same in both paths
    models = {"a": _ClampNet(0).eval(), "b": _ClampNet(1).eval()}
    mm = gmorph_tvm.import_models(models, x)
    return x, mm


def _compile_both(target):
    """``tvm.compile(relax_pipeline="gmorph")`` of the unfused module and ``gmorph_tvm.build`` of the
    fused MultiModel: (kernel hashes, executable) of each."""
    import gmorph_tvm

    x, mm = _two_model_module()
    seen = _KernelsAfterTuning()
    with tvm.transform.PassContext(instruments=[seen]):
        executable = tvm.compile(mm.bound_module(), target=target, relax_pipeline=TVM_PIPELINE)
        artifact = gmorph_tvm.build(gmorph_tvm.fuse(mm), target, weights="embedded")
    # each path runs the pipeline's apply_tuning phase once (build a second time for its untuned
    # reference when a shipped record applied to a kernel)
    assert len(seen.kernels) in (2, 3), len(seen.kernels)
    return x, seen.kernels, executable, artifact


def test_build_and_relax_pipeline_gmorph_give_the_same_kernels_and_outputs_on_llvm():
    from gmorph_tvm.core.targets import resolve_target

    target = resolve_target("llvm")
    x, (via_tvm, via_build), executable, artifact = _compile_both(target)
    assert via_tvm == via_build
    assert len(via_tvm) >= 4
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got_tvm = [o.numpy() for o in vm["main"](tvm.runtime.tensor(x.numpy()))]
    got_build = list(artifact.run({"x": x.numpy()}).values())
    assert len(got_tvm) == len(got_build) == 2
    for a, b in zip(got_tvm, got_build):
        np.testing.assert_array_equal(a, b)  # NaN positions included (assert_array_equal: NaN == NaN)
        assert np.isnan(a).any()  # the NaN reached the output through relu6 / relu / max


def test_build_and_relax_pipeline_gmorph_give_the_same_kernels_on_cuda():
    from gmorph_tvm.core.targets import resolve_target

    if not any(Path(d, "nvcc").exists() for d in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("no nvcc on PATH: the CUDA build needs it to make device code")
    target = resolve_target({"kind": "cuda", "arch": "sm_87", "host": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}})
    _, (via_tvm, via_build), _, _ = _compile_both(target)
    assert via_tvm == via_build and via_tvm


def test_build_dumps_the_ir_after_every_phase(tmp_path):
    import gmorph_tvm
    from gmorph_tvm.tuning.pipeline import PHASES

    _, mm = _two_model_module()
    artifact = gmorph_tvm.build(gmorph_tvm.fuse(mm), "llvm", dump_ir=tmp_path, shipped_records=False)
    dumped = sorted(p.name for p in tmp_path.iterdir())
    # Untuned: every kernel got a default CPU schedule, and the manifest says which rule took how many.
    schedules = artifact.manifest["tuning"]["schedules"]
    kernels = (tmp_path / "03-apply_tuning.py").read_text().count("@T.prim_func")
    assert schedules["exact"] == schedules["transferred"] == 0 and schedules["default"] == kernels > 0
    assert schedules["default_rules"]["Conv2D"] == 2 and sum(schedules["default_rules"].values()) == kernels
    # every phase, lossless_fusion included (empty in build: it builds what fuse() returned)
    expected = [f"{PHASES.index(p):02d}-{p}.py" for p in PHASES]
    assert dumped == expected, dumped
    assert "T.prim_func" in (tmp_path / "02-target_lowering.py").read_text()
    assert "gmorph_signature" in (tmp_path / "04-weights_and_signature.py").read_text()


def test_every_pass_order_is_in_the_pipeline_object():
    """Only tuning/pipeline.py builds Sequentials of passes (the one home of every pass order)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("gmorph_tvm", "passes", "tuning"):
        for path in (root / folder).rglob("*.py"):
            if path == root / "tuning" / "pipeline.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("transform.Sequential", "get_pipeline")):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node.func)}")
    allowed = [
        # the fusion verbs: a Sequential of the pipeline's own import_cleanup + lossless_fusion passes
        f"gmorph_tvm/pipeline.py:{_line_of('gmorph_tvm/pipeline.py', 'GmorphLosslessFusion')}: tvm.transform.Sequential",
        # stitch(): StitchSharedWeights with its prerequisite (it compares canonical ops), for tests and the search
        f"passes/stitch_shared_weights.py:{_line_of('passes/stitch_shared_weights.py', 'mm.apply(')}: "
        "tvm.transform.Sequential",
    ]
    assert sorted(offenders) == sorted(allowed), offenders


def _line_of(relative: str, text: str) -> int:
    path = Path(__file__).resolve().parents[1] / relative
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)
