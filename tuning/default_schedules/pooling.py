"""Pooling: default CPU schedule of max / average pooling (``pool_max``, ``pool_sum`` + divide,
adaptive pools) in NHWC or NCHW with its epilogue.

The window loops go inside a block of output columns x channels (:func:`._tiling.tile_reduction`
without weights): NHWC pools vectorise over channels, NCHW over output columns; outer loops run
in parallel.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from gmorph_tvm.tuning.default_schedules._rule import CPURule
from gmorph_tvm.tuning.default_schedules._tiling import single_reduction, tile_reduction


class Pooling(CPURule):
    name = "Pooling"

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        blocks = single_reduction(sch)
        if blocks is None or "pool" not in sch.get(blocks.anchor).name_hint:
            return False
        return tile_reduction(sch, target, allow_relayout=False)
