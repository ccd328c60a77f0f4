"""Fallback: the last default CPU rule, for kernels no other rule takes (several reductions that
are not a row reduction, gathers, scans): each root block's leading data-parallel loops are fused
and run in parallel when they cover enough iterations; nothing else changes. It takes every
kernel (a small one keeps its loops as they are), so every kernel ends up marked scheduled.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from gmorph_tvm.tuning.default_schedules._rule import CPURule
from gmorph_tvm.tuning.default_schedules._tiling import PARALLEL_MIN_ELEMENTS, root_blocks


class Fallback(CPURule):
    name = "Fallback"

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:  # noqa: ARG002
        for block in root_blocks(sch):
            stmt = sch.get(block)
            loops = sch.get_loops(block)
            kinds = [iv.iter_type for iv in stmt.iter_vars]
            lead = []
            for loop, kind in zip(loops, kinds):
                extent = sch.get(loop).extent
                if kind != tirx.IterVar.DataPar or not isinstance(extent, tirx.IntImm):
                    break
                lead.append(loop)
            if len(loops) != len(kinds) or not lead:
                continue
            work = 1
            for loop in loops:
                extent = sch.get(loop).extent
                work *= int(extent) if isinstance(extent, tirx.IntImm) else 1
            lead_extent = 1
            for loop in lead:
                lead_extent *= int(sch.get(loop).extent)
            if lead_extent < 2 or work < PARALLEL_MIN_ELEMENTS:
                continue
            try:
                fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
                sch.parallel(fused)
            except Exception:  # noqa: BLE001  # loop not parallelisable (e.g. bound to a reduction)
                continue
        return True
