"""ChannelsLast: NCHW convs become NHWC / OHWI, constant weight transposes folded, results kept."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from helpers import run_relax
from tvm import relax

from gmorph_tvm import import_models
from gmorph_tvm.data import fashion_mnist
from gmorph_tvm.passes import ChannelsLast, ChannelsLastWarning
from gmorph_tvm.pipeline import fuse_lossless
from gmorph_tvm.zoo import pretrained


def _conv_then(activation, nhwc: bool) -> tvm.IRModule:
    """conv2d(x, w) then ``activation(bb, y)``; ``nhwc``: as ChannelsLast should write it."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 9, 9), "float32"))
    w = relax.Var("w", relax.TensorType((8, 4, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            if nhwc:
                xt = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
                wt = bb.emit(relax.op.permute_dims(w, [0, 2, 3, 1]))
                y = bb.emit(relax.op.nn.conv2d(xt, wt, padding=1, data_layout="NHWC", kernel_layout="OHWI",
                                               out_layout="NHWC", out_dtype="float32"))
                out = bb.emit_output(relax.op.permute_dims(activation(bb, y), [0, 3, 1, 2]))
            else:
                y = bb.emit(relax.op.nn.conv2d(x, w, padding=1, out_dtype="float32"))
                out = bb.emit_output(activation(bb, y))
        bb.emit_func_output(out)
    return bb.get()


def _relu(bb, y):
    return bb.emit(relax.op.nn.relu(y))


def _conv_relu():
    return _conv_then(_relu, nhwc=False)


def _conv_relu_nhwc():
    return _conv_then(_relu, nhwc=True)


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


def _relu6(bb, y):
    return bb.emit(relax.op.clip(y, 0.0, 6.0))


def _relu6_as_min_max(bb, y):
    low = bb.emit(relax.op.maximum(y, relax.const(0.0, "float32")))
    return bb.emit(relax.op.minimum(low, relax.const(6.0, "float32")))


def _conv_clip():
    return _conv_then(_relu6, nhwc=False)


def _conv_clip_nhwc():
    return _conv_then(_relu6_as_min_max, nhwc=True)


def test_clip_is_carried_in_nhwc_as_min_max_not_wrapped_in_transposes():
    """ConvertLayout has no layout rule for clip: left alone, every relu6 would cost two transposes."""
    tvm.ir.assert_structural_equal(ChannelsLast()(_conv_clip()), _conv_clip_nhwc())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 9, 9)).astype("float32") * 4
    w = rng.standard_normal((8, 4, 3, 3)).astype("float32")
    np.testing.assert_allclose(run_relax(ChannelsLast()(_conv_clip()), [x, w])[0],
                               run_relax(_conv_clip(), [x, w])[0], rtol=1e-5, atol=1e-5)


def _conv_stack_max():
    """conv -> stack -> max over the stacked axis: how TVM's ONNX frontend writes ``Max``."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 9, 9), "float32"))
    w = np.random.default_rng(2).standard_normal((8, 4, 3, 3)).astype("float32")
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1, out_dtype="float32"))
            stacked = bb.emit(relax.op.stack([y, relax.op.negative(y)], axis=0))
            out = bb.emit_output(bb.emit(relax.op.max(stacked, axis=[0])))
        bb.emit_func_output(out)
    return bb.get()


def test_a_module_convertlayout_cannot_convert_keeps_nchw_with_a_warning():
    """TVM 0.27's layout rule for stack fails on its 5-D result: slower, never a crash."""
    mod = _conv_stack_max()
    with pytest.warns(ChannelsLastWarning, match="convolutions kept NCHW: TVM's ConvertLayout failed"):
        kept = ChannelsLast()(mod)
    tvm.ir.assert_structural_equal(kept, mod)
    x = np.random.default_rng(3).standard_normal((1, 4, 9, 9)).astype("float32")
    np.testing.assert_allclose(run_relax(kept, [x])[0], np.abs(run_relax(mod, [x])[0]), rtol=1e-6)


def test_a_module_without_convolutions_is_returned_unchanged():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 4, 5), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            stacked = bb.emit(relax.op.stack([x, relax.op.clip(x, 0.0, 6.0)], axis=0))
            out = bb.emit_output(bb.emit(relax.op.max(stacked, axis=[0])))
        bb.emit_func_output(out)
    mod = bb.get()
    tvm.ir.assert_structural_equal(ChannelsLast()(mod), mod)


def test_a_transposed_conv_after_a_conv_stays_nchw_and_builds():
    """PaddleOCR det's upsampling: ConvertLayout carried the NHWC input into conv2d_transpose, which
    LegalizeOps cannot lower in NHWC, so the CPU build failed ("conv2d_transpose ... NHWC")."""
    import torch

    import gmorph_tvm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.ConvTranspose2d(8, 4, 2, stride=2)).eval()
    x = torch.randn(1, 3, 8, 8)
    mm = import_models({"up": net}, x)
    converted = ChannelsLast()(mm.bound_module())
    layouts = {}

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", "").startswith("relax.nn.conv2d"):
            layouts[e.op.name] = str(e.attrs.data_layout)

    relax.analysis.post_order_visit(converted["main"].body, visit)
    assert layouts == {"relax.nn.conv2d": "NHWC", "relax.nn.conv2d_transpose": "NCHW"}
    artifact = gmorph_tvm.build(mm, "llvm", shipped_records=False)
    with torch.no_grad():
        np.testing.assert_allclose(artifact.run([x.numpy()])["up"], net(x).numpy(), rtol=1e-5, atol=1e-5)
