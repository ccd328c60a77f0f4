"""ONNX external data is checked inside the model's folder before a byte of it is read (issue 28):
'..', absolute paths and symlinks out are refused in one line, as are claimed lengths past the
file and models over protobuf's 2 GiB limit (tested with sparse files: nothing is written)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import onnx_model
from onnx import TensorProto, helper

import gmorph_tvm
from gmorph_tvm.errors import ModelImportError
from gmorph_tvm.runtime import load

WEIGHT = np.arange(12, dtype=np.float32).reshape(4, 3)


def _model_with_external(folder: Path, *, location: str = "w.bin", offset: int | None = None,
                         length: int | None = None, dims: list[int] | None = None) -> Path:
    """m.onnx: y = x @ W, W stored as external data at ``location`` (entries as given)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", TensorProto.FLOAT, [2, 4])],
                       [("y", TensorProto.FLOAT, [2, 3])], [("w", WEIGHT)])
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    if dims is not None:
        del tensor.dims[:]
        tensor.dims.extend(dims)
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location}
    if offset is not None:
        entries["offset"] = str(offset)
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _import_error(path: Path) -> str:
    with pytest.raises(ModelImportError) as info:
        gmorph_tvm.import_models({"m": str(path)})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_external_data_inside_the_folder_imports(tmp_path):
    path = _model_with_external(tmp_path)
    (tmp_path / "w.bin").write_bytes(WEIGHT.tobytes())
    mm = gmorph_tvm.import_models({"m": str(path)})
    assert [s.name for s in mm.inputs] == ["x"]


@pytest.mark.parametrize("location", ["../outside.bin", "sub/../../outside.bin", "/etc/passwd"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    (tmp_path / "outside.bin").write_bytes(WEIGHT.tobytes())
    message = _import_error(_model_with_external(tmp_path / "model", location=location))
    assert f"initializer 'w' keeps its data in {location!r}, which is not a file name inside the model's folder" in message


def test_external_data_symlinked_out_is_refused(tmp_path):
    (tmp_path / "outside.bin").write_bytes(WEIGHT.tobytes())
    path = _model_with_external(tmp_path / "model", location="w.bin")
    os.symlink(tmp_path / "outside.bin", tmp_path / "model" / "w.bin")
    assert "keeps its data in 'w.bin', which resolves outside the model's folder" in _import_error(path)


def test_external_data_claiming_more_than_the_file_holds(tmp_path):
    path = _model_with_external(tmp_path, length=10**12)
    (tmp_path / "w.bin").write_bytes(WEIGHT.tobytes())
    assert "initializer 'w' claims 1000000000000 bytes at offset 0 of 'w.bin', which holds 48 bytes" in _import_error(path)
    path = _model_with_external(tmp_path, offset=-8)
    assert "claims 48 bytes at offset -8" in _import_error(path)
    path = _model_with_external(tmp_path, length=24)
    assert "claims 24 bytes in 'w.bin'; its dtype and shape [4, 3] need 48" in _import_error(path)
    path = _model_with_external(tmp_path, offset="x")  # type: ignore[arg-type]
    assert "malformed external data entry" in _import_error(path)


def test_model_over_two_gib_is_refused_before_reading(tmp_path):
    """A 3 GiB initializer (a sparse file: no disk, and nothing is read) is refused naming the
    limit, instead of being read in full and crashing protobuf."""
    path = _model_with_external(tmp_path, dims=[4, 3 * 2**28 // 4])
    with open(tmp_path / "w.bin", "wb") as handle:
        handle.truncate(3 * 2**30)
    assert "holds 3.0 GiB with its external data, over the 2 GiB limit of one protobuf message" in _import_error(path)
    big = tmp_path / "big.onnx"
    with open(big, "wb") as handle:
        handle.truncate(3 * 2**30)
    message = _import_error(big)
    assert "is 3.0 GiB, over protobuf's 2 GiB limit on one ONNX file; save it with its weights as external data" in message


def test_saved_with_onnx_external_data_helper(tmp_path):
    """What onnx.save(save_as_external_data=True) writes is accepted and read right."""
    model = onnx_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", TensorProto.FLOAT, [2, 4])],
                       [("y", TensorProto.FLOAT, [2, 3])], [("w", WEIGHT)])
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="weights.data", size_threshold=0)
    assert (tmp_path / "weights.data").is_file()
    mm = gmorph_tvm.import_models({"m": str(tmp_path / "m.onnx")})
    x = np.ones((2, 4), np.float32)
    out = gmorph_tvm.build(mm, "llvm").export(tmp_path / "m.so")
    np.testing.assert_allclose(load(out)(x)["m"], x @ WEIGHT, rtol=1e-6)
