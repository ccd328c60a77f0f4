"""RecomposeOps: TVMScript before/expected for every recognised chain, plus numerics of each rewrite."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I  # noqa: N812
from tvm.script import relax as R  # noqa: N812
from tvm.script import tirx as T  # noqa: N812

from gmorph_tvm.passes import RecomposeOps
from gmorph_tvm.passes.canonicalize_ops import CanonicalizeOps

S = (1, 4, 3, 5)


def _run(mod: tvm.IRModule, inputs: list[np.ndarray]) -> np.ndarray:
    ex = tvm.compile(mod, "llvm")
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return out.numpy()


def _check(before: tvm.IRModule, expected: tvm.IRModule | None, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    after = RecomposeOps()(before)
    tvm.ir.assert_structural_equal(after, expected if expected is not None else before)
    params = before["main"].params
    rng = np.random.default_rng(0)
    inputs = [(rng.standard_normal([int(d) for d in p.ty.shape.values]) * 3).astype(p.ty.dtype.dtype if hasattr(
        p.ty.dtype, "dtype") else str(p.ty.dtype)) for p in params]
    np.testing.assert_allclose(_run(after, inputs), _run(before, inputs), rtol=rtol, atol=atol)


def test_silu():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                s = R.sigmoid(x)
                y = R.multiply(s, x)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                y = R.nn.silu(x)
                R.output(y)
            return y

    _check(Before, Expected)


def test_gelu_erf_legacy_export():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                d = R.divide(x, R.const(1.4142135381698608, "float32"))
                e = R.erf(d)
                a = R.add(e, R.const(1.0, "float32"))
                m = R.multiply(x, a)
                y = R.multiply(m, R.const(0.5, "float32"))
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                y = R.nn.gelu(x)
                R.output(y)
            return y

    _check(Before, Expected)


def test_gelu_tanh():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                c = R.multiply(R.multiply(x, x), x)
                k = R.multiply(c, R.const(0.044715, "float32"))
                s = R.add(x, k)
                z = R.multiply(s, R.const(0.7978845834732056, "float32"))
                t = R.tanh(z)
                a = R.add(R.const(1.0, "float32"), t)
                h = R.multiply(a, R.const(0.5, "float32"))
                y = R.multiply(h, x)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                y = R.nn.gelu_tanh(x)
                R.output(y)
            return y

    _check(Before, Expected)


def test_paddle_hardswish_becomes_torchs():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                s = R.add(x, R.const(3.0, "float32"))
                lo = R.maximum(s, R.const(0.0, "float32"))
                c = R.minimum(lo, R.const(6.0, "float32"))
                m = R.multiply(x, c)
                y = R.divide(m, R.const(6.0, "float32"))
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                lv = R.add(x, R.const(3.0, "float32"))
                lv1 = R.clip(lv, T.float64(0.0), T.float64(6.0))
                lv2 = R.divide(lv1, R.const(6.0, "float32"))
                y = R.multiply(x, lv2)
                R.output(y)
            return y

    _check(Before, Expected)


def test_hardsigmoid_onnx_constants_become_torchs():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                a = R.add(R.multiply(x, R.const(0.1666667014360428, "float32")), R.const(0.5, "float32"))
                y = R.clip(a, T.float64(0.0), T.float64(1.0))
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                lv = R.add(x, R.const(3.0, "float32"))
                lv1 = R.clip(lv, T.float64(0.0), T.float64(6.0))
                y = R.divide(lv1, R.const(6.0, "float32"))
                R.output(y)
            return y

    _check(Before, Expected)


def test_min_max_pair_becomes_clip():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                a = R.maximum(x, R.const(-1.0, "float32"))
                y = R.minimum(R.const(2.0, "float32"), a)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                y = R.clip(x, T.float64(-1.0), T.float64(2.0))
                R.output(y)
            return y

    _check(Before, Expected)


L = (2, 6, 16)


def test_layer_norm_decomposition():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(L, "float32"), gamma: R.Tensor((16,), "float32"),
                 beta: R.Tensor((1, 1, 16), "float32")) -> R.Tensor(L, "float32"):
            with R.dataflow():
                m = R.mean(x, axis=[-1], keepdims=True)
                d = R.subtract(x, m)
                q = R.power(d, R.const(2.0, "float32"))
                v = R.mean(q, axis=[-1], keepdims=True)
                s = R.sqrt(R.add(v, R.const(1e-5, "float32")))
                nrm = R.divide(d, s)
                g = R.multiply(nrm, gamma)
                y = R.add(beta, g)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(L, "float32"), gamma: R.Tensor((16,), "float32"),
                 beta: R.Tensor((1, 1, 16), "float32")) -> R.Tensor(L, "float32"):
            with R.dataflow():
                lv = R.reshape(beta, R.shape([16]))
                y = R.nn.layer_norm(x, gamma, lv, axes=[2], epsilon=9.999999747378752e-06)
                R.output(y)
            return y

    # gamma / beta must be weights (constants or weight parameters) to become the op's
    _check(_as_weights(Before, 1), _as_weights(Expected, 1), rtol=1e-4, atol=1e-5)


def _as_weights(mod: tvm.IRModule, num_input: int) -> tvm.IRModule:
    """``mod`` with params after the first ``num_input`` marked as weights (attrs num_input/params)."""
    func = mod["main"]
    rng = np.random.default_rng(7)
    values = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in p.ty.shape.values]).astype("float32"))
              for p in list(func.params)[num_input:]]
    out = mod.clone()
    out["main"] = func.with_attr("num_input", num_input).with_attr("params", values)
    return out


def test_rms_norm_decomposition():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(L, "float32"), gamma: R.Tensor((16,), "float32")) -> R.Tensor(L, "float32"):
            with R.dataflow():
                q = R.multiply(x, x)
                v = R.mean(q, axis=[2], keepdims=True)
                r = R.rsqrt(R.add(v, R.const(1e-6, "float32")))
                nrm = R.multiply(x, r)
                y = R.multiply(nrm, gamma)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(L, "float32"), gamma: R.Tensor((16,), "float32")) -> R.Tensor(L, "float32"):
            with R.dataflow():
                y = R.nn.rms_norm(x, gamma, axes=[2], epsilon=9.999999974752427e-07)
                R.output(y)
            return y

    _check(_as_weights(Before, 1), _as_weights(Expected, 1), rtol=1e-4, atol=1e-5)


def test_softmax_decomposition():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(L, "float32")) -> R.Tensor(L, "float32"):
            with R.dataflow():
                mx = R.max(x, axis=[-1], keepdims=True)
                e = R.exp(R.subtract(x, mx))
                s = R.sum(e, axis=[2], keepdims=True)
                y = R.divide(e, s)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(L, "float32")) -> R.Tensor(L, "float32"):
            with R.dataflow():
                y = R.nn.softmax(x, axis=2)
                R.output(y)
            return y

    _check(Before, Expected)


def test_stacked_reduction_becomes_binary_chain():
    @I.ir_module
    class Before:
        @R.function
        def main(a: R.Tensor(S, "float32"), b: R.Tensor((1, 4, 1, 5), "float32"),
                 c: R.Tensor((5,), "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                ba = R.broadcast_to(a, R.shape(list(S)))
                bb = R.broadcast_to(b, R.shape(list(S)))
                bc = R.broadcast_to(c, R.shape(list(S)))
                st = R.stack((ba, bb, bc), axis=0)
                y = R.mean(st, axis=[0], keepdims=False)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(a: R.Tensor(S, "float32"), b: R.Tensor((1, 4, 1, 5), "float32"),
                 c: R.Tensor((5,), "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                lv = R.add(a, b)
                lv1 = R.add(lv, c)
                y = R.multiply(lv1, R.const(1.0 / 3.0, "float32"))
                R.output(y)
            return y

    _check(Before, Expected)


def test_look_alikes_are_left_alone():
    """Gating by another tensor's sigmoid, PaddlePaddle's 0.2-slope hardsigmoid, a GELU with the wrong
    constant and an exp divided by another tensor's sum are not rewritten."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(L, "float32"), z: R.Tensor(L, "float32")):
            with R.dataflow():
                a = R.multiply(x, R.sigmoid(z))
                b = R.clip(R.add(R.multiply(x, R.const(0.2, "float32")), R.const(0.5, "float32")),
                           T.float64(0.0), T.float64(1.0))
                c = R.multiply(R.multiply(x, R.add(R.erf(R.divide(x, R.const(1.5, "float32"))),
                                                  R.const(1.0, "float32"))), R.const(0.5, "float32"))
                e = R.exp(x)
                d = R.divide(e, R.sum(R.exp(z), axis=[2], keepdims=True))
                out = (a, b, c, d)
                R.output(out)
            return out

    normalized = relax.transform.Normalize()(Before)
    tvm.ir.assert_structural_equal(RecomposeOps()(normalized), normalized)


def test_canonicalize_runs_the_recomposition():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                y = R.multiply(x, R.sigmoid(x))
                R.output(y)
            return y

    assert "nn.silu" in CanonicalizeOps()(Before).script()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_recomposed_clip_keeps_nan_and_inf(value):
    """minimum(maximum(x, lo), hi) -> clip: NaN stays NaN, +-inf are clipped, as before (LegalizeNaNSafe)."""
    from gmorph_tvm.passes import LegalizeNaNSafe

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float32"):
            with R.dataflow():
                y = R.minimum(R.maximum(x, R.const(0.0, "float32")), R.const(6.0, "float32"))
                R.output(y)
            return y

    x = np.array([value, -1.0, 3.0, 9.0], np.float32)
    lowered = [LegalizeNaNSafe()(m) for m in (Before, RecomposeOps()(Before))]
    got = [_run(m, [x]) for m in lowered]
    np.testing.assert_array_equal(got[0], got[1])
    assert np.isnan(got[1][0]) == np.isnan(value)


def test_torch_export_hardswish_decomposition_becomes_torchs_hardswish():
    """torch.export writes hardswish as x * clip(clip(x + 3, 0, inf), -inf, 6) / 6: one clip, the
    importer's own hardswish form."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                s = R.add(x, R.const(3.0, "float32"))
                lo = R.clip(s, T.float64(0.0), T.float64("inf"))
                c = R.clip(lo, T.float64("-inf"), T.float64(6.0))
                m = R.multiply(x, c)
                y = R.divide(m, R.const(6.0, "float32"))
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(S, "float32")) -> R.Tensor(S, "float32"):
            with R.dataflow():
                lv = R.add(x, R.const(3.0, "float32"))
                lv1 = R.clip(lv, T.float64(0.0), T.float64(6.0))
                lv2 = R.divide(lv1, R.const(6.0, "float32"))
                y = R.multiply(x, lv2)
                R.output(y)
            return y

    _check(Before, Expected)


def test_l2_norm_torch_spelling_becomes_onnx_reduce_l2():
    """torch's ``norm(p=2)`` (``power(sum(power(abs(x), 2)), 0.5)``, F.normalize) is ONNX ReduceL2's
    ``sqrt(sum(x * x))``: the same values bit for bit (LLVM writes ``pow(a, 2)`` as ``a * a``, and the
    sum of squares is never -0, where ``pow(., 0.5)`` and ``sqrt`` differ)."""
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 384), "float32")) -> R.Tensor((2, 1), "float32"):
            with R.dataflow():
                a = R.abs(x)
                p = R.power(a, R.const(2.0, "float32"))
                s = R.sum(p, axis=[1], keepdims=True)
                y = R.power(s, R.const(0.5, "float32"))
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 384), "float32")) -> R.Tensor((2, 1), "float32"):
            with R.dataflow():
                p = R.multiply(x, x)
                s = R.sum(p, axis=[1], keepdims=True)
                y = R.sqrt(s)
                R.output(y)
            return y

    _check(Before, Expected, rtol=0, atol=0)
    x = np.random.default_rng(1).standard_normal((2, 384)).astype("float32") * 10
    x[1] = 0.0
    x[1, 0] = -0.0
    np.testing.assert_array_equal(_run(RecomposeOps()(Before), [x]), _run(Before, [x]))


def test_powers_that_are_not_an_l2_norm_are_kept():
    """``power(abs(x), 3)`` is no square, and the square root of a sum that may be negative (or -0)
    stays a ``power``."""
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32")):
            with R.dataflow():
                a = R.abs(x)
                c = R.power(a, R.const(3.0, "float32"))
                s = R.sum(x, axis=[1], keepdims=True)
                r = R.power(s, R.const(0.5, "float32"))
                R.output(c, r)
            return (c, r)

    assert RecomposeOps()(Before).same_as(Before)
