"""gmorph_tvm.pipeline: the composed lossless fusion, checked against PyTorch on real weights."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import onnx
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
        if isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.GlobalVar) and node.op.name_hint.startswith("conv"):
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
