"""Calling a built ``main`` the way its manifest describes: the device, input checks, and the
split of the flat output tuple into tasks. Shared by in-process artifacts and loaded runners."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax

from ..errors import ArtifactError
from .manifest import input_specs, task_infos
from .specs import check_inputs

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


def execute(vm: relax.VirtualMachine, manifest: Mapping[str, Any], inputs: InputsLike, *, what: str,
            device: tvm.runtime.Device | None = None) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Check ``inputs`` against the manifest, run ``main`` and split its outputs by task."""
    arrays = check_inputs(input_specs(manifest), inputs)
    dev = device if device is not None else (tvm.cpu() if manifest["device"] == "cpu" else tvm.cuda())
    result = vm["main"](*[tvm.runtime.tensor(a, dev) for a in arrays])
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
        out[task.name] = arrays[0] if len(arrays) == 1 else arrays
    return out
