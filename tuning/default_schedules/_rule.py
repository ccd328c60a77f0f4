"""The base class of the default CPU rules: dlight's ``ScheduleRule`` for llvm targets that
turns a schedule primitive's error on an unexpected kernel into "not applicable"."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target


class CPURule(ScheduleRule):
    """Subclasses implement :meth:`schedule` (a fresh ``Schedule`` of the kernel -> True when it
    scheduled it); :meth:`apply` returns that schedule, or None for non-llvm targets, kernels
    the rule does not match and kernels a primitive refuses (the next rule gets them)."""

    name = "CPURule"

    def is_target_available(self, target: Target) -> bool:
        return super().is_target_available(target) and target.kind.name == "llvm"

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):  # noqa: ARG002
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        try:
            return sch if self.schedule(sch, target) else None
        except Exception:  # noqa: BLE001  # s_tir raises ScheduleError / TVMError on kernels a rule cannot take
            return None

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        raise NotImplementedError
