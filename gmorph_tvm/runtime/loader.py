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
"""

from __future__ import annotations

import atexit
import hashlib
import copy
import os
import platform
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tvm
from tvm import relax

from ..artifact import cuda as cuda_code
from ..core.tvm_log import quiet_tvm_warnings
from ..core.manifest import (SIGNATURE_FUNCTION, check_signature, input_specs, library_path_for, manifest_path_for,
                             read_manifest)
from ..errors import ArtifactError, InputSpecError, one_line
from ..core.specs import check_inputs
from ..core.vm import InputsLike, VMPool, device_for, execute, split_outputs  # noqa: F401 (re-exported)

_MACHINE_ELF = {"x86_64": cuda_code.EM_X86_64, "AMD64": cuda_code.EM_X86_64,
                "aarch64": cuda_code.EM_AARCH64, "arm64": cuda_code.EM_AARCH64}
_ELF_NAME = {cuda_code.EM_X86_64: "x86_64", cuda_code.EM_AARCH64: "aarch64", 40: "arm", 243: "riscv"}


class Runner:
    """A loaded artifact: ``runner(inputs) -> {task: output}``."""

    def __init__(self, library: Path, manifest: dict[str, Any], pool: VMPool):
        self.library = library
        self._manifest = manifest
        self._pool = pool
        self.device = pool.device

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

    def __call__(self, inputs: InputsLike) -> dict[str, np.ndarray | list[np.ndarray]]:
        """Run ``main``; one array per task (a list of arrays for a task with several outputs).

        ``inputs``: a dict name -> array, a list in manifest order, or a single array.
        """
        return execute(self._pool.get(), self._manifest, inputs, what=str(self.library), device=self.device)

    def benchmark(self, inputs: InputsLike | None = None, number: int = 10, repeat: int = 5,
                  min_repeat_ms: int = 0) -> dict[str, float | int]:
        """Latency of one call of ``main`` with ``vm.time_evaluator`` (inputs already on the device).

        Returns ``median_ms``, ``mean_ms``, ``std_ms``, ``min_ms`` over ``repeat`` measurements, each
        the mean of ``number`` calls. Random inputs from the manifest when ``inputs`` is None.
        """
        arrays = check_inputs(input_specs(self._manifest), inputs) if inputs is not None else random_inputs(self._manifest)
        args = [tvm.runtime.tensor(a, self.device) for a in arrays]
        return time_main(self._pool.get(), self.device, args, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)


def load(path: str | Path, device: str = "cpu") -> Runner:
    """Load ``path`` (the ``.so``/``.tar`` library, or its ``.manifest.json``) on ``device``.

    ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Raises ArtifactError (naming the file)
    when the manifest is missing or corrupt, the library is missing, it was built for another
    device kind or CPU architecture, its sha256 or embedded signature is not the manifest's, or
    TVM cannot load it.
    """
    path = Path(path)
    library = library_path_for(path)
    manifest_file = manifest_path_for(library)
    manifest = read_manifest(manifest_file)
    if manifest["library"] != library.name:
        raise ArtifactError(f"manifest {manifest_file} describes {manifest['library']!r}, not {library.name!r}")
    if not library.is_file():
        raise ArtifactError(f"library {library} not found (its manifest is {manifest_file})")
    dev = device_for(manifest, device, str(library))
    _check_host_arch(library, manifest)
    private, digest = _private_copy(library)
    if digest != manifest["library_sha256"]:
        raise ArtifactError(
            f"library {library} (sha256 {digest[:12]}...) is not the one manifest {manifest_file} describes "
            f"(sha256 {manifest['library_sha256'][:12]}...); rebuild, or keep each library with its own manifest"
        )
    try:
        with quiet_tvm_warnings():
            module = tvm.runtime.load_module(str(private))
    except Exception as err:  # noqa: BLE001 - TVM raises its own error types
        raise ArtifactError(f"cannot load {library}: {one_line(err)}") from err
    pool = VMPool(module, dev, str(library))
    _check_embedded_signature(pool, manifest, library, manifest_file)
    return Runner(library, manifest, pool)


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


def _private_copy(library: Path) -> tuple[Path, str]:
    """A copy of ``library`` named by its sha256 in this process's temp dir, and that sha256.

    The name is new for new content, so TVM (which reuses a library already opened from the same
    path) always runs the code that is in the file now; equal content reuses the same copy.
    """
    digest = hashlib.sha256()
    with _COPY_LOCK:
        if not _COPY_DIR:
            _COPY_DIR.append(Path(tempfile.mkdtemp(prefix="gmorph-tvm-libs-")))
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


def _check_host_arch(library: Path, manifest: Mapping[str, Any]) -> None:
    machine = platform.machine()
    expected = _MACHINE_ELF.get(machine)
    found = cuda_code.elf_machine(library)
    built_for = str(manifest.get("host_triple", "")).split("-")[0]
    if found in _ELF_NAME and expected is not None and found != expected:  # unknown: let the loader say
        name = _ELF_NAME[found]
        raise ArtifactError(
            f"{library} was built for {name} but this machine is {machine}; run it on the device it was "
            "built for (e.g. gmorph-tvm bench --rpc HOST:PORT)"
        )
    if found is None and built_for and machine in _MACHINE_ELF and _MACHINE_ELF.get(built_for) not in (None, expected):
        raise ArtifactError(
            f"{library} was built for a {built_for} host but this machine is {machine}; run it on that device"
        )


def random_inputs(manifest: Mapping[str, Any], seed: int = 0) -> list[np.ndarray]:
    """Deterministic inputs matching the manifest (normal floats, small non-negative ints)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in input_specs(manifest):
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            arrays.append(rng.standard_normal(spec.shape).astype(dtype))
        elif dtype.kind == "b":
            arrays.append(rng.integers(0, 2, spec.shape).astype(dtype))
        else:  # token ids, indices: keep them small and valid
            arrays.append(rng.integers(0, 2, spec.shape).astype(dtype))
    return arrays


def time_main(vm: relax.VirtualMachine, dev: tvm.runtime.Device, args: list, *, number: int, repeat: int,
              min_repeat_ms: int = 0) -> dict[str, float | int]:
    if number < 1 or repeat < 1:
        raise InputSpecError(f"number and repeat must be >= 1 (given number={number}, repeat={repeat})")
    timer = vm.time_evaluator("main", dev, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
    result = timer(*args)
    results_ms = np.array(result.results, dtype=np.float64) * 1e3
    return {
        "median_ms": float(np.median(results_ms)),
        "mean_ms": float(np.mean(results_ms)),
        "std_ms": float(np.std(results_ms)),
        "min_ms": float(np.min(results_ms)),
        "repeat": int(repeat),
        "number": int(number),
    }
