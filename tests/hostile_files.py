"""Hostile artifacts and input files, shared by the Python loader and ``gmorph-run`` (issue 28).

:func:`hostile_cases` copies a good artifact once per case and damages the copy as an attacker
would: safetensors headers whose ``data_offsets`` point before, after or across the data
(with the manifest's ``weights.sha256``/``size`` updated to the edited file, so the checks that
come first pass and the header checks are what is tested), headers and manifests nested 200,000
deep or too large, ``data_offsets [0, Infinity]``, a weights file outside the artifact's folder
(``..``, absolute, symlink), a manifest without ``library_sha256``. :func:`hostile_npy` writes
damaged ``.npy`` inputs for ``gmorph-run``. Each case carries the regex the one-line message must
match, the same for both runners unless ``native`` gives gmorph-run's own wording.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gmorph_tvm.core.manifest import manifest_path_for
from gmorph_tvm.core.weights_file import weights_path_for

LIMIT = 4 * 1024 * 1024  # gmorph_tvm.core.manifest.JSON_MAX_BYTES, runner/json.h kMaxDocumentBytes
DEEP = 200_000


@dataclass(frozen=True)
class Case:
    name: str
    library: Path
    expect: str  # regex the one-line message must match (re.search)
    native: str | None = None  # gmorph-run's regex where its wording differs


def _split(weights: Path) -> tuple[dict, bytes]:
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(artifact: Path, header: bytes, data: bytes, *, update_sha: bool = True, length: int | None = None) -> None:
    """Weights file = length + header + data; the manifest's size (and sha256) made to match it."""
    weights = weights_path_for(artifact)
    raw = struct.pack("<Q", len(header) if length is None else length) + header + data
    weights.write_bytes(raw)
    manifest_file = manifest_path_for(artifact)
    manifest = json.loads(manifest_file.read_text())
    manifest["weights"]["size"] = len(raw)
    if update_sha:
        manifest["weights"]["sha256"] = hashlib.sha256(raw).hexdigest()
    manifest_file.write_text(json.dumps(manifest))


def _header_bytes(header: dict) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-(8 + len(text)) % 64)


def _edit_manifest(artifact: Path, edit: Callable[[dict], None]) -> None:
    manifest_file = manifest_path_for(artifact)
    manifest = json.loads(manifest_file.read_text())
    edit(manifest)
    manifest_file.write_text(json.dumps(manifest))


def hostile_cases(library: Path, root: Path) -> list[Case]:
    """One damaged copy of the artifact ``library`` per case, under ``root``."""
    header, data = _split(weights_path_for(library))
    tensor = next(k for k in header if k != "__metadata__" and not k.startswith("__pad__."))
    begin, end = header[tensor]["data_offsets"]
    nbytes = end - begin
    cases: list[Case] = []

    def case(name: str, expect: str, native: str | None = None) -> Path:
        folder = root / name
        folder.mkdir(parents=True)
        copy = folder / library.name
        for src in (library, manifest_path_for(library), weights_path_for(library)):
            shutil.copy(src, folder / src.name)
        cases.append(Case(name, copy, expect, native))
        return copy

    def with_offsets(offsets, *, extra: dict | None = None) -> bytes:
        edited = json.loads(json.dumps(header))
        edited[tensor]["data_offsets"] = offsets
        edited.update(extra or {})
        return _header_bytes(edited)

    t = f"tensor '{re.escape(tensor)}'"
    size = len(data)
    art = case("offsets_before_data", rf"{t}: data_offsets \[-{nbytes}, 0\] outside the data \({size} bytes\)")
    _write(art, with_offsets([-nbytes, 0]), data)
    art = case("offsets_past_data", rf"is truncated: {t}: data_offsets \[0, {size + 4096}\] outside the data")
    _write(art, with_offsets([0, size + 4096]), data)
    art = case("offsets_reversed", rf"{t}: data_offsets \[{nbytes}, 0\] outside the data")
    _write(art, with_offsets([nbytes, 0]), data)
    art = case("offsets_huge", r"data_offsets \[0, 9223372036854775807\]|not an integer in range",
               native=r"corrupt header: tensor .*JSON number .* is not an integer in range")
    _write(art, with_offsets([0, 2**63 - 1]), data)
    art = case("offsets_fraction", rf"corrupt header: {t}: data_offsets \[0\.5, {nbytes}\] is not \[begin, end\] in int",
               native=r"corrupt header: tensor .*JSON number 0\.5.* is not an integer")
    _write(art, with_offsets([0.5, nbytes]), data)
    art = case("offsets_size_mismatch", rf"{t}: data_offsets \[{begin}, {end}\] hold {nbytes} bytes, its dtype and shape")
    edited = json.loads(json.dumps(header))
    edited[tensor]["shape"] = [1 << 20, 1 << 20]
    _write(art, _header_bytes(edited), data)
    art = case("offsets_overlap", r"corrupt header: tensor .* starts at byte 0, inside tensor")
    _write(art, with_offsets([begin, end], extra={"__pad__.99": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}),
           data)
    art = case("offsets_gap", rf"corrupt header: tensor .* starts at byte {begin + 64}, after a gap")
    shifted = json.loads(json.dumps(header))
    for info in (v for k, v in shifted.items() if k != "__metadata__"):
        info["data_offsets"] = [o + 64 for o in info["data_offsets"]]
    _write(art, _header_bytes(shifted), bytes(64) + data)
    art = case("offsets_infinity", r"has a corrupt header: .*Infinity is not a JSON number",
               native=r"has a corrupt header: invalid JSON at byte \d+: unexpected character 'I'")
    _write(art, with_offsets([0, 12345]).replace(b"12345", b"Infinity"), data)
    art = case("header_not_object", r"has a corrupt header \(not a JSON object\)")
    _write(art, b"[]" + b" " * 54, data)
    art = case("header_nested_deep", r"has a corrupt header: .*nested deeper than 64 levels")
    _write(art, b"[" * DEEP, data)
    # The sha256 is checked before the header is parsed: a deep header under the old checksum is
    # refused as corrupt without being parsed.
    art = case("header_nested_deep_checksum_first", r"is corrupt: sha256")
    _write(art, b"[" * DEEP, data, update_sha=False)
    art = case("header_over_limit", rf"header of {LIMIT + 64} bytes, over the limit of {LIMIT}")
    _write(art, b"{}" + b" " * (LIMIT + 62), data)
    art = case("header_length_claim", rf"header of {2**63} bytes, over the limit of {LIMIT}")
    _write(art, _header_bytes(header), data, length=2**63)

    art = case("manifest_nested_deep", r"manifest \S+ is not valid JSON: .*nested deeper than 64 levels",
               native=r"manifest \S+: invalid JSON at byte \d+: nested deeper than 64 levels")
    manifest_path_for(art).write_bytes(b"[" * DEEP)
    art = case("manifest_10mb", rf"manifest \S+:? is 1000\d{{4}} bytes, over the limit of {LIMIT}")
    _edit_manifest(art, lambda m: m.update(padding="x" * (10_000_000 - len(json.dumps(m)))))
    art = case("manifest_without_library_sha256", r"manifest \S+: .*library_sha256")
    _edit_manifest(art, lambda m: m.pop("library_sha256"))
    art = case("manifest_unknown_dtype", rf"manifest \S+{re.escape(manifest_path_for(library).name)}[: ]")
    _edit_manifest(art, lambda m: m["inputs"][0].update(dtype="float"))

    art = case("weights_dotdot", r"weights file name '\.\./outside\.weights\.safetensors' is a path, not a file name")
    shutil.copy(weights_path_for(library), art.parent.parent / "outside.weights.safetensors")
    _edit_manifest(art, lambda m: m["weights"].update(file="../outside.weights.safetensors"))
    art = case("weights_absolute", r"weights file name '/etc/passwd' is a path, not a file name")
    _edit_manifest(art, lambda m: m["weights"].update(file="/etc/passwd"))
    art = case("weights_symlink_out", r"weights file \S+ is a symbolic link")
    outside = root / "symlink_target.weights.safetensors"
    shutil.copy(weights_path_for(library), outside)
    weights_path_for(art).unlink()
    os.symlink(outside, weights_path_for(art))
    return cases


def hostile_npy(root: Path) -> list[tuple[Path, str]]:
    """Damaged ``.npy`` inputs for gmorph-run and the regex of its one-line message."""
    root.mkdir(parents=True, exist_ok=True)

    def npy(name: str, header: str, payload: bytes = b"", version: bytes = b"\x01\x00") -> Path:
        text = header.encode()
        path = root / name
        length = struct.pack("<H", len(text)) if version[0] == 1 else struct.pack("<I", len(text))
        path.write_bytes(b"\x93NUMPY" + version + length + text + payload)
        return path

    huge = npy("claims_4gb.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (1073741824,), }\n")
    files = [
        (huge, r"input file \S+claims_4gb\.npy: truncated \.npy data \(shape \(1073741824,\) of float32 needs more"),
        (npy("bad_descr.npy", "{'descr': '<f3', 'fortran_order': False, 'shape': (2, 3), }\n"),
         r"input file \S+bad_descr\.npy: unsupported dtype '<f3'"),
        (npy("bad_shape.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }\n"),
         r"input file \S+bad_shape\.npy: malformed shape"),
        (npy("no_shape.npy", "{'descr': '<f4', 'fortran_order': False, }\n"), r"input file \S+no_shape\.npy: header has no 'shape'"),
        (npy("huge_dim.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }\n"),
         r"input file \S+huge_dim\.npy: malformed shape"),
        (npy("overflow.npy", "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }\n"),
         r"input file \S+overflow\.npy: truncated \.npy data"),
    ]
    header_claim = root / "header_claim.npy"
    header_claim.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFFF0) + b"{}")
    files.append((header_claim, r"input file \S+header_claim\.npy: truncated \.npy header \(4294967280 bytes claimed"))
    return files
