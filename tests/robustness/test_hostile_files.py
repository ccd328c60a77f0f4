"""The hostile-file suite (tests/hostile_files.py) against both runners: the Python loader
and ``gmorph-run`` built with AddressSanitizer. Every damaged artifact or input is refused with
one line that says why; no crash, no out-of-bounds read (ASan), no file outside the artifact read."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hostile_files import hostile_cases, hostile_npy

from gmorph_tvm.errors import GmorphError
from gmorph_tvm.runtime import load

REPO = Path(__file__).resolve().parents[2]
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
ASAN_ENV = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:exitcode=99:allocator_may_return_null=0"}


@pytest.fixture(scope="module")
def cases(tiny_artifact, tmp_path_factory):
    return {c.name: c for c in hostile_cases(tiny_artifact, tmp_path_factory.mktemp("hostile"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    np.save(folder / "x.npy", np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3))
    np.save(folder / "ids.npy", np.array([4, 0], np.int64))
    return folder


@pytest.fixture(scope="module")
def asan_gmorph_run(tmp_path_factory) -> Path:
    """gmorph-run built with -fsanitize=address at -O0 (fastest to build; ASan checks the same)."""
    if shutil.which("cmake") is None or CXX is None:
        pytest.skip("needs cmake and a C++ compiler")
    build_dir = tmp_path_factory.mktemp("asan-build")
    flags = "-fsanitize=address -fno-omit-frame-pointer"
    configure = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(build_dir), f"-DPython3_EXECUTABLE={sys.executable}",
         f"-DCMAKE_CXX_COMPILER={CXX}", "-DCMAKE_BUILD_TYPE=Debug", "-DCMAKE_CXX_FLAGS_DEBUG=-O0",
         f"-DCMAKE_CXX_FLAGS={flags}",
         "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address"],
        capture_output=True, text=True, timeout=300,
    )
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compile_ = subprocess.run(["cmake", "--build", str(build_dir), "-j2"], capture_output=True, text=True, timeout=600)
    assert compile_.returncode == 0, compile_.stdout[-3000:] + compile_.stderr[-3000:]
    return build_dir / "gmorph-run"


def _native(binary: Path, library: Path, x: Path, ids: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), str(library), "--input", f"x={x}", "--input", f"ids={ids}", "--repeat", "1"],
                          capture_output=True, text=True, timeout=300, env=ASAN_ENV)


def test_python_loader_refuses_every_hostile_artifact(cases):
    for case in cases.values():
        with pytest.raises(GmorphError) as info:
            load(case.library)
        message = str(info.value)
        assert "\n" not in message, (case.name, message)
        assert re.search(case.expect, message), (case.name, message)


def test_gmorph_run_under_asan_refuses_every_hostile_artifact(asan_gmorph_run, cases, inputs, tiny_artifact):
    good = _native(asan_gmorph_run, tiny_artifact, inputs / "x.npy", inputs / "ids.npy")
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("relu: float32[2, 3] first [0, 0, 0, 0.2, 0.6")
    failures = []
    for case in cases.values():
        proc = _native(asan_gmorph_run, case.library, inputs / "x.npy", inputs / "ids.npy")
        lines = proc.stderr.strip().splitlines()
        if proc.returncode != 1 or len(lines) != 1 or not re.search(case.native or case.expect, lines[0]):
            failures.append((case.name, proc.returncode, proc.stderr[-2000:]))
    assert not failures, failures


def test_gmorph_run_under_asan_refuses_hostile_npy_inputs(asan_gmorph_run, inputs, tiny_artifact, tmp_path):
    failures = []
    for path, expect in hostile_npy(tmp_path):
        proc = _native(asan_gmorph_run, tiny_artifact, path, inputs / "ids.npy")
        lines = proc.stderr.strip().splitlines()
        if proc.returncode != 1 or len(lines) != 1 or not re.search(expect, lines[0]):
            failures.append((path.name, proc.returncode, proc.stderr[-2000:]))
    assert not failures, failures
