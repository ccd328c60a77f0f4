"""The CUDA driver version of this machine, and the check that it loads an artifact's device code.

A CUDA artifact's manifest records the oldest CUDA driver that loads its SASS
(``cuda.cuda_min_driver``, see :func:`gmorph_tvm.core.cuda.min_driver_for`). On a board whose
driver is older (e.g. JetPack 5's CUDA 11.4 for code made by CUDA 12), ``cuModuleLoadData``
would fail deep inside the first kernel launch with ``CUDA_ERROR_UNSUPPORTED_PTX_VERSION`` or
``no kernel image``; :func:`check_cuda_driver` says so in one line at load time instead.
The version is read from ``libcuda.so.1`` (``cuDriverGetVersion``, which needs no ``cuInit``
and no GPU context), so the check costs nothing where the driver is absent.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any

from ..core import cuda as cuda_code
from ..errors import ArtifactError

_LIBCUDA = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")


def cuda_driver_version() -> str | None:
    """``"12.2"`` for the installed CUDA driver, or None when there is none."""
    for name in _LIBCUDA:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        try:
            status = lib.cuDriverGetVersion(ctypes.byref(version))
        except AttributeError:
            continue
        if status == 0 and version.value > 0:
            return format_driver_version(version.value)
    return None


def format_driver_version(value: int) -> str:
    """``12020`` (cuDriverGetVersion's encoding, 1000 * major + 10 * minor) -> ``"12.2"``."""
    return f"{value // 1000}.{(value % 1000) // 10}"


def check_cuda_driver(manifest: Mapping[str, Any], driver: str | None, what: str) -> None:
    """ArtifactError (one line) when CUDA driver ``driver`` is older than the artifact needs.

    ``driver`` None (no driver here) passes: the device check reports the missing GPU.
    """
    cuda = manifest.get("cuda") or {}
    needed = cuda.get("cuda_min_driver")
    if driver is None or not needed:
        return
    if cuda_code.version_tuple(driver) >= cuda_code.version_tuple(needed):
        return
    made_by = f"CUDA {cuda['toolkit']}" if cuda.get("toolkit") else "its compiler"
    raise ArtifactError(
        f"{what} needs a CUDA driver >= {needed} (its {cuda.get('arch', 'GPU')} code was made by {made_by}), "
        f"but this driver is CUDA {driver}; rebuild for this board's JetPack (e.g. --target jetson-orin:jp5) "
        "or upgrade the driver (JetPack 5+: the cuda-compat package)"
    )
