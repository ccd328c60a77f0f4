"""Conv2dToGemm: static NCHW/OIHW ``nn.conv2d`` calls dlight cannot schedule well become matmul / spatial kernels.

Why: dlight (``tvm.s_tir.dlight``), which gives CUDA kernels their default schedules when no
tuning records exist, has no conv2d rule. Expressed as a matmul, the reduction is scheduled by
dlight's ``Matmul`` rule (tiled, shared-memory staged). The pass is target independent; the
lowering applies it only for GPU targets (:func:`gmorph_tvm.tuning.pipeline.prepare`).

What it rewrites, for ``conv2d(x, w)`` with ``x: (N, C, H, W)``, ``w: (O, C/G, KH, KW)``, G groups
(measured on apache-tvm 0.27: dlight's ``Matmul`` rule already takes a dense KxK conv2d as an
implicit GEMM, but grouped and depthwise convs fall to ``GeneralReduction``, which spreads each
output's short reduction over a thread block):

* 1x1 kernel, stride 1, no padding, one group: ``reshape(matmul(reshape(w, (O, C)),
  reshape(x, (N, C, H*W))), (N, O, H, W))``; no copy of ``x``.
* depthwise (``C/G == 1``, ``G == C``): one spatial kernel summing the KH*KW products of each
  output written out (padding, stride, dilation in its index arithmetic): no reduction block, so
  one thread per output as a depthwise kernel should be. It is marked fusable like a conv
  (``op_pattern`` kOutEWiseFusable): elementwise epilogues may fuse into it, producers may not
  (each tap would recompute them).
* other grouped convs: an unfold kernel (``emit_te``) builds ``cols: (N, G, C/G*KH*KW, OH*OW)``,
  then a batched ``matmul(reshape(w, (1, G, O/G, C/G*KH*KW)), cols)`` gives ``(N, G, O/G, OH*OW)``,
  reshaped to ``(N, O, OH, OW)``.
* dense KxK convs (one group) are left to dlight's ``Matmul`` rule.

What it preserves: the output's shape and dtype (``out_dtype`` is passed to the matmul), the sums
computed (same products, reduction order aside: results agree to float rounding), ``main``'s
signature and every other op. Convs with symbolic shapes, other layouts or ``out_layout`` are
left as they are.
"""

from __future__ import annotations

import tvm
from tvm import relax, te
from tvm import tirx as tir


@tvm.transform.module_pass(opt_level=0, name="Conv2dToGemm")
class Conv2dToGemm:
    """Rewrite static NCHW ``conv2d`` calls into unfold + ``matmul`` (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _ConvRewriter(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, relax.analysis.remove_all_unused(rewriter.visit_expr(func)))
        out = rewriter.builder_.get()
        for gvar in rewriter.depthwise:
            # Fused like a conv (its epilogue may join it, its producers may not): as an injective
            # kernel FuseOps would inline the producer chain into each of the KH*KW taps (a
            # MobileNet's hardswish computed 9 times per output; expressions TVM's simplifier
            # then needs ~100 s per kernel to compile).
            out[gvar] = out[gvar].with_attr("op_pattern", OUT_ELEMWISE_FUSABLE)
        return out


def _static_shape(expr: relax.Expr) -> list[int] | None:
    sinfo = expr.ty
    if not isinstance(sinfo, relax.TensorType) or not isinstance(sinfo.shape, relax.ShapeExpr):
        return None
    dims = []
    for dim in sinfo.shape.values:
        if not isinstance(dim, tir.IntImm):
            return None
        dims.append(int(dim))
    return dims


def _four(values) -> list[int]:
    values = [int(v) for v in values]
    if len(values) == 1:
        return values * 4
    if len(values) == 2:
        return values * 2
    return values


def _depthwise(x: te.Tensor, w: te.Tensor, kh: int, kw: int, strides, padding, dilation, oh: int, ow: int, out_dtype: str):
    """``y[n, o, p, q] = sum over (i, j) of x_padded[n, o // M, p*sh + i*dh, q*sw + j*dw] * w[o, 0, i, j]``,
    the KH*KW products written out as one expression: a spatial kernel with no reduction block."""
    n, c, h, wd = (int(d) for d in x.shape)
    o = int(w.shape[0])
    mult = o // c
    sh, sw = strides
    top, left = padding[0], padding[1]
    dh, dw = dilation

    def compute(b, oc, p, q):
        total = tir.const(0, out_dtype)
        for i in range(kh):
            for j in range(kw):
                y = p * sh + i * dh - top
                z = q * sw + j * dw - left
                inside = tir.all(y >= 0, y < h, z >= 0, z < wd)
                value = x[b, oc // mult, tir.if_then_else(inside, y, 0), tir.if_then_else(inside, z, 0)]
                term = value.astype(out_dtype) * w[oc, 0, i, j].astype(out_dtype)
                total = total + tir.if_then_else(inside, term, tir.const(0, out_dtype))
        return total

    return te.compute((n, o, oh, ow), compute, name="depthwise_conv")


def _unfold(x: te.Tensor, groups: int, kh: int, kw: int, strides, padding, dilation, oh: int, ow: int):
    """``cols[n, g, (c*KH + i)*KW + j, p*OW + q] = x_padded[n, g*Cg + c, p*sh + i*dh, q*sw + j*dw]``."""
    n, c, h, w = (int(d) for d in x.shape)
    cg = c // groups
    sh, sw = strides
    top, left = padding[0], padding[1]
    dh, dw = dilation

    def compute(b, g, r, s):
        ch = r // (kh * kw)
        i = (r // kw) % kh
        j = r % kw
        y = (s // ow) * sh + i * dh - top
        z = (s % ow) * sw + j * dw - left
        inside = tir.all(y >= 0, y < h, z >= 0, z < w)
        value = x[b, g * cg + ch, tir.if_then_else(inside, y, 0), tir.if_then_else(inside, z, 0)]
        return tir.if_then_else(inside, value, tir.const(0, x.dtype))

    return te.compute((n, groups, cg * kh * kw, oh * ow), compute, name="im2col")


OUT_ELEMWISE_FUSABLE = 4  # TVM's OpPatternKind::kOutEWiseFusable (what conv2d is)


@relax.expr_functor.mutator
class _ConvRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.depthwise: list[relax.GlobalVar] = []

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
            return call
        attrs = call.attrs
        out_layout = str(attrs.out_layout) if str(attrs.out_layout) else "NCHW"
        if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW" or out_layout != "NCHW":
            return call
        data, weight = call.args
        x_shape, w_shape, y_shape = _static_shape(data), _static_shape(weight), _static_shape(call)
        if x_shape is None or w_shape is None or y_shape is None:
            return call
        n, c, h, w = x_shape
        o, cg, kh, kw = w_shape
        _, _, oh, ow = y_shape
        groups = int(attrs.groups)
        strides = [int(s) for s in attrs.strides]
        padding = _four(attrs.padding)
        dilation = [int(d) for d in attrs.dilation]
        out_dtype = str(call.ty.dtype.dtype)
        if kh == kw == 1 and groups == 1 and strides == [1, 1] and not any(padding):
            w2 = self.builder_.emit(relax.op.reshape(weight, (o, c)))
            x3 = self.builder_.emit(relax.op.reshape(data, (n, c, h * w)))
            y = self.builder_.emit(relax.op.matmul(w2, x3, out_dtype=out_dtype))
            return relax.op.reshape(y, (n, o, oh, ow))
        if groups == 1 and not (kh == kw == 1):
            return call  # dlight's Matmul rule already takes a dense conv2d as an implicit GEMM
        if cg == 1 and groups == c:
            out = self.builder_.emit_te(
                _depthwise, data, weight, kh, kw, strides, padding, dilation, oh, ow, out_dtype,
                primfunc_name_hint="depthwise_conv",
            )
            self.depthwise.append(self.builder_.lookup_binding(out).args[0])
            return out
        cols = self.builder_.emit_te(
            _unfold, data, groups, kh, kw, strides, padding, dilation, oh, ow, primfunc_name_hint="im2col"
        )
        w4 = self.builder_.emit(relax.op.reshape(weight, (1, groups, o // groups, cg * kh * kw)))
        y = self.builder_.emit(relax.op.matmul(w4, cols, out_dtype=out_dtype))
        return relax.op.reshape(y, (n, o, oh, ow))


__all__ = ["Conv2dToGemm"]
