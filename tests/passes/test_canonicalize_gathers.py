"""CanonicalizeGathers: TVMScript before/expected for each index-lookup spelling (torch.export's and
both torch ONNX exporters' of all-MiniLM-L6-v2), numerics, and the lookups it must leave alone."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I  # noqa: N812
from tvm.script import relax as R  # noqa: N812

from gmorph_tvm.passes.canonicalize_gathers import CanonicalizeGathers
from gmorph_tvm.passes.canonicalize_ops import CanonicalizeOps

N, D = 10, 3  # embedding rows, width


def _run(mod: tvm.IRModule, inputs: list[np.ndarray]):
    ex = tvm.compile(mod, "llvm")
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return [o.numpy() for o in out] if isinstance(out, tvm.ir.Array) or hasattr(out, "__len__") and not hasattr(
        out, "numpy") else [out.numpy()]


def _same_outputs(a: tvm.IRModule, b: tvm.IRModule, inputs: list[np.ndarray]) -> None:
    for got, want in zip(_run(a, inputs), _run(b, inputs)):
        np.testing.assert_array_equal(got, want)


W = np.random.default_rng(0).standard_normal((N, D)).astype("float32")


def test_onnx_gather_with_negative_index_handling_becomes_a_wrap_take():
    """ONNX Gather as TVM converts it: ``where(i < 0, i + shape(w)[0], i)``, then a fast take."""
    @I.ir_module
    class Before:
        @R.function
        def main(ids: R.Tensor((1, 4), "int64"), w: R.Tensor((N, D), "float32")):
            with R.dataflow():
                s = R.shape_of(w)
                st = R.shape_to_tensor(s)
                neg = R.less(ids, R.const(0, "int64"))
                n = R.take(st, R.const(0, "int64"), axis=0, mode="wrap")
                shifted = R.add(ids, n)
                idx = R.where(neg, shifted, ids)
                y = R.take(w, idx, axis=0, mode="fast")
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(ids: R.Tensor((1, 4), "int64"), w: R.Tensor((N, D), "float32")):
            with R.dataflow():
                y = R.take(w, ids, axis=0, mode="wrap")
                R.output(y)
            return y

    after = CanonicalizeGathers()(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    ids = np.array([[-N, -1, 0, N - 1]], dtype="int64")  # every index ONNX allows: [-n, n)
    _same_outputs(after, Before, [ids, W])
    np.testing.assert_array_equal(_run(after, [ids, W])[0], W[[0, N - 1, 0, N - 1]][None])


def test_torch_embedding_becomes_the_same_wrap_take():
    """torch.export's ``nn.Embedding``: int32 cast, flatten, take, reshape back."""
    @I.ir_module
    class Before:
        @R.function
        def main(ids: R.Tensor((1, 4), "int64"), w: R.Tensor((N, D), "float32")):
            with R.dataflow():
                i32 = R.astype(ids, "int32")
                flat = R.reshape(i32, R.shape([4]))
                rows = R.take(w, flat, axis=0, mode="fast")
                y = R.reshape(rows, R.shape([1, 4, D]))
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(ids: R.Tensor((1, 4), "int64"), w: R.Tensor((N, D), "float32")):
            with R.dataflow():
                y = R.take(w, ids, axis=0, mode="wrap")
                R.output(y)
            return y

    after = CanonicalizeGathers()(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    _same_outputs(after, Before, [np.array([[0, 3, N - 1, 2]], dtype="int64"), W])  # torch's valid ids


def test_compile_time_gathers_that_read_in_order_become_reshapes():
    """``mask[:, None, None, :]`` as torch.export (index_tensor of aranges), the legacy exporter (Gather
    of constant indices) and the dynamo exporter (GatherND with negative-index handling) write it,
    each followed by an ``and`` with an all-true constant."""
    @I.ir_module
    class Before:
        @R.function
        def main(mask: R.Tensor((1, 4), "int64")):
            with R.dataflow():
                m = R.astype(mask, "bool")
                # torch.export
                r0 = R.arange(0, 1, 1, dtype="int64")
                r1 = R.arange(0, 4, 1, dtype="int64")
                i0 = R.reshape(r0, R.shape([1, 1, 1, 1]))
                i1 = R.reshape(r1, R.shape([1, 1, 1, 4]))
                t = R.index_tensor(m, (i0, i1))
                ok = R.greater_equal(R.reshape(R.arange(0, 4, 1, dtype="int64"), R.shape([1, 1, 4, 1])),
                                     R.const(0, "int64"))
                a = R.bitwise_and(ok, t)
                # legacy ONNX: Gather of [[[[0..3]]]] from the flattened mask
                flat = R.reshape(m, R.shape([4, 1]))
                g = R.take(flat, R.const(np.arange(4, dtype="int64").reshape(1, 1, 1, 4), "int64"), axis=0, mode="fast")
                g4 = R.reshape(g, R.shape([1, 1, 1, 4]))
                b = R.logical_and(g4, R.const(np.ones((1, 1, 4, 4), bool)))
                # dynamo ONNX: GatherND of [[[[[0, j]]]]], negative indices shifted by the shape
                nd = R.const(np.stack([np.zeros(4, "int64"), np.arange(4, dtype="int64")], -1).reshape(1, 1, 1, 4, 2), "int64")
                shape = R.shape_to_tensor(R.shape_of(m))
                nd_idx = R.where(R.less(nd, R.const(0, "int64")), R.add(shape, nd), nd)
                n = R.gather_nd(m, nd_idx)
                c = R.logical_and(R.const(np.ones((1, 1, 4, 4), bool)), n)
                R.output(a, b, c)
            return (a, b, c)

    @I.ir_module
    class Expected:
        @R.function
        def main(mask: R.Tensor((1, 4), "int64")):
            with R.dataflow():
                m = R.astype(mask, "bool")
                t = R.reshape(m, R.shape([1, 1, 1, 4]))
                a = R.broadcast_to(t, R.shape([1, 1, 4, 4]))
                flat = R.reshape(m, R.shape([4, 1]))
                g = R.reshape(flat, R.shape([1, 1, 1, 4, 1]))
                g4 = R.reshape(g, R.shape([1, 1, 1, 4]))
                b = R.broadcast_to(g4, R.shape([1, 1, 4, 4]))
                n = R.reshape(m, R.shape([1, 1, 1, 4]))
                c = R.broadcast_to(n, R.shape([1, 1, 4, 4]))
                R.output(a, b, c)
            return (a, b, c)

    after = CanonicalizeGathers()(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    _same_outputs(after, Before, [np.array([[1, 0, 1, 1]], dtype="int64")])
    # CanonicalizeOps then collapses the reshape chains: the three spellings are one.
    canon = [b.value for b in CanonicalizeOps()(Before)["main"].body.blocks[0].bindings]
    assert [str(v.op.name) for v in canon] == ["relax.astype"] + ["relax.reshape", "relax.broadcast_to"] * 3
    assert {tuple(int(d) for d in v.ty.shape.values) for v in canon[1::2]} == {(1, 1, 1, 4)}


def test_lookups_that_are_not_in_order_or_not_onnx_negative_handling_are_kept():
    """A gather of constant indices that reorders (reversed) stays a gather; a ``where`` that is not
    ONNX's negative-index handling (shift by another size) stays and only the take's mode changes
    (run-time indices never become a plain fast take); ``and`` with a mask that is not all true
    stays."""
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4,), "float32"), ids: R.Tensor((3,), "int64"), w: R.Tensor((N, D), "float32"),
                 m: R.Tensor((4,), "bool")):
            with R.dataflow():
                rev = R.take(x, R.const(np.array([3, 2, 1, 0], "int64"), "int64"), axis=0, mode="fast")
                idx = R.where(R.less(ids, R.const(0, "int64")), R.add(ids, R.const(N - 1, "int64")), ids)
                rows = R.take(w, idx, axis=0, mode="fast")
                k = R.logical_and(m, R.const(np.array([True, False, True, True])))
                R.output(rev, rows, k)
            return (rev, rows, k)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((4,), "float32"), ids: R.Tensor((3,), "int64"), w: R.Tensor((N, D), "float32"),
                 m: R.Tensor((4,), "bool")):
            with R.dataflow():
                rev = R.take(x, R.const(np.array([3, 2, 1, 0], "int64"), "int64"), axis=0, mode="fast")
                lv = R.less(ids, R.const(0, "int64"))
                lv1 = R.add(ids, R.const(N - 1, "int64"))
                idx = R.where(lv, lv1, ids)
                rows = R.take(w, idx, axis=0, mode="wrap")
                k = R.logical_and(m, R.const(np.array([True, False, True, True])))
                R.output(rev, rows, k)
            return (rev, rows, k)

    after = CanonicalizeGathers()(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    inputs = [np.arange(4, dtype="float32"), np.array([-2, 0, 5], "int64"), W, np.array([1, 1, 0, 1], bool)]
    _same_outputs(after, Before, inputs)


def test_a_clip_mode_take_keeps_its_out_of_range_reads():
    """``mode="clip"`` defines reads out of range (the last row), which ``wrap`` would change: kept,
    ONNX's negative-index ``where`` included."""
    @I.ir_module
    class Before:
        @R.function
        def main(ids: R.Tensor((3,), "int64"), w: R.Tensor((N, D), "float32")):
            with R.dataflow():
                idx = R.where(R.less(ids, R.const(0, "int64")), R.add(ids, R.const(N, "int64")), ids)
                rows = R.take(w, idx, axis=0, mode="clip")
                R.output(rows)
            return rows

    assert CanonicalizeGathers()(Before).same_as(Before)


def test_nothing_to_rewrite_returns_the_module_unchanged():
    @I.ir_module
    class Before:
        @R.function
        def main(ids: R.Tensor((3,), "int64"), w: R.Tensor((N, D), "float32")):
            with R.dataflow():
                y = R.take(w, ids, axis=0, mode="wrap")
                R.output(y)
            return y

    assert CanonicalizeGathers()(Before).same_as(Before)
