"""Helpers shared by tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gmorph_tvm.core.manifest import manifest_path_for
from gmorph_tvm.core.weights_file import weights_path_for


def run_relax(mod, inputs, target=None):
    """Compile ``mod`` (weights bound) with TVM's default CPU pipeline and run ``main``.

    A reference runner independent of gmorph_tvm.artifact, so frontend and pass tests do not depend
    on later stages. Returns a list of numpy arrays (main's tuple flattened).
    """
    import tvm
    from tvm import relax

    target = tvm.target.Target(target or {"kind": "llvm"})
    with target:
        lowered = relax.get_pipeline("zero")(mod)
    vm = relax.VirtualMachine(tvm.compile(lowered, target=target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs])
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [o.numpy() for o in out]


class TinyCNN(nn.Module):
    """Conv + global mean + linear: the smallest model that exercises a real build."""

    def __init__(self, classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def randomize_batch_norm(bn: nn.Module, gen: torch.Generator) -> None:
    """Seeded affine parameters and running statistics for one batch-norm layer, so that eval-mode
    BN is a real affine map (the defaults, mean 0 / var 1 / weight 1 / bias 0, would hide folding bugs)."""
    with torch.no_grad():
        n = bn.num_features
        bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        bn.bias.copy_(torch.rand(n, generator=gen) - 0.5)
        bn.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
        bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """``randomize_batch_norm`` on every BatchNorm1d/2d of ``model``, in module order, from one
    generator seeded with ``seed``; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for sub in model.modules():
        if isinstance(sub, (nn.BatchNorm1d, nn.BatchNorm2d)):
            randomize_batch_norm(sub, gen)
    return model.eval()


def onnx_model(nodes, inputs, outputs, initializers=(), opset: int = 17):
    """A tiny ONNX ModelProto: ``inputs``/``outputs`` are (name, elem_type, shape) triples, shape
    entries None or a string for symbolic dims; ``initializers`` are (name, numpy array) pairs."""
    from onnx import helper, numpy_helper

    def info(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, shape)

    graph = helper.make_graph(list(nodes), "g", [info(*i) for i in inputs], [info(*o) for o in outputs],
                              [numpy_helper.from_array(np.asarray(a), n) for n, a in initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
def matmul_relu_module(batch: int = 4, features: int = 8, outputs: int = 3):
    """``main(x) = relu(x @ ones)``: a one-kernel Relax module for build/export tests."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, features), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.relu(relax.op.matmul(x, relax.const(np.ones((features, outputs), "float32")))))
        bb.emit_func_output(y)
    return bb.get()


def fake_libcuda(directory: Path) -> Path | None:
    """A stand-in ``libcuda.so.1`` in ``directory`` (every call fails: no device), so the TVM CUDA
    runtime loads on a machine without a GPU driver; None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    stub = directory / "fake_cuda.c"
    stub.write_text(
        "#define STUB(n) int n() { return 100; }\n"
        "STUB(cuDeviceGetName) STUB(cuFuncSetAttribute) STUB(cuLaunchKernelEx) STUB(cuModuleGetFunction)\n"
        "STUB(cuModuleLoadData) STUB(cuModuleUnload) STUB(cuTensorMapEncodeTiled)\n"
        "int cuGetErrorName(int e, const char** s) { *s = \"CUDA_ERROR_NO_DEVICE\"; return 0; }\n"
        "int cuGetErrorString(int e, const char** s) { *s = \"no device\"; return 0; }\n"
    )
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(directory / "libcuda.so.1"), str(stub), "-Wl,-soname,libcuda.so.1"],
                   check=True)
    return directory / "libcuda.so.1"


def copy_artifact(library: Path, into: Path) -> Path:
    """A copy of an exported artifact (library, manifest, external weights) in ``into``."""
    copy = into / library.name
    shutil.copy(library, copy)
    shutil.copy(manifest_path_for(library), manifest_path_for(copy))
    shutil.copy(weights_path_for(library), weights_path_for(copy))
    return copy
