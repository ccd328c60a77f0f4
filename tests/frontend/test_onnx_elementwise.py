"""Exporter patterns import as the PyTorch importer's ops and compute what onnxruntime computes.

Each small ONNX graph is imported (``import_models``), its import clean-up applied
(``CanonicalizeOps``, which recomposes decompositions), its Relax ops checked (the op PyTorch's
importer emits, never ``stack``/``broadcast_to`` glue) and it is built for llvm and compared with
onnxruntime, with NaN and +-inf in the input where the op has a NaN rule.
"""

from __future__ import annotations

import collections

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tvm
import tvm_ffi
from helpers import onnx_model
from onnx import TensorProto, helper
from torch import nn
from tvm import relax

import gmorph_tvm
from gmorph_tvm.passes import CanonicalizeOps

F = TensorProto.FLOAT
S = [1, 3, 4, 5]
n = helper.make_node


def _ops(mod: tvm.IRModule) -> collections.Counter:
    found: collections.Counter = collections.Counter()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            found[str(expr.op.name).removeprefix("relax.")] += 1

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _input(shape=S, special: bool = True, seed: int = 0) -> np.ndarray:
    x = (np.random.default_rng(seed).standard_normal(shape) * 4).astype(np.float32)
    if special and x.size >= 10:
        flat = x.reshape(-1)
        flat[[0, 7]] = np.nan
        flat[[1, 8]] = np.inf
        flat[[2, 9]] = -np.inf
    return x


def _check(model, feeds: dict, *, ops: dict | None = None, absent=("stack", "broadcast_to"), rtol=1e-5,
           atol=1e-6) -> collections.Counter:
    mm = gmorph_tvm.import_models({"t": model})
    found = _ops(CanonicalizeOps()(mm.mod))
    for op in absent:
        assert found[op] == 0, (op, dict(found))
    for op, count in (ops or {}).items():
        assert found[op] == count, (op, dict(found))
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = gmorph_tvm.build(mm, "llvm").run(feeds)["t"]
    got = got if isinstance(got, list) else [got]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg="NaN positions")
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
    return found


def _op_sequence(func: relax.Function) -> list:
    """The function's calls in order: op, attrs and arguments (a parameter's position, an earlier
    call's position or a constant's value), so that var names and kinds do not matter."""
    where: dict = {p: ("param", i) for i, p in enumerate(func.params)}
    seq: list = []
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                args = []
                for arg in value.args:
                    if isinstance(arg, tvm.ir.GenericConst):
                        args.append(("const", arg.value.numpy().tolist()))
                    elif arg in where:
                        args.append(where[arg])
                    else:
                        args.append(("other", str(arg)))
                attrs = tvm_ffi.structural_hash(value.attrs) if value.attrs is not None else None
                seq.append((str(value.op.name), attrs, args))
                where[binding.var] = ("call", len(seq) - 1)
    return seq


def _same_as_torch(model, module: nn.Module, shape) -> None:
    """The ONNX graph's clean module computes with the torch module's ops (what the torch importer emits)."""
    mods = [gmorph_tvm.import_models({"t": model}).mod,
            gmorph_tvm.import_models({"t": module.eval()}, torch.zeros(shape)).mod]
    onnx_ops, torch_ops = (_op_sequence(CanonicalizeOps()(m)["main"]) for m in mods)
    assert onnx_ops == torch_ops, (onnx_ops, torch_ops)


# ---- Clip ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lo, hi", [(0.0, 6.0), (-1.0, 1.0), (None, 2.0), (-2.0, None), (np.nan, 1.0), (3.0, 1.0)])
def test_clip_with_constant_bounds_is_one_clip(lo, hi):
    inits, inputs = [], ["x"]
    for name, value in (("lo", lo), ("hi", hi)):
        if value is None:
            inputs.append("")
        else:
            inits.append((name, np.array(value, np.float32)))
            inputs.append(name)
    model = onnx_model([n("Clip", inputs, ["y"])], [("x", F, S)], [("y", F, S)], inits)
    found = _check(model, {"x": _input()}, ops={"clip": 1}, absent=("stack", "maximum", "minimum"))
    assert set(found) == {"clip"}
    if (lo, hi) == (0.0, 6.0):
        _same_as_torch(model, nn.ReLU6(), S)


def test_relu6_clip_bounds_are_no_weights():
    model = onnx_model([n("Clip", ["x", "lo", "hi"], ["y"])], [("x", F, S)], [("y", F, S)],
                       [("lo", np.array(0, np.float32)), ("hi", np.array(6, np.float32))])
    assert gmorph_tvm.import_models({"t": model}).params == {}


def test_clip_opset6_attributes():
    model = onnx_model([n("Clip", ["x"], ["y"], min=-0.5, max=0.5)], [("x", F, S)], [("y", F, S)], opset=6)
    _check(model, {"x": _input()}, ops={"clip": 1})


@pytest.mark.parametrize("lo_value", [0.25, np.nan, 9.0])
def test_clip_with_computed_bounds_is_maximum_minimum(lo_value):
    """Bounds from the graph: maximum/minimum with the bound (a NaN bound is no bound, lo > hi gives hi)."""
    nodes = [n("ReduceMean", ["l"], ["lo"], keepdims=0), n("Neg", ["lo"], ["neg"]), n("Abs", ["neg"], ["hi"]),
             n("Clip", ["x", "lo", "hi"], ["y"])]
    model = onnx_model(nodes, [("x", F, S), ("l", F, [1])], [("y", F, S)])
    feeds = {"x": _input(), "l": np.array([lo_value], np.float32)}
    found = _check(model, feeds, ops={"maximum": 1, "minimum": 1})
    assert "call_tir" not in found


def test_integer_clip():
    model = onnx_model([n("Clip", ["x", "lo", "hi"], ["y"])], [("x", TensorProto.INT64, [6])],
                       [("y", TensorProto.INT64, [6])],
                       [("lo", np.array(-2, np.int64)), ("hi", np.array(3, np.int64))])
    _check(model, {"x": np.array([-9, -2, 0, 2, 3, 7], np.int64)}, ops={"clip": 1})


# ---- variadic Max / Min / Sum / Mean ------------------------------------------------------------


@pytest.mark.parametrize("op, binary", [("Max", "maximum"), ("Min", "minimum"), ("Sum", "add"), ("Mean", "add")])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_variadic_ops_are_binary_chains(op, binary, count):
    names = ["a", "b", "c"][:count]
    shapes = {"a": S, "b": [1, 3, 1, 5], "c": [5]}
    inputs = [(name, F, shapes[name]) for name in names]
    model = onnx_model([n(op, names, ["y"])], inputs, [("y", F, S if count == 1 else S)])
    feeds = {name: _input(shapes[name], special=(op in ("Max", "Min")), seed=i) for i, name in enumerate(names)}
    _check(model, feeds, ops={binary: count - 1}, absent=("stack", "max", "min", "sum", "mean"), rtol=0, atol=0)


# ---- activations --------------------------------------------------------------------------------


def _hardswish_ops() -> dict:
    return {"clip": 1, "divide": 1, "multiply": 1, "add": 1}


@pytest.mark.parametrize("spelling", ["op", "hardsigmoid_mul", "paddle", "div_inside", "reciprocal"])
def test_hardswish_spellings_become_torchs_hardswish(spelling):
    consts = [("three", np.array(3, np.float32)), ("zero", np.array(0, np.float32)),
              ("six", np.array(6, np.float32)), ("sixth", np.array(1 / 6, np.float32))]
    if spelling == "op":
        nodes, opset, consts = [n("HardSwish", ["x"], ["y"])], 14, []
    elif spelling == "hardsigmoid_mul":  # torch's exporter before opset 14; PaddlePaddle's alpha 0.1666667
        nodes, opset, consts = [n("HardSigmoid", ["x"], ["h"], alpha=0.1666667, beta=0.5),
                                n("Mul", ["x", "h"], ["y"])], 13, []
    else:
        nodes = [n("Add", ["x", "three"], ["s"]), n("Clip", ["s", "zero", "six"], ["c"])]
        if spelling == "paddle":  # x * clip(x + 3, 0, 6) / 6
            nodes += [n("Mul", ["x", "c"], ["m"]), n("Div", ["m", "six"], ["y"])]
        elif spelling == "div_inside":  # x * (clip(x + 3, 0, 6) / 6)
            nodes += [n("Div", ["c", "six"], ["d"]), n("Mul", ["x", "d"], ["y"])]
        else:  # clip(x + 3, 0, 6) * (1/6) * x
            nodes += [n("Mul", ["c", "sixth"], ["d"]), n("Mul", ["d", "x"], ["y"])]
        opset = 17
    model = onnx_model(nodes, [("x", F, S)], [("y", F, S)], consts, opset=opset)
    _check(model, {"x": _input()}, ops=_hardswish_ops())
    _same_as_torch(model, nn.Hardswish(), S)


@pytest.mark.parametrize("alpha, torch_form", [(0.1666667, True), (0.2, False)])
def test_hardsigmoid(alpha, torch_form):
    model = onnx_model([n("HardSigmoid", ["x"], ["y"], alpha=alpha, beta=0.5)], [("x", F, S)], [("y", F, S)])
    found = _check(model, {"x": _input()}, ops={"clip": 1})
    assert (found["divide"] == 1 and found["add"] == 1) if torch_form else found["multiply"] == 1
    if torch_form:
        _same_as_torch(model, nn.Hardsigmoid(), S)


def test_silu_is_one_op():
    model = onnx_model([n("Sigmoid", ["x"], ["s"]), n("Mul", ["x", "s"], ["y"])], [("x", F, S)], [("y", F, S)])
    found = _check(model, {"x": _input()}, ops={"nn.silu": 1})
    assert set(found) == {"nn.silu"}
    _same_as_torch(model, nn.SiLU(), S)


def test_gelu_erf_as_torchs_legacy_exporter_writes_it():
    nodes = [n("Div", ["x", "sqrt2"], ["d"]), n("Erf", ["d"], ["e"]), n("Add", ["e", "one"], ["a"]),
             n("Mul", ["x", "a"], ["m"]), n("Mul", ["m", "half"], ["y"])]
    consts = [("sqrt2", np.array(1.4142135381698608, np.float32)), ("one", np.array(1, np.float32)),
              ("half", np.array(0.5, np.float32))]
    model = onnx_model(nodes, [("x", F, S)], [("y", F, S)], consts)
    found = _check(model, {"x": _input()}, ops={"nn.gelu": 1})
    assert set(found) == {"nn.gelu"}
    _same_as_torch(model, nn.GELU(), S)


def test_gelu_tanh_as_onnxscript_writes_it():
    nodes = [n("Pow", ["x", "three"], ["c"]), n("Mul", ["k", "c"], ["kc"]), n("Add", ["x", "kc"], ["s"]),
             n("Mul", ["r", "s"], ["z"]), n("Tanh", ["z"], ["t"]), n("Add", ["t", "one"], ["a"]),
             n("Mul", ["half", "a"], ["h"]), n("Mul", ["x", "h"], ["y"])]
    consts = [("three", np.array(3, np.float32)), ("k", np.array(0.044715, np.float32)),
              ("r", np.array(np.sqrt(2 / np.pi), np.float32)), ("one", np.array(1, np.float32)),
              ("half", np.array(0.5, np.float32))]
    model = onnx_model(nodes, [("x", F, S)], [("y", F, S)], consts)
    found = _check(model, {"x": _input()}, ops={"nn.gelu_tanh": 1})
    assert set(found) == {"nn.gelu_tanh"}
    _same_as_torch(model, nn.GELU(approximate="tanh"), S)


# ---- normalisations and softmax ------------------------------------------------------------------

T = [2, 6, 16]


def _layer_norm_nodes(affine: bool, square: str, scale: str) -> tuple[list, list]:
    nodes = [n("ReduceMean", ["x"], ["m"], axes=[-1]), n("Sub", ["x", "m"], ["d"])]
    nodes.append(n("Pow", ["d", "two"], ["q"]) if square == "pow" else n("Mul", ["d", "d"], ["q"]))
    nodes += [n("ReduceMean", ["q"], ["v"], axes=[-1]), n("Add", ["v", "eps"], ["ve"]), n("Sqrt", ["ve"], ["s"])]
    if scale == "div":
        nodes.append(n("Div", ["d", "s"], ["nrm"]))
    else:
        nodes += [n("Reciprocal", ["s"], ["r"]), n("Mul", ["d", "r"], ["nrm"])]
    consts = [("two", np.array(2, np.float32)), ("eps", np.array(1e-5, np.float32))]
    if affine:
        nodes += [n("Mul", ["nrm", "gamma"], ["g"]), n("Add", ["g", "beta"], ["y"])]
        rng = np.random.default_rng(3)
        consts += [("gamma", rng.standard_normal(T[-1]).astype(np.float32)),
                   ("beta", rng.standard_normal(T[-1]).astype(np.float32))]
    else:
        nodes.append(n("Identity", ["nrm"], ["y"]))
    return nodes, consts


@pytest.mark.parametrize("affine, square, scale", [(True, "pow", "div"), (False, "mul", "div"), (True, "mul", "recip")])
def test_layer_norm_decompositions_are_one_layer_norm(affine, square, scale):
    nodes, consts = _layer_norm_nodes(affine, square, scale)
    model = onnx_model(nodes, [("x", F, T)], [("y", F, T)], consts, opset=17)
    found = _check(model, {"x": _input(T, special=False)}, ops={"nn.layer_norm": 1}, rtol=1e-4, atol=1e-5)
    assert set(found) == {"nn.layer_norm"}, dict(found)


def test_rms_norm_decomposition_is_one_rms_norm():
    nodes = [n("Pow", ["x", "two"], ["q"]), n("ReduceMean", ["q"], ["v"], axes=[-1]), n("Add", ["v", "eps"], ["ve"]),
             n("Sqrt", ["ve"], ["s"]), n("Div", ["x", "s"], ["nrm"]), n("Mul", ["nrm", "gamma"], ["y"])]
    consts = [("two", np.array(2, np.float32)), ("eps", np.array(1e-6, np.float32)),
              ("gamma", np.linspace(0.5, 1.5, T[-1], dtype=np.float32))]
    model = onnx_model(nodes, [("x", F, T)], [("y", F, T)], consts, opset=17)
    found = _check(model, {"x": _input(T, special=False)}, ops={"nn.rms_norm": 1}, rtol=1e-4, atol=1e-5)
    assert set(found) == {"nn.rms_norm"}, dict(found)


@pytest.mark.parametrize("stable", [True, False])
def test_softmax_decomposition_is_one_softmax(stable):
    nodes = []
    if stable:
        nodes += [n("ReduceMax", ["x"], ["mx"], axes=[-1]), n("Sub", ["x", "mx"], ["sh"]), n("Exp", ["sh"], ["e"])]
    else:
        nodes.append(n("Exp", ["x"], ["e"]))
    nodes += [n("ReduceSum", ["e", "axes"], ["s"], keepdims=1), n("Div", ["e", "s"], ["y"])]
    model = onnx_model(nodes, [("x", F, T)], [("y", F, T)], [("axes", np.array([-1], np.int64))], opset=17)
    found = _check(model, {"x": _input(T, special=False)}, ops={"nn.softmax": 1})
    assert set(found) == {"nn.softmax"}, dict(found)
    _same_as_torch(model, nn.Softmax(-1), T)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_opset11_softmax_over_the_last_axis_has_no_reshapes(op):
    model = onnx_model([n(op, ["x"], ["y"], axis=2)], [("x", F, T)], [("y", F, T)], opset=11)
    found = _check(model, {"x": _input(T, special=False)})
    assert set(found) == {"nn.softmax" if op == "Softmax" else "nn.log_softmax"}, dict(found)


def test_opset11_softmax_over_an_inner_axis_keeps_onnx_semantics():
    model = onnx_model([n("Softmax", ["x"], ["y"], axis=1)], [("x", F, T)], [("y", F, T)], opset=11)
    _check(model, {"x": _input(T, special=False)})


def test_stack_glue_from_tvms_own_converter_is_recomposed():
    """A module made by TVM's own ``from_onnx`` (variadic Max as broadcast_to + stack + max) is
    rewritten by the import clean-up too."""
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx_model([n("Max", ["a", "b", "c"], ["y"])], [("a", F, S), ("b", F, [1, 3, 1, 5]), ("c", F, [5])],
                       [("y", F, S)])
    mod = from_onnx(model, shape_dict={"a": S, "b": [1, 3, 1, 5], "c": [5]})
    assert _ops(mod)["stack"] == 1
    found = _ops(CanonicalizeOps()(mod))
    assert found["stack"] == 0 and found["max"] == 0 and found["maximum"] == 2, dict(found)
    feeds = [_input(S, special=False, seed=1), _input([1, 3, 1, 5], special=False, seed=2), _input([5], seed=3)]
    ex = tvm.compile(CanonicalizeOps()(mod), "llvm")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in feeds]).numpy()
    np.testing.assert_array_equal(got, np.maximum(np.maximum(feeds[0], feeds[1]), feeds[2]))
