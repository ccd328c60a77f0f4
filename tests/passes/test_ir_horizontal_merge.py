"""HorizontalMerge, rule by rule, as IR: a TVMScript module before and the module expected after,
compared with ``tvm.ir.assert_structural_equal`` (as TVM's own pass tests are written). The numeric
checks against PyTorch are in test_horizontal_merge.py."""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from gmorph_tvm.passes._util import PROVENANCE_ATTR
from gmorph_tvm.passes.horizontal_merge import HorizontalMerge, merge_report, registered_rules

RNG = np.random.default_rng(0)


def _rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype("float32")


def _merge(mod: tvm.IRModule) -> tvm.IRModule:
    return HorizontalMerge(mode="always")(mod)


def test_every_rule_family_is_registered_once():
    names = sorted(type(rule).__name__ for rule in registered_rules())
    assert names == sorted([
        "BatchNormRule", "ConvRule", "ElementwiseRule", "LayerNormRule", "MatmulRule", "PermuteDimsRule",
        "PoolRule", "ReduceRule", "ReshapeRule", "SoftmaxRule", "TakeRule", "TupleGetItemRule", "UnaryRule",
    ])


# ---- same input: one op, outputs concatenated -------------------------------------------------------


def test_same_input_convs_become_one_conv_with_bias_and_activation_once():
    w1, w2, b1, b2 = _rand(4, 3, 3, 3), _rand(2, 3, 3, 3), _rand(1, 4, 1, 1), _rand(1, 2, 1, 1)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, R.const(w1), padding=[1, 1, 1, 1], out_dtype="float32")
                a1 = R.add(a, R.const(b1))
                a2 = R.nn.relu(a1)
                b = R.nn.conv2d(x, R.const(w2), padding=[1, 1, 1, 1], out_dtype="float32")
                b1_ = R.add(b, R.const(b2))
                b2_ = R.nn.relu(b1_)
                out = (a2, b2_)
                R.output(out)
            return out

    w, b = np.concatenate([w1, w2], 0), np.concatenate([b1, b2], 1)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                wide = R.nn.conv2d(x, R.const(w), padding=[1, 1, 1, 1], out_dtype="float32")
                wide1 = R.add(wide, R.const(b))
                wide2 = R.nn.relu(wide1)
                parts = R.split(wide2, indices_or_sections=[4], axis=1)
                a2 = parts[0]
                b2_ = parts[1]
                out = (a2, b2_)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(_merge(Before), Expected)


def test_same_input_matmuls_become_one_matmul_with_the_weight_columns_concatenated():
    w1, w2, b1, b2 = _rand(8, 3), _rand(8, 5), _rand(3), _rand(5)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32")):
            with R.dataflow():
                a = R.matmul(x, R.const(w1), out_dtype="float32")
                a1 = R.add(a, R.const(b1))
                b = R.matmul(x, R.const(w2), out_dtype="float32")
                b1_ = R.add(b, R.const(b2))
                out = (a1, b1_)
                R.output(out)
            return out

    # the per-branch biases, right-aligned to the result's rank, concatenated along the branch axis
    w, b = np.concatenate([w1, w2], 1), np.concatenate([b1, b2], 0).reshape(1, 8)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 8), "float32")):
            with R.dataflow():
                wide = R.matmul(x, R.const(w), out_dtype="float32")
                wide1 = R.add(wide, R.const(b))
                parts = R.split(wide1, indices_or_sections=[3], axis=1)
                a1 = parts[0]
                b1_ = parts[1]
                out = (a1, b1_)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(_merge(Before), Expected)


def test_embedding_lookups_of_one_index_tensor_become_one_lookup():
    t1, t2 = _rand(10, 4), _rand(10, 6)

    @I.ir_module
    class Before:
        @R.function
        def main(ids: R.Tensor((1, 5), "int64")):
            with R.dataflow():
                a = R.take(R.const(t1), ids, axis=0)
                b = R.take(R.const(t2), ids, axis=0)
                out = (a, b)
                R.output(out)
            return out

    table = np.concatenate([t1, t2], 1)

    @I.ir_module
    class Expected:
        @R.function
        def main(ids: R.Tensor((1, 5), "int64")):
            with R.dataflow():
                wide = R.take(R.const(table), ids, axis=0)
                parts = R.split(wide, indices_or_sections=[4], axis=2)
                a = parts[0]
                b = parts[1]
                out = (a, b)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(_merge(Before), Expected)


def test_merged_weight_parameters_replace_the_originals_with_provenance():
    w1, w2 = _rand(8, 3), _rand(8, 3)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), p: R.Tensor((8, 3), "float32"), q: R.Tensor((8, 3), "float32")):
            R.func_attr({"num_input": 1, "gmorph.provenance": {"p": ["a/w"], "q": ["b/w"]}})
            with R.dataflow():
                a = R.matmul(x, p, out_dtype="float32")
                b = R.matmul(x, q, out_dtype="float32")
                out = (a, b)
                R.output(out)
            return out

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), merged: R.Tensor((8, 6), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                wide = R.matmul(x, merged, out_dtype="float32")
                parts = R.split(wide, indices_or_sections=[3], axis=1)
                a = parts[0]
                b = parts[1]
                out = (a, b)
                R.output(out)
            return out

    before = Before.clone()
    before["main"] = Before["main"].with_attr("params", [tvm.runtime.tensor(w1), tvm.runtime.tensor(w2)])
    after = _merge(before)
    expected = Expected.clone()
    expected["main"] = (
        Expected["main"]
        .with_attr("params", [tvm.runtime.tensor(np.concatenate([w1, w2], 1))])
        .with_attr(PROVENANCE_ATTR, {"merged.p+q": ["a/w", "b/w"]})
    )
    tvm.ir.assert_structural_equal(after, expected)
    assert [p.name for p in after["main"].params] == ["x", "merged.p+q"]


# ---- lockstep: different inputs of one shape ------------------------------------------------------


def test_lockstep_convs_become_one_grouped_conv_through_pool_and_mean():
    wa, wb = _rand(4, 3, 3, 3), _rand(4, 3, 3, 3)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), y: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, R.const(wa), padding=[1, 1, 1, 1], out_dtype="float32")
                a1 = R.nn.max_pool2d(a, pool_size=[2, 2], strides=[2, 2])
                a2 = R.mean(a1, axis=[2, 3], keepdims=False)
                b = R.nn.conv2d(y, R.const(wb), padding=[1, 1, 1, 1], out_dtype="float32")
                b1 = R.nn.max_pool2d(b, pool_size=[2, 2], strides=[2, 2])
                b2 = R.mean(b1, axis=[2, 3], keepdims=False)
                out = (a2, b2)
                R.output(out)
            return out

    w = np.concatenate([wa, wb], 0)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), y: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                xy = R.concat((x, y), axis=1)
                wide = R.nn.conv2d(xy, R.const(w), padding=[1, 1, 1, 1], groups=2, out_dtype="float32")
                wide1 = R.nn.max_pool2d(wide, pool_size=[2, 2], strides=[2, 2])
                wide2 = R.mean(wide1, axis=[2, 3], keepdims=False)
                parts = R.split(wide2, indices_or_sections=[4], axis=1)
                a2 = parts[0]
                b2 = parts[1]
                out = (a2, b2)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(_merge(Before), Expected)


def test_lockstep_batch_norms_become_one_with_the_statistics_concatenated():
    wa, wb = _rand(4, 3, 1, 1), _rand(4, 3, 1, 1)
    (ga, ba, ma, va), (gb, bb, mb, vb) = ([_rand(4) for _ in range(4)] for _ in range(2))
    va, vb = np.abs(va), np.abs(vb)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 4, 4), "float32"), y: R.Tensor((1, 3, 4, 4), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, R.const(wa), out_dtype="float32")
                a1 = R.nn.batch_norm(a, R.const(ga), R.const(ba), R.const(ma), R.const(va), axis=1)
                a2 = a1[0]
                b = R.nn.conv2d(y, R.const(wb), out_dtype="float32")
                b1 = R.nn.batch_norm(b, R.const(gb), R.const(bb), R.const(mb), R.const(vb), axis=1)
                b2 = b1[0]
                out = (a2, b2)
                R.output(out)
            return out

    def cat(u, v):
        return R.const(np.concatenate([u, v]))

    w = np.concatenate([wa, wb], 0)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 4, 4), "float32"), y: R.Tensor((1, 3, 4, 4), "float32")):
            with R.dataflow():
                xy = R.concat((x, y), axis=1)
                wide = R.nn.conv2d(xy, R.const(w), groups=2, out_dtype="float32")
                wide1 = R.nn.batch_norm(wide, cat(ga, gb), cat(ba, bb), cat(ma, mb), cat(va, vb), axis=1)
                wide2 = wide1[0]
                parts = R.split(wide2, indices_or_sections=[4], axis=1)
                a2 = parts[0]
                b2 = parts[1]
                out = (a2, b2)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(_merge(Before), Expected)


def test_lockstep_matmuls_become_one_batched_matmul_with_stacked_weights():
    wa, wb = _rand(6, 4), _rand(6, 4)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 6), "float32"), y: R.Tensor((1, 6), "float32")):
            with R.dataflow():
                a = R.matmul(x, R.const(wa), out_dtype="float32")
                a1 = R.nn.gelu(a)
                b = R.matmul(y, R.const(wb), out_dtype="float32")
                b1 = R.nn.gelu(b)
                out = (a1, b1)
                R.output(out)
            return out

    stacked = np.stack([wa, wb])

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 6), "float32"), y: R.Tensor((1, 6), "float32")):
            with R.dataflow():
                xy = R.concat((x, y), axis=1)
                grouped = R.reshape(xy, [1, 2, 1, 6])
                product = R.matmul(grouped, R.const(stacked), out_dtype="float32")
                wide = R.reshape(product, [1, 8])
                wide1 = R.nn.gelu(wide)
                parts = R.split(wide1, indices_or_sections=[4], axis=1)
                a1 = parts[0]
                b1 = parts[1]
                out = (a1, b1)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(_merge(Before), Expected)


def test_layer_norm_over_the_branch_axis_normalizes_each_branch_then_scales_wide():
    wa, wb = _rand(6, 4), _rand(6, 4)
    ga, gb, ba, bb = _rand(4), _rand(4), _rand(4), _rand(4)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 6), "float32")):
            with R.dataflow():
                a = R.matmul(x, R.const(wa), out_dtype="float32")
                a1 = R.nn.layer_norm(a, R.const(ga), R.const(ba), axes=[-1], epsilon=1e-5)
                b = R.matmul(x, R.const(wb), out_dtype="float32")
                b1 = R.nn.layer_norm(b, R.const(gb), R.const(bb), axes=[-1], epsilon=1e-5)
                out = (a1, b1)
                R.output(out)
            return out

    w, ones, zeros = np.concatenate([wa, wb], 1), np.ones(4, "float32"), np.zeros(4, "float32")
    scale, shift = np.stack([ga, gb]), np.stack([ba, bb])

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 6), "float32")):
            with R.dataflow():
                wide = R.matmul(x, R.const(w), out_dtype="float32")
                per_branch = R.reshape(wide, [1, 2, 4])
                normed = R.nn.layer_norm(per_branch, R.const(ones), R.const(zeros), axes=[2], epsilon=1e-5)
                scaled = R.multiply(normed, R.const(scale))
                shifted = R.add(scaled, R.const(shift))
                wide1 = R.reshape(shifted, [1, 8])
                parts = R.split(wide1, indices_or_sections=[4], axis=1)
                a1 = parts[0]
                b1 = parts[1]
                out = (a1, b1)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(_merge(Before), Expected)


def test_softmax_permute_and_reshape_keep_the_branches_contiguous():
    wa, wb = _rand(2, 3, 1, 1), _rand(2, 3, 1, 1)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 4, 4), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, R.const(wa), out_dtype="float32")
                a1 = R.nn.softmax(a, axis=3)
                a2 = R.permute_dims(a1, [0, 1, 3, 2])
                a3 = R.reshape(a2, [1, 32])
                b = R.nn.conv2d(x, R.const(wb), out_dtype="float32")
                b1 = R.nn.softmax(b, axis=3)
                b2 = R.permute_dims(b1, [0, 1, 3, 2])
                b3 = R.reshape(b2, [1, 32])
                out = (a3, b3)
                R.output(out)
            return out

    w = np.concatenate([wa, wb], 0)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 4, 4), "float32")):
            with R.dataflow():
                wide = R.nn.conv2d(x, R.const(w), out_dtype="float32")
                wide1 = R.nn.softmax(wide, axis=3)
                wide2 = R.permute_dims(wide1, [0, 1, 3, 2])
                wide3 = R.reshape(wide2, [1, 64])
                parts = R.split(wide3, indices_or_sections=[32], axis=1)
                a3 = parts[0]
                b3 = parts[1]
                out = (a3, b3)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(_merge(Before), Expected)


def test_residual_add_of_two_wide_values_stays_wide():
    w1a, w1b, w2a, w2b = (_rand(4, 4, 1, 1) for _ in range(4))

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 2, 2), "float32"), y: R.Tensor((1, 4, 2, 2), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, R.const(w1a), out_dtype="float32")
                a1 = R.nn.conv2d(a, R.const(w2a), out_dtype="float32")
                a2 = R.add(a1, a)
                b = R.nn.conv2d(y, R.const(w1b), out_dtype="float32")
                b1 = R.nn.conv2d(b, R.const(w2b), out_dtype="float32")
                b2 = R.add(b1, b)
                out = (a2, b2)
                R.output(out)
            return out

    w1, w2 = np.concatenate([w1a, w1b], 0), np.concatenate([w2a, w2b], 0)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 2, 2), "float32"), y: R.Tensor((1, 4, 2, 2), "float32")):
            with R.dataflow():
                xy = R.concat((x, y), axis=1)
                wide = R.nn.conv2d(xy, R.const(w1), groups=2, out_dtype="float32")
                wide1 = R.nn.conv2d(wide, R.const(w2), groups=2, out_dtype="float32")
                wide2 = R.add(wide1, wide)
                parts = R.split(wide2, indices_or_sections=[4], axis=1)
                a2 = parts[0]
                b2 = parts[1]
                out = (a2, b2)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(_merge(Before), Expected)


# ---- not merged -----------------------------------------------------------------------------------


def test_dependent_convs_are_not_run_in_lockstep():
    w1, w2 = _rand(3, 3, 1, 1), _rand(3, 3, 1, 1)

    @I.ir_module
    class Chain:
        @R.function
        def main(x: R.Tensor((1, 3, 4, 4), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, R.const(w1), out_dtype="float32")
                b = R.nn.conv2d(a, R.const(w2), out_dtype="float32")
                R.output(b)
            return b

    tvm.ir.assert_structural_equal(_merge(Chain), Chain)
    assert merge_report(Chain, mode="always") == []


def test_auto_leaves_a_region_alone_when_its_copies_cost_more_than_it_saves():
    wa, wb = _rand(8, 8, 1, 1), _rand(8, 8, 1, 1)

    @I.ir_module
    class Wide:
        @R.function
        def main(x: R.Tensor((1, 8, 64, 64), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, R.const(wa), out_dtype="float32")
                b = R.nn.conv2d(x, R.const(wb), out_dtype="float32")
                out = (a, b)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(HorizontalMerge(mode="auto")(Wide), Wide)
    [region] = merge_report(Wide, mode="auto")
    assert region.ops == ("relax.nn.conv2d",) and not region.merged
