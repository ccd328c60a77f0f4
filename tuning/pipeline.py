"""The lowering shared by tuning and building, so tuned workloads match what gets compiled.

``prepare`` turns a Relax module (weights bound as constants) into fused TIR kernels: the
workloads MetaSchedule tunes. ``lower`` runs ``prepare`` again, applies a tuning database and
finishes the module for ``tvm.compile``:

* CPU (llvm): convolutions are made channels-last first (:mod:`gmorph_tvm.passes.channels_last`:
  NHWC activations, OHWI weights, the weight transposes folded), the layout x86 kernels
  vectorise well: set C fused at batch 1 went from 0.72x to 1.18x of ONNX Runtime
  (``bench/layout.py``). Inputs and outputs of ``main`` stay NCHW. Kernels read weights through
  ``layout_free_buffers``, so tuned schedules may store weights in a blocked layout
  (MetaSchedule's RewriteLayout). ``SplitLayoutRewritePreproc`` moves that re-layout into
  separate kernels applied to the weight constants and ``FoldConstant`` runs them once at build
  time. The artifact keeps the plain ``main(*inputs)`` convention with the
  packed weights embedded: TVM's own ``static_shape_tuning`` pipeline instead lifts them into a
  ``main_transform_params`` function callers must run first.
* CUDA: kernels without tuning records get dlight's default GPU schedules (every kernel must be
  thread-bound to compile); tuned ones keep their records. Convolutions are first rewritten to
  unfold + matmul (:mod:`gmorph_tvm.passes.conv2d_to_gemm`) since dlight has no conv2d rule.

Both must see the same module: workloads are matched by structural hash. Records shipped with
gmorph-tvm for the target's class (:mod:`.shipped`) are applied too, after the user's database:
a kernel the user's database has a record for gets the user's. Every record, the user's or a
shipped one, is applied only after it is checked against the default schedule (:mod:`.verify`).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import tvm
from tvm import relax

from gmorph_tvm.errors import TuningError, one_line
from gmorph_tvm.passes import LegalizeNaNSafe
from gmorph_tvm.passes.channels_last import ChannelsLast
from gmorph_tvm.passes.conv2d_to_gemm import Conv2dToGemm
from gmorph_tvm.passes.fold_pad_into_conv import FoldPadIntoConv
from gmorph_tvm.tuning.ffi_guard import ensure_ir_json_works
from gmorph_tvm.tuning.shipped import lookup as lookup_shipped
from gmorph_tvm.tuning.verify import VerifiedTuning, verified_database

DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")


def is_gpu_target(target: tvm.target.Target) -> bool:
    return "gpu" in target.keys


def conv_channels_last(target: tvm.target.Target, channels_last: bool | None = None) -> bool:
    """Whether :func:`prepare` makes convolutions NHWC for ``target`` given the caller's
    ``channels_last`` (None: on CPU targets); True on a GPU target is a TuningError."""
    if channels_last is None:
        return not is_gpu_target(target)
    if channels_last and is_gpu_target(target):
        raise TuningError("channels_last applies to CPU targets only (GPU convolutions are lowered to GEMMs)")
    return channels_last


def prepare(mod: tvm.IRModule, target: tvm.target.Target, *, channels_last: bool | None = None) -> tvm.IRModule:
    """Legalise and fuse ``mod`` into the TIR kernels that tuning sees and building compiles.

    ``channels_last`` (default: on CPU targets) runs :class:`ChannelsLast` first; ``False`` keeps
    the importers' NCHW convolutions (kernels as gmorph-tvm lowered them before, for records
    tuned then).
    """
    channels_last = conv_channels_last(target, channels_last)
    passes = [
        # Before fusion: a zero pad fused as a kernel's epilogue is mis-scheduled by MetaSchedule
        # (see the pass's docstring); as the next conv's padding it is not.
        FoldPadIntoConv(),
        # x86 conv kernels vectorise over output channels: NHWC / OHWI puts them innermost.
        *([ChannelsLast()] if channels_last else []),
        # dlight has no conv2d rule: on GPUs convs become unfold + matmul, which its Matmul /
        # GEMV / Reduction rules schedule (instead of the one-thread-per-output Fallback).
        *([Conv2dToGemm()] if is_gpu_target(target) else []),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        LegalizeNaNSafe(),  # NaN in -> NaN out for relu/clip/max/min (then "zero" has nothing left to legalise)
        relax.get_pipeline("zero"),
    ]
    if not is_gpu_target(target):
        # Weights (constants) become layout-free: the schedule may choose their layout.
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    with target:
        return tvm.transform.Sequential(passes)(mod)


def has_database(directory: str | os.PathLike) -> bool:
    return all((Path(directory) / name).is_file() for name in DATABASE_FILES)


def open_database(directory: str | os.PathLike):
    """The JSON tuning database in ``directory``; TuningError if missing or unreadable."""
    from tvm.s_tir import meta_schedule as ms

    directory = Path(directory)
    if not has_database(directory):
        raise TuningError(
            f"no tuning database in {directory} (expected {' and '.join(DATABASE_FILES)}); "
            "run tuning first or drop the database option"
        )
    ensure_ir_json_works()
    try:
        return ms.database.JSONDatabase(
            path_workload=str(directory / DATABASE_FILES[0]),
            path_tuning_record=str(directory / DATABASE_FILES[1]),
            module_equality="structural",
            allow_missing=False,
        )
    except Exception as err:  # TVM reports corrupt files with its own long traces
        raise TuningError(f"tuning database in {directory} is unreadable: {one_line(err)}") from err


def _uses_tensor_intrinsics(directory: Path) -> bool:
    """Whether any record tensorises: applying it then needs the intrinsics registered."""
    with open(directory / DATABASE_FILES[1], encoding="utf-8") as records:
        return any('"Tensorize"' in line for line in records)


def _default_gpu_schedules() -> tvm.transform.Pass:
    from tvm.s_tir import dlight as dl

    # Same rule list as TVM's CUDA default pipeline; skips kernels already scheduled by the DB.
    return dl.ApplyDefaultSchedule(
        dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
    )


class ShippedRecordsNote(UserWarning):
    """Shipped tuning records exist but do not apply to this target (class or TVM version)."""


def record_databases(
    target: tvm.target.Target, database_dir: str | os.PathLike | None, shipped_records: bool = True
):
    """The database to apply (user's first, then the shipped records for ``target``), or None.

    Warns with :class:`ShippedRecordsNote` when shipped records exist but not for this target.
    """
    directories = [Path(database_dir)] if database_dir is not None else []
    if shipped_records:
        shipped = lookup_shipped(target)
        if shipped.directory is not None:
            directories.append(shipped.directory)
        elif "ignored" in shipped.note or "(shipped:" in shipped.note:
            warnings.warn(shipped.note, ShippedRecordsNote, stacklevel=3)
    if not directories:
        return None
    if any(_uses_tensor_intrinsics(d) for d in directories if has_database(d)):
        importlib.import_module("tvm.s_tir.tensor_intrin")  # slow: only when needed
    databases = [open_database(d) for d in directories]
    if len(databases) == 1:
        return databases[0]
    from tvm.s_tir import meta_schedule as ms

    return ms.database.OrderedUnionDatabase(*databases)


def lower(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    *,
    database_dir: str | os.PathLike | None = None,
    shipped_records: bool = True,
) -> tvm.IRModule:
    """Lower a Relax module with bound weights for ``tvm.compile(result, target=target)``.

    Kernels with records in ``database_dir``, then kernels with records shipped for the target's
    class (``shipped_records``), get their tuned schedules if they compute what the default
    schedule computes (see :func:`lower_tuned`); the others keep default ones (dlight on GPUs,
    plain loops on CPUs). ``main`` keeps its signature.
    """
    return lower_tuned(mod, target, database_dir=database_dir, shipped_records=shipped_records)[0]


def lower_tuned(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    *,
    database_dir: str | os.PathLike | None = None,
    shipped_records: bool = True,
    exclude: Sequence[str] = (),
    channels_last: bool | None = None,
) -> tuple[tvm.IRModule, VerifiedTuning | None]:
    """:func:`lower`, also saying which kernels got tuned schedules (None without a database).

    Every record that would be applied is first checked against the kernel's default schedule
    on random inputs (:func:`gmorph_tvm.tuning.verify.verified_database`); a record that
    disagrees, or a kernel named in ``exclude``, is dropped with a :class:`TuningWarning` and the
    kernel keeps its default schedule. ``channels_last``: see :func:`prepare`.
    """
    lowered = prepare(mod, target, channels_last=channels_last)
    applied = None
    with target:
        database = record_databases(target, database_dir, shipped_records)
        if database is not None:
            checked, applied = verified_database(database, lowered, target, exclude=exclude)
            with checked:
                lowered = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(lowered)
        if is_gpu_target(target):
            lowered = _default_gpu_schedules()(lowered)
        else:
            lowered = tvm.transform.Sequential(
                [
                    relax.transform.SplitLayoutRewritePreproc(),
                    # Evaluates the weight re-layout kernels on the constants at build time.
                    relax.transform.FoldConstant(),
                    relax.transform.DeadCodeElimination(),
                ]
            )(lowered)
    return lowered, applied


def default_gpu_rules(prepared: tvm.IRModule, target: tvm.target.Target) -> dict[str, str]:
    """Which dlight rule of :func:`_default_gpu_schedules` schedules each kernel of ``prepared``
    (the output of :func:`prepare`): ``{kernel name: "Matmul" | "GEMV" | ... | "Fallback"}``,
    the first rule in the list that accepts it, as ``ApplyDefaultSchedule`` picks."""
    from tvm.s_tir import dlight as dl

    rules = [
        ("Matmul", dl.gpu.Matmul()), ("GEMV", dl.gpu.GEMV()), ("Reduction", dl.gpu.Reduction()),
        ("GeneralReduction", dl.gpu.GeneralReduction()), ("Fallback", dl.gpu.Fallback()),
    ]
    chosen: dict[str, str] = {}
    current = prepared
    with target:
        for name, rule in rules:
            current = dl.ApplyDefaultSchedule(rule)(current)
            for gvar, func in current.functions_items():
                scheduled = isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and func.attrs.get("tirx.is_scheduled")
                if scheduled and gvar.name_hint not in chosen:
                    chosen[gvar.name_hint] = name
    return chosen
