"""FoldPadIntoConv: zero spatial pads before conv2d become conv padding, bit-identically."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from helpers import run_relax
from tvm import relax

from gmorph_tvm.passes import FoldPadIntoConv


def _module(pad_width, pad_value=0.0, conv_padding=(0, 0, 0, 0), extra_use=False) -> tvm.IRModule:
    rng = np.random.default_rng(0)
    w = relax.const(rng.standard_normal((4, 1, 3, 3)).astype("float32"))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 9, 9), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            p = bb.emit(relax.op.nn.pad(x, pad_width, pad_value=pad_value))
            y = bb.emit(relax.op.nn.conv2d(p, w, strides=2, padding=conv_padding, groups=4, out_dtype="float32"))
            out = bb.emit_output(relax.Tuple([y, p]) if extra_use else y)
        bb.emit_func_output(out)
    return bb.get()


def _expected(conv_padding) -> tvm.IRModule:
    rng = np.random.default_rng(0)
    w = relax.const(rng.standard_normal((4, 1, 3, 3)).astype("float32"))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 9, 9), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=2, padding=conv_padding, groups=4, out_dtype="float32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _count(mod: tvm.IRModule, op: str) -> int:
    found = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call) and getattr(e.op, "name", "") == op else None
    )
    return len(found)


def test_tf_same_padding_becomes_conv_padding_bit_identically():
    before = _module([0, 0, 0, 0, 0, 1, 0, 1], conv_padding=(1, 0, 0, 2))
    after = FoldPadIntoConv()(before)
    # (top, left, bottom, right): conv (1, 0, 0, 2) + pad (top 0, left 0, bottom 1, right 1)
    assert tvm_ffi.structural_equal(after, _expected((1, 0, 1, 3)))
    x = np.random.default_rng(1).standard_normal((1, 4, 9, 9)).astype("float32")
    np.testing.assert_array_equal(run_relax(after, [x])[0], run_relax(before, [x])[0])


@pytest.mark.parametrize(
    "pad_width, pad_value",
    [
        ([0, 0, 0, 0, 0, 1, 0, 1], 1.0),  # not zero: not what conv padding adds
        ([1, 0, 0, 0, 0, 1, 0, 1], 0.0),  # pads the batch dim
    ],
)
def test_other_pads_are_left_alone(pad_width, pad_value):
    before = _module(pad_width, pad_value=pad_value)
    after = FoldPadIntoConv()(before)
    assert _count(after, "relax.nn.pad") == 1 and tvm_ffi.structural_equal(after, before)


def test_pad_with_other_uses_is_kept_for_them():
    after = FoldPadIntoConv()(_module([0, 0, 0, 0, 1, 1, 1, 1], extra_use=True))
    assert _count(after, "relax.nn.pad") == 1
    conv = []
    relax.analysis.post_order_visit(
        after["main"], lambda e: conv.append(e) if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.nn.conv2d" else None
    )
    assert [int(p) for p in conv[0].attrs.padding] == [1, 1, 1, 1] and conv[0].args[0].name == "x"
