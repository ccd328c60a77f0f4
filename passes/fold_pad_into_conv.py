"""FoldPadIntoConv: a zero ``pad`` of the spatial dims feeding a ``conv2d`` becomes the conv's padding.

Frontends emit TensorFlow-style "same" padding (EfficientNet's ``Conv2dStaticSamePadding``,
``nn.ZeroPad2d`` before a stride-2 conv) as ``conv2d(pad(x, [0, 0, 0, 0, t, b, l, r]))``. This pass
rewrites every such ``conv2d`` (NCHW data, constant mode, pad value 0, batch and channel dims
unpadded) to ``conv2d(x, padding=conv_padding + (t, l, b, r))``; the ``pad`` disappears when
nothing else uses it.

Why it matters beyond the saved copy: left alone, ``FuseOps`` fuses the pad as the *epilogue* of
the kernel producing ``x`` (``conv + bias + clip + pad``), a kernel whose output is larger than its
loop nest. MetaSchedule tunes such kernels with ``reverse_compute_at`` of the pad block under the
conv's tiles, which in apache-tvm 0.27 only writes the interior: the pad border is never stored
and the kernel returns whatever the memory held (wrong results that depend on memory reuse;
issue 11, same bug class as apache/tvm#15911). Folded, the pad is read-side padding of the next
conv, which TVM inlines correctly. Pads this pass cannot fold are still caught by the tuning
guard (:mod:`gmorph_tvm.tuning.verify`).

What is preserved: results are bit-identical (a conv over explicitly zero-padded input computes
the same sums as the conv padding with zeros); ``main``'s signature and all other ops are kept.
"""

from __future__ import annotations

import tvm
from tvm import relax


@tvm.transform.module_pass(opt_level=0, name="FoldPadIntoConv")
class FoldPadIntoConv:
    """Fold zero spatial ``pad`` producers into the padding of the ``conv2d`` consuming them."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _FoldPadRewriter(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, relax.analysis.remove_all_unused(rewriter.visit_expr(func)))
        return rewriter.builder_.get()


def _spatial_zero_pad(expr: relax.Expr) -> tuple[relax.Expr, tuple[int, int, int, int]] | None:
    """``(x, (top, left, bottom, right))`` if ``expr`` is ``pad(x)`` of H and W only, with zeros."""
    if not (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.nn.pad"):
        return None
    attrs = expr.attrs
    if str(attrs.pad_mode) != "constant" or float(attrs.pad_value) != 0.0:
        return None
    width = [int(w) for w in attrs.pad_width]
    if len(width) != 8 or any(width[:4]) or min(width) < 0:
        return None
    top, bottom, left, right = width[4:]
    return expr.args[0], (top, left, bottom, right)


@relax.expr_functor.mutator
class _FoldPadRewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
            return call
        attrs = call.attrs
        if str(attrs.data_layout) != "NCHW":
            return call
        data = call.args[0]
        bound = self.lookup_binding(data) if isinstance(data, relax.Var) else None
        folded = _spatial_zero_pad(bound) if bound is not None else None
        if folded is None:
            return call
        source, extra = folded
        padding = [int(p) for p in attrs.padding]
        if len(padding) == 2:
            padding = padding * 2
        elif len(padding) == 1:
            padding = padding * 4
        out_dtype = str(attrs.out_dtype) if str(attrs.out_dtype) else None
        return relax.op.nn.conv2d(
            source,
            call.args[1],
            strides=[int(s) for s in attrs.strides],
            padding=[p + e for p, e in zip(padding, extra)],
            dilation=[int(d) for d in attrs.dilation],
            groups=int(attrs.groups),
            data_layout=str(attrs.data_layout),
            kernel_layout=str(attrs.kernel_layout),
            out_layout=str(attrs.out_layout),
            out_dtype=out_dtype,
        )


__all__ = ["FoldPadIntoConv"]
