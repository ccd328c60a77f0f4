"""Load an exported artifact and run it: :func:`load` -> :class:`Runner`.

Only the TVM runtime is needed (no model code): the manifest says which inputs to pass and how
the flat output tuple of ``main`` splits into tasks.

A :class:`Runner` may be shared by any number of threads: each thread gets its own VM (created
lazily) over the one loaded module, so weights are held once. ``load`` checks the library's
sha256 against the manifest and the signature embedded in the library against the manifest's
inputs and tasks. TVM keeps one open library per file path for the life of the process, so a
library rebuilt at the same path would keep running the old code; ``load`` therefore opens a
private copy named by the library's sha256 (in a per-process temp dir, removed at exit), which
also lets a ``.tar`` from a read-only directory be linked (TVM writes ``<name>.so`` beside it).

External weights (manifest ``weights.storage == "external"``) are mapped, not read: on the CPU
every kernel reads the weights straight from the mapped ``<stem>.weights.safetensors`` (numpy
view -> DLPack -> TVM tensor, no copy; the file is 64-byte aligned, as TVM's kernels assume); on
CUDA each tensor is copied to device memory in chunks of at most :data:`DEVICE_COPY_CHUNK` bytes
and its host pages are dropped right after. Each entry point gets its weights after its inputs.
"""

from __future__ import annotations

import atexit
import copy
import fcntl
import hashlib
import os
import platform
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from ..artifact.export import artifact_lock, recover_exports
from ..core import device_code
from ..core.inputs import random_inputs  # noqa: F401 (re-exported: gmorph_tvm.runtime.random_inputs)
from ..core.manifest import (
    SIGNATURE_FUNCTION,
    check_signature,
    input_specs,
    is_external,
    library_path_for,
    manifest_path_for,
    read_manifest,
)
from ..core.specs import check_inputs
from ..core.targets import runs_here
from ..core.timing import time_main
from ..core.tvm_log import quiet_tvm_warnings
from ..core.vm import (  # noqa: F401 (re-exported)
    InputsLike,
    VMPool,
    device_for,
    entries_of,
    entry_weight_args,
    execute,
    run_entries,
    select_bucket,
    split_outputs,
)
from ..core.weights_file import ALIGNMENT, WeightsFile, read_weights
from ..errors import ArtifactError, InputSpecError, one_line
from .cuda_driver import check_cuda_driver, cuda_driver_version

DEVICE_COPY_CHUNK = 64 << 20  # bytes per host -> device copy of external weights

_MACHINE_ELF = {"x86_64": device_code.EM_X86_64, "AMD64": device_code.EM_X86_64,
                "aarch64": device_code.EM_AARCH64, "arm64": device_code.EM_AARCH64}
_ELF_NAME = {device_code.EM_X86_64: "x86_64", device_code.EM_AARCH64: "aarch64", 40: "arm", 243: "riscv"}


class Runner:
    """A loaded artifact: ``runner(inputs) -> {task: output}``."""

    def __init__(self, library: Path, manifest: dict[str, Any], pool: VMPool,
                 weights: Mapping[str, tvm.runtime.Tensor] | None = None):
        self.library = library
        self._manifest = manifest
        self._pool = pool
        self.device = pool.device
        # Mapped (CPU) or copied (CUDA) once; every thread's VM is passed the same tensors.
        self._weights = dict(weights or {})
        self._weight_args = entry_weight_args(manifest, self._weights, str(library))

    @property
    def vm(self) -> relax.VirtualMachine:
        """The calling thread's VM (one per thread, over the one loaded module)."""
        return self._pool.get()

    @property
    def module(self) -> tvm.runtime.Module:
        """The loaded library, shared by every thread's VM."""
        return self._pool.module

    @property
    def manifest(self) -> dict[str, Any]:
        return copy.deepcopy(self._manifest)

    @property
    def input_names(self) -> list[str]:
        return [s["name"] for s in self._manifest["inputs"]]

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self._manifest["tasks"]]

    def weight_args(self, function: str = "main") -> list[tvm.runtime.Tensor]:
        """The weights to pass to ``function`` after its inputs, in order (empty for embedded
        weights): ``runner.vm[function](*inputs, *runner.weight_args(function))``."""
        if function not in self._weight_args:
            raise ArtifactError(f"{self.library}: no entry point {function!r}; it has "
                                f"{', '.join(map(repr, self._weight_args))}")
        return list(self._weight_args[function])

    def __call__(self, inputs: InputsLike) -> dict[str, np.ndarray | list[np.ndarray]]:
        """Run ``main``; one array per task (a list of arrays for a task with several outputs).

        ``inputs``: a dict name -> array, a list in manifest order, or a single array.
        """
        if inputs is None:
            raise InputSpecError(f"{self.library}: no inputs given; pass a dict of {', '.join(self.input_names)} "
                                 "(or a list in that order)")
        return run_entries(self._pool.get(), self._manifest, inputs, self._weight_args, what=str(self.library),
                           device=self.device)

    def benchmark(self, inputs: InputsLike | None = None, number: int = 10, repeat: int = 5,
                  min_repeat_ms: int = 0) -> dict[str, float | int]:
        """Latency of one call of ``main`` with ``vm.time_evaluator`` (inputs already on the device).

        Returns ``median_ms``, ``mean_ms``, ``std_ms``, ``min_ms`` over ``repeat`` measurements, each
        the mean of ``number`` calls. Random inputs from the manifest when ``inputs`` is None.
        A bucketed artifact times the bucket the inputs select; a grouped one, every group (summed).
        """
        if inputs is None:
            inputs = random_inputs(self._manifest)
        if self._manifest.get("batch_buckets"):
            entry, arrays, _ = select_bucket(self._manifest, inputs, str(self.library))
            calls = [(entry, arrays)]
        else:
            arrays = check_inputs(input_specs(self._manifest), inputs)
            by_name = {s["name"]: a for s, a in zip(self._manifest["inputs"], arrays)}
            calls = [(e, [by_name[s["name"]] for s in e["inputs"]]) for e in entries_of(self._manifest)]
        vm = self._pool.get()
        total: dict[str, float | int] = {}
        for entry, arrays in calls:
            args = [tvm.runtime.tensor(a, self.device) for a in arrays] + self._weight_args[entry["function"]]
            timing = time_main(vm, self.device, args, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                               func=entry["function"])
            total = timing if not total else {k: (total[k] + v if k.endswith("_ms") else v) for k, v in timing.items()}
        return total


def load(path: str | Path, device: str = "cpu", *, verify_weights: bool = True) -> Runner:
    """Load ``path`` (the ``.so``/``.tar`` library, or its ``.manifest.json``) on ``device``.

    ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Raises ArtifactError (naming the file)
    when the manifest is missing or corrupt, the library is missing, it was built for another
    device kind or CPU architecture, its sha256 or embedded signature is not the manifest's, or
    TVM cannot load it; and when the external weights file is missing, truncated, corrupt
    (sha256, checked unless ``verify_weights=False``) or not the one the manifest describes.
    """
    path = Path(path)
    library = library_path_for(path)
    manifest_file = manifest_path_for(library)
    recover_exports(library)  # an exporter killed mid-commit: its renames finished, its debris removed
    # Under the artifact's shared lock an export's commit (exclusive) is either all done or not begun.
    with artifact_lock(library, shared=True):
        manifest = read_manifest(manifest_file)
        if manifest["library"] != library.name:
            raise ArtifactError(f"manifest {manifest_file} describes {manifest['library']!r}, not {library.name!r}")
        if not library.is_file():
            raise ArtifactError(f"library {library} not found (its manifest is {manifest_file})")
        if manifest["device"] == "cuda" and str(device).startswith(("cuda", "gpu")):
            check_cuda_driver(manifest, cuda_driver_version(), str(library))  # before the GPU check
        dev = device_for(manifest, device, str(library))
        _check_host_arch(library, manifest)
        private, digest = _private_copy(library)
        if digest != manifest["library_sha256"]:
            raise ArtifactError(
                f"library {library} (sha256 {digest[:12]}...) is not the one manifest {manifest_file} describes "
                f"(sha256 {manifest['library_sha256'][:12]}...); rebuild, or keep each library with its own manifest"
            )
        weights = None
        if is_external(manifest):
            weights = load_weights(library, manifest, dev, verify=verify_weights)
    module = _load_module(private, digest, library)
    pool = VMPool(module, dev, str(library))
    _check_embedded_signature(pool, manifest, library, manifest_file)
    return Runner(library, manifest, pool, weights)


_MODULES: dict[str, tvm.runtime.Module] = {}  # library sha256 -> the module loaded from it


def _load_module(private: Path, digest: str, library: Path) -> tvm.runtime.Module:
    """The module of the private copy ``private`` (content ``digest``), loaded once per process:
    TVM never unloads a library, and each ``load_module`` of one kept ~6 KiB that no drop gave
    back (2,000 load/drop cycles: +18.5 MiB). Modules are immutable code; every Runner makes its
    own VMs over it."""
    with _COPY_LOCK:
        module = _MODULES.get(digest)
        if module is None:
            try:
                with quiet_tvm_warnings():
                    module = tvm.runtime.load_module(str(private))
            except Exception as err:  # noqa: BLE001 - TVM raises its own error types
                raise ArtifactError(f"cannot load {library}: {one_line(err)}") from err
            _MODULES[digest] = module
    return module


def _check_embedded_signature(pool: VMPool, manifest: Mapping[str, Any], library: Path, manifest_file: Path) -> None:
    try:
        vm = pool.get()
    except ArtifactError as err:
        raise ArtifactError(f"cannot load {library}: {err}") from err
    try:
        signature = vm[SIGNATURE_FUNCTION]
    except Exception as err:  # noqa: BLE001 - TVM raises AttributeError/its own types
        raise ArtifactError(
            f"library {library} has no embedded signature (not built by this gmorph-tvm); its manifest is {manifest_file}"
        ) from err
    try:
        embedded = bytes(signature().numpy().tobytes())
    except Exception as err:  # noqa: BLE001
        raise ArtifactError(f"library {library}: cannot read its embedded signature: {one_line(err)}") from err
    check_signature(manifest, embedded, library, manifest_file)


_COPY_LOCK = threading.Lock()
_COPY_DIR: list[Path] = []


_COPY_PREFIX = "gmorph-tvm-libs-"
_OWNER = ".owner"  # locked (flock) by the process whose copies the folder holds, for its life
_OWNER_FD: list[int] = []


def _owned_temp_dir() -> Path:
    """A new private-copy folder whose OWNER file this process keeps locked until it exits (even
    by SIGKILL: the kernel drops the lock), so the next load anywhere can tell it is stale. The
    file is locked before it gets its name, so no cleaner ever sees it unlocked."""
    directory = Path(tempfile.mkdtemp(prefix=_COPY_PREFIX))
    fd = os.open(directory / f"{_OWNER}.tmp", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.replace(directory / f"{_OWNER}.tmp", directory / _OWNER)
    _OWNER_FD.append(fd)
    return directory


def _remove_stale_copies() -> None:
    """Remove this user's private-copy folders whose owner process is gone (a load killed by
    SIGKILL never runs its atexit clean-up)."""
    for directory in Path(tempfile.gettempdir()).glob(f"{_COPY_PREFIX}*"):
        try:
            if directory.lstat().st_uid != os.getuid() or not directory.is_dir():
                continue
            fd = os.open(directory / _OWNER, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # no owner file: another version's folder, or one being made
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner runs
        finally:
            os.close(fd)
        shutil.rmtree(directory, ignore_errors=True)


def _private_copy(library: Path) -> tuple[Path, str]:
    """A copy of ``library`` named by its sha256 in this process's temp dir, and that sha256.

    The name is new for new content, so TVM (which reuses a library already opened from the same
    path) always runs the code that is in the file now; equal content reuses the same copy.
    """
    digest = hashlib.sha256()
    with _COPY_LOCK:
        if not _COPY_DIR:
            _remove_stale_copies()
            _COPY_DIR.append(_owned_temp_dir())
            atexit.register(shutil.rmtree, str(_COPY_DIR[0]), True)
        directory = _COPY_DIR[0]
        fd, tmp_name = tempfile.mkstemp(dir=directory, suffix=library.suffix)
        try:
            try:
                with os.fdopen(fd, "wb") as dst, open(library, "rb") as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        digest.update(chunk)
                        dst.write(chunk)
            except OSError as err:
                raise ArtifactError(f"cannot read library {library}: {err.strerror}") from err
            final = directory / f"{digest.hexdigest()}{library.suffix}"
            if not final.exists():  # never overwrite a copy that may be mapped already
                os.replace(tmp_name, final)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    return final, digest.hexdigest()



def load_weights(library: Path, manifest: Mapping[str, Any], dev: tvm.runtime.Device, *,
                 verify: bool = True) -> dict[str, tvm.runtime.Tensor]:
    """The external weights of ``library``'s artifact as TVM tensors on ``dev``, by name."""
    record = manifest["weights"]
    if not isinstance(record.get("file"), str):
        raise ArtifactError(f"manifest {manifest_path_for(library)}: external weights without a 'file'")
    path = library.with_name(record["file"])
    on_cpu = dev.dlpack_device_type() == tvm.cpu().dlpack_device_type()
    wf = read_weights(path, record, verify=verify)
    tensors: dict[str, tvm.runtime.Tensor] = {}
    for entry in wf.entries:
        try:
            if on_cpu:
                tensors[entry.name] = tvm_ffi.from_dlpack(wf.array(entry), require_alignment=ALIGNMENT)
            else:
                tensors[entry.name] = _copy_to_device(wf, entry, dev)
        except Exception as err:  # noqa: BLE001 - TVM / DLPack errors
            raise ArtifactError(f"cannot load weight {entry.name!r} of {path}: {one_line(err)}") from err
    return tensors


def _copy_to_device(wf: WeightsFile, entry, dev: tvm.runtime.Device) -> tvm.runtime.Tensor:
    """One weight copied to ``dev`` in bounded chunks; its mapped host pages dropped after."""
    tensor = tvm.runtime.empty(entry.shape, entry.dtype, dev)
    source = wf.array(entry).reshape(-1).view(np.uint8)
    if entry.nbytes <= DEVICE_COPY_CHUNK:
        tensor.copyfrom(wf.array(entry))
    else:
        flat = tensor._create_view((entry.nbytes,), "uint8")
        for start in range(0, entry.nbytes, DEVICE_COPY_CHUNK):
            stop = min(start + DEVICE_COPY_CHUNK, entry.nbytes)
            flat._create_view((stop - start,), "uint8", start).copyfrom(source[start:stop])
    wf.release(entry)
    return tensor



def _check_host_arch(library: Path, manifest: Mapping[str, Any]) -> None:
    machine = platform.machine()
    expected = _MACHINE_ELF.get(machine)
    found = device_code.elf_machine(library)
    built_for = str(manifest.get("host_triple", "")).split("-")[0]
    if found in _ELF_NAME and expected is not None and found != expected:  # unknown: let the loader say
        name = _ELF_NAME[found]
        raise ArtifactError(
            f"{library} was built for {name} but this machine is {machine}; run it on the device it was "
            "built for (e.g. gmorph-tvm bench --rpc HOST:PORT)"
        )
    if found is None and built_for in _MACHINE_ELF and machine in _MACHINE_ELF and not runs_here(built_for):
        raise ArtifactError(
            f"{library} was built for a {built_for} host but this machine is {machine}; run it on that device"
        )
