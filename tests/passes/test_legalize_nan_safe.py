"""NaN and +-inf inputs give what onnxruntime / PyTorch give (LegalizeNaNSafe + Clip import)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import onnx_model
from onnx import TensorProto, helper
from torch import nn

import gmorph_tvm

F = TensorProto.FLOAT
S = [1, 2, 4, 4]


def _special_input() -> np.ndarray:
    x = np.random.default_rng(0).standard_normal(S).astype(np.float32)
    flat = x.reshape(-1)
    flat[[0, 9, 21]] = np.nan
    flat[[1, 6, 17]] = np.inf
    flat[[2, 7, 30]] = -np.inf
    flat[[3, 10, 25]] = 3e38
    flat[[4, 11]] = -3e38
    return x


def _all_nan() -> np.ndarray:
    return np.full(S, np.nan, np.float32)


@pytest.fixture(scope="module")
def onnx_case():
    n = helper.make_node
    nodes = [
        n("Relu", ["x"], ["relu"]),
        n("Clip", ["x", "lo", "hi"], ["clip"]),
        n("HardSigmoid", ["x"], ["hardsigmoid"]),
        n("Max", ["x", "half"], ["max"]),
        n("Min", ["x", "half"], ["min"]),
        n("MaxPool", ["x"], ["maxpool"], kernel_shape=[2, 2], strides=[2, 2]),
        n("Softmax", ["x"], ["softmax"], axis=-1),
        n("Sigmoid", ["x"], ["sigmoid"]),
        n("LeakyRelu", ["x"], ["leaky"], alpha=0.1),
    ]
    outs = [(o, F, [1, 2, 2, 2] if o == "maxpool" else S) for o in
            ("relu", "clip", "hardsigmoid", "max", "min", "maxpool", "softmax", "sigmoid", "leaky")]
    model = onnx_model(nodes, [("x", F, S)], outs,
                       [("lo", np.float32(0)), ("hi", np.float32(6)), ("half", np.float32(0.5))])
    art = gmorph_tvm.build(gmorph_tvm.import_models({"t": model}))
    return model, art, [o[0] for o in outs]


@pytest.mark.parametrize("make", [_special_input, _all_nan])
def test_onnx_ops_match_onnxruntime_on_nan_and_inf(onnx_case, make):
    model, art, names = onnx_case
    x = make()
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    got = art.run(x)["t"]
    for name, want, have in zip(names, expected, got):
        if name == "maxpool":  # onnxruntime keeps a window's NaN only where it comes first; PyTorch always
            windows = x.reshape(1, 2, 2, 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(1, 2, 2, 2, 4)
            want = np.where(np.isnan(windows).any(-1), np.nan, want)
        np.testing.assert_array_equal(np.isnan(have), np.isnan(want), err_msg=f"NaN positions of {name}")
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)


class TorchOps(nn.Module):
    def forward(self, x):
        half = torch.full_like(x, 0.5)
        return (torch.relu(x), nn.functional.relu6(x), torch.clamp(x, -1.0, 1.0), torch.maximum(x, half),
                torch.minimum(x, half), torch.max(x).reshape(1), torch.min(x).reshape(1),
                nn.functional.max_pool2d(x, 2), torch.softmax(x, -1), nn.functional.hardtanh(x))


@pytest.mark.parametrize("make", [_special_input, _all_nan])
def test_torch_ops_match_pytorch_on_nan_and_inf(make):
    x = torch.from_numpy(make())
    model = TorchOps().eval()
    art = gmorph_tvm.build(gmorph_tvm.import_models({"t": model}, example_inputs=torch.zeros(S)))
    got = art.run(x.numpy())["t"]
    with torch.no_grad():
        expected = [e.numpy() for e in model(x)]
    for i, (want, have) in enumerate(zip(expected, got)):
        np.testing.assert_array_equal(np.isnan(have), np.isnan(want), err_msg=f"NaN positions of output {i}")
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=f"output {i}")


def test_integer_max_still_lowers():
    class IntMax(nn.Module):
        def forward(self, x):
            return torch.relu(x), torch.max(x).reshape(1)

    x = torch.tensor([[-3, 5, 2], [7, -1, 0]], dtype=torch.int64)
    art = gmorph_tvm.build(gmorph_tvm.import_models({"t": IntMax()}, example_inputs=x))
    relu, amax = art.run(x.numpy())["t"]
    assert relu.tolist() == [[0, 5, 2], [7, 0, 0]] and amax.tolist() == [7]


def test_clip_with_low_above_high_gives_high():
    """clamp(x, 2, 1) is 1 everywhere (torch.clamp, onnxruntime's Clip); NaN stays NaN."""
    from tvm import relax

    from gmorph_tvm.passes import LegalizeNaNSafe

    x = relax.Var("x", relax.TensorType((5,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        out = bb.emit(relax.op.clip(x, 2.0, 1.0))
        bb.emit_func_output(out)
    import tvm

    ex = tvm.compile(LegalizeNaNSafe()(bb.get()), "llvm")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(
        np.array([np.nan, -5, 1.5, 5, np.inf], np.float32))).numpy()
    want = torch.clamp(torch.tensor([np.nan, -5, 1.5, 5, np.inf]), 2.0, 1.0).numpy()
    np.testing.assert_array_equal(got, want)
