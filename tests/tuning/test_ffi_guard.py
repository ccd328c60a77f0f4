"""Regression tests for the apache-tvm-ffi pin (0.1.15.post2 segfaults on IR JSON, killing tuning)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gmorph_tvm.errors import TuningError
from gmorph_tvm.tuning import ffi_guard

REPO = Path(__file__).resolve().parents[2]


def test_installed_tvm_ffi_is_the_pinned_version():
    import tvm_ffi

    assert tvm_ffi.__version__ == ffi_guard.PINNED_TVM_FFI_VERSION


def test_ir_json_and_pickle_survive_in_a_subprocess():
    # A segfault here is a non-zero exit code of the child, not a dead pytest.
    worked, what = ffi_guard.probe_ir_json()
    assert worked, what


def test_probe_reports_a_crashing_child():
    proc = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    assert proc.returncode < 0  # sanity: the platform reports signals as negative codes
    original = ffi_guard.IR_JSON_PROBE
    try:
        ffi_guard.IR_JSON_PROBE = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
        worked, what = ffi_guard.probe_ir_json()
    finally:
        ffi_guard.IR_JSON_PROBE = original
    assert not worked and "signal 11" in what


def test_unpinned_version_that_crashes_raises_tuning_error(monkeypatch):
    monkeypatch.setattr(ffi_guard, "installed_tvm_ffi_version", lambda: "0.1.15.post2")
    monkeypatch.setattr(ffi_guard, "probe_ir_json", lambda: (False, "IR serialisation probe died (signal 11)"))
    ffi_guard.ensure_ir_json_works.cache_clear()
    try:
        with pytest.raises(TuningError, match=r"apache-tvm-ffi 0\.1\.15\.post2 crashes.*==0\.1\.14\.post1"):
            ffi_guard.ensure_ir_json_works()
    finally:
        ffi_guard.ensure_ir_json_works.cache_clear()


def test_every_install_path_pins_tvm_ffi():
    pin = f"apache-tvm-ffi=={ffi_guard.PINNED_TVM_FFI_VERSION}"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(rf'"{re.escape(pin)}"', pyproject), "pyproject.toml must pin " + pin
    # Any requirements/constraints file that mentions the package must pin the same version.
    for path in [*REPO.glob("requirements*.txt"), *REPO.glob("constraints*.txt"), *REPO.glob(".ci/*")]:
        if path.is_file():
            text = path.read_text(errors="replace")
            for line in text.splitlines():
                if "apache-tvm-ffi" in line and not line.lstrip().startswith("#"):
                    assert pin in line, f"{path.name}: {line.strip()!r} does not pin {pin}"
