"""The artifact manifest: what a compiled library computes and how to call it.

Written beside the library as ``<dir>/<stem>.manifest.json``. It lets a runner (Python or the
C++ ``gmorph-run``) check inputs by name/shape/dtype and name the outputs by task without
importing the original models. Schema (``format_version`` 1)::

    {"format": "gmorph-tvm-artifact", "format_version": 1, "package_version": "0.1.0",
     "library": "model.so", "target": {...TVM target dict...}, "device": "cpu" | "cuda",
     "host_triple": "x86_64-linux-gnu",
     "inputs": [{"name", "shape", "dtype"}, ...],
     "tasks": [{"name", "inputs", "outputs", "source", "source_sha256"}, ...],
     "weights": {"count": N, "bytes": B, "storage": "external" | "embedded",
                 # external only (see gmorph_tvm.core.weights_file):
                 "file": "model.weights.safetensors", "format": "safetensors", "sha256": ..., "size": ...,
                 "alignment": 64, "tensors": [{"name", "dtype", "shape"}, ...]},
     "entries": [{"function": "main", "inputs": [...], "tasks": [names], "outputs": [...],
                  "weights": [tensor names, in parameter order after the inputs],
                  "batch": 8}, ...],          # several for batch buckets or groups (gmorph_tvm.core.vm)
     "batch_buckets": [1, 8, 32], "batch_padding": "edge",   # bucketed builds only
     "cuda": {"arch": "sm_87", "device_code": "fatbin" | "cubin"},  # CUDA targets only
     "created": "2025-01-01T00:00:00+00:00"}

``main`` returns one flat tuple: every task's outputs in task order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import ArtifactError
from .specs import TaskInfo, TensorSpec

FORMAT = "gmorph-tvm-artifact"
FORMAT_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
LIBRARY_SUFFIXES = (".so", ".tar", ".dylib", ".dll")


def manifest_path_for(library: str | Path) -> Path:
    """``dir/model.so`` -> ``dir/model.manifest.json``."""
    library = Path(library)
    return library.with_name(library.stem + MANIFEST_SUFFIX)


def library_path_for(path: str | Path) -> Path:
    """The library an artifact path refers to: the path itself, or the one a manifest names."""
    path = Path(path)
    if path.name.endswith(MANIFEST_SUFFIX):
        manifest = read_manifest(path)
        return path.with_name(manifest["library"])
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load and validate a manifest (given its path or its library's); ArtifactError naming the
    file on any problem."""
    path = Path(path)
    if not path.name.endswith(MANIFEST_SUFFIX):
        path = manifest_path_for(path)
    if not path.is_file():
        raise ArtifactError(f"manifest {path} not found (export writes it beside the library)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"manifest {path} is not valid JSON: {err}") from None
    validate_manifest(data, path)
    return data


def validate_manifest(data: Any, path: str | Path = "<manifest>") -> None:
    if not isinstance(data, dict):
        raise ArtifactError(f"manifest {path} is not a JSON object")
    if data.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a gmorph-tvm manifest (format {data.get('format')!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"manifest {path} has format_version {version!r}; this gmorph-tvm reads version {FORMAT_VERSION}"
        )
    for key, kind in (("library", str), ("device", str), ("inputs", list), ("tasks", list), ("target", dict)):
        if not isinstance(data.get(key), kind):
            raise ArtifactError(f"manifest {path}: field {key!r} is missing or not a {kind.__name__}")
    if data["device"] not in ("cpu", "cuda"):
        raise ArtifactError(f"manifest {path}: unknown device {data['device']!r}")
    try:
        input_specs(data)
        task_infos(data)
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"manifest {path}: malformed inputs/tasks ({type(err).__name__}: {err})") from None
    if is_external(data):
        weights = data["weights"]
        for key, kind in (("file", str), ("sha256", str), ("tensors", list)):
            if not isinstance(weights.get(key), kind):
                raise ArtifactError(f"manifest {path}: external weights field {key!r} is missing or not a {kind.__name__}")
    entries = data.get("entries")
    if entries is not None:
        if not isinstance(entries, list) or not entries or not all(
                isinstance(e, dict) and isinstance(e.get("function"), str) and isinstance(e.get("inputs"), list)
                and isinstance(e.get("tasks"), list) and isinstance(e.get("weights", []), list) for e in entries):
            raise ArtifactError(f"manifest {path}: malformed 'entries'")
        if data.get("batch_buckets") is not None and sorted(int(e.get("batch", 0)) for e in entries) != sorted(
                int(b) for b in data["batch_buckets"]):
            raise ArtifactError(f"manifest {path}: 'batch_buckets' do not match the entries")


def is_external(manifest: Mapping[str, Any]) -> bool:
    """Whether the artifact keeps its weights in a separate weights file."""
    weights = manifest.get("weights")
    return isinstance(weights, Mapping) and weights.get("storage") == "external"


def input_specs(manifest: Mapping[str, Any]) -> list[TensorSpec]:
    return [TensorSpec.from_json(s) for s in manifest["inputs"]]


def task_infos(manifest: Mapping[str, Any]) -> list[TaskInfo]:
    return [TaskInfo.from_json(t) for t in manifest["tasks"]]


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to ``path`` through a temp file in the same directory and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
