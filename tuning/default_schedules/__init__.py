"""Default CPU schedules for kernels without a tuning record, in the spirit of dlight.

Without them an untuned CPU kernel compiles as the plain loop nest legalization wrote (TVM 0.27's
``s_tir.dlight.cpu`` has GEMV and row reductions only): untuned builds ran 10-30x slower than
ONNX Runtime. One rule per op family, tried in this order on every PrimFunc not yet scheduled
(``tirx.is_scheduled``: kernels MetaScheduleApplyDatabase gave a tuned record keep it):

* :class:`.conv2d.Conv2D`: NHWC / NCHW conv2d, dense, grouped, depthwise, fused epilogue;
* :class:`.matmul.Matmul`: matmul / dense / batch matmul, fused epilogue;
* :class:`.pooling.Pooling`: max / average pools;
* :class:`.reduction.Reduction`: other reductions (means over spatial axes; softmax / layer norm);
* :class:`.elementwise.Elementwise`: kernels without a reduction;
* :class:`.fallback.Fallback`: parallel outer loops for anything else.

All vectorise at the target's vector width (``-mcpu``: AVX-512 16 floats, AVX2 8, NEON 4) and run
outer loops on the target's cores. The pass must run before ``SplitLayoutRewritePreproc``:
Conv2D / Matmul store constant weights in a blocked layout through
``meta_schedule.layout_rewrite_preproc`` blocks, which that pass moves out for ``FoldConstant``.
"""

from __future__ import annotations

import tvm

from gmorph_tvm.tuning.default_schedules._rule import CPURule
from gmorph_tvm.tuning.default_schedules.conv2d import Conv2D
from gmorph_tvm.tuning.default_schedules.elementwise import Elementwise
from gmorph_tvm.tuning.default_schedules.fallback import Fallback
from gmorph_tvm.tuning.default_schedules.matmul import Matmul
from gmorph_tvm.tuning.default_schedules.pooling import Pooling
from gmorph_tvm.tuning.default_schedules.reduction import Reduction

__all__ = ["CPURule", "Conv2D", "DefaultCPUSchedules", "Elementwise", "Fallback", "Matmul", "Pooling",
           "Reduction", "default_cpu_rules", "default_rules", "first_rule", "is_default_record", "record_schedule"]

SCHEDULED = "tirx.is_scheduled"


def default_rules() -> list[CPURule]:
    """The rules in the order they are tried."""
    return [Conv2D(), Matmul(), Pooling(), Reduction(), Elementwise(), Fallback()]


def _is_scheduled(func) -> bool:
    return func.attrs is not None and SCHEDULED in func.attrs and bool(func.attrs[SCHEDULED])


@tvm.transform.module_pass(opt_level=0, name="DefaultCPUSchedules")
class DefaultCPUSchedules:
    """Schedule every not-yet-scheduled PrimFunc of a module for the llvm ``target`` with the
    first of :func:`default_rules` that takes it (dlight's ``ApplyDefaultSchedule`` semantics;
    other targets: unchanged). After a run, :attr:`chosen` says which rule took each kernel.

    Rewrites: the loop nests (and constant weight layouts) of kernels without
    ``tirx.is_scheduled``, marking them scheduled. Preserves: what every kernel computes, kernels
    already scheduled (tuned records), Relax functions and kernel signatures.
    """

    def __init__(self, target: tvm.target.Target):
        self.target = target
        self.chosen: dict[str, str] = {}

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.chosen = {}
        if self.target.kind.name != "llvm":
            return mod
        rules = default_rules()
        updated = {}
        with self.target:
            for gvar, func in mod.functions_items():
                if not isinstance(func, tvm.tirx.PrimFunc) or _is_scheduled(func):
                    continue
                found = first_rule(func, self.target, rules)
                if found is not None:
                    sch, self.chosen[gvar.name_hint] = found
                    updated[gvar] = sch.mod["main"].with_attr(SCHEDULED, True)
        if not updated:
            return mod
        mod = mod.clone()  # IRModule item assignment writes through to the caller's module
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod


def default_cpu_rules(mod: tvm.IRModule, target: tvm.target.Target) -> dict[str, str]:
    """Which rule :class:`DefaultCPUSchedules` gives each kernel of ``mod`` that is not yet
    scheduled: ``{kernel name: "Conv2D" | "Matmul" | ... | "Fallback"}`` (empty for non-llvm
    targets)."""
    schedules = DefaultCPUSchedules(target)
    schedules(mod)
    return schedules.chosen


def first_rule(func: tvm.tirx.PrimFunc, target: tvm.target.Target, rules: list[CPURule] | None = None):
    """``(schedule, rule name)`` from the first of ``rules`` (default: :func:`default_rules`) that
    takes ``func``, as :class:`DefaultCPUSchedules` schedules it (call it inside ``with target``);
    None when no rule does or the target is not llvm."""
    for rule in default_rules() if rules is None else rules:
        sch = rule.apply(func, target, False)
        if sch is not None:
            return sch, rule.name
    return None


def record_schedule(workload: tvm.IRModule, target: tvm.target.Target):
    """The default CPU schedule of a tuning workload (:func:`first_rule`: what a build without a
    record runs) as MetaSchedule can store it: ``(schedule, rule name)``, or None. Its trace is
    replayed after ``EnterPostproc``, so the whole trace is its postproc part: the evolutionary
    search replays database records without that part and then runs its own postprocessors,
    which fail on a weight layout the rule already rewrote (and abort the run); a build replays
    all of it."""
    from tvm import s_tir

    with target:
        found = first_rule(workload["main"], target)
    if found is None:
        return None
    sch, name = found
    record = s_tir.Schedule(workload)
    record.enter_postproc()
    sch.trace.apply_to_schedule(record, remove_postproc=False)
    return record, name


def is_default_record(record) -> bool:
    """Whether a tuning record is a default CPU schedule stored by :func:`record_schedule` (no
    sampled decisions: nothing in it transfers to other extents)."""
    insts = record.trace.insts
    return len(insts) > 0 and insts[0].kind.name == "EnterPostproc"
