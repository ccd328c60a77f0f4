"""Errors keep their cause and print one line; the shared helpers (one_line, core.ir, core.timing,
the host-architecture check) behave as every caller expects."""

from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest
import tvm
from tvm import relax

from gmorph_tvm.core import ir, timing
from gmorph_tvm.core.targets import cpu_arch, runs_here
from gmorph_tvm.errors import ModelImportError, one_line
from gmorph_tvm.frontend import import_models


def test_one_line_picks_the_informative_line():
    tvm_style = ValueError("Traceback (most recent call last):\n  File \"x.py\", line 3\n  0x7f: f()\n"
                           "  Check failed: (a == b) is false: shapes differ\nat src/foo.cc:10")
    assert one_line(tvm_style) == "Check failed: (a == b) is false: shapes differ"
    checker = ValueError("Field 'type' is required but missing.\n\n==> Context: Bad node spec for node Conv")
    assert one_line(checker) == "==> Context: Bad node spec for node Conv"
    assert one_line(checker, first=True) == "Field 'type' is required but missing."
    assert one_line(RuntimeError("")) == "RuntimeError"
    assert one_line(RuntimeError("x" * 50), 10) == "xxxxxxx..."


def test_import_errors_keep_their_cause_and_the_cli_prints_one_line(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"definitely not protobuf")
    with pytest.raises(ModelImportError) as info:
        import_models({"broken": str(bad)}, np.zeros((1, 3), np.float32))
    assert info.value.__cause__ is not None  # raised `from err`, not `from None`
    assert "\n" not in str(info.value)
    proc = subprocess.run([sys.executable, "-m", "gmorph_tvm.cli", "build", str(bad), "-o", str(tmp_path / "m.so")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("[gmorph-tvm] ")]  # progress
    assert len(lines) == 1 and lines[0].startswith("gmorph-tvm build: error: "), proc.stderr  # no chained trace
    assert "not a valid ONNX" in proc.stderr and "Traceback" not in proc.stderr


def test_ir_readers():
    x = relax.Var("x", relax.TensorType((2, 3), "float16"))
    call = relax.op.nn.relu(x)
    assert ir.op_name(call) == "relax.nn.relu" and ir.op_name(x) is None
    assert ir.static_shape(x.ty) == (2, 3) and ir.dtype_str(x.ty) == "float16"
    pair = relax.TupleType([x.ty, relax.TensorType((5,), "int32")])
    assert ir.static_shape(pair) is None and ir.static_shape(pair, first_field=True) == (2, 3)
    n = tvm.tirx.Var("n", "int64")
    assert ir.static_shape(relax.TensorType((n, 3), "float32")) is None
    assert ir.dtype_str(relax.TensorType(ndim=2, dtype="")) is None
    assert ir.nbytes((2, 3), "float16") == 12
    assert ir.tensor_nbytes(tvm.runtime.tensor(np.zeros((4, 5), np.float32))) == 80
    assert [ir.normalize_axis(a, 4) for a in (-1, 0, 3, -4)] == [3, 0, 3, 0]


def test_timing_loop():
    calls = []
    samples = timing.seconds_per_call(lambda: calls.append(1), number=3, repeat=4, clock="cpu")
    assert len(samples) == 4 and len(calls) == 12 and all(s >= 0 for s in samples)
    with pytest.raises(ValueError):
        timing.seconds_per_call(lambda: None, number=0)


def test_host_arch_check_has_one_spelling_per_arch():
    assert cpu_arch("AMD64") == "x86_64" and cpu_arch("arm64") == "aarch64" and cpu_arch("x86_64") == "x86_64"
    assert runs_here(platform.machine())
    other = "aarch64" if cpu_arch(platform.machine()) == "x86_64" else "x86_64"
    assert not runs_here(other)
