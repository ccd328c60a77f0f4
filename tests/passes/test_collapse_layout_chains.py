"""CollapseLayoutChains: TVMScript before/expected for each collapsed chain, bit-exact numerics, and
the chains it must leave alone (a real broadcast, reshapes that do not flatten the batch)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I  # noqa: N812
from tvm.script import relax as R  # noqa: N812

from gmorph_tvm.passes.canonicalize_ops import CanonicalizeOps
from gmorph_tvm.passes.collapse_layout_chains import CollapseLayoutChains


def _run(mod: tvm.IRModule, inputs: list[np.ndarray]) -> np.ndarray:
    ex = tvm.compile(mod, "llvm")
    return relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()


def _inputs(mod: tvm.IRModule) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal([int(d) for d in p.ty.shape.values]).astype("float32") for p in mod["main"].params]


def _check(before: tvm.IRModule, expected: tvm.IRModule) -> None:
    after = CollapseLayoutChains()(before)
    tvm.ir.assert_structural_equal(after, expected)
    inputs = _inputs(before)
    np.testing.assert_array_equal(_run(after, inputs), _run(before, inputs))  # bit for bit


def test_torch_export_attention_matmul_becomes_one_4d_matmul():
    """torch.export's q @ k^T: broadcast_to (same shape) + reshape to 3-D, matmul, reshape back."""
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((1, 12, 16, 32), "float32"), k: R.Tensor((1, 12, 16, 32), "float32")):
            with R.dataflow():
                kt = R.permute_dims(k, axes=[0, 1, 3, 2])
                qb = R.broadcast_to(q, R.shape([1, 12, 16, 32]))
                q3 = R.reshape(qb, R.shape([12, 16, 32]))
                kb = R.broadcast_to(kt, R.shape([1, 12, 32, 16]))
                k3 = R.reshape(kb, R.shape([12, 32, 16]))
                s3 = R.matmul(q3, k3, out_dtype="float32")
                s = R.reshape(s3, R.shape([1, 12, 16, 16]))
                R.output(s)
            return s

    @I.ir_module
    class Expected:
        @R.function
        def main(q: R.Tensor((1, 12, 16, 32), "float32"), k: R.Tensor((1, 12, 16, 32), "float32")):
            with R.dataflow():
                kt = R.permute_dims(k, axes=[0, 1, 3, 2])
                s = R.matmul(q, kt, out_dtype="float32")
                R.output(s)
            return s

    _check(Before, Expected)


def test_reshape_pairs_and_permute_pairs_become_one_op():
    """Heads split with two reshapes, keys transposed with two permutes (torch.export), and the
    merge back with two reshapes: ONNX's single Reshape / Transpose."""
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((16, 384), "float32")):
            with R.dataflow():
                a = R.reshape(x, R.shape([1, 16, 384]))
                b = R.reshape(a, R.shape([1, 16, 12, 32]))
                c = R.permute_dims(b, axes=[0, 2, 1, 3])
                d = R.permute_dims(c, axes=[0, 1, 3, 2])
                e = R.permute_dims(d, axes=[0, 3, 1, 2])  # undoes the two before
                f = R.reshape(e, R.shape([1, 16, 384]))
                g = R.reshape(f, R.shape([16, 384]))
                R.output(d, g)
            return (d, g)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((16, 384), "float32")):
            with R.dataflow():
                b = R.reshape(x, R.shape([1, 16, 12, 32]))
                d = R.permute_dims(b, axes=[0, 2, 3, 1])
                R.output(d)
            return (d, x)

    after = CollapseLayoutChains()(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    inputs = _inputs(Before)
    ex_a, ex_b = (relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in inputs])
                  for m in (after, Before))
    for got, want in zip(ex_a, ex_b):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_a_real_broadcast_and_a_different_batch_split_are_kept():
    """``broadcast_to`` that broadcasts (a batch dim 1 -> 12) stays; the matmul still loses its
    flattening, reading the broadcast 4-D value. A matmul whose result is reshaped to another batch
    split than its operands' ([12] from [2, 6] read as [3, 4]) is left alone."""
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((1, 1, 16, 32), "float32"), k: R.Tensor((1, 12, 32, 16), "float32"),
                 u: R.Tensor((2, 6, 16, 32), "float32"), v: R.Tensor((2, 6, 32, 16), "float32")):
            with R.dataflow():
                qb = R.broadcast_to(q, R.shape([1, 12, 16, 32]))
                q3 = R.reshape(qb, R.shape([12, 16, 32]))
                k3 = R.reshape(k, R.shape([12, 32, 16]))
                s3 = R.matmul(q3, k3, out_dtype="float32")
                s = R.reshape(s3, R.shape([1, 12, 16, 16]))
                u3 = R.reshape(u, R.shape([12, 16, 32]))
                v3 = R.reshape(v, R.shape([12, 32, 16]))
                t3 = R.matmul(u3, v3, out_dtype="float32")
                t = R.reshape(t3, R.shape([3, 4, 16, 16]))
                R.output(s, t)
            return (s, t)

    @I.ir_module
    class Expected:
        @R.function
        def main(q: R.Tensor((1, 1, 16, 32), "float32"), k: R.Tensor((1, 12, 32, 16), "float32"),
                 u: R.Tensor((2, 6, 16, 32), "float32"), v: R.Tensor((2, 6, 32, 16), "float32")):
            with R.dataflow():
                qb = R.broadcast_to(q, R.shape([1, 12, 16, 32]))
                s = R.matmul(qb, k, out_dtype="float32")
                u3 = R.reshape(u, R.shape([12, 16, 32]))
                v3 = R.reshape(v, R.shape([12, 32, 16]))
                t3 = R.matmul(u3, v3, out_dtype="float32")
                t = R.reshape(t3, R.shape([3, 4, 16, 16]))
                R.output(s, t)
            return (s, t)

    after = CollapseLayoutChains()(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    inputs = _inputs(Before)
    got, want = (relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in inputs])
                 for m in (after, Before))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w.numpy())


def test_nothing_to_collapse_returns_the_module_unchanged():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")):
            with R.dataflow():
                y = R.reshape(x, R.shape([3, 2]))
                z = R.permute_dims(y, axes=[1, 0])
                R.output(z)
            return z

    assert CollapseLayoutChains()(Before).same_as(Before)


def test_canonicalize_ops_runs_it():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3, 4), "float32")):
            with R.dataflow():
                a = R.broadcast_to(x, R.shape([2, 3, 4]))
                b = R.reshape(a, R.shape([6, 4]))
                c = R.reshape(b, R.shape([24]))
                R.output(c)
            return c

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 3, 4), "float32")):
            with R.dataflow():
                c = R.reshape(x, R.shape([24]))
                R.output(c)
            return c

    tvm.ir.assert_structural_equal(CanonicalizeOps()(Before), Expected)
