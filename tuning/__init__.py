"""Auto-tuning with MetaSchedule, and the lowering that applies its results.

``tune(mod, target, TuneConfig(trials=...), work_dir=...)`` searches schedules for the distinct kernels of a
(fused) Relax module and stores them in a JSON database in ``work_dir``; ``lower(mod, target,
database_dir=...)`` prepares the module for ``tvm.compile`` with those schedules applied (and, on
CPUs, weights pre-packed into the tuned layouts at build time).
"""

from gmorph_tvm.tuning.config import TuneConfig
from gmorph_tvm.tuning.ffi_guard import PINNED_TVM_FFI_VERSION, ensure_ir_json_works
from gmorph_tvm.tuning.pipeline import default_gpu_rules, has_database, lower, lower_tuned, prepare
from gmorph_tvm.tuning.report import TaskReport, TuningReport, TuningWarning
from gmorph_tvm.tuning.tasks import TaskPlan, allocate, extract
from gmorph_tvm.tuning.tuner import tune

__all__ = [
    "PINNED_TVM_FFI_VERSION",
    "TaskPlan",
    "TaskReport",
    "TuneConfig",
    "TuningReport",
    "TuningWarning",
    "allocate",
    "default_gpu_rules",
    "ensure_ir_json_works",
    "extract",
    "has_database",
    "lower",
    "lower_tuned",
    "prepare",
    "tune",
]
