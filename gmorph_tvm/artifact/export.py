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

Across processes: the artifact's folder is the lock (``fcntl.flock`` on the directory itself, so
no lock file is left beside the artifact; a commit takes milliseconds, so artifacts sharing a
folder lose nothing by sharing it). The commit (renames into place) runs under the exclusive lock, the loader reads
manifest, library and weights under the shared one, so two exporters to one path never leave the
library of one build with the manifest of the other, and a load never sees half a commit. The
commit is journalled: before the first rename the staging folder gets a ``COMMIT`` file listing
the renames, and each staging folder holds an ``OWNER`` file its exporter keeps locked. A process
killed (SIGKILL) mid-commit leaves a staging folder with ``COMMIT`` and no live owner;
:func:`recover_exports` (run by the next export and by ``load``, under the exclusive lock) finishes
its renames (the new artifact) and removes it; a dead exporter's folder without ``COMMIT`` is
removed (the old artifact stays).
"""

from __future__ import annotations

import fcntl
import json
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


@contextmanager
def artifact_lock(library: Path, *, shared: bool) -> Iterator[bool]:
    """Hold the lock of ``library``'s artifact: ``flock`` on its folder (shared: readers;
    exclusive: a commit or a recovery). Yields whether it is held (False where the folder cannot
    be opened or locked, e.g. a file system without flock)."""
    try:
        fd = os.open(library.parent if str(library.parent) else ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            held = True
        except OSError:
            held = False
        yield held
    finally:
        os.close(fd)


def _owner_alive(staging: Path) -> bool:
    """Whether the exporter that made ``staging`` still runs (it holds OWNER locked)."""
    try:
        fd = os.open(staging / "OWNER", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _recover_locked(library: Path) -> None:
    """Finish or remove the staging folders of dead exporters of ``library`` (exclusive lock held)."""
    for staging in sorted(library.parent.glob(f".{library.stem}.export-*")):
        if not staging.is_dir() or _owner_alive(staging):
            continue
        commit = staging / "COMMIT"
        if commit.is_file():
            try:
                renames = json.loads(commit.read_text())
                for staged, final in renames:
                    if (staging / staged).is_file():
                        os.replace(staging / staged, library.parent / final)
            except (OSError, ValueError, TypeError):
                continue  # leave it for a process that can finish it
        shutil.rmtree(staging, ignore_errors=True)


def recover_exports(library: str | os.PathLike) -> None:
    """Complete what exporters of ``library`` killed mid-commit left (their new artifact), and
    remove dead exporters' staging folders. Cheap when there is nothing to do (one glob)."""
    library = Path(library)
    if not any(library.parent.glob(f".{library.stem}.export-*")):
        return
    try:
        with artifact_lock(library, shared=False) as held:
            if held:
                _recover_locked(library)
    except OSError:
        pass  # a read-only folder: nothing this process could repair


def _make_staging(path: Path, directory: Path) -> tuple[Path, int]:
    """A new staging folder with its OWNER file locked by this process (made under the artifact
    lock, so a recovering process never sees it without its owner)."""
    with artifact_lock(path, shared=False):
        staging = Path(tempfile.mkdtemp(prefix=f".{path.stem}.export-", dir=directory))
        fd = os.open(staging / "OWNER", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
    return staging, fd


def _export_staged(artifact: Artifact, path: Path, directory: Path, fcompile: Callable | None) -> Path:
    try:
        staging, owner = _make_staging(path, directory)
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
        with artifact_lock(path, shared=False):
            _recover_locked(path)  # an earlier exporter killed mid-commit: its build first, then ours
            _install(renames, staged_manifest, manifest_path, staging)
        return path
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(owner)


def _install(renames: list[tuple[Path, Path]], staged_manifest: Path, manifest_path: Path, staging: Path) -> None:
    """Rename the library (and the weights file) into place, then the manifest last: it is what
    says the artifact is there. When any rename fails, the files already replaced are put back
    (or removed where there was none before), so the directory keeps a consistent old artifact.
    Before the first rename, ``COMMIT`` in the staging folder lists them all, so that a process
    killed in between is completed by :func:`recover_exports`; it is removed when they are done
    or undone."""
    done: list[tuple[Path, Path | None]] = []  # (final, backup of what it replaced)
    commit = staging / "COMMIT"
    journal = [(staged.name, final.name) for staged, final in [*renames, (staged_manifest, manifest_path)]]
    try:
        with open(staging / "COMMIT.tmp", "w") as handle:
            handle.write(json.dumps(journal))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging / "COMMIT.tmp", commit)
    except OSError as err:
        raise BuildError(f"cannot write {manifest_path}: {err.strerror} (nothing was replaced)") from err

    def undo() -> str:
        commit.unlink(missing_ok=True)
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
    commit.unlink()


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
