"""Conv2D: default CPU schedule of a fused 2-D convolution (NHWC/OHWI as the CPU lowering makes
them, NCHW where a model kept it; dense, grouped and depthwise) with its epilogue (bias add,
batch-norm arithmetic, relu / clip / NaN-safe maximum-minimum, residual add).

Register blocking (:func:`._tiling.tile_reduction`): NHWC -> a block of output columns x output
channels (``bi x vi``, channels vectorised) accumulated in registers across the kernel window and
input channels, weights re-laid out ``[co // vi, kh, kw, ci, co % vi]`` at build time; NCHW ->
output channels x output columns (columns vectorised). Outer loops (batch, rows, tiles) run in
parallel; the padding stage is its own parallel, vectorised loop.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from gmorph_tvm.tuning.default_schedules._rule import CPURule
from gmorph_tvm.tuning.default_schedules._tiling import single_reduction, tile_reduction

CONV_BLOCKS = ("conv2d_nhwc", "conv2d_nchw", "group_conv2d_nhwc", "group_conv2d_nchw",
               "depthwise_conv2d_nhwc", "depthwise_conv2d_nchw")


class Conv2D(CPURule):
    name = "Conv2D"

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        blocks = single_reduction(sch)
        if blocks is None or sch.get(blocks.anchor).name_hint not in CONV_BLOCKS:
            return False
        return tile_reduction(sch, target)
