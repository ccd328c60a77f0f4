"""ChannelsLast: every NCHW ``conv2d`` becomes an NHWC / OHWI convolution, the CPU-friendly layout.

The importers give NCHW convolutions. An x86 convolution kernel vectorises over output channels,
which NCHW puts outermost (MetaSchedule's layout rewrite re-packs the weights, never the
activations); NHWC puts them innermost. This pass runs TVM's ``relax.transform.ConvertLayout``
with ``conv2d -> (NHWC, OHWI)``: data and weight get a ``permute_dims`` before each convolution,
the layout is carried through the ops TVM can infer it for (elementwise ops, bias adds, pooling,
other convolutions), and a ``permute_dims`` back to NCHW is placed where an op needs it (a
``reshape``/``flatten`` before a classifier, every output). Then ``FoldConstant`` folds the
transposes of constant weights (a weights-bound module, ``MultiModel.bound_module()``): the
artifact stores OHWI weights, nothing is transposed at run time but activations.

``ConvertLayout`` knows no layout for ``clip`` (relu6, hardtanh): it would wrap every one in a
transpose back to NCHW and one forward again. So each 4-D floating-point ``clip(x, lo, hi)`` is
first written ``minimum(maximum(x, lo), hi)``, which it carries through (elementwise with scalar
constants; a NaN stays NaN either way once :class:`LegalizeNaNSafe` lowers them).

Measured (``bench/layout.py``): set C fused, batch 1, 0.72x -> 1.18x of ONNX Runtime.

Where it runs: on CPU targets, in :func:`gmorph_tvm.tuning.prepare` (tuning and building see
the same NHWC kernels); never on GPUs (their convs become GEMMs).

A module without a ``conv2d`` is returned unchanged. Where ``ConvertLayout`` itself fails (TVM
0.27's layout rule for ``stack`` cannot handle a 5-D result: TVM's own ONNX converter writes
variadic ``Max``/``Min``/``Sum``/``Mean`` so; gmorph-tvm's importer and :class:`RecomposeOps`
write binary ops instead) the module keeps NCHW with a :class:`ChannelsLastWarning` saying why:
slower, never wrong.

What is preserved: ``main``'s signature (inputs and outputs stay NCHW) and its results up to the
floating-point summation order of the convolutions (tests: 1e-5 relative). Not preserved: the
kernels — tuning records of NCHW kernels do not apply to the converted module. Constant
subexpressions other than weight transposes are folded too (``FoldConstant`` on the module).
"""

from __future__ import annotations

import warnings

import tvm
from tvm import relax

from gmorph_tvm.errors import one_line

# conv2d_transpose stays NCHW/IOHW (TOPI legalises only that): without the pin, ConvertLayout's
# layout inference would carry the NHWC input into it and leave it unlegalisable (PaddleOCR det).
LAYOUTS = {"relax.nn.conv2d": ["NHWC", "OHWI"], "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}


@relax.expr_functor.mutator
class _ClipAsMinMax(relax.PyExprMutator):
    """``clip(x, lo, hi)`` on 4-D float tensors -> ``minimum(maximum(x, lo), hi)``."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if getattr(call.op, "name", None) != "relax.clip":
            return call
        info = call.args[0].ty
        dtype = str(getattr(info, "dtype", ""))
        if not isinstance(info, relax.TensorType) or info.ndim != 4 or not dtype.startswith(("float", "bfloat")):
            return call
        low, high = (relax.const(float(bound.value), dtype) for bound in call.args[1:3])
        return relax.op.minimum(relax.op.maximum(call.args[0], low), high)


def _clip_as_min_max(mod: tvm.IRModule) -> tvm.IRModule:
    functions = {gvar: _ClipAsMinMax().visit_expr(func) if isinstance(func, relax.Function) else func
                 for gvar, func in mod.functions_items()}
    return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)


class ChannelsLastWarning(UserWarning):
    """TVM could not convert a module's convolutions to NHWC: they stay NCHW."""


def _has_conv2d(mod: tvm.IRModule) -> bool:
    found = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: found.append(e) if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.nn.conv2d" else None)
    return bool(found)


@tvm.transform.module_pass(opt_level=0, name="ChannelsLast")
class ChannelsLast:
    """Convert every ``conv2d`` to NHWC data / OHWI weights and fold the constant weight transposes."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not _has_conv2d(mod):
            return mod
        try:
            converted = relax.transform.ConvertLayout(LAYOUTS)(_clip_as_min_max(mod))
        except Exception as err:  # noqa: BLE001 - TVM raises many error types
            warnings.warn(f"convolutions kept NCHW: TVM's ConvertLayout failed ({one_line(err)})",
                          ChannelsLastWarning, stacklevel=2)
            return mod
        return relax.transform.FoldConstant()(converted)
