"""Matmul: default CPU schedule of a fused matmul / dense / batch matmul (``[.., M, K] x [.., K, N]``,
either operand a constant or an activation) with its epilogue.

Register blocking (:func:`._tiling.tile_reduction`): rows x columns (``bi x vi``, columns
vectorised) accumulated in registers across K; a constant right operand read along a non-last
axis (``[.., N, K]``) is re-laid out ``[N // vi, .., K, N % vi]`` at build time. Batch and tile
loops run in parallel.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from gmorph_tvm.tuning.default_schedules._rule import CPURule
from gmorph_tvm.tuning.default_schedules._tiling import single_reduction, tile_reduction


class Matmul(CPURule):
    name = "Matmul"

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        blocks = single_reduction(sch)
        if blocks is None:
            return False
        block = sch.get(blocks.anchor).name_hint
        if not any(key in block for key in ("matmul", "dense")):
            return False
        return tile_reduction(sch, target)
