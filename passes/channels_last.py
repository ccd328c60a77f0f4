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

Measured (``bench/layout.py``): set C fused, batch 1, 0.72x -> 1.18x of ONNX Runtime.

What is preserved: ``main``'s signature (inputs and outputs stay NCHW) and its results up to the
floating-point summation order of the convolutions (tests: 1e-5 relative). Not preserved: the
kernels — tuning records of NCHW kernels do not apply to the converted module. Constant
subexpressions other than weight transposes are folded too (``FoldConstant`` on the module).
"""

from __future__ import annotations

import tvm
from tvm import relax

LAYOUTS = {"relax.nn.conv2d": ["NHWC", "OHWI"]}


@tvm.transform.module_pass(opt_level=0, name="ChannelsLast")
class ChannelsLast:
    """Convert every ``conv2d`` to NHWC data / OHWI weights and fold the constant weight transposes."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return relax.transform.FoldConstant()(relax.transform.ConvertLayout(LAYOUTS)(mod))
