"""Compile a MultiModel (or a bare Relax IRModule) into an :class:`Artifact`.

``build`` is: normalise the entry points (:mod:`.entries`) -> run the compiler pipeline
(:class:`gmorph_tvm.tuning.pipeline.Pipeline`: clean-up, target lowering, verified tuning records,
weights and signature) -> ``tvm.compile`` (the pipeline's finalize phase) -> the manifest
(:mod:`.manifest`); for CUDA targets it also compiles the kernels to a fatbin with nvcc (see
:mod:`gmorph_tvm.core.cuda`), so the exported library carries binary device code for the
requested ``sm_XX`` even when built on a machine without a GPU. Every failure is a :class:`BuildError` naming the tasks and the operator
involved when they can be told, never a raw TVM trace.

Weights (``weights=``): ``"external"`` (the default) lifts every weight out of the compiled code
after lowering (:class:`~gmorph_tvm.passes.LiftWeights`), when the tuned CPU layouts
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
import platform
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tvm
from tvm import relax

from ..core import cuda as cuda_code
from ..core.ir import tensor_nbytes
from ..core.targets import JETPACK_CUDA, TargetLike, is_cuda, jetpack_of, resolve_target, runs_here, target_dict
from ..core.vm import VMPool, device_for, entry_weight_args, run_entries
from ..errors import ArtifactError, BuildError, GmorphError, one_line
from ..frontend import TaskInfo, TensorSpec
from ..passes import content_names, index_bounds
from ..tuning.pipeline import Pipeline, PipelineResult, conv_channels_last
from ..tuning.shipped import lookup as lookup_shipped
from . import tuned_check
from .entries import BuildInput, artifact_signature, normalise_entries
from .export import export_artifact
from .manifest import constant_stats, make_manifest, signature

WeightsMode = Literal["external", "embedded"]
WEIGHTS_MODES = ("external", "embedded")


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


@dataclass
class _Compiled:
    """One compiled build: the executable and what the pipeline made it from (lifted weights)."""

    executable: relax.VMExecutable
    result: PipelineResult
    lowered: tvm.IRModule  # what was compiled (before the finalize phase)


def build(
    model: BuildInput,
    target: TargetLike = "llvm",
    *,
    tuning_db: str | Path | None = None,
    name: str | None = None,
    shipped_records: bool = True,
    weights: WeightsMode = "external",
    channels_last: bool | None = None,
    dump_ir: str | Path | None = None,
    transfer_records: bool = False,
) -> Artifact:
    """Compile ``model`` for ``target`` (a preset such as ``"llvm"``, ``"cuda"``, ``"jetson-orin"``,
    a TVM target dict, or a ``tvm.target.Target``): normalise its entry points, run the compiler
    pipeline (:class:`gmorph_tvm.tuning.pipeline.Pipeline`, the object ``relax_pipeline="gmorph"``
    also runs, without its fusion phase: build compiles the model it is given), compile, and
    describe the result in a manifest.

    For a MultiModel the weights are bound as constants first (``model.bound_module()``). A bare
    IRModule is compiled as is; its inputs come from ``main``'s parameters and each of its
    outputs becomes a task ``out0``, ``out1``, ... . ``tuning_db`` is a MetaSchedule work dir
    whose tuned schedules are applied where they match (a directory without records yet adds
    none; one tuned for another machine class is refused); then the tuning records shipped with
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
    :func:`gmorph_tvm.tune` the same value. ``dump_ir``: a folder that receives the module after
    every phase of the pipeline (TVMScript). ``transfer_records``: kernels without a record of
    their own borrow the verified record of the nearest kernel of the same structure at other
    extents (see :class:`~gmorph_tvm.tuning.pipeline.Pipeline`; off by default, as measured there).
    """
    if weights not in WEIGHTS_MODES:
        raise BuildError(f"weights must be one of {', '.join(WEIGHTS_MODES)}, not {weights!r}")
    tgt = resolve_target(target)
    entries = normalise_entries(model)
    inputs, tasks = artifact_signature(entries)
    task_names = [t.name for t in tasks]
    duplicates = sorted({n for n in task_names if task_names.count(n) > 1})
    if duplicates:
        raise BuildError(f"task name {duplicates[0]!r} appears more than once; every task needs its own name")
    arch: str | None = None
    jetpack = jetpack_of(tgt) if is_cuda(tgt) else None
    board_cuda = JETPACK_CUDA[jetpack] if jetpack else None  # SASS that board's driver loads
    if is_cuda(tgt):
        if "arch" not in tgt.attrs:
            raise BuildError(f"CUDA target {target_dict(tgt)} has no 'arch' (e.g. 'sm_87')")
        arch = str(tgt.attrs["arch"])
        cuda_code.check_arch_supported(arch, board_cuda)  # fail before spending time on lowering
        cuda_code.check_library_blob_format()  # ... also when export could not embed the compiled code
    bounds: dict[str, Any] = {}
    for entry in entries:
        bounds.update(index_bounds(entry.mod))
    names = content_names({k: v for e in entries for k, v in e.params.items()}) if weights == "external" else {}

    def compile_with(database: str | Path | None, exclude: Sequence[str] = (), shipped: bool = True,
                     dump: str | Path | None = None) -> _Compiled:
        pipe = Pipeline(tgt, fuse=False, channels_last=channels_last, tuning_db=database,
                        shipped_records=shipped_records and shipped, exclude=exclude, weights=weights,
                        weight_names=names, dump_ir=dump, transfer=transfer_records,
                        signature=lambda entry_weights: signature(entries, inputs, tasks, bounds, entry_weights))
        where = entries[0].mod if len(entries) == 1 else None
        with _stage("lowering", where, tasks, tgt):
            lowered = pipe.run_entries({e.function: e.mod for e in entries})
        with _stage("compiling", lowered, tasks, tgt), _cuda_compile_callback(arch, board_cuda):
            executable = tvm.compile(lowered, target=tgt, relax_pipeline=pipe.finalize_pass())
        return _Compiled(executable, pipe.result, lowered)

    def call_entries(vm: relax.VirtualMachine, compiled: _Compiled, device: Any, data: Sequence[np.ndarray]) -> list:
        """Every entry point of ``compiled`` on ``data`` (a bucket: padded to its batch), outputs in order."""
        by_name = {s.name: a for s, a in zip(inputs, data)}
        on_cpu = device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        out: list = []
        for entry, lifted in zip(entries, compiled.result.lifted):
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

    compiled = compile_with(tuning_db, dump=dump_ir)
    applied = compiled.result.tuning
    tuning_check = None
    if applied is not None and applied.applied:
        # No tuned artifact leaves here unless it computes what the untuned build computes
        # (the whole multi-entry module: every entry point, with its weights).
        def rebuild(exclude: Sequence[str]) -> tuple[_Compiled, Any]:
            again = compile_with(tuning_db, exclude)
            return again, again.result.tuning

        compiled, tuning_check = tuned_check.verify_tuned_build(
            compiled, applied, tgt, inputs, compile_untuned=lambda: compile_with(None, shipped=False),
            rebuild=rebuild, call=call_entries,
        )
    elif applied is not None:
        tuning_check = tuned_check.ModuleCheck(dropped=dict(applied.dropped), kernel_seconds=applied.seconds)
    executable, result = compiled.executable, compiled.result
    fatbins = _compile_device_code(executable, arch, board_cuda) if arch is not None else {}

    weight_stats: dict[str, Any] = {"storage": weights}
    if weights == "external":
        weight_stats.update(count=len(result.file_weights), bytes=sum(tensor_nbytes(v) for _, v in result.file_weights))
    else:
        weight_stats.update(constant_stats(compiled.lowered))
    manifest = make_manifest(
        name=name or "+".join(task_names), target=tgt, entries=entries, inputs=inputs, tasks=tasks, bounds=bounds,
        entry_weights=result.entry_weights, weight_stats=weight_stats, arch=arch, jetpack=jetpack, board_cuda=board_cuda,
        tuning={
            "database": str(tuning_db) if tuning_db is not None else None,
            "shipped": lookup_shipped(tgt).key if shipped_records else None,
            "conv_layout": "NHWC" if conv_channels_last(tgt, channels_last) else "NCHW",
            "schedules": result.schedules(),
            **(tuning_check.to_json() if tuning_check is not None else {}),
        },
    )
    return Artifact(executable, tgt, manifest, fatbins, _weights=result.file_weights)


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
