"""Export an :class:`~gmorph_tvm.artifact.builder.Artifact`: library + manifest, atomically.

The library and the manifest are first written into a temporary directory next to the
destination, then renamed into place, so an export that fails (unwritable directory, linker
error, missing cross compiler) leaves neither a partial library nor a manifest describing a
library that is not there.

CUDA artifacts go through our own import packer (``fpack_imports``): TVM's packer would embed
the CUDA module as generated source; ours splices in the fatbin compiled at build time and then
lets TVM turn the blob into an object for the host triple (``codegen.codegen_blob``), which also
works for an aarch64 host from an x86 machine.

External weights go to ``<stem>.weights.safetensors`` (:mod:`gmorph_tvm.core.weights_file`), staged
and renamed with the rest; the manifest's ``weights`` record gets the file name, its sha256 and
size, and the name, dtype and shape of every tensor in it.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import tvm

from ..errors import BuildError, GmorphError, one_line
from . import cuda as cuda_code
from ..core.tvm_log import quiet_tvm_warnings
from ..core.manifest import manifest_path_for, write_json_atomic
from ..core.weights_file import weights_path_for, write_weights

if TYPE_CHECKING:
    from .builder import Artifact

SUPPORTED_SUFFIXES = (".so", ".tar")
_CROSS_CXX = {"aarch64": "aarch64-linux-gnu-g++", "arm64": "aarch64-linux-gnu-g++"}


def export_artifact(artifact: "Artifact", path: Path, *, fcompile: Callable | None = None) -> Path:
    path = Path(path)
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise BuildError(f"cannot export to {path}: the library name must end in .so or .tar")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise BuildError(f"cannot export to {path}: directory {directory} does not exist")
    if fcompile is None and path.suffix == ".so":
        fcompile = _default_linker(artifact)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.stem}.export-", dir=directory))
    except OSError as err:
        raise BuildError(f"cannot export to {path}: directory {directory} is not writable ({err.strerror})") from None
    try:
        staged_lib = staging / path.name
        work = staging / "work"
        work.mkdir()
        fpack = _cuda_packer(artifact) if artifact.device == "cuda" else None
        try:
            with quiet_tvm_warnings():
                artifact.executable.export_library(
                    str(staged_lib), fcompile=fcompile, fpack_imports=fpack, workspace_dir=str(work)
                )
        except GmorphError:
            raise
        except Exception as err:  # noqa: BLE001 - compilers/TVM raise many types
            raise BuildError(f"exporting {path.name} failed: {one_line(err)}") from None
        if not staged_lib.is_file():
            raise BuildError(f"exporting {path.name} failed: the linker wrote no file")
        if artifact.device == "cuda":
            _check_device_code(staged_lib, artifact._manifest["cuda"]["arch"])

        manifest = artifact.manifest
        manifest["library"] = path.name
        manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        renames = [(staged_lib, path)]
        if manifest["weights"].get("storage") == "external":
            weights_path = weights_path_for(path)
            staged_weights = staging / weights_path.name
            try:
                record = write_weights(staged_weights, [(n, v.numpy()) for n, v in artifact.weights])
            except OSError as err:
                raise BuildError(f"cannot write {weights_path}: {err.strerror}") from None
            manifest["weights"].update(record)
            renames.append((staged_weights, weights_path))
        manifest_path = manifest_path_for(path)
        staged_manifest = staging / manifest_path.name
        write_json_atomic(staged_manifest, manifest)
        renames.append((staged_manifest, manifest_path))
        try:
            for staged, final in renames:  # the manifest last: it is what says the artifact is there
                os.replace(staged, final)
        except OSError as err:
            raise BuildError(f"cannot write {path}: {err.strerror}") from None
        return path
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _default_linker(artifact: "Artifact") -> Callable | None:
    """None (TVM's default: the host C++ compiler) for a native host, else a cross compiler."""
    arch = artifact._manifest["host_triple"].split("-")[0]
    machine = platform.machine()
    if arch in (machine, "x86_64" if machine == "AMD64" else machine) or (arch == "arm64" and machine == "aarch64"):
        return None
    cxx = os.environ.get("GMORPH_TVM_CROSS_CXX") or _CROSS_CXX.get(arch) or f"{artifact._manifest['host_triple']}-g++"
    if shutil.which(cxx) is None:
        raise BuildError(
            f"exporting a .so for a {arch} host needs the cross compiler {cxx} (Debian/Ubuntu: "
            f"apt install g++-{arch.replace('_', '-')}-linux-gnu), or set GMORPH_TVM_CROSS_CXX; "
            "alternatively export to .tar, which the device links when it loads it"
        )
    from tvm.support import cc

    return cc.cross_compiler(cxx)


def _cuda_packer(artifact: "Artifact") -> Callable[..., str]:
    """An ``fpack_imports`` for export_library that embeds fatbins instead of CUDA source."""
    fatbins = artifact._fatbins

    def pack(mod: tvm.runtime.Module, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        blob = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes())
        patched, count = cuda_code.patch_library_blob(blob, fatbins)
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


def _check_device_code(library: Path, arch: str) -> None:
    """The exported file must hold SASS for ``arch`` -- never only CUDA source or PTX."""
    sm = cuda_code.sm_number(arch)
    images = cuda_code.device_images_in_file(library)
    if not any(img.kind == "elf" and img.sm == sm for img in images):
        found = ", ".join(sorted({f"{img.kind}:sm_{img.sm}" for img in images})) or "none"
        raise BuildError(f"{library.name} holds no compiled CUDA code for {arch} (found: {found})")


def describe_device_code(library: str | Path) -> dict[str, Any]:
    """Summary of the CUDA device code inside an exported library (for reports and tests)."""
    images = cuda_code.device_images_in_file(library)
    return {
        "sass": sorted({f"sm_{img.sm}" for img in images if img.kind == "elf"}),
        "ptx": sorted({f"compute_{img.sm}" for img in images if img.kind == "ptx"}),
    }
