"""The external weights file of an artifact: safetensors, 64-byte aligned, read by mmap.

Why safetensors (and not TVM's tensor-cache format, ``tvm.contrib.tvmjs.dump_tensor_cache``):
it is one file (the tensor cache is a JSON index plus shards), it is readable by every ML stack
(``safetensors.safe_open``, ``huggingface-cli``, a 20-line C++ parser: 8-byte header length, a JSON
header, raw little-endian data), and it can be mapped: data offsets are explicit, so a loader can
hand the kernels pointers into the mapped file instead of copies. TVM's own loader
(``vm.builtin.tensor_cache.load``) reads every shard into a buffer and copies it into new tensors,
which is the 2x peak this file exists to avoid.

Layout written here (still plain safetensors): the JSON header is padded with spaces so the data
starts at a multiple of :data:`ALIGNMENT`, and every weight starts at a multiple of
:data:`ALIGNMENT` too, because TVM's compiled kernels assume 64-byte-aligned buffers (the
``storage_alignment`` their packed API declares). Safetensors forbids holes between tensors, so
the gaps are filled by 1-d ``uint8`` tensors named ``__pad__.<n>`` that readers skip.
``__metadata__`` records the writer and the alignment.

:func:`read_weights` checks everything before a kernel sees a byte: the file is a plain file (a
symlink is refused), its size is the manifest's and (unless told not to) its sha256 too, both
before the header is parsed; the header is bounded JSON (:func:`gmorph_tvm.core.manifest.loads_bounded`:
size, depth, no NaN/Infinity); every tensor's ``data_offsets`` are two integers inside the data,
its byte count is its dtype and shape's, and in offset order the tensors (pads included) tile the
data exactly, with no overlap and no gap; the tensors are the ones the manifest expects (names,
dtypes, shapes, in order). Any failure is one :class:`ArtifactError` line naming the file and why.
``gmorph-run`` (runner/gmorph_run.cc) makes the same checks with the same messages.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import stat
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError
from .manifest import JSON_MAX_BYTES, loads_bounded

FORMAT = "safetensors"
ALIGNMENT = 64
PAD_PREFIX = "__pad__."
WEIGHTS_SUFFIX = ".weights.safetensors"

# numpy dtype name <-> safetensors dtype code
_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
          "int32": "I32", "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
          "uint8": "U8", "bool": "BOOL"}
_FROM_ST = {v: k for k, v in _TO_ST.items()}


def weights_path_for(library: str | Path) -> Path:
    """``dir/model.so`` -> ``dir/model.weights.safetensors``."""
    library = Path(library)
    return library.with_name(library.stem + WEIGHTS_SUFFIX)


@dataclass(frozen=True)
class TensorEntry:
    """One weight in the file: name, dtype, shape and where its bytes are (from the data start)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def write_weights(path: str | Path, tensors: Sequence[tuple[str, np.ndarray]]) -> dict[str, Any]:
    """Write ``tensors`` (name, C-contiguous array) to ``path``; returns the manifest's record:
    ``{"file", "format", "sha256", "size", "alignment", "tensors": [{name, dtype, shape}]}``."""
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": {"writer": "gmorph-tvm", "alignment": str(ALIGNMENT)}}
    offset, pads, layout = 0, 0, []
    for name, array in tensors:
        dtype = str(array.dtype)
        if dtype not in _TO_ST:
            raise ArtifactError(f"cannot write weight {name!r} to {path}: dtype {dtype} has no safetensors code")
        if name.startswith(PAD_PREFIX) or name in header:
            raise ArtifactError(f"cannot write weight {name!r} to {path}: the name is reserved or repeated")
        start = _align(offset)
        if start != offset:
            header[f"{PAD_PREFIX}{pads}"] = {"dtype": "U8", "shape": [start - offset], "data_offsets": [offset, start]}
            pads += 1
        end = start + int(array.nbytes)
        header[name] = {"dtype": _TO_ST[dtype], "shape": [int(d) for d in array.shape], "data_offsets": [start, end]}
        layout.append((array, start))
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (_align(8 + len(text)) - 8 - len(text))
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for chunk in (struct.pack("<Q", len(text)), text):
            out.write(chunk)
            digest.update(chunk)
        position = 0
        for array, start in layout:
            if start > position:
                gap = b"\0" * (start - position)
                out.write(gap)
                digest.update(gap)
            data = np.ascontiguousarray(array).data.cast("B")
            out.write(data)
            digest.update(data)
            position = start + len(data)
    return {
        "file": path.name,
        "format": FORMAT,
        "sha256": digest.hexdigest(),
        "size": path.stat().st_size,
        "alignment": ALIGNMENT,
        "tensors": [{"name": n, "dtype": str(a.dtype), "shape": [int(d) for d in a.shape]} for n, a in tensors],
    }


class WeightsFile:
    """A weights file mapped into memory (copy-on-write, never written): its tensors as numpy views.

    The views share the mapping; keep this object (or any view) alive while they are in use.
    """

    def __init__(self, path: Path, data_start: int, entries: list[TensorEntry], mapping: mmap.mmap):
        self.path = path
        self.data_start = data_start
        self.entries = entries
        self._mmap = mapping

    def array(self, entry: TensorEntry) -> np.ndarray:
        """The tensor's bytes in the mapping, as a (writable, never written) numpy array."""
        return np.ndarray(entry.shape, dtype=np.dtype(entry.dtype), buffer=self._mmap,
                          offset=self.data_start + entry.begin)

    def release(self, entry: TensorEntry) -> None:
        """Drop the mapped pages of ``entry`` from this process (after copying it to a device)."""
        page = mmap.PAGESIZE
        start = (self.data_start + entry.begin) // page * page
        end = (self.data_start + entry.end + page - 1) // page * page
        end = min(end, len(self._mmap))
        if end > start and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)


def read_weights(path: str | Path, expected: Mapping[str, Any] | None = None, *, verify: bool = True) -> WeightsFile:
    """Map the weights file ``path`` and check it against ``expected`` (the manifest's record).

    ``verify`` also compares the file's sha256 with the record's (reads every byte once; the
    pages stay mapped, so this costs time, not memory beyond what the weights take anyway).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ArtifactError(f"weights file {path} is a symbolic link; the weights must be a plain file in the "
                                "artifact's folder") from err
        if err.errno == errno.ENOENT:
            raise ArtifactError(f"weights file {path} not found (export writes it beside the library)") from err
        raise ArtifactError(f"cannot read weights file {path}: {err.strerror}") from err
    with open(fd, "rb") as fh:
        try:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ArtifactError(f"weights file {path} is not a plain file")
            size = info.st_size
            if size < 8:
                raise ArtifactError(f"weights file {path} is truncated ({size} bytes; not a safetensors file)")
            want = expected.get("size") if expected is not None else None
            if isinstance(want, int) and want != size:
                what = "is truncated" if size < want else "does not belong to this artifact:"
                raise ArtifactError(f"weights file {path} {what} ({size} bytes, the manifest says {want})")
            mapping = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as err:
            raise ArtifactError(f"cannot read weights file {path}: {err.strerror}") from err
    try:
        # The checksum before the header: the file the manifest describes has a header we wrote.
        if verify and expected is not None and expected.get("sha256"):
            digest = hashlib.sha256(memoryview(mapping)).hexdigest()
            if digest != expected["sha256"]:
                raise ArtifactError(f"weights file {path} is corrupt: sha256 {digest[:16]}... differs from the "
                                    f"manifest's {str(expected['sha256'])[:16]}...")
        (header_len,) = struct.unpack_from("<Q", mapping, 0)
        if header_len > JSON_MAX_BYTES:
            raise ArtifactError(f"weights file {path} has a header of {header_len} bytes, over the limit of "
                                f"{JSON_MAX_BYTES}")
        if 8 + header_len > size:
            raise ArtifactError(f"weights file {path} is truncated or not a safetensors file "
                                f"(header of {header_len} bytes in a file of {size})")
        header = loads_bounded(mapping[8:8 + header_len], f"weights file {path} has a corrupt header")
        data_start = 8 + header_len
        entries = _entries(header, path, data_start, size)
        if expected is not None:
            _check_expected(path, entries, expected, size)
    except ArtifactError:
        mapping.close()
        raise
    return WeightsFile(path, data_start, entries, mapping)


def _offsets(name: str, info: Any, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """dtype, shape, begin, end of one header entry; ValueError saying why it is not valid."""
    if not isinstance(info, dict):
        raise ValueError(f"tensor {name!r} is not a JSON object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str) or code not in _FROM_ST:
        raise ValueError(f"tensor {name!r}: unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in offsets)):
        raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end] in integers")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise ValueError(f"tensor {name!r}: data_offsets [{begin}, {end}] outside the data ({data_size} bytes)")
    if end > data_size:
        raise _Truncated(f"tensor {name!r}: data_offsets [{begin}, {end}] outside the data ({data_size} bytes)")
    need = np.dtype(_FROM_ST[code]).itemsize
    for d in shape:
        need *= d
    if end - begin != need:
        raise ValueError(f"tensor {name!r}: data_offsets [{begin}, {end}] hold {end - begin} bytes, its dtype and "
                         f"shape {need}")
    return _FROM_ST[code], tuple(shape), begin, end


class _Truncated(ValueError):
    """A tensor that ends past the end of the file."""


def _entries(header: Any, path: Path, data_start: int, size: int) -> list[TensorEntry]:
    data_size = size - data_start
    if not isinstance(header, dict):
        raise ArtifactError(f"weights file {path} has a corrupt header (not a JSON object)")
    entries, spans = [], []
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, begin, end = _offsets(name, info, data_size)
            spans.append((begin, end, name))
            if name.startswith(PAD_PREFIX):
                continue
            if begin % ALIGNMENT:
                raise ValueError(f"tensor {name!r} is not {ALIGNMENT}-byte aligned (offset {begin})")
            entries.append(TensorEntry(name, dtype, shape, begin, end))
        # In offset order the tensors must tile the data exactly: no overlap, no gap, nothing after.
        at, previous = 0, "the start of the data"
        for begin, end, name in sorted(spans):
            if begin != at:
                where = "inside" if begin < at else "after a gap following"
                raise ValueError(f"tensor {name!r} starts at byte {begin}, {where} {previous}")
            at, previous = end, f"tensor {name!r}"
    except _Truncated as err:
        raise ArtifactError(f"weights file {path} is truncated: {err}") from err
    except ValueError as err:
        raise ArtifactError(f"weights file {path} has a corrupt header: {err}") from err
    if at != data_size:
        raise ArtifactError(f"weights file {path} is longer than its header says ({size} bytes, header describes "
                            f"{data_start + at})")
    return entries


def _check_expected(path: Path, entries: list[TensorEntry], expected: Mapping[str, Any], size: int) -> None:
    want = expected.get("tensors") or []
    got = [(e.name, e.dtype, list(e.shape)) for e in entries]
    need = [(t["name"], t["dtype"], list(t["shape"])) for t in want]
    if got != need:
        first = next((i for i, (g, n) in enumerate(zip(got, need)) if g != n), min(len(got), len(need)))
        have = got[first] if first < len(got) else "nothing"
        wanted = need[first] if first < len(need) else "nothing"
        raise ArtifactError(f"weights file {path} does not match its manifest: tensor {first} is {have}, "
                            f"expected {wanted}")


def unique_arrays(arrays: Iterable[tuple[str, np.ndarray]]) -> tuple[list[tuple[str, np.ndarray]], dict[str, str]]:
    """Arrays of equal dtype, shape and bytes kept once: (kept, {dropped name: kept name})."""
    kept: list[tuple[str, np.ndarray]] = []
    alias: dict[str, str] = {}
    seen: dict[tuple, list[int]] = {}
    for name, array in arrays:
        key = (str(array.dtype), tuple(array.shape), hashlib.blake2b(np.ascontiguousarray(array).data.cast("B"),
                                                                    digest_size=16).digest())
        match = next((i for i in seen.get(key, []) if np.array_equal(kept[i][1], array)), None)
        if match is None:
            seen.setdefault(key, []).append(len(kept))
            kept.append((name, array))
        else:
            alias[name] = kept[match][0]
    return kept, alias
