"""Compile a MultiModel (or a bare Relax IRModule) into an :class:`Artifact`.

``build`` lowers the module for the target with ``gmorph_tvm.tuning.lower`` (default schedules,
or tuned ones from a tuning database), finishes it with TVM's ``default_build`` relax pipeline in
``tvm.compile``, and for CUDA targets compiles the kernels to a fatbin with nvcc (see
:mod:`gmorph_tvm.core.cuda`), so the exported library carries binary device code for the
requested ``sm_XX`` even when built on a machine without a GPU. Every failure is a :class:`BuildError` naming the tasks and the operator
involved when they can be told, never a raw TVM trace.

Weights (``weights=``): ``"external"`` (the default) lifts every weight out of the compiled code
after lowering (:class:`~gmorph_tvm.artifact.lift_weights.LiftWeights`), when the tuned CPU layouts
are already packed into them, so the library holds code only and :meth:`Artifact.export` writes
the weights once, in their final layout, to ``<stem>.weights.safetensors`` (see
:mod:`gmorph_tvm.core.weights_file`), which the runners map instead of copying. ``"embedded"``
keeps them as constants inside the library (one file; the loaded library image and TVM's
deserialised constant pool then hold about twice the weights).

Several entry points in one artifact, sharing one copy of the weights:

* ``build({1: mm1, 8: mm8, 32: mm32})``: batch buckets. Each is the same model imported (and
  fused, and tuned) at that batch size; functions ``main_b1``, ``main_b8``, ... are lowered on
  their own (so each uses the tuning records of its own workloads). A runner picks the bucket by
  the inputs' leading dimension and pads smaller batches up to the next bucket.
* ``build([group0, group1])``: the groups of a grouped build (``fuse_grouped``), one function each
  (``main_g0``, ...); a runner runs them all and returns every task's outputs.

Weights of equal content are stored once across all entry points (a tuned layout that differs
between buckets is a different tensor, stored once for the buckets that share it).
"""

from __future__ import annotations

import copy
import hashlib
import platform
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import tvm
from tvm import relax

from ..core import cuda as cuda_code
from ..core.manifest import FORMAT, FORMAT_VERSION, SIGNATURE_FUNCTION, encode_signature
from ..core.targets import JETPACK_CUDA, TargetLike, is_cuda, jetpack_of, resolve_target, runs_here, target_dict
from ..core.version import __version__
from ..core.vm import VMPool, device_for, entry_weight_args, run_entries
from ..core.weights_file import unique_arrays
from ..errors import ArtifactError, BuildError, GmorphError, one_line
from ..frontend import MultiModel, TaskInfo, TensorSpec, bind_weights
from ..passes import index_bounds
from ..tuning import lower_tuned
from ..tuning.pipeline import conv_channels_last
from ..tuning.shipped import lookup as lookup_shipped
from . import tuned_check
from .export import export_artifact
from .lift_weights import LiftWeights, content_names

WeightsMode = Literal["external", "embedded"]
WEIGHTS_MODES = ("external", "embedded")

# Ops that survive lowering (VM builtins and packed calls): anything else left in a Relax
# function means the module still needs TVM's finalizing relax pipeline.
_LOWERED_OPS = ("relax.vm.", "relax.builtin.", "relax.memory.", "relax.call_builtin_with_ctx", "relax.call_packed",
                "relax.call_pure_packed", "relax.null_value", "relax.shape_of", "relax.print", "relax.assert_op",
                "relax.make_closure", "relax.invoke_closure", "relax.invoke_pure_closure")


@dataclass
class Artifact:
    """A compiled multi-task model: the VM executable plus its manifest."""

    executable: relax.VMExecutable
    target: tvm.target.Target
    _manifest: dict[str, Any]
    _fatbins: dict[str, bytes] = field(default_factory=dict)  # CUDA source sha256 -> fatbin or cubin
    _vm: Any = field(default=None, repr=False)
    # External weights: file order (name, value); written by export, passed to main by run.
    _weights: list[tuple[str, tvm.runtime.Tensor]] = field(default_factory=list, repr=False)
    _weight_args: Any = field(default=None, repr=False)

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest (``library`` and ``created`` are filled in by :meth:`export`)."""
        return copy.deepcopy(self._manifest)

    @property
    def name(self) -> str:
        return str(self._manifest["name"])

    @property
    def device(self) -> str:
        return str(self._manifest["device"])

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(s) for s in self._manifest["inputs"]]

    @property
    def tasks(self) -> list[TaskInfo]:
        return [TaskInfo.from_json(t) for t in self._manifest["tasks"]]

    @property
    def weights(self) -> list[tuple[str, tvm.runtime.Tensor]]:
        """The external weights in file order (empty for embedded weights)."""
        return list(self._weights)

    def weight_args(self, function: str = "main") -> list[tvm.runtime.Tensor]:
        """The weights to pass to ``function`` of this executable after its inputs, in order (CPU
        tensors; empty for embedded weights): ``vm[function](*inputs, *artifact.weight_args())``."""
        values = dict(self._weights)
        entry = next((e for e in self._manifest["entries"] if e["function"] == function), None)
        if entry is None:
            raise ArtifactError(f"artifact {self.name!r} has no entry point {function!r}")
        return [values[n] for n in entry["weights"]]

    def export(self, path: str | Path, *, fcompile: Callable | None = None) -> Path:
        """Write the library (``.so``, or ``.tar`` of objects) and ``<stem>.manifest.json`` beside it
        (and, for external weights, ``<stem>.weights.safetensors``).

        Both are written to temporary files and renamed into place, so a failed export leaves
        nothing behind. ``fcompile`` overrides the linker (default: the host compiler, or
        ``aarch64-linux-gnu-g++`` for an aarch64 host such as a Jetson).
        """
        return export_artifact(self, Path(path), fcompile=fcompile)

    def run(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray) -> dict[str, Any]:
        """Run in this process (CPU artifacts built for this machine, or CUDA with a GPU here)."""
        if self._vm is None:
            built_for = self._manifest["host_triple"].split("-")[0]
            if not runs_here(built_for):
                raise ArtifactError(
                    f"artifact {self.name!r} was built for a {built_for} host; export it and run it there "
                    f"(this machine is {platform.machine()})"
                )
            dev = device_for(self._manifest, self.device, f"artifact {self.name!r}")
            self._vm = VMPool(self.executable, dev, f"artifact {self.name!r}")  # one VM per thread
            on_cpu = dev.dlpack_device_type() == tvm.cpu().dlpack_device_type()
            values = {name: value if on_cpu else value.copyto(dev) for name, value in self._weights}
            self._weight_args = entry_weight_args(self._manifest, values, f"artifact {self.name!r}")
        return run_entries(self._vm.get(), self._manifest, inputs, self._weight_args, what=f"artifact {self.name!r}")


ModelLike: TypeAlias = MultiModel | tvm.IRModule
BuildInput: TypeAlias = ModelLike | Mapping[int, ModelLike] | Sequence[MultiModel]


@dataclass
class _Entry:
    """One entry point to compile: its function name, weights-bound module and signature."""

    function: str
    mod: tvm.IRModule
    inputs: list[TensorSpec]
    tasks: list[TaskInfo]
    batch: int | None = None
    params: Mapping[str, tvm.runtime.Tensor] = field(default_factory=dict)  # names for lifted weights


def build(
    model: BuildInput,
    target: TargetLike = "llvm",
    *,
    tuning_db: str | Path | None = None,
    name: str | None = None,
    shipped_records: bool = True,
    weights: WeightsMode = "external",
    channels_last: bool | None = None,
) -> Artifact:
    """Compile ``model`` for ``target`` (a preset such as ``"llvm"``, ``"cuda"``, ``"jetson-orin"``,
    a TVM target dict, or a ``tvm.target.Target``).

    For a MultiModel the weights are bound as constants first (``model.bound_module()``). A bare
    IRModule is compiled as is; its inputs come from ``main``'s parameters and each of its
    outputs becomes a task ``out0``, ``out1``, ... . ``tuning_db`` is a MetaSchedule work dir
    whose tuned schedules are applied where they match; then the tuning records shipped with
    gmorph-tvm for the target's CPU class, unless ``shipped_records`` is False. Every record
    applied must compute what the default schedule computes (checked per kernel on random
    inputs); a tuned artifact is then compared with the untuned build on random inputs before it
    is returned (:mod:`gmorph_tvm.artifact.tuned_check`). Records that fail either check are
    dropped with a :class:`~gmorph_tvm.tuning.TuningWarning` naming the kernel; manifest field
    ``tuning`` says which databases were used and what was applied, dropped and measured.

    ``model`` may also be a mapping batch size -> model (batch buckets) or a list of MultiModels (the groups of a grouped build):
    one artifact, one entry point each, one copy of the weights (see the module docstring); the
    tuned-build check runs on the whole multi-entry module (every entry point).
    ``weights``: ``"external"`` (a separate, mapped weights file) or ``"embedded"`` (one library).
    ``channels_last`` (default: on CPU targets) computes convolutions in NHWC / OHWI
    (:class:`gmorph_tvm.passes.ChannelsLast`; inputs and outputs keep their layout); ``False``
    keeps the imported NCHW kernels. Tuning records apply to the layout they were tuned in: give
    :func:`gmorph_tvm.tune` the same value.
    """
    if weights not in WEIGHTS_MODES:
        raise BuildError(f"weights must be one of {', '.join(WEIGHTS_MODES)}, not {weights!r}")
    tgt = resolve_target(target)
    entries = _entries(model)
    inputs, tasks = _artifact_signature(entries)
    task_names = [t.name for t in tasks]
    duplicates = sorted({n for n in task_names if task_names.count(n) > 1})
    if duplicates:
        raise BuildError(f"task name {duplicates[0]!r} appears more than once; every task needs its own name")
    name = name or "+".join(task_names)
    device = "cuda" if is_cuda(tgt) else "cpu"
    arch: str | None = None
    jetpack = jetpack_of(tgt) if device == "cuda" else None
    board_cuda = JETPACK_CUDA[jetpack] if jetpack else None  # SASS that board's driver loads
    if device == "cuda":
        if "arch" not in tgt.attrs:
            raise BuildError(f"CUDA target {target_dict(tgt)} has no 'arch' (e.g. 'sm_87')")
        arch = str(tgt.attrs["arch"])
        cuda_code.check_arch_supported(arch, board_cuda)  # fail before spending time on lowering
        cuda_code.check_library_blob_format()  # ... also when export could not embed the compiled code

    bounds: dict[str, Any] = {}
    for entry in entries:
        bounds.update(index_bounds(entry.mod))
    names = content_names({k: v for e in entries for k, v in e.params.items()}) if weights == "external" else {}
    # What each compiled executable was built from (tuned and untuned builds pre-pack differently):
    # id -> (lowered module, lifted weights per entry, file weights, weight names per entry).
    built: dict[int, tuple[tvm.IRModule, list, list, list]] = {}

    def lower_and_compile(database: str | Path | None, exclude: Sequence[str] = (), shipped: bool = True):
        parts, applied_parts = [], []
        for entry in entries:
            with _stage("lowering", entry.mod, entry.tasks, tgt):
                part, part_applied = _lower(entry.mod, tgt, database, exclude, shipped_records and shipped,
                                                   channels_last)
            parts.append(part)
            applied_parts.append(part_applied)
        lifted: list[list[tuple[str, tvm.runtime.Tensor]]] = [[] for _ in entries]
        if weights == "external":
            for i, part in enumerate(parts):
                lift = LiftWeights(names=names)
                parts[i] = lift(part)  # type: ignore[operator]  # a module pass instance
                lifted[i] = lift.lifted()
            file_weights, entry_weights = _unique_weights(lifted)
        else:
            file_weights, entry_weights = [], [[] for _ in entries]
        lowered = parts[0] if len(entries) == 1 else _combine(parts, [e.function for e in entries])
        signature = {
            "inputs": [s.to_json() for s in inputs],
            "tasks": [t.to_json() for t in tasks],
            "index_bounds": bounds,
            "entries": [_entry_json(e, w) for e, w in zip(entries, entry_weights)],
            "batch_buckets": [e.batch for e in entries] if entries[0].batch is not None else [],
        }
        with _stage("compiling", lowered, tasks, tgt), _cuda_compile_callback(arch, board_cuda):
            executable = tvm.compile(_with_signature(lowered, signature), target=tgt,
                                     relax_pipeline=_finalize_pipeline(lowered))
        built[id(executable)] = (lowered, lifted, file_weights, entry_weights)
        return executable, _merge_applied(applied_parts)

    def call_entries(vm: relax.VirtualMachine, executable: Any, device: Any, data: Sequence[np.ndarray]) -> list:
        """Every entry point of ``executable`` on ``data`` (a bucket: padded to its batch), outputs in order."""
        by_name = {s.name: a for s, a in zip(inputs, data)}
        on_cpu = device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        out: list = []
        for entry, lifted in zip(entries, built[id(executable)][1]):
            args = []
            for spec in entry.inputs:
                array = by_name[spec.name]
                if entry.batch is not None and array.shape[0] != entry.batch:
                    array = np.pad(array, [(0, entry.batch - array.shape[0])] + [(0, 0)] * (array.ndim - 1),
                                   mode="edge")
                args.append(tvm.runtime.tensor(np.ascontiguousarray(array), device))
            values = [v if on_cpu else v.copyto(device) for _, v in lifted]
            out.append(vm[entry.function](*args, *values))
        return out

    executable, applied = lower_and_compile(tuning_db)
    tuning_check = None
    if applied is not None and applied.applied:
        # No tuned artifact leaves here unless it computes what the untuned build computes
        # (the whole multi-entry module: every entry point, with its weights).
        def rebuild(exclude: Sequence[str]):
            return lower_and_compile(tuning_db, exclude)

        executable, tuning_check = tuned_check.verify_tuned_build(
            executable, applied, tgt, inputs, compile_untuned=lambda: lower_and_compile(None, shipped=False)[0],
            rebuild=rebuild, call=call_entries,
        )
    elif applied is not None:
        tuning_check = tuned_check.ModuleCheck(dropped=dict(applied.dropped), kernel_seconds=applied.seconds)
    lowered, _, file_weights, entry_weights = built[id(executable)]
    built.clear()
    fatbins = _compile_device_code(executable, arch, board_cuda) if arch is not None else {}

    weight_stats: dict[str, Any] = {"storage": weights}
    if weights == "external":
        weight_stats.update(count=len(file_weights), bytes=sum(_nbytes(v) for _, v in file_weights))
    else:
        weight_stats.update(constant_stats(lowered))

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "name": name,
        "library": None,
        "target": target_dict(tgt),
        "device": device,
        "host_triple": host_triple(tgt),
        "inputs": [s.to_json() for s in inputs],
        "tasks": [t.to_json() for t in tasks],
        "weights": weight_stats,
        "entries": [_entry_json(e, w) for e, w in zip(entries, entry_weights)],
        "index_bounds": bounds,
        "created": None,
    }
    if entries[0].batch is not None:
        manifest["batch_buckets"] = [e.batch for e in entries]
        manifest["batch_padding"] = "edge"
    manifest["tuning"] = {
        "database": str(tuning_db) if tuning_db is not None else None,
        "shipped": lookup_shipped(tgt).key if shipped_records else None,
        "conv_layout": "NHWC" if conv_channels_last(tgt, channels_last) else "NCHW",
        **(tuning_check.to_json() if tuning_check is not None else {}),
    }
    if arch is not None:
        # toolkit: the CUDA release that made the SASS; cuda_min_driver: the oldest driver that loads it.
        manifest["cuda"] = {"arch": arch, **cuda_code.device_code_info(arch, board_cuda)}
        if jetpack:
            manifest["cuda"].update(jetpack=jetpack, board_cuda=board_cuda)
    return Artifact(executable, tgt, manifest, fatbins, _weights=file_weights)


def _nbytes(value: tvm.runtime.Tensor) -> int:
    return int(np.prod([int(d) for d in value.shape], dtype=np.int64)) * np.dtype(str(value.dtype)).itemsize


def _entry_json(entry: _Entry, weights: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "function": entry.function,
        "inputs": [s.to_json() for s in entry.inputs],
        "tasks": [t.name for t in entry.tasks],
        "outputs": [o.to_json() for t in entry.tasks for o in t.outputs],
        "weights": weights,
    }
    if entry.batch is not None:
        out["batch"] = entry.batch
    return out


def _one_entry(model: Any, function: str, what: str) -> _Entry:
    if isinstance(model, MultiModel):
        return _Entry(function, model.bound_module(), list(model.inputs), list(model.tasks), params=model.params)
    if isinstance(model, tvm.IRModule):
        if "main" not in [gv.name_hint for gv in model.get_global_vars()]:
            raise BuildError(f"the IRModule to build{what} has no 'main' function")
        mod = bind_weights(model)
        inputs, tasks = _signature_specs(mod)
        return _Entry(function, mod, inputs, tasks)
    raise BuildError(f"build() takes a MultiModel or a tvm.IRModule{what}, not {type(model).__name__}")


def _entries(model: Any) -> list[_Entry]:
    if isinstance(model, (MultiModel, tvm.IRModule)):
        return [_one_entry(model, "main", "")]
    if isinstance(model, Mapping):
        if not model or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in model):
            raise BuildError("batch buckets must map batch sizes (integers >= 1) to models, e.g. {1: mm1, 8: mm8}")
        entries = []
        for batch in sorted(model):
            entry = _one_entry(model[batch], f"main_b{batch}", f" (batch bucket {batch})")
            entry.batch = batch
            entries.append(entry)
        _check_buckets(entries)
        return entries
    if isinstance(model, Sequence) and not isinstance(model, (str, bytes)):
        if not model:
            raise BuildError("build() was given an empty list of groups")
        entries = [_one_entry(m, f"main_g{i}", f" (group {i})") for i, m in enumerate(model)]
        seen: dict[str, int] = {}
        for i, entry in enumerate(entries):
            for task in entry.tasks:
                if task.name in seen:
                    raise BuildError(f"task {task.name!r} is in group {seen[task.name]} and group {i}; "
                                     "groups must not share tasks")
                seen[task.name] = i
        return entries
    raise BuildError(f"build() takes a MultiModel or a tvm.IRModule, not {type(model).__name__}")


def _check_buckets(entries: list[_Entry]) -> None:
    """Every bucket: the same inputs and tasks, every input and output batched along axis 0."""
    first = entries[0]

    def unbatched(specs):
        return [(s.name, s.dtype, s.shape[1:]) for s in specs]

    for entry in entries:
        for spec in [*entry.inputs, *(o for t in entry.tasks for o in t.outputs)]:
            if not spec.shape or spec.shape[0] != entry.batch:
                raise BuildError(f"batch bucket {entry.batch}: {spec.name} has shape {list(spec.shape)}; every input "
                                 f"and output of a bucket must have the batch size {entry.batch} as its first dimension")
        if unbatched(entry.inputs) != unbatched(first.inputs):
            raise BuildError(f"batch bucket {entry.batch} has other inputs than bucket {first.batch}: "
                             f"{[s.describe() for s in entry.inputs]} vs {[s.describe() for s in first.inputs]}")
        outs = [(t.name, unbatched(t.outputs)) for t in entry.tasks]
        if outs != [(t.name, unbatched(t.outputs)) for t in first.tasks]:
            raise BuildError(f"batch bucket {entry.batch} has other tasks or outputs than bucket {first.batch}")


def _artifact_signature(entries: list[_Entry]) -> tuple[list[TensorSpec], list[TaskInfo]]:
    """The artifact's inputs and tasks: a bucket's (the smallest), or the union over groups."""
    if len(entries) == 1 or entries[0].batch is not None:
        return list(entries[0].inputs), list(entries[0].tasks)
    inputs: dict[str, TensorSpec] = {}
    for i, entry in enumerate(entries):
        for spec in entry.inputs:
            if spec.name in inputs and inputs[spec.name] != spec:
                raise BuildError(f"group {i} reads input {spec.describe()}, another group "
                                 f"{inputs[spec.name].describe()}; groups must agree on shared inputs")
            inputs.setdefault(spec.name, spec)
    return list(inputs.values()), [t for e in entries for t in e.tasks]


def _unique_weights(lifted: list[list[tuple[str, tvm.runtime.Tensor]]]):
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



def _merge_applied(parts: list[Any]) -> Any:
    """The per-entry tuning results as one (None when no entry was lowered with records)."""
    found = [p for p in parts if p is not None]
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    merged = copy.copy(found[0])
    merged.applied = sorted({k for p in found for k in p.applied})
    merged.unverified = sorted({k for p in found for k in p.unverified})
    merged.dropped = {k: v for p in found for k, v in p.dropped.items()}
    merged.seconds = sum(p.seconds for p in found)
    return merged


# ---- lowering ------------------------------------------------------------------------------


def _lower(mod: tvm.IRModule, target: tvm.target.Target, tuning_db: str | Path | None, exclude: Sequence[str] = (),
           shipped_records: bool = True, channels_last: bool | None = None):
    # Same lowering as tuning uses, so tuned workloads match what gets compiled.
    return lower_tuned(mod, target, database_dir=tuning_db, shipped_records=shipped_records, exclude=exclude,
                       channels_last=channels_last)


def _with_signature(mod: tvm.IRModule, manifest: Mapping[str, Any]) -> tvm.IRModule:
    """``mod`` plus a VM function ``gmorph_signature() -> uint8[n]``: the JSON signature (inputs,
    task names, output specs) the loader compares with the manifest, so a library and a manifest
    that do not belong together are refused before ``main`` runs."""
    data = np.frombuffer(encode_signature(manifest), dtype="uint8").copy()
    const = relax.const(data, "uint8")
    func = relax.Function([], const, const.ty, is_pure=True).with_attr("global_symbol", SIGNATURE_FUNCTION)
    out = mod.clone()
    out[SIGNATURE_FUNCTION] = func
    return out




@relax.expr_functor.mutator
class _Rename(relax.PyExprMutator):
    """Points calls at renamed kernels (the GlobalVars of the combined module)."""

    def __init__(self, mapping: Mapping[str, tvm.ir.GlobalVar]):
        super().__init__()
        self.mapping = mapping

    def visit_global_var_(self, gvar):
        return self.mapping.get(gvar.name_hint, gvar)


def _combine(parts: Sequence[tvm.IRModule], functions: Sequence[str]) -> tvm.IRModule:
    """One module with each lowered part's ``main`` as ``functions[i]``; kernels renamed apart
    (identical kernels are kept once)."""
    bb = relax.BlockBuilder()
    for part, function in zip(parts, functions):
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



def _finalize_pipeline(mod: tvm.IRModule) -> str | None:
    """"default_build" if ``mod`` still has dataflow / call_tir to lower, else None (already final)."""
    pending = False

    def visit(expr):
        nonlocal pending
        if isinstance(expr, relax.DataflowBlock):
            pending = True
        elif isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            if not expr.op.name.startswith(_LOWERED_OPS):
                pending = True

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            if any(isinstance(b, relax.DataflowBlock) for b in getattr(func.body, "blocks", [])):
                return "default_build"
            relax.analysis.post_order_visit(func.body, visit)
            if pending:
                return "default_build"
    return None


@contextmanager
def _cuda_compile_callback(arch: str | None, board_cuda: str | None = None) -> Iterator[None]:
    """On a machine with a CUDA driver TVM JIT-compiles kernels through ``tvm_callback_cuda_compile``
    during codegen (NVRTC by default, which needs cuda-bindings); make it produce our fatbin for
    the target arch instead, and put the original back afterwards."""
    if arch is None or tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        yield  # no CUDA runtime here: codegen keeps the source, compiled in _compile_device_code
        return
    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    original = tvm.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(
        name, lambda code, *_: cuda_code.compile_kernels(str(code), arch, board_cuda), override=True
    )
    try:
        yield
    finally:
        if original is not None:
            tvm_ffi.register_global_func(name, original, override=True)


def _compile_device_code(executable: relax.VMExecutable, arch: str, board_cuda: str | None = None) -> dict[str, bytes]:
    """nvcc-compile the source of every CUDA module codegen left uncompiled (no CUDA runtime here)."""
    fatbins: dict[str, bytes] = {}
    found = 0
    for module in _module_tree(executable.mod):
        if module.kind != "cuda":
            continue
        found += 1
        if module.is_runnable():
            continue  # a real CUDA module: already compiled by _cuda_compile_callback
        source = str(module.inspect_source("cuda"))
        if not source:
            raise BuildError("TVM produced a CUDA module without source; cannot compile its kernels")
        fatbins[cuda_code.source_key(source)] = cuda_code.compile_kernels(source, arch, board_cuda)
    if not found:
        raise BuildError("the CUDA build produced no CUDA kernels (nothing was offloaded to the GPU)")
    return fatbins


def _module_tree(root: tvm.runtime.Module) -> list[tvm.runtime.Module]:
    out, stack = [], [root]
    while stack:
        module = stack.pop()
        out.append(module)
        stack.extend(module.imports)
    return out


# ---- manifest helpers ------------------------------------------------------------------------


def host_triple(target: tvm.target.Target) -> str:
    """The host code's triple: the target's mtriple, or this machine's."""
    host = target.host if is_cuda(target) and target.host is not None else target
    triple = str(host.attrs["mtriple"]) if "mtriple" in host.attrs else ""
    if triple:
        return triple
    if sys.platform.startswith("linux"):
        return f"{platform.machine()}-linux-gnu"
    get = tvm.get_global_func("target.llvm_get_system_triple", allow_missing=True)
    return str(get()) if get is not None else platform.machine()


def constant_stats(mod: tvm.IRModule) -> dict[str, int]:
    """Count and bytes of the tensor constants (weights) the compiled program embeds.

    Mirrors the VM's constant pool, which stores constants of equal content once (the exec
    builder deduplicates by structural equality); scalars (0-d constants from legalization)
    are not counted as weights.
    """
    import tvm_ffi

    groups: dict[tuple, list[np.ndarray]] = {}
    total = {"count": 0, "bytes": 0}

    def visit(expr):
        if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
            value = expr.value
            if len(value.shape) == 0:
                return
            key = (str(value.dtype), tuple(int(d) for d in value.shape), tvm_ffi.structural_hash(value))
            array = value.numpy()
            same = groups.setdefault(key, [])
            if any(np.array_equal(array, seen) for seen in same):  # confirm the hash hit
                return
            same.append(array)
            total["count"] += 1
            total["bytes"] += int(array.nbytes)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return total


def _signature_specs(mod: tvm.IRModule) -> tuple[list[TensorSpec], list[TaskInfo]]:
    """Inputs from ``main``'s parameters; one task ``out<i>`` per output of a bare IRModule."""
    func = mod["main"]
    inputs = []
    for param in func.params:
        inputs.append(_spec(param.name, param.ty, f"input {param.name!r}"))
    ret = func.ret_ty
    leaves = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    digest = hashlib.sha256(str(_module_hash(mod)).encode()).hexdigest()
    tasks = []
    for i, ty in enumerate(leaves):
        out = _spec(f"out{i}", ty, f"output {i}")
        tasks.append(TaskInfo(f"out{i}", tuple(inputs), (out,), "relax", digest))
    return inputs, tasks


def _module_hash(mod: tvm.IRModule) -> int:
    import tvm_ffi

    return tvm_ffi.structural_hash(mod)


def _spec(name: str, ty: Any, what: str) -> TensorSpec:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise BuildError(f"main's {what} is not a tensor of static shape ({ty}); build needs static shapes")
    try:
        shape = tuple(int(d) for d in ty.shape.values)
    except (TypeError, AttributeError) as err:
        raise BuildError(f"main's {what} has a symbolic shape {ty.shape}; build needs static shapes") from err
    dtype = ty.dtype
    return TensorSpec(name, shape, str(getattr(dtype, "dtype", dtype)))


# ---- errors --------------------------------------------------------------------------------


@contextmanager
def _stage(what: str, mod: tvm.IRModule, tasks: Sequence[TaskInfo], target: tvm.target.Target) -> Iterator[None]:
    try:
        yield
    except GmorphError:
        raise
    except Exception as err:  # noqa: BLE001 - TVM raises many error types; all become BuildError
        message = str(err)
        where = _locate(message, mod, tasks)
        raise BuildError(f"{what} for {target.kind.name} failed{where}: {one_line(err)}") from err


def _locate(message: str, mod: tvm.IRModule, tasks: Sequence[TaskInfo]) -> str:
    """`` in op X (tasks a, b)`` for the op or kernel the error message mentions, if any."""
    try:
        main = mod["main"]
    except Exception:  # noqa: BLE001
        return ""
    kernels = {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    mentioned_kernels = [k for k in sorted(kernels, key=len, reverse=True) if re.search(rf"\b{re.escape(k)}\b", message)]
    mentioned_ops = re.findall(r"\brelax\.[A-Za-z_][\w.]*[A-Za-z_0-9]", message)
    if mentioned_kernels:
        label, pred = f"kernel {mentioned_kernels[0]!r}", _calls_kernel(mentioned_kernels[0])
    elif mentioned_ops:
        label, pred = f"op {mentioned_ops[0]}", _calls_op(mentioned_ops[0])
    else:
        return ""
    names = _tasks_depending_on(main, pred, tasks)
    return f" in {label}" + (f" (task {', '.join(repr(n) for n in names)})" if names else "")


def _calls_op(op_name: str) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == op_name


def _calls_kernel(kernel: str) -> Callable[[Any], bool]:
    def pred(v) -> bool:
        if not isinstance(v, relax.Call):
            return False
        callee = v.args[0] if isinstance(v.op, tvm.ir.Op) and v.op.name.startswith("relax.call_tir") and v.args else v.op
        return isinstance(callee, tvm.ir.GlobalVar) and callee.name_hint == kernel

    return pred


def _tasks_depending_on(func: relax.Function, pred: Callable[[Any], bool], tasks: Sequence[TaskInfo]) -> list[str]:
    """Tasks whose outputs depend on a binding whose value satisfies ``pred`` (forward taint)."""
    tainted: set = set()
    bound: dict = {}
    body = func.body
    for block in getattr(body, "blocks", []):
        for binding in block.bindings:
            value = binding.value
            bound[binding.var] = value
            if pred(value) or any(v in tainted for v in relax.analysis.free_vars(value)):
                tainted.add(binding.var)
    result = body.body if hasattr(body, "body") else body
    while isinstance(result, relax.Var) and result in bound:
        result = bound[result]
        if not isinstance(result, (relax.Var, relax.Tuple)):
            break
    fields = list(result.fields) if isinstance(result, relax.Tuple) else [result]
    names, index = [], 0
    for task in tasks:
        outs = fields[index:index + len(task.outputs)]
        index += len(task.outputs)
        if any(isinstance(f, relax.Var) and f in tainted for f in outs):
            names.append(task.name)
    return names
