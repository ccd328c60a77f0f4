"""Elementwise: default CPU schedule of kernels without a reduction (elementwise chains with
broadcasts, the NaN-safe maximum/minimum that LegalizeNaNSafe writes, casts, reshapes,
transposes, concatenations, padding).

Every block that can be is inlined into its consumer; each remaining block gets its innermost
loop vectorised (by a divisor of its extent, at the target's vector width) and its outer loops
fused and run in parallel when it writes enough elements (:func:`._tiling.schedule_injective`).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from gmorph_tvm.tuning.default_schedules._rule import CPURule
from gmorph_tvm.tuning.default_schedules._tiling import root_blocks, schedule_injective, vector_lanes


class Elementwise(CPURule):
    name = "Elementwise"

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        blocks = root_blocks(sch)
        if not blocks or any(
            iv.iter_type != tirx.IterVar.DataPar for b in blocks for iv in sch.get(b).iter_vars
        ):
            return False
        outputs = list(sch.mod["main"].params)
        for block in blocks[:-1]:
            write = sch.get(block).writes[0].source
            if any(write.same_as(o) for o in outputs):
                continue
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001  # kept as its own stage
                continue
        for block in root_blocks(sch):
            lanes = vector_lanes(target, max(sch.get(block).writes[0].source.dtype.bits, 8))
            schedule_injective(sch, block, lanes)
        return True
