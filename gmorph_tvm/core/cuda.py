"""CUDA device code: compile TVM's generated CUDA C to a fatbin with nvcc, and inspect fatbins.

Why this exists: on a machine without libcuda (a CI box, a build server), TVM 0.27's CUDA runtime
library (libtvm_runtime_cuda.so, which needs libcuda.so.1) does not load, so the real CUDA module
factory ``ffi.Module.create.cuda`` is missing and codegen returns a *fallback* module that stores
the kernels as CUDA C **source** (format ``"cuda"``). Exported as is, the ``.so`` only works where
the TVM Python package plus NVRTC/nvcc can compile that source just in time when the library is
loaded -- not on a bare Jetson with a C++ runtime. nvcc needs no GPU, so we compile the source
to a fatbin (SASS for ``sm_XX`` plus PTX for ``compute_XX``) at build time and splice it into
the library blob at export time (see :func:`patch_library_blob`).

Why not a public TVM API: in TVM 0.27 codegen calls ``tvm_callback_cuda_compile`` only when the
CUDA runtime factory ``ffi.Module.create.cuda`` is registered (none is called without it; checked
with a recording callback), that factory and the matching loader live in libtvm_runtime_cuda.so,
which needs libcuda.so.1, and the codegen's fallback module (which stores whatever it is given) is
"never registered as an FFI factory" (``cuda_fallback_module.cc``). So without a driver no public
call makes TVM hold a fatbin, and the blob that ``export_library(fpack_imports=...)`` hands us is
rewritten here. Its layout is private to TVM: :func:`check_library_blob_format` refuses TVM
versions it was not verified on, and :func:`patch_library_blob` checks that the blob it parsed
re-serialises to the same bytes before changing it (tests/artifact/test_library_blob.py).

Architectures the installed nvcc dropped (CUDA 13 has nothing below sm_75: Jetson Xavier sm_72,
Nano sm_53) take a second route, :func:`compile_cubin_via_ptx`: nvcc emits PTX for its lowest
virtual architecture, the PTX is re-targeted to ``sm_XX`` and assembled by an older ``ptxas``
(``$GMORPH_TVM_PTXAS``, or the one in the pip wheel ``nvidia-cuda-nvcc-cu11``) into a cubin. ptxas
checks every instruction against the target and refuses what ``sm_XX`` lacks, so a cubin that
assembles is valid SASS for it; the PTX ISA version is lowered to what that ptxas knows.

Layout notes (TVM 0.27, ``tvm_ffi`` library_module.cc / ``cuda_module.cc``), all little endian:

* library blob: ``<nbytes:u64> <indptr:vec<u64>> <children:vec<u64>> (<kind:str> [<bytes:str>])*``
  where ``str`` / ``vec`` are a u64 length followed by the payload, and the module of kind
  ``"_lib"`` (the host code itself) has no bytes.
* a ``"cuda"`` module's bytes: ``<fmt:str> <fmap> <code:str>``. The loader hands ``code`` to
  ``cuModuleLoadData`` for any fmt other than ``"cuda"``, so ``fmt="fatbin"`` + fatbin bytes
  load with no compiler on the device.
* fatbin file: header ``<magic 0xBA55ED50:u32> <version:u16> <header size:u16> <size:u64>``,
  then entries ``<kind:u16 (1 PTX, 2 ELF)> <ver:u16> <header size:u32> <payload size:u64>``
  with the SM number as a u32 at entry offset 28. (0x466243B1 is the magic of the *wrapper*
  struct nvcc puts in host objects; the raw fatbin we embed starts with 0xBA55ED50.)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import tvm
import tvm_ffi

from ..errors import BuildError
from .device_code import (  # noqa: F401  (re-exported: the readers of what this module writes)
    ELF_MAGIC,
    EM_AARCH64,
    EM_CUDA,
    EM_X86_64,
    FATBIN_MAGIC,
    DeviceImage,
    cubin_sm,
    device_images_in_bytes,
    device_images_in_file,
    elf_machine,
    fatbin_images,
    u32_at,
)

# The CUDA toolkit that last supported each architecture nvcc 13 dropped (for error messages).
_LAST_TOOLKIT = {
    50: "12.x", 52: "12.x", 53: "12.x", 60: "12.x", 61: "12.x", 62: "12.x", 70: "12.x", 72: "12.x",
}
_BOARDS = {53: "Jetson Nano, JetPack 4 / CUDA 10.2", 62: "Jetson TX2, JetPack 4 / CUDA 10.2",
           72: "Jetson Xavier, JetPack 5 / CUDA 11.4", 87: "Jetson Orin, JetPack 5-6"}

# Flags TVM's own nvcc path uses (tvm.support.nvcc._compile_cuda_nvcc), so kernels behave the
# same whether TVM JIT-compiles them on a GPU box or we compile them here.
_NVCC_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
]


# ---- nvcc ----------------------------------------------------------------------------------


def find_legacy_ptxas() -> str | None:
    """A ptxas for architectures nvcc dropped: ``$GMORPH_TVM_PTXAS``, else the one shipped in the
    ``nvidia-cuda-nvcc-cu11`` / ``-cu12`` wheels (``nvidia/cuda_nvcc/bin/ptxas``)."""
    explicit = os.environ.get("GMORPH_TVM_PTXAS")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    try:
        import importlib.util

        spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        ptxas = Path(location) / "bin" / "ptxas"
        if ptxas.is_file():
            if not os.access(ptxas, os.X_OK):
                try:
                    ptxas.chmod(ptxas.stat().st_mode | 0o111)  # some installers drop the exec bit
                except OSError:
                    continue
            return str(ptxas)
    return None


def cache_dir() -> Path:
    """Where the set-up keeps downloaded toolchains and runtimes (``$GMORPH_TVM_CACHE``)."""
    return Path(os.environ.get("GMORPH_TVM_CACHE") or Path.home() / ".cache" / "gmorph-tvm")


def ptxas_candidates() -> list[str]:
    """Every ptxas found: ``$GMORPH_TVM_PTXAS``, the ``nvidia-cuda-nvcc-cu*`` wheel installed here,
    the ones the set-up unpacked in the cache (``<cache>/nvcc-cu12/...``: the cu11 and cu12 wheels
    both install into ``nvidia/cuda_nvcc``, so only one can be installed), and nvcc's own."""
    found = []
    legacy = find_legacy_ptxas()
    if legacy:
        found.append(legacy)
    if not os.environ.get("GMORPH_TVM_PTXAS"):
        found.extend(str(p) for p in sorted(cache_dir().glob("nvcc-cu*/nvidia/cuda_nvcc/bin/ptxas")))
        nvcc = find_nvcc()
        beside_nvcc = shutil.which("ptxas", path=str(Path(nvcc).parent)) if nvcc else None
        if beside_nvcc:
            found.append(str(Path(beside_nvcc)))
    unique = []
    for path in found:
        if path not in unique and os.access(path, os.X_OK):
            unique.append(path)
    return unique


@lru_cache(maxsize=16)
def tool_release(tool: str) -> str:
    """CUDA release (``"11.8"``) of an nvcc or ptxas binary, from its ``--version``."""
    try:
        text = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"cannot run {tool}: {err}") from err
    match = re.search(r"release (\d+\.\d+)", text)
    if not match:
        raise BuildError(f"{tool} --version names no CUDA release")
    return match.group(1)


def version_tuple(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def min_driver_for(release: str) -> str:
    """The oldest CUDA driver that loads SASS made by CUDA ``release`` (see docs/deployment.md, Device code per JetPack).

    Drivers are backward compatible (newer drivers load older code). From CUDA 11 on, minor
    version compatibility lets code from any 11.x / 12.x toolkit run on a driver of the same
    major release (11.0 / 12.0 and later; PTX JIT excepted, which SASS does not need). Before
    CUDA 11 a driver loads only code of its own release or older.
    """
    major, minor = version_tuple(release)
    return f"{major}.0" if major >= 11 else f"{major}.{minor}"


def driver_accepts(driver: str, release: str) -> bool:
    """Whether a driver of CUDA version ``driver`` loads SASS made by CUDA ``release``."""
    return version_tuple(driver) >= version_tuple(min_driver_for(release))


def find_nvcc() -> str | None:
    """The nvcc to use: ``$GMORPH_TVM_NVCC``, else ``nvcc`` on PATH, else ``$CUDA_HOME/bin/nvcc``."""
    explicit = os.environ.get("GMORPH_TVM_NVCC")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


@lru_cache(maxsize=8)
def _nvcc_info(nvcc: str) -> tuple[str, frozenset[int]]:
    """(release, supported SM numbers) of an nvcc binary."""
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        codes = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"cannot run {nvcc}: {err}") from err
    match = re.search(r"release (\d+\.\d+)", version)
    release = match.group(1) if match else "unknown"
    sms = frozenset(int(m) for m in re.findall(r"sm_(\d+)", codes))
    return release, sms


def sm_number(arch: str) -> int:
    """``"sm_87"`` -> 87; a BuildError for anything else."""
    match = re.fullmatch(r"sm_(\d+)[af]?", str(arch).strip())
    if not match:
        raise BuildError(f"CUDA arch {arch!r} is not of the form sm_XX (e.g. sm_87)")
    return int(match.group(1))


def check_arch_supported(arch: str, board_cuda: str | None = None) -> str:
    """Fail early, with the fix, when nvcc is missing or nothing here can compile for ``arch``.

    Returns the nvcc path. Shipping CUDA source instead would only move the failure to the
    device, where it needs a JIT compiler that a deployed C++ runtime does not have.
    """
    return _device_toolchain(arch, board_cuda)[0]


# What to install for a ptxas of each CUDA major release (the board's driver family).
_PTXAS_FOR_MAJOR = {
    12: "the ptxas of CUDA 12.2 (bash scripts/setup.sh puts it in ~/.cache/gmorph-tvm/nvcc-cu12: "
        "pip install --no-deps --target ~/.cache/gmorph-tvm/nvcc-cu12 nvidia-cuda-nvcc-cu12==12.2.140)",
    11: "the ptxas of CUDA 11.8 (pip install nvidia-cuda-nvcc-cu11==11.8.89, the 'jetson' extra)",
    10: "a CUDA 10.2 ptxas (no pip wheel carries one: the x86-64 CUDA 10.2 toolkit's bin/ptxas)",
}


def _device_toolchain(arch: str, board_cuda: str | None = None) -> tuple[str, str | None]:
    """(nvcc, None) when nvcc compiles ``arch`` itself; (nvcc, ptxas) when another ptxas must make
    the SASS: ``arch`` is one nvcc dropped, or the board's driver (CUDA ``board_cuda``) is of an
    older major release than nvcc."""
    sm = sm_number(arch)
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError(
            f"building for CUDA {arch} needs nvcc to compile the kernels to a fatbin (no GPU needed); "
            "install the CUDA toolkit or point GMORPH_TVM_NVCC at an nvcc binary"
        )
    release, supported = _nvcc_info(nvcc)
    if board_cuda is not None:
        return nvcc, _ptxas_for_board(arch, board_cuda, nvcc, release, supported)
    if not supported or sm in supported:
        return nvcc, None
    ptxas = find_legacy_ptxas() if sm < min(supported) else None
    if ptxas is not None:
        return nvcc, ptxas
    board = f" ({_BOARDS[sm]})" if sm in _BOARDS else ""
    last = _LAST_TOOLKIT.get(sm)
    hint = f"the last CUDA release that does is {last}" if last else "use a CUDA release that supports it"
    legacy = (" or install the ptxas of CUDA 11.8 (pip install nvidia-cuda-nvcc-cu11) / set GMORPH_TVM_PTXAS"
              if sm < min(supported) else "")
    raise BuildError(
        f"nvcc {release} ({nvcc}) does not support {arch}{board}; {hint}. Set GMORPH_TVM_NVCC to "
        f"such an nvcc (e.g. the board's JetPack nvcc){legacy} and build again"
    )


def _ptxas_for_board(arch: str, board_cuda: str, nvcc: str, release: str, supported: frozenset[int]) -> str | None:
    """The tool whose SASS a driver of CUDA ``board_cuda`` loads: None for nvcc itself, else a ptxas.

    Among the tools of the board's major release, the newest not newer than the board wins
    (plain backward compatibility); failing that the oldest newer one (minor version compatibility).
    """
    sm = sm_number(arch)
    major = version_tuple(board_cuda)[0]
    if version_tuple(release)[0] == major and (not supported or sm in supported):
        return None
    same_major = [(tool_release(p), p) for p in ptxas_candidates() if version_tuple(tool_release(p))[0] == major]
    older = sorted((v for v in same_major if version_tuple(v[0]) <= version_tuple(board_cuda)), key=lambda v: version_tuple(v[0]))
    newer = sorted((v for v in same_major if version_tuple(v[0]) > version_tuple(board_cuda)), key=lambda v: version_tuple(v[0]))
    if older:
        return older[-1][1]
    if newer:
        return newer[0][1]
    hint = _PTXAS_FOR_MAJOR.get(major, f"a CUDA {major}.x ptxas")
    raise BuildError(
        f"a board with a CUDA {board_cuda} driver needs {arch} SASS from a CUDA {major}.x ptxas (nvcc {release} "
        f"here makes code it may refuse); install {hint}, or set GMORPH_TVM_PTXAS to one"
    )


def device_code_info(arch: str, board_cuda: str | None = None) -> dict[str, str]:
    """Manifest fields of the device code a build makes here: its format, the CUDA release that
    made its SASS, and the oldest CUDA driver that loads it (:func:`min_driver_for`)."""
    nvcc, ptxas = _device_toolchain(arch, board_cuda)
    toolkit = tool_release(ptxas) if ptxas else _nvcc_info(nvcc)[0]
    return {"device_code": "cubin" if ptxas else "fatbin", "toolkit": toolkit, "cuda_min_driver": min_driver_for(toolkit)}


def compile_kernels(source: str, arch: str, board_cuda: str | None = None) -> bytes:
    """Compile CUDA C ``source`` for ``arch``: a fatbin, or a cubin made by another ptxas (archs
    nvcc dropped, or the ptxas of the board's CUDA release when ``board_cuda`` is given)."""
    nvcc, ptxas = _device_toolchain(arch, board_cuda)
    if ptxas is not None:
        return compile_cubin_via_ptx(source, arch, nvcc, ptxas)
    return compile_fatbin(source, arch)


def compile_fatbin(source: str, arch: str) -> bytes:
    """Compile CUDA C ``source`` to a fatbin holding SASS for ``arch`` and PTX for its compute_XX."""
    nvcc = check_arch_supported(arch)
    sm = str(arch).strip()[3:]  # "87", or "90a" for arch-specific features
    with tempfile.TemporaryDirectory(prefix="gmorph_nvcc_") as tmp:
        src = Path(tmp) / "kernels.cu"
        out = Path(tmp) / "kernels.fatbin"
        src.write_text(source)
        cmd = [nvcc, "--fatbin", *_NVCC_FLAGS, "-gencode", f"arch=compute_{sm},code=[sm_{sm},compute_{sm}]",
               "-o", str(out), str(src)]
        _run_compiler(cmd, out, source, f"nvcc failed to compile the CUDA kernels for {arch}")
        data = out.read_bytes()
    if not data or struct.unpack_from("<I", data, 0)[0] != FATBIN_MAGIC:
        raise BuildError(f"nvcc produced no fatbin for {arch}")
    return data


def compile_cubin_via_ptx(source: str, arch: str, nvcc: str, ptxas: str) -> bytes:
    """CUDA C -> PTX (nvcc, for ``arch`` or its lowest virtual arch) -> re-targeted to ``arch`` -> cubin (ptxas)."""
    sm = sm_number(arch)
    supported = _nvcc_info(nvcc)[1]
    lowest = sm if sm in supported else min(supported)  # PTX for the arch itself when nvcc has it
    with tempfile.TemporaryDirectory(prefix="gmorph_ptx_") as tmp:
        src, ptx, cubin = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.ptx", Path(tmp) / "kernels.cubin"
        src.write_text(source)
        _run_compiler([nvcc, "--ptx", *_NVCC_FLAGS, f"-arch=compute_{lowest}", "-o", str(ptx), str(src)], ptx,
                      source, f"nvcc failed to compile the CUDA kernels to PTX for {arch}")
        text, count = re.subn(r"^\.target\s+sm_\d+\w*", f".target sm_{sm}", ptx.read_text(), count=1, flags=re.M)
        if count != 1:
            raise BuildError(f"nvcc's PTX for {arch} has no .target line")
        cmd = [ptxas, "-O3", f"-arch=sm_{sm}", "-o", str(cubin), str(ptx)]
        for _ in range(2):
            ptx.write_text(text)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            # An older ptxas knows an older PTX ISA: it names its own, retry with that one.
            known = re.search(r"Unsupported \.version [\d.]+; current version is '([\d.]+)'", proc.stderr)
            if proc.returncode == 0 or not known:
                break
            text = re.sub(r"^\.version\s+[\d.]+", f".version {known.group(1)}", text, count=1, flags=re.M)
        if proc.returncode != 0 or not cubin.is_file():
            detail = next((line.strip() for line in proc.stderr.splitlines() if line.strip()), "no output")
            raise BuildError(f"ptxas ({ptxas}) failed to assemble the kernels for {arch}: {detail}")
        data = cubin.read_bytes()
    if cubin_sm(data) != sm:
        raise BuildError(f"ptxas produced no cubin for {arch}")
    return data


def _run_compiler(cmd: list[str], out: Path, source: str, what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        errors = [line for line in (proc.stderr + proc.stdout).splitlines() if "error" in line.lower()]
        detail = errors[0].strip() if errors else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"{what}{_kernel_at_error(source, detail)}: {detail}")


def _kernel_at_error(source: str, detail: str) -> str:
    """`` in kernel 'name'`` for an nvcc error of the form ``kernels.cu(LINE): error ...``."""
    match = re.search(r"\((\d+)\)", detail)
    if not match:
        return ""
    line_no = int(match.group(1))
    name = None
    for i, line in enumerate(source.splitlines(), start=1):
        if i > line_no:
            break
        found = re.search(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", line)
        if found:
            name = found.group(1)
    return f" in kernel {name!r}" if name else ""


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


# ---- the exported library's module blob ----------------------------------------------------

# (apache-tvm, apache-tvm-ffi) release prefixes whose library blob and CUDA module layout the
# functions below were verified against (the module docstring; tests/artifact/test_library_blob.py).
# A new release may change the private layout: verify it, then add it here.
BLOB_FORMAT_VERIFIED = (("0.27.", "0.1."),)


def check_library_blob_format(tvm_version: str | None = None, ffi_version: str | None = None) -> None:
    """Refuse (one BuildError line) to rewrite the library blob of a TVM release it was not verified on."""
    tvm_version = tvm.__version__ if tvm_version is None else tvm_version
    ffi_version = tvm_ffi.__version__ if ffi_version is None else ffi_version
    for tvm_prefix, ffi_prefix in BLOB_FORMAT_VERIFIED:
        if tvm_version.startswith(tvm_prefix) and ffi_version.startswith(ffi_prefix):
            return
    known = ", ".join(f"apache-tvm {t}x with apache-tvm-ffi {f}x" for t, f in BLOB_FORMAT_VERIFIED)
    raise BuildError(
        f"embedding compiled CUDA code rewrites TVM's private library-blob layout, verified only for {known}; "
        f"this is apache-tvm {tvm_version} with apache-tvm-ffi {ffi_version}: install apache-tvm==0.27.0.post1 "
        "(or verify gmorph_tvm/core/cuda.py against this release and add it to BLOB_FORMAT_VERIFIED)"
    )



class _Reader:
    def __init__(self, data: bytes, offset: int = 0):
        self.data, self.pos = data, offset

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise ValueError("truncated blob")
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def raw(self) -> bytes:
        size = self.u64()
        if self.pos + size > len(self.data):
            raise ValueError("truncated blob")
        out = self.data[self.pos:self.pos + size]
        self.pos += size
        return out

    def vec_u64(self) -> list[int]:
        count = self.u64()
        values = list(struct.unpack_from(f"<{count}Q", self.data, self.pos))
        self.pos += 8 * count
        return values


def _pack_str(payload: bytes) -> bytes:
    return struct.pack("<Q", len(payload)) + payload


@dataclass
class BlobModule:
    kind: str
    payload: bytes | None  # None for the "_lib" placeholder


def parse_library_blob(blob: bytes) -> tuple[list[int], list[int], list[BlobModule]]:
    """Split a packed-imports blob (with its u64 size header) into import tree + modules."""
    reader = _Reader(blob)
    nbytes = reader.u64()
    if nbytes != len(blob) - 8:
        raise ValueError(f"blob size header says {nbytes} bytes, blob has {len(blob) - 8}")
    indptr = reader.vec_u64()
    children = reader.vec_u64()
    modules = []
    for _ in range(len(indptr) - 1):
        kind = reader.raw().decode()
        modules.append(BlobModule(kind, None if kind == "_lib" else reader.raw()))
    return indptr, children, modules


def serialize_library_blob(indptr: list[int], children: list[int], modules: list[BlobModule]) -> bytes:
    body = struct.pack(f"<Q{len(indptr)}Q", len(indptr), *indptr)
    body += struct.pack(f"<Q{len(children)}Q", len(children), *children)
    for module in modules:
        body += _pack_str(module.kind.encode())
        if module.payload is not None:
            body += _pack_str(module.payload)
    return struct.pack("<Q", len(body)) + body


def split_cuda_module(payload: bytes) -> tuple[str, bytes, bytes]:
    """``(fmt, fmap bytes, code)`` of a serialized CUDA module.

    ``code`` is the last field, so the fmap is everything between fmt and code; we read code's
    length from the end-anchored position and check it, rather than re-implementing the fmap
    format.
    """
    reader = _Reader(payload)
    fmt = reader.raw().decode()
    fmap_start = reader.pos
    # Walk candidate positions: the code length prefix is the u64 such that prefix + 8 + len == end.
    for pos in range(fmap_start, len(payload) - 7):
        (size,) = struct.unpack_from("<Q", payload, pos)
        if pos + 8 + size == len(payload):
            return fmt, payload[fmap_start:pos], payload[pos + 8:]
    raise ValueError("cannot locate the code field of a CUDA module")


def join_cuda_module(fmt: str, fmap: bytes, code: bytes) -> bytes:
    return _pack_str(fmt.encode()) + fmap + _pack_str(code)


def patch_library_blob(blob: bytes, fatbins: dict[str, bytes]) -> tuple[bytes, int]:
    """Replace every CUDA-source module in ``blob`` by its fatbin or cubin (looked up by source hash).

    Returns the new blob and how many CUDA modules it holds. A CUDA module whose source has no
    fatbin is an error: exporting it would silently ship JIT-only code.
    """
    check_library_blob_format()
    try:
        indptr, children, modules = parse_library_blob(blob)
        same = serialize_library_blob(indptr, children, modules) == blob
    except (ValueError, struct.error) as err:
        raise BuildError(f"TVM's library blob does not have the layout this TVM release had: {err}") from err
    if not same:
        raise BuildError("TVM's library blob does not re-serialise to the same bytes: its layout changed")
    cuda_modules = 0
    for module in modules:
        if module.kind != "cuda":
            continue
        cuda_modules += 1
        if module.payload is None:
            raise BuildError("a CUDA module in TVM's library blob has no bytes: its layout changed")
        try:
            fmt, fmap, code = split_cuda_module(module.payload)
        except (ValueError, struct.error, UnicodeDecodeError) as err:
            raise BuildError(f"a CUDA module in TVM's library blob has an unknown layout: {err}") from err
        if fmt == "cuda":
            key = source_key(code.decode())
            if key not in fatbins:
                raise BuildError("a CUDA module in this artifact has no compiled fatbin; rebuild it")
            compiled = fatbins[key]
            module.payload = join_cuda_module("cubin" if compiled[:4] == ELF_MAGIC else "fatbin", fmap, compiled)
        elif not (code[:4] == ELF_MAGIC or u32_at(code, 0) == FATBIN_MAGIC):
            raise BuildError(f"a CUDA module in this artifact holds {fmt!r} code, not a cubin/fatbin")
    return serialize_library_blob(indptr, children, modules), cuda_modules


# ---- packing compiled device code into an exported library --------------------------------


def fatbin_packer(fatbins: dict[str, bytes]) -> Callable[..., str]:
    """An ``fpack_imports`` embedding ``fatbins`` (CUDA source sha256 -> fatbin/cubin) for the
    CUDA source modules (also used for tuning candidates measured on a board)."""

    def pack(mod: tvm.runtime.Module, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        blob = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes())
        patched, count = patch_library_blob(blob, fatbins)
        if count == 0:
            raise BuildError("this CUDA artifact holds no CUDA module to export")
        llvm_target = _host_target_string(mod)
        codegen_blob = tvm.get_global_func("codegen.codegen_blob")
        obj = codegen_blob(patched, is_system_lib, llvm_target, symbol_prefix)
        out = os.path.join(workspace_dir, f"{symbol_prefix}devc.o")
        obj.write_to_file(out)
        return out

    return pack


def _host_target_string(root: tvm.runtime.Module) -> str:
    stack = [root]
    while stack:
        module = stack.pop()
        if module.kind == "llvm":
            return str(module.get_function("_get_target_string")())
        stack.extend(module.imports)
    raise BuildError("this artifact has no host (llvm) module to export")
