"""Tuning on boards through a TVM RPC tracker: which boards, which runner, which builder export.

``tune(..., tracker="host:port", key="orin")`` measures every candidate schedule on the boards
registered with the tracker under ``key`` (``python -m tvm.exec.rpc_server --tracker HOST:PORT
--key orin`` on each board). The parent asks the tracker how many servers carry the key and
hands the worker a plain JSON spec (:func:`runner_spec`); the worker builds MetaSchedule's
``RPCRunner`` with one connection per board (:func:`make_runner`), so the boards measure in
parallel. For a host CPU other than this machine's (an aarch64 Jetson from x86), the builder
exports each candidate as a ``.so`` linked by the cross compiler (:func:`make_export`), with CUDA
kernels compiled to SASS here, so the board needs neither a C++ nor a CUDA compiler; for a native
CPU host the default ``.tar`` export is kept (the server links it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import tvm
from tvm.support import cc

from gmorph_tvm.core import cuda as cuda_code
from gmorph_tvm.core.targets import JETPACK_CUDA, host_is_native, is_cuda, jetpack_of
from gmorph_tvm.errors import TuningError

# Cross compilers for the host CPU triples of boards (the same ones export_artifact uses).
CROSS_CXX = {"aarch64": "aarch64-linux-gnu-g++", "arm64": "aarch64-linux-gnu-g++"}


def parse_tracker(tracker: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"`` or ``(host, port)`` -> ``(host, port)``; TuningError for anything else."""
    if isinstance(tracker, (tuple, list)) and len(tracker) == 2:
        host, port = tracker
        return str(host), int(port)
    host, sep, port = str(tracker).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TuningError(f"tracker address {tracker!r} is not of the form HOST:PORT")
    return host, int(port)


def count_servers(host: str, port: int, key: str) -> int:
    """How many RPC servers are registered with the tracker at ``host:port`` under ``key``."""
    from tvm import rpc

    try:
        summary = rpc.connect_tracker(host, port).summary()
    except Exception as err:  # noqa: BLE001 - socket and TVM errors
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        raise TuningError(f"cannot reach the RPC tracker {host}:{port}: {first}") from err
    # Servers register as "server:<key>"; busy ones stay listed in server_info.
    return sum(1 for server in summary.get("server_info", []) if server.get("key") == f"server:{key}")


def runner_spec(
    tracker: str | tuple[str, int],
    key: str | None,
    *,
    session_timeout_s: float = 120.0,
    number: int = 3,
    repeat: int = 1,
    min_repeat_ms: int = 50,
) -> dict[str, Any]:
    """The JSON-able description of an RPC runner on every board under ``key`` (checked now)."""
    if not key:
        raise TuningError("tuning through a tracker needs the device key the boards registered with (--key)")
    host, port = parse_tracker(tracker)
    boards = count_servers(host, port, key)
    if boards == 0:
        raise TuningError(
            f"no RPC server is registered with the tracker {host}:{port} under key {key!r}; start one on each "
            f"board with: python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}"
        )
    return {
        "host": host,
        "port": port,
        "key": key,
        "max_workers": boards,
        "session_timeout_s": float(session_timeout_s),
        "number": int(number),
        "repeat": int(repeat),
        "min_repeat_ms": int(min_repeat_ms),
    }


def make_runner(spec: dict[str, Any]):
    """MetaSchedule's RPCRunner for a :func:`runner_spec`: one parallel connection per board."""
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.RPCRunner(
        ms.runner.RPCConfig(
            tracker_host=spec["host"],
            tracker_port=int(spec["port"]),
            tracker_key=spec["key"],
            session_priority=1,
            session_timeout_sec=int(spec["session_timeout_s"]),
        ),
        evaluator_config=ms.runner.EvaluatorConfig(
            number=int(spec["number"]),
            repeat=int(spec["repeat"]),
            min_repeat_ms=int(spec["min_repeat_ms"]),
            enable_cpu_cache_flush=False,
        ),
        max_workers=int(spec["max_workers"]),
    )


def cross_compiler_for(target: tvm.target.Target) -> str | None:
    """The cross C++ compiler that links code for ``target``'s host CPU, or None for this machine's.

    TuningError when the host is foreign and no cross compiler is installed.
    """
    if host_is_native(target):
        return None
    host = target.host if is_cuda(target) and target.host is not None else target
    triple = str(host.attrs.get("mtriple", ""))
    arch = triple.split("-")[0]
    cxx = os.environ.get("GMORPH_TVM_CROSS_CXX") or CROSS_CXX.get(arch) or f"{triple}-g++"
    if shutil.which(cxx) is None:
        raise TuningError(
            f"tuning for a {arch} board links each candidate with the cross compiler {cxx}, which is not "
            f"installed (Debian/Ubuntu: apt install g++-{arch}-linux-gnu), or set GMORPH_TVM_CROSS_CXX"
        )
    return cxx


def make_export(cxx: str | None, arch: str | None = None, board_cuda: str | None = None) -> Callable[[Any], str]:
    """An ``f_export`` for MetaSchedule's LocalBuilder: a ``.so`` for the board.

    ``cxx``: the cross compiler that links it (None: this machine's). ``arch``: for CUDA targets,
    the kernels TVM left as CUDA source (no CUDA runtime here) are compiled to SASS as ``build``
    does (:func:`gmorph_tvm.core.cuda.compile_kernels`, the ptxas of ``board_cuda``'s release), so
    the board needs no CUDA compiler. Runs in the builder's worker processes (pickled by value).
    """

    def export(mod) -> str:
        packer = None
        if arch:
            fatbins: dict[str, bytes] = {}
            stack = [mod]
            while stack:
                module = stack.pop()
                stack.extend(module.imports)
                if module.kind == "cuda" and not module.is_runnable():
                    source = str(module.inspect_source("cuda"))
                    fatbins[cuda_code.source_key(source)] = cuda_code.compile_kernels(source, arch, board_cuda)
            packer = cuda_code.fatbin_packer(fatbins) if fatbins else None
        path = os.path.join(tempfile.mkdtemp(prefix="gmorph_ms_"), "candidate.so")
        mod.export_library(path, fcompile=cc.cross_compiler(cxx) if cxx else None, fpack_imports=packer)
        return path

    return export


def export_spec(target: tvm.target.Target) -> dict[str, Any] | None:
    """What the worker's ``make_export`` needs for ``target`` on a board (None: the default .tar)."""
    cxx = cross_compiler_for(target)
    arch = str(target.attrs["arch"]) if is_cuda(target) and "arch" in target.attrs else None
    if cxx is None and arch is None:
        return None
    jetpack = jetpack_of(target) if arch else None
    return {"cxx": cxx, "arch": arch, "board_cuda": JETPACK_CUDA[jetpack] if jetpack else None}
