"""ChannelsLast: NCHW convs become NHWC / OHWI, constant weight transposes folded, results kept."""

from __future__ import annotations

import numpy as np
import tvm
from helpers import run_relax
from tvm import relax

from gmorph_tvm import import_models
from gmorph_tvm.data import fashion_mnist
from gmorph_tvm.passes import ChannelsLast
from gmorph_tvm.pipeline import fuse_lossless
from gmorph_tvm.zoo import pretrained


def _conv_relu():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 9, 9), "float32"))
    w = relax.Var("w", relax.TensorType((8, 4, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, padding=1, out_dtype="float32"))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(out)
    return bb.get()


def _conv_relu_nhwc():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 9, 9), "float32"))
    w = relax.Var("w", relax.TensorType((8, 4, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            xt = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
            wt = bb.emit(relax.op.permute_dims(w, [0, 2, 3, 1]))
            y = bb.emit(relax.op.nn.conv2d(xt, wt, padding=1, data_layout="NHWC", kernel_layout="OHWI",
                                           out_layout="NHWC", out_dtype="float32"))
            r = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(relax.op.permute_dims(r, [0, 3, 1, 2]))
        bb.emit_func_output(out)
    return bb.get()


def test_conv_becomes_nhwc_with_the_layout_carried_through_relu():
    tvm.ir.assert_structural_equal(ChannelsLast()(_conv_relu()), _conv_relu_nhwc())


def _calls(mod: tvm.IRModule, op: str) -> list[relax.Call]:
    found: list[relax.Call] = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call) and getattr(e.op, "name", "") == op else None)
    return found


def test_real_fused_set_keeps_its_results_and_stores_ohwi_weights():
    """Four trained Fashion-MNIST CNNs of different shapes (set C), fused with grouped merged convs:
    every conv NHWC, no weight transposed at run time, outputs equal to the NCHW module's."""
    x = fashion_mnist.load_split("test", limit=2).images.contiguous()
    bound = fuse_lossless(import_models(pretrained.fmnist_netfuse_set(4), x)).bound_module()
    converted = ChannelsLast()(bound)
    convs = _calls(converted, "relax.nn.conv2d")
    assert convs and len(convs) == len(_calls(bound, "relax.nn.conv2d"))
    assert all(str(c.attrs.data_layout) == "NHWC" and str(c.attrs.kernel_layout) == "OHWI" for c in convs)
    assert all(isinstance(c.args[1], tvm.ir.GenericConst) for c in convs), "a weight transpose was left for run time"
    assert not [p for p in _calls(converted, "relax.permute_dims") if isinstance(p.args[0], tvm.ir.GenericConst)]
    expected = run_relax(bound, [x.numpy()])
    got = run_relax(converted, [x.numpy()])
    assert len(got) == len(expected) == 4
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * float(np.abs(e).max()))
