"""The compiler pipeline: every pass order of gmorph-tvm, in one object.

Shaped like MLC-LLM's ``compiler_pass/pipeline.py``: named phases, each a list of passes, an
optional IR dump after every phase, and the same object behind :func:`gmorph_tvm.build`,
:func:`gmorph_tvm.tune` (its workloads) and ``tvm.compile(mod, target, relax_pipeline="gmorph")``
(registered by :mod:`gmorph_tvm.pipeline`). Nothing else in gmorph-tvm decides an order of passes.

=======================  ================================================================
phase                    passes
=======================  ================================================================
import_cleanup           CanonicalizeOps: exporters' decompositions recomposed into the ops the
                         torch importer emits (RecomposeOps), gathers and layout chains in
                         one spelling (CanonicalizeGathers, CollapseLayoutChains), one spelling
                         per op, batch norm folded into convs
lossless_fusion          StitchSharedWeights, HorizontalMerge (``fuse=True`` only: ``build``
                         takes what :func:`gmorph_tvm.fuse` returned and leaves it as is)
target_lowering          FoldPadIntoConv; CPU: ChannelsLast (NHWC activations, OHWI weights);
                         GPU: Conv2dToGemm (dlight has no conv2d rule); decompose for
                         inference; CPU: LegalizeFastMath (float32 exp/erf/tanh/sigmoid and the
                         GELU, SiLU, softmax on them as vectorisable polynomials); LegalizeNaNSafe
                         (NaN in -> NaN out for relu/clip/max/min);
                         LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR;
                         CPU: weights layout-free (tuned schedules may re-lay them out)
apply_tuning             records (the user's database, then the shipped ones for the target's
                         class), each verified against the unscheduled kernel first (with
                         ``transfer``: also records of the nearest kernel at other extents); GPU:
                         dlight default schedules; CPU: DefaultCPUSchedules (conv2d, matmul,
                         pooling, reductions, elementwise: parallel, vectorised, tiled) for
                         every kernel without a record, then the weight re-layouts of tuned and
                         default schedules evaluated at build time (SplitLayoutRewritePreproc +
                         FoldConstant)
weights_and_signature    external weights: LiftWeights per entry point, equal tensors stored
                         once; entry points combined into one module; AttachSignature
finalize                 TVM's ``default_build`` (VM lowering), when anything is left to lower
=======================  ================================================================

The tuner extracts its workloads from ``import_cleanup`` + ``target_lowering`` (:func:`prepare`),
which is exactly what ``apply_tuning`` sees, so records match by structural hash. CPU
convolutions are channels-last because x86 kernels vectorise over output channels: set C fused
at batch 1 went from 0.72x to 1.18x of ONNX Runtime (``bench/layout.py``). The artifact keeps the
plain ``main(*inputs, *weights)`` convention with packed weights; TVM's ``static_shape_tuning``
pipeline instead lifts them into a ``main_transform_params`` callers must run first.

``dump_ir=DIR`` writes the module after every phase as TVMScript:
``DIR/<NN>-<phase>[.<entry>].py``.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tvm
from tvm import relax

from gmorph_tvm.core.weights_file import unique_arrays
from gmorph_tvm.errors import GmorphError, TuningError, one_line
from gmorph_tvm.passes import (
    AttachSignature,
    CanonicalizeOps,
    ChannelsLast,
    Conv2dToGemm,
    FoldPadIntoConv,
    HorizontalMerge,
    LegalizeFastMath,
    LegalizeNaNSafe,
    LiftWeights,
    StitchSharedWeights,
)
from gmorph_tvm.passes.horizontal_merge.transform import MergeMode
from gmorph_tvm.tuning.default_schedules import DefaultCPUSchedules
from gmorph_tvm.tuning.ffi_guard import ensure_ir_json_works
from gmorph_tvm.tuning.shipped import lookup as lookup_shipped
from gmorph_tvm.tuning.shipped import target_class
from gmorph_tvm.tuning.target_key import STAMP_FILE
from gmorph_tvm.tuning.transfer import TRANSFERRED, TransferReport, source_databases, transferred_database
from gmorph_tvm.tuning.verify import VerifiedTuning, verified_database

DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")

PHASES = ("import_cleanup", "lossless_fusion", "target_lowering", "apply_tuning", "weights_and_signature", "finalize")
Phase = Literal["import_cleanup", "lossless_fusion", "target_lowering", "apply_tuning", "weights_and_signature",
                "finalize"]
WeightsMode = Literal["external", "embedded"]

# Ops that survive lowering (VM builtins and packed calls): anything else left in a Relax
# function means the module still needs the finalize phase.
_LOWERED_OPS = ("relax.vm.", "relax.builtin.", "relax.memory.", "relax.call_builtin_with_ctx", "relax.call_packed",
                "relax.call_pure_packed", "relax.null_value", "relax.shape_of", "relax.print", "relax.assert_op",
                "relax.make_closure", "relax.invoke_closure", "relax.invoke_pure_closure")


def is_gpu_target(target: tvm.target.Target) -> bool:
    return "gpu" in target.keys


def conv_channels_last(target: tvm.target.Target, channels_last: bool | None = None) -> bool:
    """Whether the target lowering makes convolutions NHWC for ``target`` given the caller's
    ``channels_last`` (None: on CPU targets); True on a GPU target is a TuningError."""
    if channels_last is None:
        return not is_gpu_target(target)
    if channels_last and is_gpu_target(target):
        raise TuningError("channels_last applies to CPU targets only (GPU convolutions are lowered to GEMMs)")
    return channels_last


def dlight_gpu_rules() -> list[tuple[str, Any]]:
    """dlight's default GPU schedule rules, in the order TVM's CUDA pipeline tries them."""
    from tvm.s_tir import dlight as dl

    return [("Matmul", dl.gpu.Matmul()), ("GEMV", dl.gpu.GEMV()), ("Reduction", dl.gpu.Reduction()),
            ("GeneralReduction", dl.gpu.GeneralReduction()), ("Fallback", dl.gpu.Fallback())]


@dataclass
class PipelineResult:
    """What one run of the pipeline did beyond rewriting the module."""

    tuning: VerifiedTuning | None = None  # records applied / dropped (None: no database at all)
    file_weights: list[tuple[str, tvm.runtime.Tensor]] = field(default_factory=list)  # external weights, once each
    entry_weights: list[list[str]] = field(default_factory=list)  # per entry point: its weights' names, in order
    lifted: list[list[tuple[str, tvm.runtime.Tensor]]] = field(default_factory=list)  # per entry point
    default_rules: dict[str, str] = field(default_factory=dict)  # kernel -> the default CPU rule that scheduled it
    transferred: dict[str, str] = field(default_factory=dict)  # kernel -> the workload whose record it borrowed

    def schedules(self) -> dict[str, Any]:
        """How the kernels were scheduled: exact tuned records, records transferred from another
        shape, default CPU rules (per rule)."""
        rules: dict[str, int] = {}
        for rule in self.default_rules.values():
            rules[rule] = rules.get(rule, 0) + 1
        applied = set(self.tuning.applied) if self.tuning is not None else set()
        moved = len(applied & set(self.transferred))
        return {"exact": len(applied) - moved, "transferred": moved, "default": sum(rules.values()),
                "default_rules": dict(sorted(rules.items()))}



class Pipeline:
    """gmorph-tvm's compiler pipeline for one target (see the module docstring for the phases).

    ``fuse``: run the lossless fusion (``tvm.compile(..., relax_pipeline="gmorph")`` does;
    :func:`gmorph_tvm.build` does not, it builds the model it is given). ``stitch`` / ``merge``:
    the fusion's options. ``channels_last``: see :func:`conv_channels_last`. ``tuning_db``: a
    MetaSchedule work dir whose records apply first; ``shipped_records``: then the records shipped
    for the target's class; ``exclude``: kernels whose records are not applied. ``weights``:
    ``"external"`` lifts them out of the code (:class:`LiftWeights`, ``weight_names`` names them
    after the model's parameters), ``"embedded"`` keeps them as constants. ``signature``: given the
    weight names of each entry point, the mapping :class:`AttachSignature` embeds (None: none).
    ``dump_ir``: a folder to write the module to after every phase. ``transfer``: CPU kernels
    without a record of their own run the verified record of the nearest structurally equal kernel
    (other extents; :mod:`gmorph_tvm.tuning.transfer`) instead of their default schedule. Off by
    default: measured, EfficientNet-Lite0 at 96x96 with set E's 224x224 records transferred ran
    5.6 ms vs 2.9 ms on the default schedules (tuning uses transfers as its starting population).
    """

    def __init__(
        self,
        target: tvm.target.Target | None = None,
        *,
        fuse: bool = True,
        stitch: bool = True,
        merge: MergeMode = "auto",
        channels_last: bool | None = None,
        tuning_db: str | os.PathLike | None = None,
        shipped_records: bool = True,
        exclude: Sequence[str] = (),
        weights: WeightsMode = "embedded",
        weight_names: Mapping[bytes, str] | None = None,
        signature: Callable[[list[list[str]]], Mapping[str, Any]] | None = None,
        dump_ir: str | os.PathLike | None = None,
        transfer: bool = False,
    ) -> None:
        self.target = target
        self.transfer = transfer
        self.fuse, self.stitch, self.merge = fuse, stitch, merge
        self.channels_last = channels_last
        self.tuning_db = tuning_db
        self.shipped_records = shipped_records
        self.exclude = tuple(exclude)
        self.weights = weights
        self.weight_names = weight_names or {}
        self.signature = signature
        self.dump_ir = Path(dump_ir) if dump_ir is not None else None
        self.result = PipelineResult()
        self._last_tuning: VerifiedTuning | None = None  # of the last apply_tuning run
        self._last_lifted: list[tuple[str, tvm.runtime.Tensor]] = []  # of the last weights run
        self._last_transfer: TransferReport | None = None  # exact / transferred / default, of the last apply_tuning
        self._last_default_rules: dict[str, str] = {}  # kernel -> default CPU rule, of the last apply_tuning run
        self._raised: GmorphError | None = None  # raised by one of our passes inside TVM's pass machinery

    # ---- the phases --------------------------------------------------------------------------

    def phase_passes(self, phase: Phase, target: tvm.target.Target | None) -> list[tvm.transform.Pass]:
        """The passes of ``phase`` for ``target``, in order (per entry point for the first four;
        the first two need no target)."""
        if target is None and phase not in ("import_cleanup", "lossless_fusion"):
            raise TuningError(f"pipeline phase {phase!r} needs a target")
        cpu = target is None or not is_gpu_target(target)
        if phase == "import_cleanup":
            return [CanonicalizeOps()]
        if phase == "lossless_fusion":
            if not self.fuse:
                return []
            return [*([StitchSharedWeights()] if self.stitch else []),
                    *([HorizontalMerge(mode=self.merge, target=target)] if self.merge != "never" else [])]
        assert target is not None
        if phase == "target_lowering":
            return [
                # Before fusion into kernels: a zero pad fused as a kernel's epilogue is
                # mis-scheduled by MetaSchedule (see the pass); as the next conv's padding it is not.
                FoldPadIntoConv(),
                *([ChannelsLast()] if conv_channels_last(target, self.channels_last) else []),
                *([Conv2dToGemm()] if not cpu else []),
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                # CPU: exp/erf/tanh/sigmoid (and the GELU, SiLU, softmax on them) as vectorisable
                # polynomials; LLVM calls libm once per element for them.
                *([LegalizeFastMath()] if cpu else []),
                LegalizeNaNSafe(),  # before LegalizeOps, which then has no relu/clip/max/min left
                # TVM's "zero" pipeline, spelled out (no database is current here).
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                # Weights (constants) become layout-free: a tuned schedule may choose their layout.
                *([relax.transform.AttachAttrLayoutFreeBuffers()] if cpu else []),
            ]
        if phase == "apply_tuning":
            after = ([_DLightDefault()] if not cpu else
                     [_DefaultCPU(self, target),  # every kernel without a record: parallel, vectorised, tiled
                      relax.transform.SplitLayoutRewritePreproc(),
                      relax.transform.FoldConstant(),  # the weight re-layout kernels, run once at build time
                      relax.transform.DeadCodeElimination()])
            return [_ApplyVerifiedRecords(self), *after]
        if phase == "weights_and_signature":
            return [_LiftEntryWeights(self)] if self.weights == "external" else []
        if phase == "finalize":
            return [relax.get_pipeline("default_build")]
        raise TuningError(f"unknown pipeline phase {phase!r}; phases: {', '.join(PHASES)}")

    # ---- running ---------------------------------------------------------------------------

    def run(self, mod: tvm.IRModule, *, phases: Sequence[Phase] = PHASES, label: str = "") -> tvm.IRModule:
        """``mod`` through ``phases`` (in the pipeline's order) for ``self.target``."""
        target = self._target()
        unknown = [p for p in phases if p not in PHASES]
        if unknown:
            raise TuningError(f"unknown pipeline phase {unknown[0]!r}; phases: {', '.join(PHASES)}")
        with target:
            for index, phase in enumerate(PHASES):
                if phase not in phases:
                    continue
                if phase == "finalize" and not needs_finalize(mod):
                    continue
                passes = self.phase_passes(phase, target)
                if passes:
                    self._raised = None
                    try:
                        mod = tvm.transform.Sequential(passes, name=f"gmorph.{phase}")(mod)
                    except Exception:
                        # TVM's FFI turns an exception raised inside a Python pass into a RuntimeError:
                        # re-raise our own (a TuningError naming the database, ...) as it was raised.
                        if self._raised is not None:
                            raise self._raised from self._raised.__cause__
                        raise
                self._dump(index, phase, mod, label)
        return mod

    def run_entries(self, entries: Mapping[str, tvm.IRModule]) -> tvm.IRModule:
        """Several entry points (function name -> module with a ``main``) into one module, ready for
        ``tvm.compile`` (everything but ``finalize``): each entry point is lowered and tuned on its
        own (its own workloads), its weights lifted; then they are combined (kernels renamed apart,
        identical ones kept once), equal weights stored once, and the signature attached."""
        self.result = PipelineResult()
        parts, tunings = {}, []
        for function, mod in entries.items():
            label = function if len(entries) > 1 else ""
            parts[function] = self.run(mod, phases=PHASES[:4], label=label)
            tunings.append(self._last_tuning)
            self.result.default_rules.update(
                {(f"{k}@{function}" if len(entries) > 1 else k): v for k, v in self._last_default_rules.items()})
            if self._last_transfer is not None:
                self.result.transferred.update(self._last_transfer.sources)
            if self.weights == "external":
                parts[function] = self.run(parts[function], phases=("weights_and_signature",), label=label)
                self.result.lifted.append(self._last_lifted)
            else:
                self.result.lifted.append([])
        self.result.tuning = merge_tunings(tunings)
        if self.weights == "external":
            self.result.file_weights, self.result.entry_weights = unique_weights(self.result.lifted)
        else:
            self.result.entry_weights = [[] for _ in entries]
        combined = parts[next(iter(parts))] if len(parts) == 1 else combine_entries(parts)
        if self.signature is not None:
            combined = AttachSignature(self.signature(self.result.entry_weights))(combined)  # type: ignore[operator]
            self._dump(PHASES.index("weights_and_signature"), "weights_and_signature", combined,
                       "combined" if len(entries) > 1 else "")
        return combined

    def finalize_pass(self) -> tvm.transform.Pass:
        """The finalize phase alone, for ``tvm.compile(lowered, relax_pipeline=...)`` after :meth:`run_entries`."""

        @tvm.transform.module_pass(opt_level=0, name="GmorphFinalize")
        def _finalize(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
            return self.run(mod, phases=("finalize",))

        return _finalize

    def as_pass(self) -> tvm.transform.Pass:
        """The whole pipeline as one module pass (what ``relax_pipeline="gmorph"`` runs): ``main``
        (and any other Relax function, kept as is) through every phase for the current target."""

        @tvm.transform.module_pass(opt_level=0, name="GmorphRelaxPipeline")
        def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
            self.target = self.target or tvm.target.Target.current(allow_none=True)
            lowered = self.run_entries({"main": mod})
            return self.run(lowered, phases=("finalize",))

        return _pipeline

    # ---- internals ---------------------------------------------------------------------------

    def _target(self) -> tvm.target.Target:
        target = self.target or tvm.target.Target.current(allow_none=True)
        if target is None:
            raise TuningError("the gmorph pipeline needs a target (tvm.compile(mod, target, relax_pipeline='gmorph'))")
        return target

    def _dump(self, index: int, phase: str, mod: tvm.IRModule, label: str) -> None:
        if self.dump_ir is None:
            return
        self.dump_ir.mkdir(parents=True, exist_ok=True)
        name = f"{index:02d}-{phase}" + (f".{label}" if label else "") + ".py"
        (self.dump_ir / name).write_text(mod.script(show_meta=False), encoding="utf-8")


@tvm.transform.module_pass(opt_level=0, name="ApplyVerifiedRecords")
class _ApplyVerifiedRecords:
    """The tuning records for the module's kernels (user's database, then shipped), each applied only
    if it computes what the default schedule computes (:func:`verified_database`)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:

        pipe = self.pipeline
        target = pipe._target()
        pipe._last_tuning, pipe._last_default_rules, pipe._last_transfer = None, {}, None
        try:
            database = record_databases(target, pipe.tuning_db, pipe.shipped_records)
            checked = None
            if database is not None:
                checked, pipe._last_tuning = verified_database(database, mod, target, exclude=pipe.exclude)
            if pipe.transfer and not is_gpu_target(target):
                checked = self._with_transfers(mod, target, checked)
        except GmorphError as err:
            pipe._raised = err
            raise
        if checked is None:
            return mod
        with checked:
            return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)

    def _with_transfers(self, mod: tvm.IRModule, target: tvm.target.Target, checked: Any) -> Any:
        """``checked`` plus a verified record transferred from the nearest structurally equal kernel
        (other extents) for every kernel without one of its own (:mod:`gmorph_tvm.tuning.transfer`)."""
        from tvm.s_tir import meta_schedule as ms

        pipe = self.pipeline
        sources = source_databases(target, pipe.tuning_db if pipe.tuning_db is not None and has_database(pipe.tuning_db)
                                   else None, pipe.shipped_records)
        if not sources:
            return checked
        skip = set(pipe.exclude) | set(pipe._last_tuning.dropped if pipe._last_tuning is not None else ())
        extra, report = transferred_database(mod, target, [checked] if checked is not None else [], sources=sources,
                                             exclude=skip)
        pipe._last_transfer = report
        moved = sorted(k for k, kind in report.kinds.items() if kind == TRANSFERRED)
        if not moved:
            return checked
        tuning = pipe._last_tuning or VerifiedTuning()
        tuning.applied = sorted({*tuning.applied, *moved})  # the whole-module check may blame them too
        pipe._last_tuning = tuning
        return extra if checked is None else ms.database.OrderedUnionDatabase(checked, extra)


@tvm.transform.module_pass(opt_level=0, name="DefaultCPUScheduleRules")
class _DefaultCPU:
    """:class:`DefaultCPUSchedules` for the kernels the database left unscheduled; keeps which rule
    took each kernel for the build's report."""

    def __init__(self, pipeline: Pipeline, target: tvm.target.Target) -> None:
        self.pipeline, self.target = pipeline, target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        schedules = DefaultCPUSchedules(self.target)
        out = schedules(mod)  # type: ignore[operator]  # a module pass instance
        self.pipeline._last_default_rules = dict(schedules.chosen)
        return out


@tvm.transform.module_pass(opt_level=0, name="DLightDefaultSchedules")
class _DLightDefault:
    """dlight's default GPU schedules for every kernel the database left unscheduled (every kernel
    must be thread-bound to compile for a GPU)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        from tvm.s_tir import dlight as dl

        return dl.ApplyDefaultSchedule(*(rule for _, rule in dlight_gpu_rules()))(mod)


@tvm.transform.module_pass(opt_level=0, name="LiftEntryWeights")
class _LiftEntryWeights:
    """:class:`LiftWeights` with the pipeline's weight names; keeps the lifted values for the artifact."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        lift = LiftWeights(names=self.pipeline.weight_names)
        out = lift(mod)  # type: ignore[operator]  # a module pass instance
        self.pipeline._last_lifted = lift.lifted()
        return out


# ---- the public lowering entry points (tuning and the tests use these) ----------------------


def prepare(mod: tvm.IRModule, target: tvm.target.Target, *, channels_last: bool | None = None) -> tvm.IRModule:
    """``mod``'s kernels as tuning sees them: the pipeline's ``import_cleanup`` and
    ``target_lowering`` (what ``apply_tuning`` receives in a build). ``channels_last``: see
    :func:`conv_channels_last` (``False`` keeps the importers' NCHW convolutions)."""
    return Pipeline(target, fuse=False, channels_last=channels_last).run(
        mod, phases=("import_cleanup", "target_lowering"))


def lower(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    *,
    database_dir: str | os.PathLike | None = None,
    shipped_records: bool = True,
) -> tvm.IRModule:
    """``mod`` (weights bound) through the pipeline up to ``apply_tuning``, for
    ``tvm.compile(result, target=target)``: tuned kernels where a verified record exists, default
    schedules elsewhere (dlight on GPUs, plain loops on CPUs); ``main`` keeps its signature."""
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

    A record that disagrees with the default schedule on random inputs, or a kernel named in
    ``exclude``, is dropped with a :class:`TuningWarning` and the kernel keeps its default schedule.
    """
    pipe = Pipeline(target, fuse=False, channels_last=channels_last, tuning_db=database_dir,
                    shipped_records=shipped_records, exclude=exclude)
    lowered = pipe.run(mod, phases=("import_cleanup", "target_lowering", "apply_tuning"))
    return lowered, pipe._last_tuning


def default_gpu_rules(prepared: tvm.IRModule, target: tvm.target.Target) -> dict[str, str]:
    """Which dlight rule of the GPU ``apply_tuning`` phase schedules each kernel of ``prepared``
    (the output of :func:`prepare`): ``{kernel name: "Matmul" | "GEMV" | ... | "Fallback"}``, the
    first rule in the list that accepts it, as ``ApplyDefaultSchedule`` picks."""
    from tvm.s_tir import dlight as dl

    chosen: dict[str, str] = {}
    current = prepared
    with target:
        for name, rule in dlight_gpu_rules():
            current = dl.ApplyDefaultSchedule(rule)(current)
            for gvar, func in current.functions_items():
                scheduled = isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and func.attrs.get("tirx.is_scheduled")
                if scheduled and gvar.name_hint not in chosen:
                    chosen[gvar.name_hint] = name
    return chosen


def needs_finalize(mod: tvm.IRModule) -> bool:
    """Whether ``mod`` still has dataflow / ``call_tir`` for the finalize phase to lower."""
    pending = False

    def visit(expr):
        nonlocal pending
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and not expr.op.name.startswith(_LOWERED_OPS):
            pending = True

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            if any(isinstance(b, relax.DataflowBlock) for b in getattr(func.body, "blocks", [])):
                return True
            relax.analysis.post_order_visit(func.body, visit)
            if pending:
                return True
    return False


# ---- tuning databases ------------------------------------------------------------------------


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


def check_database_target(directory: str | os.PathLike, target: tvm.target.Target) -> None:
    """Refuse a database whose target stamp (written by ``tune``) names another machine class than
    ``target``'s (another CPU class or architecture, another CUDA arch): its schedules were chosen,
    and its kernels verified, for the other one. A database without a stamp is taken as is."""
    stamp = Path(directory) / STAMP_FILE
    if not stamp.is_file():
        return
    try:
        recorded = json.loads(stamp.read_text(encoding="utf-8"))
        recorded_target = tvm.target.Target(recorded)
    except Exception as err:  # noqa: BLE001 - a stamp TVM cannot read names no target we can match
        raise TuningError(f"tuning database {directory}: its target stamp {stamp.name} is unreadable "
                          f"({one_line(err)})") from err
    mine, theirs = _machine_class(target), _machine_class(recorded_target)
    if mine != theirs:
        raise TuningError(
            f"tuning database {directory} was tuned for {theirs} ({recorded_target}), not for this build's "
            f"{mine} ({target}); tune for this target into another directory, or build without it"
        )


def _machine_class(target: tvm.target.Target) -> str:
    return target_class(target) or target.kind.name


def _uses_tensor_intrinsics(directory: Path) -> bool:
    """Whether any record tensorises: applying it then needs the intrinsics registered."""
    with open(directory / DATABASE_FILES[1], encoding="utf-8") as records:
        return any('"Tensorize"' in line for line in records)


class ShippedRecordsNote(UserWarning):
    """Shipped tuning records exist but do not apply to this target (class or TVM version)."""


def record_databases(
    target: tvm.target.Target, database_dir: str | os.PathLike | None, shipped_records: bool = True
):
    """The database to apply (user's first, then the shipped records for ``target``), or None.

    A user's directory without a database yet (e.g. a new ``--tuning-db`` with no tuning) adds
    nothing; one stamped for another machine class is refused (:func:`check_database_target`).
    Warns with :class:`ShippedRecordsNote` when shipped records exist but not for this target.
    """
    directories = []
    if database_dir is not None:
        check_database_target(database_dir, target)
        if has_database(database_dir) or not Path(database_dir).is_dir():
            directories.append(Path(database_dir))  # a missing folder stays an error (a typo)
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


# ---- entry points and weights ------------------------------------------------------------------


def merge_tunings(parts: Sequence[VerifiedTuning | None]) -> VerifiedTuning | None:
    """The per-entry tuning results as one (None when no entry was lowered with records)."""
    found = [p for p in parts if p is not None]
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    return VerifiedTuning(
        applied=sorted({k for p in found for k in p.applied}),
        dropped={k: v for p in found for k, v in p.dropped.items()},
        unverified=sorted({k for p in found for k in p.unverified}),
        checks=[c for p in found for c in p.checks],
        seconds=sum(p.seconds for p in found),
    )


def unique_weights(lifted: Sequence[Sequence[tuple[str, tvm.runtime.Tensor]]]):
    """One tensor per distinct content over all entries: (file weights, per-entry names in order)."""
    flat: list[tuple[str, np.ndarray]] = []
    values: dict[str, tvm.runtime.Tensor] = {}
    keyed: list[list[str]] = []
    for i, part in enumerate(lifted):
        names = []
        for name, value in part:
            key = name if name not in values else f"{name}@{i}"
            n = 1
            while key in values:
                key, n = f"{name}@{i}.{n}", n + 1
            values[key] = value
            flat.append((key, value.numpy()))
            names.append(key)
        keyed.append(names)
    kept, alias = unique_arrays(flat)
    file_weights = [(name, values[name]) for name, _ in kept]
    return file_weights, [[alias.get(n, n) for n in names] for names in keyed]


@relax.expr_functor.mutator
class _Rename(relax.PyExprMutator):
    """Points calls at renamed kernels (the GlobalVars of the combined module)."""

    def __init__(self, mapping: Mapping[str, tvm.ir.GlobalVar]):
        super().__init__()
        self.mapping = mapping

    def visit_global_var_(self, gvar):
        return self.mapping.get(gvar.name_hint, gvar)


def combine_entries(parts: Mapping[str, tvm.IRModule]) -> tvm.IRModule:
    """One module with each part's ``main`` as the function named by its key; kernels renamed apart
    (identical kernels are kept once)."""
    bb = relax.BlockBuilder()
    for function, part in parts.items():
        mapping: dict[str, tvm.ir.GlobalVar] = {}
        for gvar, func in part.functions_items():
            if isinstance(func, tvm.tirx.PrimFunc):
                mapping[gvar.name_hint] = bb.add_func(func.without_attr("global_symbol"), gvar.name_hint)
        for gvar, func in part.functions_items():
            if isinstance(func, relax.Function):
                new_name = function if gvar.name_hint == "main" else f"{gvar.name_hint}_{function}"
                renamed = _Rename(mapping).visit_expr(func)
                if gvar.name_hint == "main":
                    renamed = renamed.with_attr("global_symbol", function)
                else:
                    renamed = renamed.without_attr("global_symbol")
                bb.add_func(renamed, new_name)
    return bb.get()
