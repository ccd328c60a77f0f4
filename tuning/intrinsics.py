"""Register only the tensor intrinsics that a target's tuning can use.

Why: ``import tvm.s_tir.tensor_intrin`` parses hundreds of TVMScript intrinsics for every backend
(CUDA alone is most of it) and takes 35-90 s on a busy 2-core machine. MetaSchedule imports it in
every ``TuneContext`` and, worse, in every LocalBuilder batch (the builder restarts its worker pool
for each batch), so untouched it costs ~40 s per search round whatever the trial count.

MetaSchedule's default schedule rules only reach for the intrinsics of one family per target
(x86 VNNI/AVX-512 dot products, Arm dot products, RISC-V vector, CUDA tensor cores), so inside
our own tuning worker we load that one submodule and skip the package ``__init__`` that imports
all of them. The builder does not need intrinsics at all: tensorisation already happened in the
search process, the builder only lowers the scheduled function.

Only call :func:`register_for_target` in a process we own (the tuning worker): it leaves a
partially populated ``tvm.s_tir.tensor_intrin`` package in ``sys.modules``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import tvm

from gmorph_tvm.core.targets import machine_arch

_PACKAGE = "tvm.s_tir.tensor_intrin"


def intrinsic_families(target: tvm.target.Target) -> list[str] | None:
    """Submodules of ``tvm.s_tir.tensor_intrin`` MetaSchedule may use for ``target``.

    ``None`` means "unknown target family: import the whole package".
    """
    kind = target.kind.name
    if kind == "cuda":
        return ["cuda"]
    if kind in ("rocm", "metal", "hexagon"):
        return [kind]
    if kind != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "")) if "mtriple" in target.attrs else ""
    arch = triple.split("-")[0] if triple else machine_arch()
    if arch in ("x86_64", "i386", "i686", "amd64"):
        return ["x86"]
    if arch.startswith(("aarch64", "arm")):
        return ["arm_cpu"]
    if arch.startswith("riscv"):
        return ["riscv_cpu"]
    return None


def register_for_target(target: tvm.target.Target) -> None:
    """Make the tensor intrinsics ``target`` may need available, as cheaply as possible."""
    families = intrinsic_families(target)
    if _PACKAGE in sys.modules or families is None:
        importlib.import_module(_PACKAGE)
        return
    import tvm.s_tir

    package_dir = os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")
    spec = importlib.util.spec_from_file_location(
        _PACKAGE, os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir]
    )
    assert spec is not None
    # Register the package without executing its __init__ (which imports every family).
    sys.modules[_PACKAGE] = importlib.util.module_from_spec(spec)
    for family in families:
        importlib.import_module(f"{_PACKAGE}.{family}")
