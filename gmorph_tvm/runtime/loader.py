"""Load an exported artifact and run it: :func:`load` -> :class:`Runner`.

Only the TVM runtime is needed (no model code): the manifest says which inputs to pass and how
the flat output tuple of ``main`` splits into tasks.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from ..core import device_code
from ..core.manifest import input_specs, library_path_for, manifest_path_for, read_manifest
from ..core.specs import check_inputs
from ..core.targets import runs_here
from ..core.tvm_log import quiet_tvm_warnings
from ..core.vm import InputsLike, device_for, execute, split_outputs  # noqa: F401 (re-exported)
from ..errors import ArtifactError, one_line

_MACHINE_ELF = {"x86_64": device_code.EM_X86_64, "AMD64": device_code.EM_X86_64,
                "aarch64": device_code.EM_AARCH64, "arm64": device_code.EM_AARCH64}
_ELF_NAME = {device_code.EM_X86_64: "x86_64", device_code.EM_AARCH64: "aarch64", 40: "arm", 243: "riscv"}


class Runner:
    """A loaded artifact: ``runner(inputs) -> {task: output}``."""

    def __init__(self, library: Path, manifest: dict[str, Any], vm: relax.VirtualMachine, device: tvm.runtime.Device):
        self.library = library
        self._manifest = manifest
        self.vm = vm
        self.device = device

    @property
    def manifest(self) -> dict[str, Any]:
        import copy

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
        return execute(self.vm, self._manifest, inputs, what=str(self.library), device=self.device)

    def benchmark(self, inputs: InputsLike | None = None, number: int = 10, repeat: int = 5,
                  min_repeat_ms: int = 0) -> dict[str, float | int]:
        """Latency of one call of ``main`` with ``vm.time_evaluator`` (inputs already on the device).

        Returns ``median_ms``, ``mean_ms``, ``std_ms``, ``min_ms`` over ``repeat`` measurements, each
        the mean of ``number`` calls. Random inputs from the manifest when ``inputs`` is None.
        """
        arrays = check_inputs(input_specs(self._manifest), inputs) if inputs is not None else random_inputs(self._manifest)
        args = [tvm.runtime.tensor(a, self.device) for a in arrays]
        return time_main(self.vm, self.device, args, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)


def load(path: str | Path, device: str = "cpu") -> Runner:
    """Load ``path`` (the ``.so``/``.tar`` library, or its ``.manifest.json``) on ``device``.

    ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Raises ArtifactError (naming the file)
    when the manifest is missing or corrupt, the library is missing, it was built for another
    device kind or CPU architecture, or TVM cannot load it.
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
    try:
        with quiet_tvm_warnings():
            module = tvm.runtime.load_module(str(library))
        vm = relax.VirtualMachine(module, dev)
    except Exception as err:  # noqa: BLE001 - TVM raises its own error types
        raise ArtifactError(f"cannot load {library}: {one_line(err)}") from err
    return Runner(library, manifest, vm, dev)


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
        raise ValueError("number and repeat must be >= 1")
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
