"""The board's host side, executed here: gmorph-run cross-built for aarch64 against the runtime of
the aarch64 apache-tvm wheel runs an ``aarch64`` (CPU) artifact under qemu-aarch64, and its
outputs equal those of the x86-64 build of the same models.

Needs qemu-user-static, g++-aarch64-linux-gnu (its sysroot /usr/aarch64-linux-gnu is qemu's
-L) and the runtime libraries that ``scripts/fetch_board_runtime.sh`` (run by the set-up)
extracts into the cache; skipped, naming what is missing, otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm_ffi.libinfo

import gmorph_tvm
from gmorph_tvm import build
from gmorph_tvm.core.cuda import cache_dir
from gmorph_tvm.runtime import load
from helpers import TinyCNN

REPO = Path(__file__).resolve().parents[2]
SYSROOT = Path("/usr/aarch64-linux-gnu")
RUNTIME = cache_dir() / "aarch64-runtime"
QEMU = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
CROSS = shutil.which("aarch64-linux-gnu-g++")

_missing = [what for what, ok in (
    ("qemu-user-static (apt install qemu-user-static)", QEMU),
    ("g++-aarch64-linux-gnu", CROSS and SYSROOT.is_dir()),
    ("cmake", shutil.which("cmake")),
    (f"the aarch64 TVM runtime in {RUNTIME} (bash scripts/fetch_board_runtime.sh)",
     (RUNTIME / "libtvm_runtime.so").is_file() and (RUNTIME / "libtvm_ffi.so").is_file()),
) if not ok]
pytestmark = pytest.mark.skipif(bool(_missing), reason="needs " + ", ".join(_missing))


@pytest.fixture(scope="module")
def x():
    return torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype("float32"))


@pytest.fixture(scope="module")
def multimodel(x):
    return gmorph_tvm.import_models({"shape": TinyCNN(4, 0).eval(), "color": TinyCNN(3, 1).eval()}, example_inputs=x)


@pytest.fixture(scope="module")
def gmorph_run_aarch64(tmp_path_factory) -> Path:
    build_dir = tmp_path_factory.mktemp("cmake-aarch64")
    configure = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(build_dir), f"-DCMAKE_TOOLCHAIN_FILE={REPO / 'cmake/aarch64-linux-gnu.cmake'}",
         f"-DGMORPH_FFI_INCLUDE={tvm_ffi.libinfo.find_include_path()}",
         f"-DGMORPH_DLPACK_INCLUDE={tvm_ffi.libinfo.find_dlpack_include_path()}",
         f"-DGMORPH_FFI_LIB={RUNTIME / 'libtvm_ffi.so'}", f"-DGMORPH_TVM_RUNTIME_LIB={RUNTIME / 'libtvm_runtime.so'}"],
        capture_output=True, text=True, timeout=300,
    )
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compiled = subprocess.run(["cmake", "--build", str(build_dir), "-j2"], capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    binary = build_dir / "gmorph-run"
    assert binary.read_bytes()[18] == 183  # e_machine EM_AARCH64
    return binary


def test_aarch64_artifact_runs_under_qemu_like_the_x86_build(gmorph_run_aarch64, multimodel, x, tmp_path):
    board = build(multimodel, "aarch64").export(tmp_path / "board.so")
    assert board.read_bytes()[18] == 183
    x_file = tmp_path / "x.npy"
    np.save(x_file, x.numpy())
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [QEMU, "-L", str(SYSROOT), "-E", f"LD_LIBRARY_PATH={RUNTIME}", str(gmorph_run_aarch64), str(board),
         "--input", f"x={x_file}", "--repeat", "2", "--save-outputs", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "over 2 runs on cpu:0" in proc.stdout

    expected = load(build(multimodel, "llvm").export(tmp_path / "host.so"))(x.numpy())
    for task, value in expected.items():
        emulated = np.load(out / f"{task}.npy")
        assert emulated.shape == value.shape and emulated.dtype == value.dtype
        np.testing.assert_allclose(emulated, value, rtol=1e-5, atol=1e-6)
