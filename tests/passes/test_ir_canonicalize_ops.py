"""CanonicalizeOps, one canonicalisation at a time, as IR: a TVMScript module before and the module
expected after, compared with ``tvm.ir.assert_structural_equal`` (as TVM's own pass tests are
written). The numeric and cross-frontend checks are in test_canonicalize.py."""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from gmorph_tvm.passes import CanonicalizeOps
from gmorph_tvm.passes._util import PROVENANCE_ATTR
from gmorph_tvm.passes.canonicalize_ops import fold_conv_batch_norm

RNG = np.random.default_rng(0)


def _rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype("float32")


def _with_params(mod: tvm.IRModule, *values: np.ndarray, **attrs) -> tvm.IRModule:
    """``mod`` whose ``main`` holds ``values`` as its weight parameters' values (attrs ``params``)."""
    out = mod.clone()
    func = mod["main"].with_attr("params", [tvm.runtime.tensor(v) for v in values])
    for key, value in attrs.items():
        func = func.with_attr(key, value)
    out["main"] = func
    return out


def test_unset_out_dtype_is_filled_in_with_the_result_dtype():
    w, m = _rand(4, 3, 3, 3), _rand(8, 2)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), y: R.Tensor((2, 8), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, R.const(w), padding=[1, 1, 1, 1])
                b = R.matmul(y, R.const(m))
                out = (a, b)
                R.output(out)
            return out

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), y: R.Tensor((2, 8), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, R.const(w), padding=[1, 1, 1, 1], out_dtype="float32")
                b = R.matmul(y, R.const(m), out_dtype="float32")
                out = (a, b)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(CanonicalizeOps()(Before), Expected)


def test_axes_become_positive_and_sorted_where_order_does_not_matter():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3, 4, 5), "float32")):
            with R.dataflow():
                a = R.mean(x, axis=[-1, -2], keepdims=True)
                s = R.sum(x)
                q = R.squeeze(a, axis=[-1, 2])
                e = R.expand_dims(q, axis=[-1])
                p = R.permute_dims(x, [0, -1, 1, 2])
                sm = R.nn.softmax(x, axis=-1)
                out = (s, e, p, sm)
                R.output(out)
            return out

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 3, 4, 5), "float32")):
            with R.dataflow():
                a = R.mean(x, axis=[2, 3], keepdims=True)
                s = R.sum(x, axis=[0, 1, 2, 3])  # None (all axes) made explicit
                q = R.squeeze(a, axis=[2, 3])
                e = R.expand_dims(q, axis=[2])
                p = R.permute_dims(x, [0, 3, 1, 2])  # order matters: only made positive
                sm = R.nn.softmax(x, axis=3)
                out = (s, e, p, sm)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(CanonicalizeOps()(Before), Expected)


def test_add_and_multiply_put_the_weight_like_operand_second():
    b = _rand(1, 4, 1, 1)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), y: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((1, 4, 1, 1), "float32")):
            R.func_attr({"num_input": 2})
            with R.dataflow():
                a = R.add(R.const(b), x)  # torch's bias add
                m = R.multiply(R.const(2.0, "float32"), a)
                c = R.add(x, y)  # two activations: left as they are
                e = R.exp(w)  # computed from a weight only: weight-like
                d = R.multiply(e, c)
                out = (m, d)
                R.output(out)
            return out

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), y: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((1, 4, 1, 1), "float32")):
            R.func_attr({"num_input": 2})
            with R.dataflow():
                a = R.add(x, R.const(b))
                m = R.multiply(a, R.const(2.0, "float32"))
                c = R.add(x, y)
                e = R.exp(w)
                d = R.multiply(c, e)
                out = (m, d)
                R.output(out)
            return out

    w = _rand(1, 4, 1, 1)
    after = CanonicalizeOps()(_with_params(Before, w))
    tvm.ir.assert_structural_equal(after, _with_params(Expected, w))


def test_layout_ops_on_constants_fold_into_the_constant_and_leave_no_binding_behind():
    b = _rand(4)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 2, 2), "float32")):
            with R.dataflow():
                r = R.reshape(R.const(b), [1, 4, 1, 1])
                a = R.add(x, r)
                R.output(a)
            return a

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 2, 2), "float32")):
            with R.dataflow():
                a = R.add(x, R.const(b.reshape(1, 4, 1, 1)))
                R.output(a)
            return a

    tvm.ir.assert_structural_equal(CanonicalizeOps()(Before), Expected)


def test_inference_batch_norm_attrs_get_one_spelling():
    g, be, m, v = _rand(4), _rand(4), _rand(4), np.abs(_rand(4))

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 2, 2), "float32")):
            with R.dataflow():
                d = R.nn.batch_norm(x, R.const(g), R.const(be), R.const(m), R.const(v), axis=-3, epsilon=1e-5,
                                    momentum=0.9, training=False)
                e = d[0]
                R.output(e)
            return e

    eps32 = float(np.float32(1e-5))  # what the float32 kernels add (ONNX stores it this way)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 2, 2), "float32")):
            with R.dataflow():
                d = R.nn.batch_norm(x, R.const(g), R.const(be), R.const(m), R.const(v), axis=1, epsilon=eps32,
                                    momentum=0.1, training=False)
                e = d[0]
                R.output(e)
            return e

    tvm.ir.assert_structural_equal(CanonicalizeOps(fold_batch_norm=False)(Before), Expected)


# ---- batch norm folded into the conv before it ---------------------------------------------------


def test_batch_norm_after_conv_and_bias_folds_into_the_conv_constants():
    w, cb = _rand(4, 3, 3, 3), _rand(1, 4, 1, 1)
    g, be, m, v = _rand(4), _rand(4), _rand(4), np.abs(_rand(4))

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, R.const(w), padding=[1, 1, 1, 1])
                c1 = R.add(c, R.const(cb))
                d = R.nn.batch_norm(c1, R.const(g), R.const(be), R.const(m), R.const(v), axis=1, epsilon=1e-5,
                                    training=False)
                e = d[0]
                f = R.nn.relu(e)
                R.output(f)
            return f

    new_w, new_b = fold_conv_batch_norm(w, cb.reshape(-1), g, be, m, v, 1e-5)
    new_b = new_b.reshape(1, 4, 1, 1)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, R.const(new_w), padding=[1, 1, 1, 1], out_dtype="float32")
                e = R.add(c, R.const(new_b))
                f = R.nn.relu(e)
                R.output(f)
            return f

    tvm.ir.assert_structural_equal(CanonicalizeOps()(Before), Expected)


def test_batch_norm_fold_of_weight_parameters_makes_new_parameters_with_provenance():
    w, g, be, m, v = _rand(4, 3, 3, 3), _rand(4), _rand(4), _rand(4), np.abs(_rand(4))

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 g: R.Tensor((4,), "float32"), b: R.Tensor((4,), "float32"), m: R.Tensor((4,), "float32"),
                 v: R.Tensor((4,), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], out_dtype="float32")
                d = R.nn.batch_norm(c, g, b, m, v, axis=1, epsilon=1e-5, training=False)
                e = d[0]
                R.output(e)
            return e

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w_fold: R.Tensor((4, 3, 3, 3), "float32"),
                 b_fold: R.Tensor((4,), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                c = R.nn.conv2d(x, w_fold, padding=[1, 1, 1, 1], out_dtype="float32")
                bias = R.reshape(b_fold, [1, 4, 1, 1])
                e = R.add(c, bias)
                R.output(e)
            return e

    new_w, new_b = fold_conv_batch_norm(w, None, g, be, m, v, 1e-5)
    after = CanonicalizeOps()(_with_params(Before, w, g, be, m, v))
    provenance = {"w.bnfold": ["/w", "/g", "/v"], "b.bnfold": ["/b", "/g", "/m", "/v"]}
    tvm.ir.assert_structural_equal(after, _with_params(Expected, new_w, new_b, **{PROVENANCE_ATTR: provenance}))
    assert [p.name for p in after["main"].params] == ["x", "w.bnfold", "b.bnfold"]
