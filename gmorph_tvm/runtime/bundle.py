"""A runtime bundle: what running artifacts needs where no TVM is installed (a GPU box, a board).

``bundle_runtime(target, out_dir)`` writes::

    DIR/lib/   libtvm_ffi.so, libtvm_runtime.so (+ libtvm_runtime_cuda.so and, where this machine
               has it, libcudart.so.13 for CUDA), copied from the installed apache-tvm /
               apache-tvm-ffi wheels and the CUDA toolkit
    DIR/bin/   gmorph-run (the native runner, built with CMake from this checkout's runner/)
    DIR/gmorph-run   a shell wrapper: LD_LIBRARY_PATH=DIR/lib, then bin/gmorph-run "$@"
    DIR/BUNDLE.json  target, TVM version, files and sizes

The Python runtime-only path (``TVM_USE_RUNTIME_LIB=1``) still needs the ``tvm`` Python package,
so the bundle's runner is the C++ one: ``DIR/gmorph-run model.so --input x=x.npy --save-outputs OUT``.
For jetson-orin the libraries of *this* machine's wheel do not load on an aarch64 board: there
the runtime is built on/for the board (CMakeLists.txt ``GMORPH_BUILD_TVM_RUNTIME``); the bundle
refuses rather than ship x86 libraries.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import stat
import subprocess
import sys
from importlib import util as importlib_util
from pathlib import Path

from ..errors import BuildError

MAX_BYTES = 16 * 1024 * 1024
CUDART = "libcudart.so.13"  # what libtvm_runtime_cuda.so of apache-tvm 0.27 is linked against
REPO = Path(__file__).resolve().parents[2]

_WRAPPER = """#!/bin/sh
# gmorph-run from this runtime bundle: the TVM runtime libraries next to it, no TVM install needed.
here=$(cd "$(dirname "$0")" && pwd)
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/bin/gmorph-run" "$@"
"""


def _package_dir(name: str) -> Path:
    spec = importlib_util.find_spec(name)
    if spec is None or spec.origin is None:
        raise BuildError(f"bundle-runtime: Python package {name!r} is not installed (pip install apache-tvm)")
    return Path(spec.origin).parent


def runtime_libraries(target: str) -> list[Path]:
    """The wheel's runtime libraries a ``target`` artifact needs (BuildError if one is missing)."""
    tvm_lib = _package_dir("tvm") / "lib"
    ffi_lib = _package_dir("tvm_ffi") / "lib"
    libraries = [ffi_lib / "libtvm_ffi.so", tvm_lib / "libtvm_runtime.so"]
    if target != "llvm":
        libraries.append(tvm_lib / "libtvm_runtime_cuda.so")
    for library in libraries:
        if not library.is_file():
            raise BuildError(f"bundle-runtime: {library} is missing from the installed wheel")
    if target == "cuda":
        cudart = find_cudart()
        if cudart is not None:  # redistributable; a GPU box with only PyTorch's wheels may lack it on its path
            libraries.append(cudart)
    return libraries


def find_cudart() -> Path | None:
    """The ``libcudart.so.13`` the wheel's CUDA runtime links (CUDA_HOME, /usr/local/cuda), or None."""
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    for root in filter(None, roots):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            path = Path(root) / sub / CUDART
            if path.is_file():
                return path  # copied under this name (copy2 follows the link to the file)
    return None


def build_native_runner(build_dir: Path) -> Path:
    """Configure and build ``gmorph-run`` with CMake in ``build_dir``; its path."""
    if shutil.which("cmake") is None:
        raise BuildError("bundle-runtime: cmake is not installed (needed to build gmorph-run)")
    steps = [
        ["cmake", "-S", str(REPO), "-B", str(build_dir), f"-DPython3_EXECUTABLE={sys.executable}",
         "-DCMAKE_BUILD_TYPE=Release"],
        ["cmake", "--build", str(build_dir), "-j2"],
    ]
    for step in steps:
        proc = subprocess.run(step, check=False, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise BuildError(f"bundle-runtime: {' '.join(step[:2])} failed in {build_dir}: {tail[0]}")
    binary = build_dir / "gmorph-run"
    if not binary.is_file():
        raise BuildError(f"bundle-runtime: the CMake build in {build_dir} made no gmorph-run")
    return binary


def bundle_runtime(target: str, out_dir: str | os.PathLike, *, runner: str | os.PathLike | None = None) -> Path:
    """Write the runtime bundle for ``target`` ("llvm", "cuda" or "jetson-orin") into ``out_dir``.

    ``runner``: an already built gmorph-run to ship (default: build it under ``out_dir/.build``
    and keep only the binary). Raises BuildError naming the missing piece or the size overrun.
    """
    if target not in ("llvm", "cuda", "jetson-orin"):
        raise BuildError(f"bundle-runtime: unknown target {target!r} (expected llvm, cuda or jetson-orin)")
    if target == "jetson-orin" and platform.machine() != "aarch64":
        raise BuildError(
            "bundle-runtime: jetson-orin needs an aarch64 TVM runtime, and this wheel's is "
            f"{platform.machine()}: build it with CMake -DGMORPH_BUILD_TVM_RUNTIME=ON (see CMakeLists.txt)"
        )
    out = Path(out_dir)
    (out / "lib").mkdir(parents=True, exist_ok=True)
    (out / "bin").mkdir(exist_ok=True)
    libraries = runtime_libraries(target)
    for library in libraries:
        shutil.copy2(library, out / "lib" / library.name)
    if runner is None:
        build_dir = out / ".build"
        shutil.copy2(build_native_runner(build_dir), out / "bin" / "gmorph-run")
        shutil.rmtree(build_dir)
    else:
        shutil.copy2(runner, out / "bin" / "gmorph-run")
    wrapper = out / "gmorph-run"
    wrapper.write_text(_WRAPPER, encoding="utf-8")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    total = sum(files.values())
    if total > MAX_BYTES:
        raise BuildError(f"bundle-runtime: {out} holds {total / 2**20:.1f} MiB, over the 16 MiB budget")
    info = {"target": target, "machine": platform.machine(), "tvm_lib": str(libraries[-1].parent),
            "files": files, "total_bytes": total}
    (out / "BUNDLE.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


__all__ = ["CUDART", "MAX_BYTES", "build_native_runner", "bundle_runtime", "find_cudart", "runtime_libraries"]
