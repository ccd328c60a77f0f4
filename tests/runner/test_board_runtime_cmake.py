"""The root CMake build of TVM's runtime from source (``-DGMORPH_BUILD_TVM_RUNTIME=ON``).

Without the TVM tree, configuring stops with one message holding the git commands that fetch
it. With a tree (``third_party/tvm``, or ``$GMORPH_TVM_SOURCE_DIR``) and CMake >= 3.26 (tvm-ffi's
minimum), configuring a cross build for aarch64 succeeds; compiling it takes too long for CI on 2
cores and is ``scripts/build_board_runtime.sh`` (its time is in docs/deployment.md, TVM's runtime from source).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CMAKE = shutil.which("cmake")

pytestmark = pytest.mark.skipif(CMAKE is None or shutil.which("g++") is None, reason="needs cmake and g++")


def _configure(build_dir: Path, *args: str, cmake: str | None = None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([cmake or CMAKE, "-S", str(REPO), "-B", str(build_dir), "-DGMORPH_BUILD_TVM_RUNTIME=ON", *args],
                          capture_output=True, text=True, timeout=600, env=env)


def test_missing_tvm_tree_says_how_to_fetch_it(tmp_path):
    missing = tmp_path / "no-tvm"
    proc = _configure(tmp_path / "build", f"-DGMORPH_TVM_SOURCE_DIR={missing}")
    assert proc.returncode != 0
    text = re.sub(r"\s+", " ", proc.stderr)
    assert f"no TVM source tree in {missing}" in text
    assert (f"git clone https://github.com/apache/tvm {missing} && git -C {missing} checkout 7b5acb32b && "
            f"git -C {missing} submodule update --init --recursive 3rdparty/tvm-ffi") in text


def _new_cmake() -> tuple[str | None, dict]:
    """A CMake >= 3.26: the one on PATH, or the pip package the bench script caches."""
    env = dict(os.environ)
    version = subprocess.run([CMAKE, "--version"], capture_output=True, text=True).stdout.split()[2]
    if tuple(int(v) for v in version.split(".")[:2]) >= (3, 26):
        return CMAKE, env
    cache = Path(os.environ.get("GMORPH_TVM_CACHE") or Path.home() / ".cache" / "gmorph-tvm") / "cmake-pip"
    if (cache / "bin" / "cmake").is_file():
        env["PYTHONPATH"] = str(cache)
        return str(cache / "bin" / "cmake"), env
    return None, env


def test_runtime_cross_build_for_aarch64_configures(tmp_path):
    tree = Path(os.environ.get("GMORPH_TVM_SOURCE_DIR") or REPO / "third_party" / "tvm")
    if not (tree / "CMakeLists.txt").is_file():
        pytest.skip(f"no TVM source tree in {tree} (see third_party/README.md)")
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("needs g++-aarch64-linux-gnu")
    cmake, env = _new_cmake()
    if cmake is None:
        pytest.skip("tvm-ffi needs CMake >= 3.26 (bash scripts/build_board_runtime.sh fetches one)")
    proc = _configure(tmp_path / "build", f"-DGMORPH_TVM_SOURCE_DIR={tree}",
                      f"-DCMAKE_TOOLCHAIN_FILE={REPO / 'cmake/aarch64-linux-gnu.cmake'}", cmake=cmake, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cache = (tmp_path / "build" / "CMakeCache.txt").read_text()
    assert "CMAKE_CXX_COMPILER_AR:FILEPATH=/usr/bin/aarch64-linux-gnu-gcc-ar" in cache  # the cross toolchain
    assert "Build files have been written" in proc.stdout
    assert "USE_LLVM:STRING=OFF" in cache
