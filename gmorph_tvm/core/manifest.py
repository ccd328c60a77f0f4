"""The artifact manifest: what a compiled library computes and how to call it.

Written beside the library as ``<dir>/<stem>.manifest.json``. It lets a runner (Python or the
C++ ``gmorph-run``) check inputs by name/shape/dtype and name the outputs by task without
importing the original models. Schema (``format_version`` 2)::

    {"format": "gmorph-tvm-artifact", "format_version": 2, "package_version": "0.1.0",
     "library": "model.so", "library_sha256": "<hex digest of the library file>",
     "target": {...TVM target dict...}, "device": "cpu" | "cuda",
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
     "index_bounds": {input name: {"low": lo, "high": hi}},  # inputs that index a table (take)
     "cuda": {"arch": "sm_87", "device_code": "fatbin" | "cubin",   # CUDA targets only
              "toolkit": "12.2",          # CUDA release of the nvcc/ptxas that made the SASS
              "cuda_min_driver": "12.0",  # oldest CUDA driver that loads it (loader refuses older)
              "jetpack": "jp6", "board_cuda": "12.2"},  # only for jetson-*:jpN targets
     "created": "2025-01-01T00:00:00+00:00"}

``main`` returns one flat tuple: every task's outputs in task order.

Version 2 added ``library_sha256``; the library also embeds its own signature (inputs, task
names, output specs) as the VM function ``gmorph_signature``, so a loader can tell a manifest
that does not describe its library (another build, edited tasks or shapes) before running it.
Version-1 manifests (no checksum) are refused with a message saying to rebuild.

Every JSON a runner reads from an artifact (this manifest, the weights file's header) goes
through :func:`loads_bounded`: at most :data:`JSON_MAX_BYTES` bytes (checked before reading),
nested at most :data:`JSON_MAX_DEPTH` levels (checked before parsing, so 200,000 ``[`` is one
line, not a RecursionError) and no ``NaN``/``Infinity``. ``gmorph-run`` (runner/json.h) has the
same limits. The external weights ``file`` must be a bare file name: the file beside the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError
from .specs import TaskInfo, TensorSpec

FORMAT = "gmorph-tvm-artifact"
FORMAT_VERSION = 2
SIGNATURE_FUNCTION = "gmorph_signature"
_SHA256 = re.compile(r"[0-9a-f]{64}")
MANIFEST_SUFFIX = ".manifest.json"
LIBRARY_SUFFIXES = (".so", ".tar", ".dylib", ".dll")
JSON_MAX_BYTES = 4 * 1024 * 1024  # a manifest or a weights header (runner/json.h: kMaxDocumentBytes)
JSON_MAX_DEPTH = 64  # arrays/objects inside each other (runner/json.h: kMaxDepth)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def json_depth(data: bytes) -> int:
    """How deep arrays and objects nest in the JSON text ``data`` (brackets in strings ignored);
    linear time, no recursion."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    step = np.isin(bare, (ord("["), ord("{"))).astype(np.int32) - np.isin(bare, (ord("]"), ord("}"))).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_bounded(data: bytes, what: str) -> Any:
    """``json.loads`` for a file of an artifact: ArtifactError ``"{what}: <why>"`` (one line) when it
    is over :data:`JSON_MAX_BYTES`, nested deeper than :data:`JSON_MAX_DEPTH`, holds NaN/Infinity
    or is not valid JSON. ``what`` says whose JSON it is, e.g. ``"manifest m.json is not valid JSON"``."""
    if len(data) > JSON_MAX_BYTES:
        raise ArtifactError(f"{what}: {len(data)} bytes, over the limit of {JSON_MAX_BYTES}")
    if json_depth(data) > JSON_MAX_DEPTH:
        raise ArtifactError(f"{what}: nested deeper than {JSON_MAX_DEPTH} levels")
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"{what}: {err}") from err


def file_name_problem(name: Any) -> str | None:
    """Why ``name`` (a file an artifact's manifest names) is not a bare file name in the artifact's
    folder, or None: no folder part, no ``..``, not absolute."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        return "is empty or a folder"
    if "/" in name or "\\" in name or os.sep in name:
        return "is a path, not a file name in the artifact's folder"
    if "\0" in name:
        return "holds a NUL byte"
    return None


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
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > JSON_MAX_BYTES:  # refused before anything is read
                raise ArtifactError(f"manifest {path} is {size} bytes, over the limit of {JSON_MAX_BYTES}")
            raw = handle.read(JSON_MAX_BYTES + 1)
    except OSError as err:
        raise ArtifactError(f"cannot read manifest {path}: {err.strerror}") from err
    data = loads_bounded(raw, f"manifest {path} is not valid JSON")
    validate_manifest(data, path)
    return data


def validate_manifest(data: Any, path: str | Path = "<manifest>") -> None:
    if not isinstance(data, dict):
        raise ArtifactError(f"manifest {path} is not a JSON object")
    if data.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a gmorph-tvm manifest (format {data.get('format')!r})")
    version = data.get("format_version")
    if version == 1:
        raise ArtifactError(
            f"manifest {path} has format_version 1 (no library checksum, written by gmorph-tvm < 0.2); "
            "rebuild the artifact with this gmorph-tvm"
        )
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"manifest {path} has format_version {version!r}; this gmorph-tvm reads version {FORMAT_VERSION}"
        )
    for key, kind in (("library", str), ("device", str), ("inputs", list), ("tasks", list), ("target", dict)):
        if not isinstance(data.get(key), kind):
            raise ArtifactError(f"manifest {path}: field {key!r} is missing or not a {kind.__name__}")
    library = data["library"]
    if not library or library != Path(library).name or library in (".", ".."):
        raise ArtifactError(
            f"manifest {path}: field 'library' must be the library's file name beside the manifest, not {library!r}"
        )
    if not isinstance(data.get("library_sha256"), str) or not _SHA256.fullmatch(data["library_sha256"]):
        raise ArtifactError(f"manifest {path}: field 'library_sha256' is missing or not a sha256 hex digest")
    if data["device"] not in ("cpu", "cuda"):
        raise ArtifactError(f"manifest {path}: unknown device {data['device']!r}")
    try:
        specs = input_specs(data)
        tasks = task_infos(data)
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"manifest {path}: malformed inputs/tasks ({type(err).__name__}: {err})") from err
    for what, names in (("input", [s.name for s in specs]), ("task", [t.name for t in tasks])):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ArtifactError(f"manifest {path}: {what} name {duplicates[0]!r} appears more than once")
    bounds = data.get("index_bounds", {})
    if not isinstance(bounds, dict) or not all(
        isinstance(v, dict) and all(isinstance(v.get(k), int) and not isinstance(v.get(k), bool) for k in ("low", "high"))
        for v in bounds.values()
    ):
        raise ArtifactError(f"manifest {path}: field 'index_bounds' must map input names to {{'low': int, 'high': int}}")
    for spec in [*specs, *(o for t in tasks for o in t.outputs)]:
        if any(d < 0 for d in spec.shape):
            raise ArtifactError(f"manifest {path}: tensor {spec.name!r} has a negative dimension {list(spec.shape)}")
    if is_external(data):
        weights = data["weights"]
        for key, wanted in (("file", str), ("sha256", str), ("tensors", list)):
            if not isinstance(weights.get(key), wanted):
                raise ArtifactError(f"manifest {path}: external weights field {key!r} is missing or not a {wanted.__name__}")
        problem = file_name_problem(weights["file"])
        if problem:
            raise ArtifactError(f"manifest {path}: weights file name {weights['file']!r} {problem}")
    entries = data.get("entries")
    if entries is not None:
        if not isinstance(entries, list) or not entries or not all(
                isinstance(e, dict) and isinstance(e.get("function"), str) and isinstance(e.get("inputs"), list)
                and isinstance(e.get("tasks"), list) and isinstance(e.get("weights", []), list) for e in entries):
            raise ArtifactError(f"manifest {path}: malformed 'entries'")
        buckets = data.get("batch_buckets")
        if buckets is not None:
            batches = [e.get("batch", 0) for e in entries]
            if not isinstance(buckets, list) or not all(
                    isinstance(b, int) and not isinstance(b, bool) for b in [*buckets, *batches]):
                raise ArtifactError(f"manifest {path}: 'batch_buckets' and the entries' 'batch' must be integers")
            if sorted(batches) != sorted(buckets):
                raise ArtifactError(f"manifest {path}: 'batch_buckets' do not match the entries")


def is_external(manifest: Mapping[str, Any]) -> bool:
    """Whether the artifact keeps its weights in a separate weights file."""
    weights = manifest.get("weights")
    return isinstance(weights, Mapping) and weights.get("storage") == "external"


def input_specs(manifest: Mapping[str, Any]) -> list[TensorSpec]:
    return [TensorSpec.from_json(s) for s in manifest["inputs"]]


def task_infos(manifest: Mapping[str, Any]) -> list[TaskInfo]:
    return [TaskInfo.from_json(t) for t in manifest["tasks"]]


def signature_of(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What the library computes, as embedded in it at build time: inputs, every task (name,
    inputs, output specs, source) in ``main``'s output order, the index bounds and, for
    multi-entry builds (batch buckets, groups), every entry point: function, batch, inputs, tasks
    and the weight tensors it takes (so a manifest naming other entries or weights is refused)."""
    signature: dict[str, Any] = {
        "inputs": [s.to_json() for s in input_specs(manifest)],
        "tasks": [t.to_json() for t in task_infos(manifest)],
        "index_bounds": {k: dict(v) for k, v in (manifest.get("index_bounds") or {}).items()},
    }
    if manifest.get("entries"):
        signature["entries"] = [
            {"function": e["function"], "batch": e.get("batch"), "inputs": list(e["inputs"]),
             "tasks": list(e["tasks"]), "weights": list(e.get("weights", []))}
            for e in manifest["entries"]
        ]
        signature["batch_buckets"] = list(manifest.get("batch_buckets") or [])
    return signature


def encode_signature(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(signature_of(manifest), sort_keys=True, separators=(",", ":")).encode()


def check_signature(manifest: Mapping[str, Any], embedded: bytes, library: str | Path, manifest_file: str | Path) -> None:
    """ArtifactError naming both files when the library's embedded signature is not the manifest's."""
    try:
        found = json.loads(embedded.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"library {library} holds a corrupt signature (its manifest is {manifest_file})") from err
    expected = signature_of(manifest)
    if found == expected:
        return
    raise ArtifactError(
        f"manifest {manifest_file} does not describe library {library}: {_first_difference(expected, found)}"
    )


def _first_difference(expected: dict[str, Any], found: dict[str, Any]) -> str:
    def describe(entries: list) -> str:
        return ", ".join(f"{e['name']}: {e['dtype']}{e['shape']}" for e in entries)

    if expected.get("inputs") != found.get("inputs"):
        return f"the manifest lists inputs {describe(expected['inputs'])}, the library reads {describe(found.get('inputs', []))}"
    names = [t["name"] for t in expected["tasks"]]
    found_names = [t.get("name") for t in found.get("tasks", [])]
    if names != found_names:
        return f"the manifest lists tasks {names}, the library computes {found_names}"
    for want, got in zip(expected["tasks"], found["tasks"]):
        if want.get("outputs") != got.get("outputs"):
            return (f"task {want['name']!r}: the manifest lists outputs {describe(want['outputs'])}, "
                    f"the library returns {describe(got.get('outputs', []))}")
        if want != got:
            return f"task {want['name']!r}: its inputs or source differ"
    if expected.get("index_bounds") != found.get("index_bounds"):
        return f"index bounds {expected.get('index_bounds')} in the manifest, {found.get('index_bounds')} in the library"
    return "their signatures differ"


def sha256_of_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to ``path`` through a temp file in the same directory and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
