"""Target presets and normalisation.

TVM 0.27 only accepts targets as dicts (the old ``"llvm -mcpu=..."`` strings are rejected). Users
may pass a dict, a ``tvm.target.Target``, or one of the preset names below. Presets for CPUs fill
in the host CPU (``mcpu``): without it LLVM emits generic x86-64 code, several times slower.
"""

from __future__ import annotations

import copy
import platform
import re
from collections.abc import Mapping
from typing import Any, Union

import tvm

from ..errors import TargetError, one_line
from .threads import physical_cores

TargetLike = Union[str, Mapping[str, Any], "tvm.target.Target"]

# aarch64 host of the Jetson boards: CPU core per generation.
_JETSON = {
    "jetson-orin": ("sm_87", "cortex-a78ae"),
    "jetson-xavier": ("sm_72", "carmel"),
    "jetson-nano": ("sm_53", "cortex-a57"),
}


# JetPack releases per board, and the CUDA version of the driver each ships (what
# cudaDriverGetVersion reports on a stock install): JetPack 4.6 CUDA 10.2, 5.x CUDA 11.4,
# 6.0 CUDA 12.2 (6.1/6.2: 12.6). "jetson-orin:jp6" picks device code that driver loads.
JETPACK_CUDA = {"jp4": "10.2", "jp5": "11.4", "jp6": "12.2"}
JETPACKS = {"jetson-orin": ("jp5", "jp6"), "jetson-xavier": ("jp5",), "jetson-nano": ("jp4",)}


def host_cpu() -> str:
    """The LLVM name of this machine's CPU (e.g. ``znver5``)."""
    get_cpu = tvm.get_global_func("target.llvm_get_system_cpu", allow_missing=True)
    return str(get_cpu()) if get_cpu is not None else "generic"


def host_num_cores() -> int:
    """Physical cores this process may use: the ``num-cores`` of CPU presets, and the threads
    ``import gmorph_tvm`` gives TVM's runtime (:mod:`.threads`)."""
    return physical_cores()


def _llvm_host() -> dict[str, Any]:
    return {"kind": "llvm", "mcpu": host_cpu(), "num-cores": host_num_cores()}


def preset_names() -> list[str]:
    jetpacks = [f"{board}:{jp}" for board in sorted(_JETSON) for jp in JETPACKS[board]]
    return ["llvm", "cuda", *sorted(_JETSON), *jetpacks, "aarch64"]


def _preset(name: str) -> dict[str, Any]:
    if name in ("llvm", "cpu"):
        return _llvm_host()
    if name == "cuda":
        return {"kind": "cuda", "arch": "sm_90", "host": _llvm_host()}
    if name.startswith("cuda:"):  # e.g. "cuda:sm_87" -> CUDA for that arch, this host
        return {"kind": "cuda", "arch": name.split(":", 1)[1], "host": _llvm_host()}
    board, _, jetpack = name.partition(":")
    if board in _JETSON:
        arch, cpu = _JETSON[board]
        host = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": cpu}
        if not jetpack:
            return {"kind": "cuda", "arch": arch, "host": host}
        if jetpack not in JETPACKS[board]:
            raise TargetError(
                f"{board} runs JetPack {', '.join(JETPACKS[board])}, not {jetpack!r}; use "
                + " or ".join(f"'{board}:{jp}'" for jp in JETPACKS[board])
            )
        # The tag carries the JetPack choice through Target round trips (tuning, manifest).
        return {"kind": "cuda", "arch": arch, "tag": name, "host": host}
    if name == "aarch64":
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae"}
    raise TargetError(
        f"unknown target preset {name!r}; use one of {', '.join(preset_names())}, 'cuda:sm_XX', "
        "or a TVM target dict such as {'kind': 'llvm', 'mcpu': 'znver5'}"
    )


def target_dict(target: TargetLike) -> dict[str, Any]:
    """Normalise a preset name, dict or Target into a plain target dict."""
    if isinstance(target, tvm.target.Target):
        return dict(_to_plain(target.export()))
    if isinstance(target, str):
        stripped = target.strip()
        if stripped.startswith("{"):
            import json

            try:
                return json.loads(stripped)
            except json.JSONDecodeError as err:
                raise TargetError(f"target {target!r} is not valid JSON: {err}") from err
        return _preset(stripped)
    if isinstance(target, Mapping):
        return copy.deepcopy(dict(target))
    raise TargetError(f"target must be a preset name, a dict or a tvm.target.Target, not {type(target).__name__}")


def _to_plain(obj: Any) -> Any:
    """Turn TVM containers (Map/Array/String/IntImm) into JSON-able Python values."""
    if isinstance(obj, Mapping) or hasattr(obj, "items"):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or (hasattr(obj, "__len__") and hasattr(obj, "__getitem__") and not isinstance(obj, str)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if hasattr(obj, "value"):
        return obj.value
    return str(obj)


def resolve_target(target: TargetLike) -> tvm.target.Target:
    """A ``tvm.target.Target`` for a preset name, dict or Target, with a clear error if invalid."""
    if isinstance(target, tvm.target.Target):
        check_triple(target)
        return target
    spec = target_dict(target)
    try:
        resolved = tvm.target.Target(spec)
    except Exception as err:  # TVM raises its own error types with long C++ traces
        raise TargetError(f"invalid target {spec}: {one_line(err)}") from err
    check_triple(resolved)
    return resolved


# Architectures LLVM spells with a version or variant suffix (armv7a, thumbv7, i686, mips64el, ...).
_ARCH_FAMILIES = ("arm", "thumb", "aarch64", "mips", "powerpc", "riscv", "sparc", "wasm", "loongarch")


def check_triple(target: tvm.target.Target) -> None:
    """TargetError unless the ``mtriple`` of ``target`` (or of its host) names an architecture this
    LLVM has a backend for. An unknown one (``nonsense-foo-bar``) is not refused by TVM: LLVM warns,
    and code generation later crashes the process."""
    for part in (target, target.host):
        if part is None or part.kind.name != "llvm" or "mtriple" not in part.attrs:
            continue
        triple = str(part.attrs["mtriple"])
        arch = cpu_arch(triple.split("-")[0])
        arch = "i386" if re.fullmatch(r"i[3-6]86", arch) else arch
        get = tvm.get_global_func("target.llvm_get_targets", allow_missing=True)
        known = [str(k) for k in get()] if get is not None else []
        if known and arch not in known and not arch.startswith(_ARCH_FAMILIES):
            raise TargetError(f"target triple {triple!r}: this LLVM has no backend for {arch!r} "
                              f"(it knows {', '.join(sorted(known))})")


def jetpack_of(target: tvm.target.Target) -> str | None:
    """``"jp6"`` for a target made from ``"jetson-orin:jp6"`` (its tag), else None."""
    tag = str(getattr(target, "tag", "") or "")
    jetpack = tag.partition(":")[2]
    return jetpack if tag.partition(":")[0] in JETPACKS and jetpack in JETPACK_CUDA else None


def is_cuda(target: tvm.target.Target) -> bool:
    return target.kind.name == "cuda"


_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def cpu_arch(name: str) -> str:
    """One spelling per CPU architecture: ``AMD64`` -> ``x86_64``, ``arm64`` -> ``aarch64``."""
    name = str(name).strip().lower()
    return _ARCH_ALIASES.get(name, name)


def machine_arch() -> str:
    """This machine's CPU architecture, spelled as :func:`cpu_arch` does."""
    return cpu_arch(platform.machine())


def runs_here(arch: str) -> bool:
    """Whether code for CPU ``arch`` (e.g. a triple's first field) runs on this machine; the one
    host-architecture check of the builder, the loader, export and measured grouping."""
    return cpu_arch(arch) == machine_arch()


def host_is_native(target: tvm.target.Target) -> bool:
    """True when code for this target's host CPU can run on this machine."""
    host = target.host if is_cuda(target) else target
    if host is None:
        return True
    triple = str(host.attrs.get("mtriple", "")) if hasattr(host, "attrs") else ""
    return not triple or runs_here(triple.split("-")[0])
