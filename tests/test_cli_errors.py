"""CLI misuse is one line on stderr and exit 1 or 2, never a traceback (issue 12, items 3, 10, 11)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile

import numpy as np
import onnx
import pytest
from helpers import onnx_model
from onnx import TensorProto, helper

import gmorph_tvm
from gmorph_tvm.artifact import manifest_path_for
from gmorph_tvm.cli import main
from gmorph_tvm.runtime import load
from gmorph_tvm.runtime.rpc import local_benchmark

F = TensorProto.FLOAT


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse
        code = int(exit_.code)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("[gmorph-tvm]")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-errors")
    relu = onnx_model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, [1, 4])], [("y", F, [1, 4])])
    neg = onnx_model([helper.make_node("Neg", ["x"], ["y"])], [("x", F, [1, 4])], [("y", F, [1, 4])])
    sym = onnx_model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, ["n", 4])], [("y", F, ["n", 4])])
    other = onnx_model([helper.make_node("Relu", ["z"], ["y"])], [("z", F, [2, 3])], [("y", F, [2, 3])])
    for name, model in (("relu", relu), ("neg", neg), ("sym", sym), ("other", other)):
        onnx.save(model, str(tmp / f"{name}.onnx"))
    np.save(tmp / "x.npy", np.array([[-1, 2, -3, 4]], np.float32))
    np.save(tmp / "x2.npy", np.array([[5, -6, 7, -8]], np.float32))
    mm = gmorph_tvm.import_models({"relu": str(tmp / "relu.onnx")})
    art = gmorph_tvm.build(mm)
    art.export(tmp / "relu.so")
    (tmp / "tar").mkdir()
    art.export(tmp / "tar" / "relu.tar")
    gmorph_tvm.build(gmorph_tvm.import_models({"other": str(tmp / "other.onnx")})).export(tmp / "other.so")
    return tmp


def test_duplicate_task_names_are_an_error(files, capsys):
    code, _, err = _cli(capsys, "build", str(files / "relu.onnx"), str(files / "neg.onnx"), "--names", "t,t",
                        "-o", str(files / "dup.so"))
    assert code == 1 and "--names gives task name 't' more than once" in _one_line(err)
    assert not (files / "dup.so").exists()


@pytest.mark.parametrize("shape,code,pattern", [
    ("x=", 2, "empty shape"),
    ("x=0,4", 2, "dimensions must be positive"),
    ("x=-1,4", 2, "dimensions must be positive"),
    ("x=a,4", 2, "dimensions must be integers"),
    ("x=1,2,4", 1, r"input 'x' has rank 2 \(\[\?, 4\]\) but input_shapes gives 3 dimensions"),
    ("q=1,4", 1, "input_shapes names 'q', which is not an input of this model"),
    ("x=2,5", 1, "cannot change dimension 1 from 4 to 5"),
])
def test_bad_input_shape_option(files, capsys, shape, code, pattern):
    got, _, err = _cli(capsys, "build", str(files / "sym.onnx"), "--input-shape", shape, "-o", str(files / "s.so"))
    assert got == code
    line = _one_line(err) if code == 1 else err.strip().splitlines()[-1]  # argparse: usage, then one line
    assert "Traceback" not in err and re.search(pattern, line), err


def test_input_shape_given_twice(files, capsys):
    code, _, err = _cli(capsys, "build", str(files / "sym.onnx"), "--input-shape", "x=1,4", "--input-shape", "x=2,4",
                        "-o", str(files / "s.so"))
    assert code == 1 and "--input-shape for input 'x' is given twice" in _one_line(err)


def test_duplicate_input_is_an_error(files, capsys):
    code, _, err = _cli(capsys, "run", str(files / "relu.so"), "--input", f"x={files / 'x.npy'}",
                        "--input", f"x={files / 'x2.npy'}")
    assert code == 1 and "--input 'x' is given twice" in _one_line(err)


def test_save_outputs_onto_a_file_or_read_only_dir(files, capsys, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("not a directory")
    code, _, err = _cli(capsys, "run", str(files / "relu.so"), "--input", f"x={files / 'x.npy'}", "--save-outputs",
                        str(target))
    assert code == 1 and "exists and is not a directory" in _one_line(err)
    if os.geteuid() == 0:
        return  # root writes anywhere; the read-only case cannot be made here
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, _, err = _cli(capsys, "run", str(files / "relu.so"), "--input", f"x={files / 'x.npy'}", "--save-outputs",
                        str(ro / "sub"))
    assert code == 1 and "--save-outputs" in _one_line(err)


def test_bench_number_zero(files, capsys):
    code, _, err = _cli(capsys, "bench", str(files / "relu.so"), "--number", "0")
    assert code == 2 and "must be at least 1" in err and "Traceback" not in err


def test_manifest_library_holding_a_path(files, tmp_path, capsys):
    shutil.copy(files / "relu.so", tmp_path / "relu.so")
    manifest = json.loads(manifest_path_for(files / "relu.so").read_text())
    manifest["library"] = "../elsewhere/relu.so"
    manifest_path_for(tmp_path / "relu.so").write_text(json.dumps(manifest))
    code, _, err = _cli(capsys, "run", str(manifest_path_for(tmp_path / "relu.so")), "--input", f"x={files / 'x.npy'}")
    assert code == 1 and "field 'library' must be the library's file name" in _one_line(err)


def test_tar_artifact_from_a_read_only_directory(files, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    artifact_files = sorted(p.name for p in (files / "tar").iterdir() if p.name.startswith("relu."))
    assert {"relu.tar", "relu.manifest.json"} <= set(artifact_files)  # and the weights file, if any
    for name in artifact_files:
        shutil.copy(files / "tar" / name, ro / name)
    ro.chmod(0o555)
    try:
        out = load(ro / "relu.tar")(np.array([[-1, 2, -3, 4]], np.float32))["relu"]
        assert out.tolist() == [[0, 2, 0, 4]]
        assert sorted(p.name for p in ro.iterdir()) == artifact_files  # nothing written beside it
    finally:
        ro.chmod(0o755)
    assert tarfile.is_tarfile(ro / "relu.tar")


def test_bench_compare_of_unrelated_models_is_not_comparable(files, capsys):
    rows = local_benchmark(files / "relu.so", number=1, repeat=1, compare=[files / "other.so"])
    assert rows[1]["comparable"] is False and rows[1]["speedup"] is None and rows[1]["max_abs_diff"] is None
    code, out, _ = _cli(capsys, "bench", str(files / "relu.so"), "--number", "1", "--repeat", "1", "--compare",
                        str(files / "other.so"), str(files / "relu.so"))
    assert code == 0
    lines = out.strip().splitlines()
    assert "not comparable" in lines[3] and "not comparable" not in lines[4] and "x |" in lines[4]
