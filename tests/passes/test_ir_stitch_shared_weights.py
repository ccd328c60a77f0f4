"""StitchSharedWeights as IR: a TVMScript module before and the module expected after, compared
with ``tvm.ir.assert_structural_equal`` (as TVM's own pass tests are written). The numeric and
property checks are in test_stitch.py / test_stitch_properties.py."""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from gmorph_tvm.passes import StitchSharedWeights
from gmorph_tvm.passes._util import PROVENANCE_ATTR

RNG = np.random.default_rng(0)


def _rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype("float32")


def _with_params(mod: tvm.IRModule, *values: np.ndarray) -> tvm.IRModule:
    out = mod.clone()
    out["main"] = mod["main"].with_attr("params", [tvm.runtime.tensor(v) for v in values])
    return out


def test_identical_weight_parameters_are_stored_once_and_their_ops_computed_once():
    w = _rand(4, 3, 3, 3)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), wa: R.Tensor((4, 3, 3, 3), "float32"),
                 wb: R.Tensor((4, 3, 3, 3), "float32")):
            R.func_attr({"num_input": 1, "gmorph.provenance": {"wa": ["a/conv.weight"], "wb": ["b/conv.weight"]}})
            with R.dataflow():
                a = R.nn.conv2d(x, wa, out_dtype="float32")
                a1 = R.nn.relu(a)
                b = R.nn.conv2d(x, wb, out_dtype="float32")
                b1 = R.nn.relu(b)
                b2 = R.sigmoid(b1)  # task b's own head
                out = (a1, b2)
                R.output(out)
            return out

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), wa: R.Tensor((4, 3, 3, 3), "float32")):
            R.func_attr({"num_input": 1, "gmorph.provenance": {"wa": ["a/conv.weight", "b/conv.weight"]}})
            with R.dataflow():
                a = R.nn.conv2d(x, wa, out_dtype="float32")
                a1 = R.nn.relu(a)
                b2 = R.sigmoid(a1)
                out = (a1, b2)
                R.output(out)
            return out

    after = StitchSharedWeights()(_with_params(Before, w, w.copy()))
    tvm.ir.assert_structural_equal(after, _with_params(Expected, w))
    assert dict(after["main"].attrs[PROVENANCE_ATTR]) == {"wa": ("a/conv.weight", "b/conv.weight")}


def test_weights_differing_in_one_bit_stay_apart():
    w = _rand(4, 3, 1, 1)
    w_other = w.copy()
    w_other.view(np.uint32)[0, 0, 0, 0] ^= 1  # one ulp apart

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 2, 2), "float32"), wa: R.Tensor((4, 3, 1, 1), "float32"),
                 wb: R.Tensor((4, 3, 1, 1), "float32")):
            R.func_attr({"num_input": 1, "gmorph.provenance": {"wa": ["a/w"], "wb": ["b/w"]}})
            with R.dataflow():
                a = R.nn.conv2d(x, wa, out_dtype="float32")
                b = R.nn.conv2d(x, wb, out_dtype="float32")
                out = (a, b)
                R.output(out)
            return out

    before = _with_params(Before, w, w_other)
    tvm.ir.assert_structural_equal(StitchSharedWeights()(before), before)


def test_constants_of_equal_content_become_one_and_their_ops_one():
    w = _rand(4, 3, 3, 3)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, R.const(w), out_dtype="float32")
                b = R.nn.conv2d(x, R.const(w.copy()), out_dtype="float32")
                c = R.add(a, b)
                R.output(c)
            return c

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, R.const(w), out_dtype="float32")
                c = R.add(a, a)
                R.output(c)
            return c

    tvm.ir.assert_structural_equal(StitchSharedWeights()(Before), Expected)


def test_a_constant_equal_to_a_weight_parameter_becomes_the_parameter():
    b = _rand(1, 4)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4), "float32"), p: R.Tensor((1, 4), "float32")):
            R.func_attr({"num_input": 1, "gmorph.provenance": {"p": ["a/bias"]}})
            with R.dataflow():
                a = R.add(x, p)
                c = R.add(x, R.const(b))
                out = (a, c)
                R.output(out)
            return out

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4), "float32"), p: R.Tensor((1, 4), "float32")):
            R.func_attr({"num_input": 1, "gmorph.provenance": {"p": ["a/bias"]}})
            with R.dataflow():
                a = R.add(x, p)
                out = (a, a)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(StitchSharedWeights()(_with_params(Before, b)), _with_params(Expected, b))


def test_identical_ops_on_one_input_are_computed_once_through_multi_output_ops():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32")):
            with R.dataflow():
                a = R.split(x, indices_or_sections=[4], axis=1)
                a0 = a[0]
                a1 = R.nn.relu(a0)
                b = R.split(x, indices_or_sections=[4], axis=1)
                b0 = b[0]
                b1 = R.nn.relu(b0)
                b2 = R.exp(b1)
                out = (a1, b2)
                R.output(out)
            return out

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 8), "float32")):
            with R.dataflow():
                a = R.split(x, indices_or_sections=[4], axis=1)
                a0 = a[0]
                a1 = R.nn.relu(a0)
                b2 = R.exp(a1)
                out = (a1, b2)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(StitchSharedWeights()(Before), Expected)
