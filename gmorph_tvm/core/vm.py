"""Calling a built ``main`` the way its manifest describes: the device, input checks, and the
split of the flat output tuple into tasks (each output checked against the manifest's shape and
dtype). Shared by in-process artifacts and loaded runners.

A ``relax.VirtualMachine`` keeps its registers, frames and the last call's results inside the
object, so one VM called from several threads crashes or mixes results. :class:`VMPool` gives
every calling thread its own VM, created on first use, over the same executable or loaded
module; VMs made from one executable share its constant pool, and external weights are mapped
once and passed to every thread's VM, so weights are not copied per thread.

An artifact has one or more entry points (manifest ``entries``; a manifest without them has one,
``main``): a plain build has ``main``; a bucketed build has one function per batch size
(``batch_buckets``), of which :func:`run_entries` calls the smallest that holds the inputs' batch,
padding the batch up to it by repeating the last sample ("edge") and cutting the outputs back;
a batch above the largest bucket is refused. A grouped build has one function per group, all of
which are called. Each entry point takes its inputs and then its weights (external weights), in
the order the entry lists them.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax

from ..errors import ArtifactError, RuntimeInputError, one_line
from .manifest import input_specs, task_infos
from .specs import TensorSpec, check_index_bounds, check_inputs

InputsLike = Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray


def device_for(manifest: Mapping[str, Any], device: str, what: str) -> tvm.runtime.Device:
    """The TVM device to run ``manifest``'s artifact on, checking it matches how it was built."""
    kind, _, index_text = str(device).partition(":")
    kind = {"gpu": "cuda", "llvm": "cpu"}.get(kind, kind)
    if kind not in ("cpu", "cuda"):
        raise ArtifactError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    if kind != manifest["device"]:
        raise ArtifactError(
            f"{what} was built for {manifest['device']} (target {manifest['target'].get('kind')}), "
            f"so it cannot run on device {device!r}; load it with device={manifest['device']!r} or rebuild"
        )
    index = int(index_text) if index_text.isdigit() else 0
    dev = tvm.cpu(index) if kind == "cpu" else tvm.cuda(index)
    if kind == "cuda" and not dev.exist:
        raise ArtifactError(f"{what} needs a CUDA GPU, but no CUDA device {index} is available here")
    return dev


class VMPool:
    """One ``relax.VirtualMachine`` per calling thread over one executable or loaded module."""

    def __init__(self, module: Any, device: tvm.runtime.Device, what: str):
        self.module = module
        self.device = device
        self._what = what
        self._local = threading.local()

    def get(self) -> relax.VirtualMachine:
        """This thread's VM (created on the first call from the thread)."""
        vm = getattr(self._local, "vm", None)
        if vm is None:
            try:
                vm = relax.VirtualMachine(self.module, self.device)
            except Exception as err:  # noqa: BLE001 - TVM raises its own error types
                raise ArtifactError(f"cannot run {self._what} here: {one_line(err)}") from err
            self._local.vm = vm
        return vm


def entries_of(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The entry points of ``manifest`` (one ``main`` for manifests that list none)."""
    if manifest.get("entries"):
        return list(manifest["entries"])
    return [{"function": "main", "inputs": list(manifest["inputs"]), "tasks": [t["name"] for t in manifest["tasks"]],
             "weights": []}]


def entry_weight_args(manifest: Mapping[str, Any], tensors: Mapping[str, Any], what: str) -> dict[str, list]:
    """function name -> the weight tensors to pass after its inputs, from ``tensors`` (by name)."""
    out: dict[str, list] = {}
    for entry in entries_of(manifest):
        missing = [n for n in entry.get("weights", []) if n not in tensors]
        if missing:
            raise ArtifactError(f"{what}: entry {entry['function']!r} needs weight {missing[0]!r}, which the "
                                "weights file does not hold")
        out[entry["function"]] = [tensors[n] for n in entry.get("weights", [])]
    return out


def run_entries(vm: relax.VirtualMachine, manifest: Mapping[str, Any], inputs: InputsLike,
                weight_args: Mapping[str, list] | None, *, what: str,
                device: tvm.runtime.Device | None = None) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Check ``inputs``, call the entry point(s) they select, return every task's outputs."""
    dev = device if device is not None else (tvm.cpu() if manifest["device"] == "cpu" else tvm.cuda())
    weight_args = weight_args or {}
    entries = entries_of(manifest)
    if manifest.get("batch_buckets"):
        entry, arrays, batch = select_bucket(manifest, inputs, what)
        check_index_bounds(manifest.get("index_bounds") or {}, input_specs(manifest), arrays)
        args = [tvm.runtime.tensor(a, dev) for a in arrays] + list(weight_args.get(entry["function"], []))
        result = _call(vm, entry["function"], args, what)
        outs = split_outputs(manifest, result, what, tasks=entry["tasks"], batch=int(entry["batch"]))
        if batch == entry["batch"]:
            return outs
        return {t: [o[:batch] for o in v] if isinstance(v, list) else v[:batch] for t, v in outs.items()}
    specs = input_specs(manifest)
    arrays = check_inputs(specs, inputs)
    check_index_bounds(manifest.get("index_bounds") or {}, specs, arrays)
    by_name = {s["name"]: a for s, a in zip(manifest["inputs"], arrays)}
    out: dict[str, np.ndarray | list[np.ndarray]] = {}
    for entry in entries:
        args = [tvm.runtime.tensor(by_name[s["name"]], dev) for s in entry["inputs"]]
        result = _call(vm, entry["function"], [*args, *weight_args.get(entry["function"], [])], what)
        out.update(split_outputs(manifest, result, what, tasks=entry["tasks"]))
    return out


def _call(vm: relax.VirtualMachine, function: str, args: Sequence[Any], what: str) -> Any:
    try:
        return vm[function](*args)
    except Exception as err:  # noqa: BLE001 - TVM raises its own error types
        raise ArtifactError(f"running {what} (entry {function!r}) failed: {one_line(err)}") from err


def select_bucket(manifest: Mapping[str, Any], inputs: InputsLike, what: str) -> tuple[dict, list[np.ndarray], int]:
    """(bucket entry, inputs padded to its batch, the given batch) for a bucketed artifact."""
    specs = input_specs(manifest)
    buckets = sorted(int(b) for b in manifest["batch_buckets"])
    given = _leading_dim(specs, inputs)
    accepted = ", ".join(map(str, buckets))
    if given is None or given < 1:
        raise RuntimeInputError(f"{what}: inputs must have a batch dimension of at least 1 (batch sizes {accepted}, "
                                "smaller ones padded up)")
    arrays = check_inputs([TensorSpec(s.name, (given, *s.shape[1:]), s.dtype) for s in specs], inputs)
    fits = [b for b in buckets if b >= given]
    if not fits:
        raise RuntimeInputError(f"{what}: batch {given} is larger than the largest batch bucket {buckets[-1]} "
                                f"(built for batch sizes {accepted}); split the batch")
    bucket = fits[0]
    entry = next(e for e in entries_of(manifest) if int(e["batch"]) == bucket)
    if bucket != given:
        arrays = [np.ascontiguousarray(np.pad(a, [(0, bucket - given)] + [(0, 0)] * (a.ndim - 1), mode="edge"))
                  for a in arrays]
    return entry, arrays, given


def _leading_dim(specs: Sequence[TensorSpec], inputs: InputsLike) -> int | None:
    value: Any
    if isinstance(inputs, Mapping):
        value = next((inputs[s.name] for s in specs if s.name in inputs), None)
    elif isinstance(inputs, (list, tuple)):
        value = inputs[0] if inputs else None
    else:
        value = inputs
    shape = getattr(value, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) >= 1 else None


def execute(vm: relax.VirtualMachine, manifest: Mapping[str, Any], inputs: InputsLike, *, what: str,
            device: tvm.runtime.Device | None = None) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Check ``inputs`` against the manifest, run ``main`` and split its outputs by task."""
    specs = input_specs(manifest)
    arrays = check_inputs(specs, inputs)
    check_index_bounds(manifest.get("index_bounds") or {}, specs, arrays)
    dev = device if device is not None else (tvm.cpu() if manifest["device"] == "cpu" else tvm.cuda())
    try:
        result = vm["main"](*[tvm.runtime.tensor(a, dev) for a in arrays])
    except Exception as err:  # noqa: BLE001 - TVM raises its own error types
        raise ArtifactError(f"running {what} failed: {one_line(err)}") from err
    return split_outputs(manifest, result, what)


def split_outputs(manifest: Mapping[str, Any], result: Any, what: str = "artifact",
                  tasks: Sequence[str] | None = None,
                  batch: int | None = None) -> dict[str, np.ndarray | list[np.ndarray]]:
    """The flat output tuple of an entry point, by task (``tasks``: that entry's; default all).

    ``batch``: a batch-bucket entry's batch size, which replaces the manifest's leading dimension."""
    flat = [result] if hasattr(result, "numpy") else list(result)
    infos = [t for t in task_infos(manifest) if tasks is None or t.name in tasks]
    expected = sum(len(t.outputs) for t in infos)
    if len(flat) != expected:
        raise ArtifactError(f"{what} returned {len(flat)} outputs but its manifest lists {expected}")
    out: dict[str, np.ndarray | list[np.ndarray]] = {}
    index = 0
    for task in infos:
        arrays = [flat[index + i].numpy() for i in range(len(task.outputs))]
        index += len(task.outputs)
        for spec, array in zip(task.outputs, arrays):
            shape = spec.shape if batch is None or not spec.shape else (batch, *spec.shape[1:])
            if tuple(array.shape) != tuple(shape) or str(array.dtype) != spec.dtype:
                raise ArtifactError(
                    f"{what}: output {spec.name!r} of task {task.name!r} is {array.dtype}{list(array.shape)} "
                    f"but its manifest says {spec.dtype}{list(shape)}"
                )
        out[task.name] = arrays[0] if len(arrays) == 1 else arrays
    return out
