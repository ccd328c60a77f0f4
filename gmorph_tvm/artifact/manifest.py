"""The manifest of a build: what :meth:`Artifact.export` writes beside the library (format in
:mod:`gmorph_tvm.core.manifest`), made from the entry points, the pipeline's result and the target."""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax

from ..core import cuda as cuda_code
from ..core.manifest import FORMAT, FORMAT_VERSION, SIGNATURE_FUNCTION
from ..core.targets import is_cuda, target_dict
from ..core.version import __version__
from ..frontend import TaskInfo, TensorSpec
from .entries import Entry, entry_json


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

    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function) and gvar.name_hint != SIGNATURE_FUNCTION:  # the signature is no weight
            relax.analysis.post_order_visit(func.body, visit)
    return total


def make_manifest(
    *,
    name: str,
    target: tvm.target.Target,
    entries: Sequence[Entry],
    inputs: Sequence[TensorSpec],
    tasks: Sequence[TaskInfo],
    bounds: Mapping[str, Any],
    entry_weights: Sequence[Sequence[str]],
    weight_stats: Mapping[str, Any],
    tuning: Mapping[str, Any],
    arch: str | None,
    jetpack: str | None,
    board_cuda: str | None,
) -> dict[str, Any]:
    """The manifest (``library`` and ``created`` are filled in by export)."""
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "name": name,
        "library": None,
        "target": target_dict(target),
        "device": "cuda" if is_cuda(target) else "cpu",
        "host_triple": host_triple(target),
        **signature(entries, inputs, tasks, bounds, entry_weights),
        "weights": dict(weight_stats),
        "created": None,
    }
    if entries[0].batch is not None:
        manifest["batch_padding"] = "edge"
    else:
        del manifest["batch_buckets"]
    manifest["tuning"] = dict(tuning)
    if arch is not None:
        # toolkit: the CUDA release that made the SASS; cuda_min_driver: the oldest driver that loads it.
        manifest["cuda"] = {"arch": arch, **cuda_code.device_code_info(arch, board_cuda)}
        if jetpack:
            manifest["cuda"].update(jetpack=jetpack, board_cuda=board_cuda)
    return manifest


def signature(entries: Sequence[Entry], inputs: Sequence[TensorSpec], tasks: Sequence[TaskInfo],
              bounds: Mapping[str, Any], entry_weights: Sequence[Sequence[str]]) -> dict[str, Any]:
    """What the library embeds (``gmorph_signature``) and the manifest repeats: inputs, tasks, index
    bounds, entry points with their weights, batch buckets."""
    return {
        "inputs": [s.to_json() for s in inputs],
        "tasks": [t.to_json() for t in tasks],
        "index_bounds": dict(bounds),
        "entries": [entry_json(e, list(w)) for e, w in zip(entries, entry_weights)],
        "batch_buckets": [e.batch for e in entries] if entries[0].batch is not None else [],
    }
