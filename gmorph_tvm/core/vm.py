"""Calling a built ``main`` the way its manifest describes: the device, input checks, and the
split of the flat output tuple into tasks (each output checked against the manifest's shape and
dtype). Shared by in-process artifacts and loaded runners.

A ``relax.VirtualMachine`` keeps its registers, frames and the last call's results inside the
object, so one VM called from several threads crashes or mixes results. :class:`VMPool` gives
every calling thread its own VM, created on first use, over the same executable or loaded
module; VMs made from one executable share its constant pool, so weights are not copied per
thread.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax

from ..errors import ArtifactError, one_line
from .manifest import input_specs, task_infos
from .specs import check_index_bounds, check_inputs

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


def split_outputs(manifest: Mapping[str, Any], result: Any, what: str = "artifact") -> dict[str, np.ndarray | list[np.ndarray]]:
    flat = [result] if hasattr(result, "numpy") else list(result)
    tasks = task_infos(manifest)
    expected = sum(len(t.outputs) for t in tasks)
    if len(flat) != expected:
        raise ArtifactError(f"{what} returned {len(flat)} outputs but its manifest lists {expected}")
    out: dict[str, np.ndarray | list[np.ndarray]] = {}
    index = 0
    for task in tasks:
        arrays = [flat[index + i].numpy() for i in range(len(task.outputs))]
        index += len(task.outputs)
        for spec, array in zip(task.outputs, arrays):
            if tuple(array.shape) != spec.shape or str(array.dtype) != spec.dtype:
                raise ArtifactError(
                    f"{what}: output {spec.name!r} of task {task.name!r} is {array.dtype}{list(array.shape)} "
                    f"but its manifest says {spec.dtype}{list(spec.shape)}"
                )
        out[task.name] = arrays[0] if len(arrays) == 1 else arrays
    return out
