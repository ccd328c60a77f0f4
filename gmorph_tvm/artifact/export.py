"""Export an :class:`~gmorph_tvm.artifact.builder.Artifact`: library + manifest, atomically.

The library and the manifest are first written into a temporary directory next to the
destination, then renamed into place, so an export that fails (unwritable directory, linker
error, missing cross compiler) leaves neither a partial library nor a manifest describing a
library that is not there. The two renames are one step: when the manifest cannot be put in
place the library that was already renamed is rolled back (the previous one restored, or the new
one removed). SIGTERM during an export raises SystemExit(143) so the temporary directory is
removed on the way out. The manifest records the library's sha256, which the loader checks.

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
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from ..core import cuda as cuda_code
from ..core.manifest import manifest_path_for, sha256_of_file, write_json_atomic
from ..core.targets import runs_here
from ..core.tvm_log import quiet_tvm_warnings
from ..core.weights_file import weights_path_for, write_weights
from ..errors import BuildError, GmorphError, one_line

if TYPE_CHECKING:
    from .builder import Artifact

SUPPORTED_SUFFIXES = (".so", ".tar")
_CROSS_CXX = {"aarch64": "aarch64-linux-gnu-g++", "arm64": "aarch64-linux-gnu-g++"}


def export_artifact(artifact: Artifact, path: Path, *, fcompile: Callable | None = None) -> Path:
    path = Path(path)
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise BuildError(f"cannot export to {path}: the library name must end in .so or .tar")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise BuildError(f"cannot export to {path}: directory {directory} does not exist")
    if fcompile is None and path.suffix == ".so":
        fcompile = _default_linker(artifact)
    with _terminate_as_exit():
        return _export_staged(artifact, path, directory, fcompile)


def _export_staged(artifact: Artifact, path: Path, directory: Path, fcompile: Callable | None) -> Path:
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.stem}.export-", dir=directory))
    except OSError as err:
        raise BuildError(f"cannot export to {path}: directory {directory} is not writable ({err.strerror})") from err
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
            raise BuildError(f"exporting {path.name} failed: {one_line(err)}") from err
        if not staged_lib.is_file():
            raise BuildError(f"exporting {path.name} failed: the linker wrote no file")
        if artifact.device == "cuda":
            _check_device_code(staged_lib, artifact._manifest["cuda"]["arch"])

        manifest = artifact.manifest
        manifest["library"] = path.name
        manifest["library_sha256"] = sha256_of_file(staged_lib)
        manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        renames = [(staged_lib, path)]
        if manifest["weights"].get("storage") == "external":
            weights_path = weights_path_for(path)
            staged_weights = staging / weights_path.name
            try:
                record = write_weights(staged_weights, [(n, v.numpy()) for n, v in artifact.weights])
            except OSError as err:
                raise BuildError(f"cannot write {weights_path}: {err.strerror}") from err
            manifest["weights"].update(record)
            renames.append((staged_weights, weights_path))
        manifest_path = manifest_path_for(path)
        staged_manifest = staging / manifest_path.name
        try:
            write_json_atomic(staged_manifest, manifest)
        except OSError as err:
            raise BuildError(f"cannot write manifest {manifest_path}: {err.strerror}") from err
        _install(renames, staged_manifest, manifest_path, staging)
        return path
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(renames: list[tuple[Path, Path]], staged_manifest: Path, manifest_path: Path, staging: Path) -> None:
    """Rename the library (and the weights file) into place, then the manifest last: it is what
    says the artifact is there. When any rename fails, the files already replaced are put back
    (or removed where there was none before), so the directory keeps a consistent old artifact."""
    done: list[tuple[Path, Path | None]] = []  # (final, backup of what it replaced)

    def undo() -> str:
        for final, backup in reversed(done):
            try:
                if backup is not None:
                    os.replace(backup, final)
                else:
                    final.unlink()
            except OSError:
                pass
        if not done:
            return "nothing was replaced"
        state = "the previous library was put back" if done[0][1] is not None else "the new library was removed"
        return state + ("; so was the weights file" if len(done) > 1 else "")

    for index, (staged, final) in enumerate(renames):
        backup = None
        if final.is_file():
            backup = staging / f"previous-{index}{final.suffix}"
            try:
                os.link(final, backup)
            except OSError:
                shutil.copy2(final, backup)
        try:
            os.replace(staged, final)
        except OSError as err:
            state = undo()
            raise BuildError(f"cannot write {final}: {err.strerror} ({state})") from err
        done.append((final, backup))
    try:
        os.replace(staged_manifest, manifest_path)
    except OSError as err:
        state = undo()
        raise BuildError(f"cannot write manifest {manifest_path}: {err.strerror} ({state})") from err


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """While exporting, SIGTERM raises SystemExit(143) so ``finally`` blocks clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError):  # not settable here (e.g. an embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _default_linker(artifact: Artifact) -> Callable | None:
    """None (TVM's default: the host C++ compiler) for a native host, else a cross compiler."""
    arch = artifact._manifest["host_triple"].split("-")[0]
    if runs_here(arch):
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


def _cuda_packer(artifact: Artifact) -> Callable[..., str]:
    """An ``fpack_imports`` for export_library that embeds fatbins instead of CUDA source."""
    return cuda_code.fatbin_packer(artifact._fatbins)


def _check_device_code(library: Path, arch: str) -> None:
    """The exported file must hold SASS for ``arch`` -- never only CUDA source or PTX."""
    sm = cuda_code.sm_number(arch)
    images = cuda_code.device_images_in_file(library)
    if not any(img.kind == "elf" and img.sm == sm for img in images):
        found = ", ".join(sorted({f"{img.kind}:sm_{img.sm}" for img in images})) or "none"
        raise BuildError(f"{library.name} holds no compiled CUDA code for {arch} (found: {found})")
