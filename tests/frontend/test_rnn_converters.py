"""LSTM / GRU converters (gmorph_tvm/frontend/onnx_ops) against onnxruntime, within 1e-5.

Models are built with onnx.helper (every attribute the converters read) or exported from
torch.nn.LSTM / GRU; the imported module must hold no LSTM/GRU op of its own, only the unrolled
matmuls and elementwise ops.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tvm
from helpers import run_relax
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from gmorph_tvm import import_models

SEQ, BATCH, INPUT, HIDDEN = 3, 2, 4, 5


def _rnn_model(op: str, *, direction="forward", layout=0, bias=True, initial=True, peepholes=False,
               clip=None, activations=None, alphas=None, betas=None, linear_before_reset=None, seed=0):
    gates = 4 if op == "LSTM" else 3
    dirs = 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (dirs, gates * HIDDEN, INPUT)).astype("float32"), "W"),
        numpy_helper.from_array(rng.normal(0, 0.5, (dirs, gates * HIDDEN, HIDDEN)).astype("float32"), "R"),
    ]
    names = ["x", "W", "R", "", "", "", "", ""]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (dirs, 2 * gates * HIDDEN)).astype("float32"), "B"))
        names[3] = "B"
    state = [BATCH, dirs, HIDDEN] if layout else [dirs, BATCH, HIDDEN]
    if initial:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, state).astype("float32"), "h0"))
        names[5] = "h0"
        if op == "LSTM":
            inits.append(numpy_helper.from_array(rng.normal(0, 0.5, state).astype("float32"), "c0"))
            names[6] = "c0"
    if peepholes:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (dirs, 3 * HIDDEN)).astype("float32"), "P"))
        names[7] = "P"
    while names[-1] == "":
        names.pop()
    attrs = {"hidden_size": HIDDEN, "direction": direction}
    if layout:
        attrs["layout"] = 1
    if clip is not None:
        attrs["clip"] = clip
    if activations is not None:
        attrs["activations"] = activations
    if alphas is not None:
        attrs["activation_alpha"] = alphas
    if betas is not None:
        attrs["activation_beta"] = betas
    if linear_before_reset is not None:
        attrs["linear_before_reset"] = linear_before_reset
    outs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    node = helper.make_node(op, names, outs, name=f"my_{op.lower()}", **attrs)
    x_shape = [BATCH, SEQ, INPUT] if layout else [SEQ, BATCH, INPUT]
    y_shape = [BATCH, SEQ, dirs, HIDDEN] if layout else [SEQ, dirs, BATCH, HIDDEN]
    graph = helper.make_graph(
        [node], "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, y_shape if o == "Y" else state) for o in outs], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, x_shape


PLAIN_OPS = {f"relax.{name}" for name in (
    "matmul", "add", "subtract", "multiply", "divide", "sigmoid", "tanh", "nn.relu", "clip", "split", "squeeze",
    "expand_dims", "concat", "permute_dims", "strided_slice", "zeros", "where", "greater", "greater_equal", "abs",
    "exp", "log", "reshape",
)}


def _relax_ops(mod) -> list[str]:
    ops = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            ops.append(expr.op.name)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return ops


def _time_major_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """A layout-1 (batch-major) RNN model rewritten as layout 0 between transposes.

    onnxruntime runs only layout 0, so this is the reference for the converters' layout 1.
    """
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    rnn = ref.graph.node[0]
    for attr in rnn.attribute:
        if attr.name == "layout":
            attr.i = 0
    nodes = []
    for pos, name in enumerate(rnn.input):
        if name and pos in (0, 5, 6):  # X, initial_h, initial_c
            nodes.append(helper.make_node("Transpose", [name], [f"{name}_t"], perm=[1, 0, 2]))
            rnn.input[pos] = f"{name}_t"
    nodes.append(rnn)
    outs = list(rnn.output)
    for pos, name in enumerate(outs):
        nodes.append(helper.make_node("Transpose", [f"{name}_t"], [name], perm=[2, 0, 1, 3] if pos == 0 else [1, 0, 2]))
        rnn.output[pos] = f"{name}_t"
    del ref.graph.node[:]
    ref.graph.node.extend(nodes)
    onnx.checker.check_model(ref)
    return ref


def _check_against_ort(model: onnx.ModelProto, x: np.ndarray, tol: float = 1e-5) -> None:
    layout1 = any(a.name == "layout" and a.i == 1 for n in model.graph.node for a in n.attribute)
    reference = _time_major_reference(model) if layout1 else model
    mm = import_models({"rnn": model})
    ops = _relax_ops(mm.mod)
    assert ops.count("relax.matmul") >= SEQ + 1  # one input projection, one recurrence matmul per step
    assert set(ops) <= PLAIN_OPS, set(ops) - PLAIN_OPS
    got = run_relax(mm.bound_module(), [x])
    want = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


LSTM_CASES = {
    "forward": {},
    "reverse": {"direction": "reverse"},
    "bidirectional": {"direction": "bidirectional"},
    "no_bias_no_state": {"bias": False, "initial": False},
    "layout1_bidirectional": {"direction": "bidirectional", "layout": 1},
    "peepholes_clip": {"peepholes": True, "clip": 0.7},
    "activations": {"direction": "bidirectional", "activations": ["HardSigmoid", "LeakyRelu", "Tanh", "Sigmoid", "Softsign", "Affine"],
                    "alphas": [0.3, 0.2, 0.9], "betas": [0.4, 0.1]},
}


@pytest.mark.parametrize("case", list(LSTM_CASES))
def test_lstm_matches_onnxruntime(case):
    model, shape = _rnn_model("LSTM", **LSTM_CASES[case])
    _check_against_ort(model, np.random.default_rng(1).normal(size=shape).astype("float32"))


GRU_CASES = {
    "forward": {},
    "reverse_linear_before_reset": {"direction": "reverse", "linear_before_reset": 1},
    "bidirectional": {"direction": "bidirectional"},
    "bidirectional_linear_before_reset_layout1": {"direction": "bidirectional", "linear_before_reset": 1, "layout": 1},
    "no_bias_no_state_clip": {"bias": False, "initial": False, "clip": 0.5},
    "activations": {"activations": ["Relu", "ScaledTanh"], "alphas": [0.8], "betas": [1.5]},
}


@pytest.mark.parametrize("case", list(GRU_CASES))
def test_gru_matches_onnxruntime(case):
    model, shape = _rnn_model("GRU", **GRU_CASES[case])
    _check_against_ort(model, np.random.default_rng(2).normal(size=shape).astype("float32"))


class _TorchRNN(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
        self.rnn = cls(INPUT, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
        self.head = torch.nn.Linear(2 * HIDDEN, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_torch_exported_two_layer_bidirectional_rnn_matches(kind, tmp_path):
    model = _TorchRNN(kind).eval()
    x = torch.randn(BATCH, SEQ, INPUT)
    path = tmp_path / f"{kind}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert kind.upper() in ops
    _check_against_ort(onnx.load(str(path)), x.numpy())
    with torch.no_grad():
        expected = model(x).numpy()
    got = run_relax(import_models({"m": str(path)}).bound_module(), [x.numpy()])[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_sequence_lens_shorter_than_the_sequence_is_a_clear_error():
    model, _ = _rnn_model("GRU")
    lens = numpy_helper.from_array(np.array([SEQ, SEQ - 1], dtype="int32"), "lens")
    model.graph.initializer.append(lens)
    node = model.graph.node[0]
    node.input[4:4] = ["lens"] if len(node.input) <= 4 else []
    node.input[4] = "lens"
    with pytest.raises(Exception, match=r"node 'my_gru' \(GRU\).*sequence_lens"):
        import_models({"rnn": model})
