"""Fuzz targets, one per parser of a file a user may be handed (issue 28), each bounded to a few
seconds: the safetensors header (Python reader), the manifest, ONNX external-data entries, and
the native readers (json.h, npy.h, safetensors.h) through runner/fuzz_parsers.cc built with
AddressSanitizer and UBSan. Every input gives a result or one GmorphError line (native: exit 0 or
1 with one line), never another exception, a crash or a sanitizer report."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmorph_tvm.core.manifest import read_manifest
from gmorph_tvm.core.weights_file import read_weights, write_weights
from gmorph_tvm.errors import GmorphError

REPO = Path(__file__).resolve().parents[2]
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

ints = st.one_of(st.integers(-2**64, 2**64), st.sampled_from([0, 8, 48, 64, 112, -1, 2**53, 2**63]))
json_leaf = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                          max_leaves=12)


def _one_line(err: GmorphError) -> None:
    assert str(err) and "\n" not in str(err), str(err)


@st.composite
def headers(draw):
    """A safetensors header: the real one with random edits, or random JSON / raw bytes."""
    kind = draw(st.sampled_from(["edit", "edit", "edit", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_value)).encode()
    header = {"__metadata__": {"alignment": "64"},
              "a": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]},
              "__pad__.0": {"dtype": "U8", "shape": [16], "data_offsets": [48, 64]},
              "b": {"dtype": "I64", "shape": [6], "data_offsets": [64, 112]}}
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(["a", "b", "__pad__.0", "c"]))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole"]))
        value = draw(json_value) if field == "whole" or draw(st.booleans()) else [draw(ints), draw(ints)]
        if field == "whole":
            header[name] = value
        else:
            header.setdefault(name, {})
            if isinstance(header[name], dict):
                header[name][field] = value
    text = json.dumps(header, allow_nan=True).encode()
    return text + b" " * (-(8 + len(text)) % 64)


def test_fuzz_safetensors_header_python(tmp_path):
    good = tmp_path / "good.safetensors"
    record = write_weights(good, [("a", np.zeros((4, 3), np.float32)), ("b", np.zeros(6, np.int64))])
    data = good.read_bytes()[-112:]
    path = tmp_path / "w.safetensors"

    @FUZZ
    @given(header=headers(), claimed=st.one_of(st.none(), ints.filter(lambda v: 0 <= v < 2**64)))
    def check(header, claimed):
        path.write_bytes(struct.pack("<Q", len(header) if claimed is None else claimed) + header + data)
        for expected in (None, record):
            try:
                weights = read_weights(path, expected, verify=False)
            except GmorphError as err:
                _one_line(err)
                continue
            for entry in weights.entries:  # what it accepted lies inside the file
                assert 0 <= weights.data_start + entry.begin <= weights.data_start + entry.end <= len(path.read_bytes())
                weights.array(entry)

    check()


def test_fuzz_manifest_python(tiny_artifact, tmp_path):
    manifest = json.loads(Path(str(tiny_artifact).replace(".so", ".manifest.json")).read_text())
    path = tmp_path / "m.manifest.json"
    keys = sorted(manifest)

    @FUZZ
    @given(edits=st.lists(st.tuples(st.sampled_from(keys + ["entries", "batch_buckets", "index_bounds"]), json_value),
                          max_size=3),
           raw=st.one_of(st.none(), st.binary(max_size=100)))
    def check(edits, raw):
        edited = json.loads(json.dumps(manifest))
        for key, value in edits:
            edited[key] = value
        path.write_bytes(raw if raw is not None else json.dumps(edited, allow_nan=True).encode())
        try:
            read_manifest(path)
        except GmorphError as err:
            _one_line(err)

    check()


def test_fuzz_onnx_external_data(tmp_path):
    from onnx import TensorProto

    from gmorph_tvm.frontend.importer import _read_onnx

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(np.arange(12, dtype=np.float32).tobytes())
    (tmp_path / "outside.bin").write_bytes(b"\0" * 48)
    os.symlink(tmp_path / "outside.bin", folder / "link.bin")
    (folder / "sub").mkdir()

    from helpers import onnx_model
    from onnx import helper

    model = onnx_model([helper.make_node("Relu", ["w"], ["y"])], [], [("y", TensorProto.FLOAT, [4, 3])],
                       [("w", np.zeros((4, 3), np.float32))])
    locations = st.one_of(st.sampled_from(["w.bin", "../outside.bin", "/etc/passwd", "link.bin", "sub", "sub/../w.bin",
                                           "missing.bin", "", "w.bin\0x", "./w.bin", "\\..\\outside.bin"]),
                          st.text(max_size=12))
    numbers = st.one_of(st.integers(-2**70, 2**70).map(str), st.text(max_size=5))

    @FUZZ
    @given(location=locations, offset=st.one_of(st.none(), numbers), length=st.one_of(st.none(), numbers),
           dims=st.lists(st.integers(-3, 2**40), max_size=3))
    def check(location, offset, length, dims):
        tensor = model.graph.initializer[0]
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        del tensor.external_data[:]
        del tensor.dims[:]
        tensor.dims.extend(dims or [4, 3])
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", length)):
            if value is not None:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        path = folder / "m.onnx"
        path.write_bytes(model.SerializeToString())
        try:
            proto, _ = _read_onnx("m", path)
        except GmorphError as err:
            _one_line(err)
            return
        # Accepted: the data came from inside the folder.
        assert os.path.realpath(folder / location).startswith(str(folder.resolve()))
        assert len(proto.graph.initializer[0].raw_data) <= 48

    check()


# ---- the native parsers, under AddressSanitizer and UBSan ----------------------------------


@pytest.fixture(scope="module")
def fuzz_parsers(tmp_path_factory) -> Path:
    """runner/fuzz_parsers.cc (json.h, npy.h, safetensors.h; no TVM) built with ASan + UBSan."""
    if CXX is None:
        pytest.skip("needs a C++ compiler")
    binary = tmp_path_factory.mktemp("fuzz") / "fuzz_parsers"
    proc = subprocess.run([CXX, "-std=c++17", "-O0", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                           "-I", str(REPO / "runner"), str(REPO / "runner" / "fuzz_parsers.cc"), "-o", str(binary)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return binary


def _run_native(binary: Path, kind: str, files: list[Path]) -> None:
    proc = subprocess.run([str(binary), kind, *map(str, files)], capture_output=True, text=True, errors="replace", timeout=300,
                          env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1:exitcode=99"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == len(files), proc.stdout[-3000:]
    assert all(line.startswith(("ok", "error: ")) for line in lines), proc.stdout[-3000:]


def test_fuzz_native_safetensors_and_json(fuzz_parsers, tmp_path):
    data = bytes(112)
    files: list[Path] = []

    @FUZZ
    @given(header=headers(), claimed=st.one_of(st.none(), ints.filter(lambda v: 0 <= v < 2**64)))
    def collect(header, claimed):
        path = tmp_path / f"w{len(files)}.safetensors"
        path.write_bytes(struct.pack("<Q", len(header) if claimed is None else claimed) + header + data)
        files.append(path)

    collect()
    files.append(tmp_path / "deep.safetensors")
    files[-1].write_bytes(struct.pack("<Q", 200_000) + b"[" * 200_000)
    _run_native(fuzz_parsers, "safetensors", files)
    _run_native(fuzz_parsers, "json", files)


def test_fuzz_native_npy(fuzz_parsers, tmp_path):
    files: list[Path] = []
    descrs = st.one_of(st.sampled_from(["'<f4'", "'<i8'", "'|b1'", "'>f4'", "'<f3'", "'", "''", "'<c8'"]),
                       st.text(max_size=6))
    shapes = st.one_of(st.lists(st.integers(0, 2**64), max_size=4).map(lambda d: "(" + ", ".join(map(str, d)) + ",)"),
                       st.text(max_size=10))

    @FUZZ
    @given(descr=descrs, shape=shapes, fortran=st.sampled_from(["False", "True", "x"]), payload=st.binary(max_size=64),
           version=st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x09\x00"]), drop=st.sampled_from(["", "descr", "shape"]),
           claimed=st.one_of(st.none(), st.integers(0, 2**32 - 1)))
    def collect(descr, shape, fortran, payload, version, drop, claimed):
        fields = {"descr": descr, "fortran_order": fortran, "shape": shape}
        fields.pop(drop, None)
        header = ("{" + ", ".join(f"'{k}': {v}" for k, v in fields.items()) + ", }\n").encode()
        size = len(header) if claimed is None else claimed
        length = struct.pack("<H", size & 0xFFFF) if version[0] == 1 else struct.pack("<I", size)
        path = tmp_path / f"x{len(files)}.npy"
        path.write_bytes(b"\x93NUMPY" + version + length + header + payload)
        files.append(path)

    collect()
    np.save(tmp_path / "good.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    files.append(tmp_path / "good.npy")
    _run_native(fuzz_parsers, "npy", files)
