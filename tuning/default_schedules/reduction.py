"""Reduction: default CPU schedule of reductions that are not convolutions, matmuls or pools.

* A reduction over outer axes of a contiguous input (a mean over the spatial axes of an NHWC
  tensor, a transposed convolution's accumulation, max/min over a stacked axis): the kept
  innermost axis is vectorised and the reduction loops go outside it
  (:func:`._tiling.tile_reduction`).
* Row reductions (softmax, layer norm, RMS norm: reductions over the innermost axis followed by
  elementwise blocks): dlight's CPU ``Reduction`` rule (leading spatial axes in parallel,
  elementwise blocks vectorised).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu import Reduction as DlightReduction
from tvm.target import Target

from gmorph_tvm.tuning.default_schedules._rule import CPURule
from gmorph_tvm.tuning.default_schedules._tiling import single_reduction, tile_reduction


class Reduction(CPURule):
    name = "Reduction"

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        scheduled = super().apply(func, target, tunable)
        if scheduled is not None or not self.is_target_available(target):
            return scheduled
        try:
            return DlightReduction().apply(func, target, False)
        except Exception:  # noqa: BLE001  # dlight refuses kernels with errors too
            return None

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        if single_reduction(sch) is None:
            return False
        return tile_reduction(sch, target, allow_relayout=False)
