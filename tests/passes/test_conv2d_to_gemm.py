"""Conv2dToGemm: same results as the conv on CPU; on CUDA no conv is left to dlight's weak rules."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.s_tir.dlight.analysis import get_root_block

from gmorph_tvm.passes import Conv2dToGemm
from gmorph_tvm.tuning import default_gpu_rules, lower, prepare

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}})


def _conv_module(x_shape, w_shape, **attrs) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    w = relax.Var("w", relax.TensorType(w_shape, "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, w, **attrs))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, *arrays):
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


CASES = [
    ((2, 8, 9, 9), (16, 8, 1, 1), {}),  # 1x1: reshape + matmul
    ((2, 8, 9, 9), (16, 8, 3, 3), {"padding": 1}),  # dense: left to dlight
    ((1, 8, 10, 11), (6, 4, 3, 3), {"strides": 2, "padding": (1, 2), "groups": 2, "dilation": 2}),
    ((1, 8, 12, 12), (16, 2, 3, 3), {"strides": (1, 2), "padding": (0, 1, 2, 1), "groups": 4}),
    ((2, 8, 9, 9), (8, 1, 3, 3), {"padding": 1, "groups": 8}),  # depthwise
    ((1, 4, 7, 7), (8, 1, 5, 5), {"strides": 2, "padding": 2, "groups": 4, "dilation": (1, 2)}),  # multiplier 2
]


@pytest.mark.parametrize("x_shape,w_shape,attrs", CASES)
def test_rewrite_matches_conv2d_on_cpu(x_shape, w_shape, attrs):
    mod = _conv_module(x_shape, w_shape, **attrs)
    rewritten = Conv2dToGemm()(mod)
    groups = attrs.get("groups", 1)
    dense_kxk = groups == 1 and w_shape[2:] != (1, 1)
    calls = rewritten.script()
    assert ("R.nn.conv2d" in calls) == dense_kxk
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype("float32")
    w = rng.standard_normal(w_shape).astype("float32")
    np.testing.assert_allclose(_run(rewritten, x, w), _run(mod, x, w), rtol=1e-5, atol=1e-5)


def _cnn() -> tvm.IRModule:
    """Dense, depthwise, pointwise and grouped convs with relus, then mean + dense; constant weights."""
    rng = np.random.default_rng(0)

    def const(*shape):
        return relax.const(rng.standard_normal(shape).astype("float32") * 0.2)

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 16, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, const(8, 3, 3, 3), padding=1)))
            h = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(h, const(8, 1, 3, 3), strides=2, padding=1, groups=8)))
            h = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(h, const(16, 8, 1, 1))))
            h = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(h, const(16, 4, 3, 3), padding=1, groups=4)))
            h = bb.emit(relax.op.mean(h, axis=[2, 3]))
            out = bb.emit_output(relax.op.add(relax.op.matmul(h, const(16, 4)), const(4)))
        bb.emit_func_output(out)
    return bb.get()


def _has_reduction(func: tvm.tirx.PrimFunc) -> bool:
    sch = tvm.s_tir.Schedule(func)
    pending = [get_root_block(sch)]
    while pending:
        for block in sch.get_child_blocks(pending.pop()):
            if any(int(iv.iter_type) == 2 for iv in sch.get(block).iter_vars):  # CommReduce
                return True
            pending.append(block)
    return False


def test_cuda_lowering_leaves_no_reduction_on_weak_rules():
    """The criterion: every kernel with a reduction block (a conv's or matmul's sum) is taken by
    dlight's Matmul, GEMV or Reduction rule. GeneralReduction (one output per thread block, the
    short conv reduction across threads) and Fallback (the reduction serial in one thread, no
    tiling) are allowed only for kernels without a reduction (elementwise, unfold, depthwise)."""
    prepared = prepare(_cnn(), CUDA)
    rules = default_gpu_rules(prepared, CUDA)
    kernels = {gv.name_hint: f for gv, f in prepared.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert set(rules) == set(kernels)
    weak = {name: rules[name] for name, f in kernels.items() if _has_reduction(f) and rules[name] in ("GeneralReduction", "Fallback")}
    assert not weak, f"reductions left on weak dlight rules: {weak}"
    assert any(rule == "Matmul" for rule in rules.values())


def test_cuda_lowering_without_the_rewrite_puts_grouped_convs_on_general_reduction():
    """What the rewrite fixes (guards the test above from passing vacuously)."""
    with CUDA:
        plain = tvm.transform.Sequential(
            [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(), relax.get_pipeline("zero")]
        )(_cnn())
    rules = default_gpu_rules(plain, CUDA)
    assert sorted(name for name, rule in rules.items() if rule == "GeneralReduction" and "conv2d" in name)


def test_cuda_lowered_cnn_compiles_for_sm90():
    executable = tvm.compile(lower(_cnn(), CUDA), target=CUDA)
    assert executable is not None


def test_depthwise_kernel_takes_its_epilogue_but_not_its_producers():
    """A producer inlined into the depthwise kernel would be recomputed by each of its 9 taps (and a
    MobileNet's hardswish chains made TVM's simplifier take ~100 s per kernel)."""
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 14, 14), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.clip(relax.op.add(x, relax.const(3.0)), 0.0, 6.0))  # a producer chain
            w = relax.const(rng.standard_normal((8, 1, 3, 3)).astype("float32"))
            h = bb.emit(relax.op.nn.conv2d(h, w, padding=1, groups=8))
            out = bb.emit_output(relax.op.clip(h, 0.0, 6.0))  # an epilogue
        bb.emit_func_output(out)
    prepared = prepare(bb.get(), CUDA)
    names = [gv.name_hint for gv in prepared.get_global_vars() if "depthwise" in gv.name_hint]
    assert names == ["fused_depthwise_conv_clip"], names  # not fused_add_clip_depthwise_conv_clip1
    x_np = rng.standard_normal((1, 8, 14, 14)).astype("float32")
    want = _run(bb.get(), x_np)
    np.testing.assert_allclose(_run(Conv2dToGemm()(bb.get()), x_np), want, rtol=1e-5, atol=1e-5)
