"""CanonicalizeOps: one spelling per op (out_dtype, axes, operand order, epsilon, constant layout),
batch-norm folding bit-identical to torch's ONNX export, exact numerics for every other rewrite."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
import tvm
from helpers import randomize_batch_norms
from onnx import numpy_helper
from random_models import assert_close, run_module
from torch import nn
from tvm import relax

from gmorph_tvm import import_models
from gmorph_tvm.frontend import params_of
from gmorph_tvm.passes import CanonicalizeOps
from gmorph_tvm.passes._util import count_ops, provenance_of, weight_params

F32 = "float32"


def _t(shape, dtype=F32):
    return relax.TensorType(shape, dtype)


def _calls(mod, op_name):
    found = []

    def visit(node):
        if isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.Op) and node.op.name == op_name:
            found.append(node)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


def _build(params, emit, num_input=None, weights=()):
    """A module ``main(*params)`` whose dataflow body is ``emit(bb, *params)``."""
    bb = relax.BlockBuilder()
    with bb.function("main", list(params)):
        with bb.dataflow():
            out = bb.emit_output(emit(bb, *params))
        bb.emit_func_output(out)
    mod = bb.get()
    if num_input is not None:
        mod["main"] = mod["main"].with_attr("num_input", num_input).with_attr("params", list(weights))
    relax.analysis.well_formed(mod)
    return mod


def _run_exact(mod, inputs):
    target = tvm.target.Target({"kind": "llvm"})
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


def _rng_array(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(F32)


# ---- per-op spelling ------------------------------------------------------------------------------


def test_axes_become_positive_and_sorted_with_identical_results():
    x = relax.Var("x", _t((2, 3, 4, 5)))

    def emit(bb, x):
        m = bb.emit(relax.op.mean(x, axis=[-1, -2], keepdims=True))
        s = bb.emit(relax.op.sum(x, axis=None, keepdims=False))
        sm = bb.emit(relax.op.nn.softmax(x, axis=-1))
        c = bb.emit(relax.op.concat([sm, x], axis=-3))
        e = bb.emit(relax.op.expand_dims(m, axis=[-1, 0]))
        q = bb.emit(relax.op.squeeze(e, axis=[-1, 0]))
        sl = bb.emit(relax.op.strided_slice(c, axes=[-1, 1], begin=[1, 2], end=[4, 6], strides=[2, 1]))
        parts = bb.emit(relax.op.split(sl, 2, axis=-4))
        first = bb.emit(relax.TupleGetItem(parts, 0))
        return relax.Tuple([q, s, first])

    mod = _build([x], emit)
    canon = CanonicalizeOps()(mod)
    relax.analysis.well_formed(canon)
    assert [int(a) for a in _calls(canon, "relax.mean")[0].attrs.axis] == [2, 3]
    assert [int(a) for a in _calls(canon, "relax.sum")[0].attrs.axis] == [0, 1, 2, 3]
    assert int(_calls(canon, "relax.nn.softmax")[0].attrs.axis) == 3
    assert int(_calls(canon, "relax.concat")[0].attrs.axis) == 1
    assert [int(a) for a in _calls(canon, "relax.expand_dims")[0].attrs.axis] == [0, 5]
    assert [int(a) for a in _calls(canon, "relax.squeeze")[0].attrs.axis] == [0, 5]
    assert int(_calls(canon, "relax.split")[0].attrs.axis) == 0
    sl = _calls(canon, "relax.strided_slice")[0]
    assert [[int(v) for v in arg.fields] for arg in sl.args[1:]] == [[1, 3], [2, 1], [6, 4], [1, 2]]
    # Exact rewrites: bit-identical outputs, not merely close.
    inp = [_rng_array((2, 3, 4, 5))]
    for got, want in zip(_run_exact(canon, inp), _run_exact(mod, inp)):
        assert got.shape == want.shape and np.array_equal(got, want)


def test_out_dtype_filled_and_weight_operand_moved_second():
    x = relax.Var("x", _t((1, 4)))
    w = relax.Var("w", _t((4, 3)))
    b = relax.Var("b", _t((3,)))
    weights = [tvm.runtime.tensor(_rng_array((4, 3), 1)), tvm.runtime.tensor(_rng_array((3,), 2))]

    def emit(bb, x, w, b):
        wt = bb.emit(relax.op.permute_dims(w, [1, 0]))
        wt2 = bb.emit(relax.op.permute_dims(wt, [1, 0]))  # still weight-only: counts as a weight
        mm = bb.emit(relax.op.matmul(x, wt2))  # out_dtype unset, as ONNX spells it
        biased = bb.emit(relax.op.add(b, mm))  # bias first, as torch spells it
        scaled = bb.emit(relax.op.multiply(relax.const(np.full((3,), 0.5, F32)), biased))
        both = bb.emit(relax.op.add(scaled, biased))  # two activations: order kept
        return both

    mod = _build([x, w, b], emit, num_input=1, weights=weights)
    canon = CanonicalizeOps()(mod)
    relax.analysis.well_formed(canon)
    (mm,) = _calls(canon, "relax.matmul")
    assert str(mm.attrs.out_dtype) == F32
    adds = _calls(canon, "relax.add")
    bias_add = next(a for a in adds if isinstance(a.args[1], relax.Var) and a.args[1].name == "b")
    assert bias_add.args[1].same_as(canon["main"].params[2])
    (mul,) = _calls(canon, "relax.multiply")
    assert isinstance(mul.args[1], tvm.ir.GenericConst)
    activation_add = next(a for a in adds if a is not bias_add)
    assert not isinstance(activation_add.args[0], tvm.ir.GenericConst)
    inp = [_rng_array((1, 4), 3)]
    from gmorph_tvm.frontend import bind_weights

    assert np.array_equal(_run_exact(bind_weights(canon), inp)[0], _run_exact(bind_weights(mod), inp)[0])


def test_layout_ops_on_constants_are_folded_and_epsilon_rounded():
    x = relax.Var("x", _t((1, 4, 3, 3)))
    bias = relax.const(_rng_array((4,), 4))
    gamma, beta = relax.const(np.ones(3, F32)), relax.const(np.zeros(3, F32))

    def emit(bb, x):
        r = bb.emit(relax.op.reshape(bias, (1, 4, 1, 1)))
        y = bb.emit(relax.op.add(r, x))
        ln = bb.emit(relax.op.nn.layer_norm(y, gamma, beta, axes=[-1], epsilon=1e-5))
        return ln

    mod = _build([x], emit)
    canon = CanonicalizeOps()(mod)
    relax.analysis.well_formed(canon)
    assert not _calls(canon, "relax.reshape")
    (add,) = _calls(canon, "relax.add")
    assert isinstance(add.args[1], tvm.ir.GenericConst) and tuple(add.args[1].value.shape) == (1, 4, 1, 1)
    (ln,) = _calls(canon, "relax.nn.layer_norm")
    assert float(ln.attrs.epsilon) == float(np.float32(1e-5)) and [int(a) for a in ln.attrs.axes] == [3]
    inp = [_rng_array((1, 4, 3, 3), 5)]
    assert np.array_equal(_run_exact(canon, inp)[0], _run_exact(mod, inp)[0])


def test_clip_bounds_become_float64_values_of_the_data_dtype():
    """torch's relu6 (integer bounds), hardtanh (doubles) and an ONNX clamp (float32 1e-9) spell one clip."""
    from tvm.script import ir as I  # noqa: N812
    from tvm.script import relax as R  # noqa: N812
    from tvm.script import tirx as T  # noqa: N812

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")):
            with R.dataflow():
                a = R.clip(x, 0, 6)
                b = R.clip(x, T.float64(1e-9), T.float64("inf"))
                c = R.clip(x, T.float64(0.0), T.float64(6.0))
                out = (a, b, c)
                R.output(out)
            return out

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")):
            with R.dataflow():
                a = R.clip(x, T.float64(0.0), T.float64(6.0))
                b = R.clip(x, T.float64(float(np.float32(1e-9))), T.float64("inf"))
                c = R.clip(x, T.float64(0.0), T.float64(6.0))
                out = (a, b, c)
                R.output(out)
            return out

    canon = CanonicalizeOps()(Before)
    tvm.ir.assert_structural_equal(canon, Expected)
    inp = [np.array([[-1, 1e-10, 2], [5, 7, np.nan]], F32)]
    for got, want in zip(_run_exact(canon, inp), _run_exact(Before, inp)):
        np.testing.assert_array_equal(got, want)


# ---- batch-norm folding -------------------------------------------------------------------------------


class ConvBN(nn.Module):
    """conv+BN with and without conv bias, a 1-d conv+BN, and a BN the fold must leave alone."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6)
        self.c2, self.bn2 = nn.Conv2d(6, 5, 1, bias=False), nn.BatchNorm2d(5, eps=1e-3)
        self.c3, self.bn3 = nn.Conv2d(5, 5, 3, padding=1), nn.BatchNorm2d(5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = self.bn2(self.c2(y))
        z = self.c3(y)
        return self.bn3(z) + z  # the conv output is used twice: folding would duplicate the conv


@pytest.fixture(scope="module")
def conv_bn():
    torch.manual_seed(0)
    model = randomize_batch_norms(ConvBN())
    x = torch.randn(1, 3, 8, 8)
    return model, x, import_models({"a": model}, x)


def test_batch_norm_folds_into_conv_bit_identical_to_onnx_export(conv_bn):
    model, x, mm = conv_bn
    canon = CanonicalizeOps()(mm.mod)
    relax.analysis.well_formed(canon)
    ops = count_ops(canon)
    assert ops["relax.nn.batch_norm"] == 1  # bn3 kept: its conv output has another use
    assert ops["relax.nn.conv2d"] == 3
    params = params_of(canon)
    assert "a.c1.weight.bnfold" in params and "a.c2.weight.bnfold" in params
    assert "a.c1.weight" not in params and "a.bn1.running_var" not in params  # no longer used
    assert "a.c3.weight" in params and "a.bn3.running_var" in params
    func = canon["main"]
    assert len(func.attrs["params"]) == len(func.params) - int(func.attrs["num_input"])

    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
    initializers = [numpy_helper.to_array(i) for i in onnx.load_from_string(buf.getvalue()).graph.initializer]
    for name in ["a.c1.weight.bnfold", "a.c1.bias.bnfold", "a.c2.weight.bnfold", "a.bn2.bias.bnfold"]:
        value = params[name].numpy()
        assert any(i.shape == value.shape and i.tobytes() == value.tobytes() for i in initializers), name

    with torch.no_grad():
        expected = [model(x).numpy()]
    assert_close(run_module(canon, [x]), expected)


def test_folded_weights_keep_provenance(conv_bn):
    _, _, mm = conv_bn
    prov = provenance_of(CanonicalizeOps()(mm.mod))
    assert prov["a.c1.weight.bnfold"] == [("a", "c1.weight"), ("a", "bn1.weight"), ("a", "bn1.running_var")]
    assert prov["a.bn2.bias.bnfold"] == [
        ("a", "bn2.bias"), ("a", "bn2.weight"), ("a", "bn2.running_mean"), ("a", "bn2.running_var")
    ]
    assert prov["a.c3.weight"] == [("a", "c3.weight")]


def test_batch_norm_folds_with_bound_constants(conv_bn):
    model, x, mm = conv_bn
    bound = mm.bound_module()
    canon = CanonicalizeOps()(bound)
    relax.analysis.well_formed(canon)
    assert count_ops(canon)["relax.nn.batch_norm"] == 1
    assert not weight_params(canon["main"])
    with torch.no_grad():
        expected = [model(x).numpy()]
    assert_close(run_module(canon, [x]), expected)


def test_fold_is_skipped_where_it_would_break_sharing():
    """A frozen conv with fine-tuned BN stats: folding would make the conv weights differ."""
    torch.manual_seed(1)
    a = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), seed=1)
    b = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), seed=2)
    b[0].load_state_dict(a[0].state_dict())  # same conv, different BN statistics
    c = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), seed=3)
    c.load_state_dict(a.state_dict())  # c is an exact copy of a
    x = torch.randn(1, 3, 6, 6)
    mm = import_models({"a": a, "b": b, "c": c}, x)
    ops = count_ops(CanonicalizeOps()(mm.mod))
    assert ops["relax.nn.batch_norm"] == 3 and ops["relax.nn.conv2d"] == 3
    # Without b, the copies fold identically (both folded, same folded weights).
    pair = import_models({"a": a, "c": c}, x)
    canon = CanonicalizeOps()(pair.mod)
    assert count_ops(canon)["relax.nn.batch_norm"] == 0
    params = params_of(canon)
    assert params["a.0.weight.bnfold"].numpy().tobytes() == params["c.0.weight.bnfold"].numpy().tobytes()


def test_training_batch_norm_and_non_dataflow_output():
    x = relax.Var("x", _t((1, 2, 4, 4)))
    w = relax.const(_rng_array((3, 2, 1, 1), 6))
    stats = [relax.const(np.abs(_rng_array((3,), s)) + 0.5) for s in range(4)]

    def body(training):
        bb = relax.BlockBuilder()
        with bb.function("main", [x]):
            with bb.dataflow():
                conv = bb.emit(relax.op.nn.conv2d(x, w))
                bn = bb.emit(relax.op.nn.batch_norm(conv, *stats, axis=1, training=training))
                out = bb.emit_output(relax.TupleGetItem(bn, 0))  # a non-dataflow var
            bb.emit_func_output(out)
        return bb.get()

    folded = CanonicalizeOps()(body(False))
    relax.analysis.well_formed(folded)
    assert count_ops(folded)["relax.nn.batch_norm"] == 0
    inp = [_rng_array((1, 2, 4, 4), 7)]
    assert_close(_run_exact(folded, inp), _run_exact(body(False), inp))
    kept = CanonicalizeOps()(body(True))
    assert count_ops(kept)["relax.nn.batch_norm"] == 1
    assert count_ops(CanonicalizeOps(fold_batch_norm=False)(body(False)))["relax.nn.batch_norm"] == 1


def test_conv1d_batch_norm_folds():
    torch.manual_seed(2)
    model = randomize_batch_norms(nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3), nn.ReLU()), seed=4)
    x = torch.randn(1, 2, 7)
    mm = import_models({"s": model}, x)
    canon = CanonicalizeOps()(mm.mod)
    relax.analysis.well_formed(canon)
    assert count_ops(canon)["relax.nn.batch_norm"] == 0 and count_ops(canon)["relax.nn.conv1d"] == 1
    with torch.no_grad():
        expected = [model(x).numpy()]
    assert_close(run_module(canon, [x]), expected)
