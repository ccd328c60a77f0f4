"""Load an exported artifact and run it: :func:`load` -> :class:`Runner`.

Only the TVM runtime is needed (no model code): the manifest says which inputs to pass and how
the flat output tuple of ``main`` splits into tasks.

External weights (manifest ``weights.storage == "external"``) are mapped, not read: on the CPU
every kernel reads the weights straight from the mapped ``<stem>.weights.safetensors`` (numpy
view -> DLPack -> TVM tensor, no copy; the file is 64-byte aligned, as TVM's kernels assume); on
CUDA each tensor is copied to device memory in chunks of at most :data:`DEVICE_COPY_CHUNK` bytes
and its host pages are dropped right after. Each entry point gets its weights after its inputs.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from ..artifact import cuda as cuda_code
from ..core.tvm_log import quiet_tvm_warnings
from ..core.manifest import input_specs, is_external, library_path_for, manifest_path_for, read_manifest, task_infos
from ..errors import ArtifactError, one_line
from ..core.specs import check_inputs
from ..core.vm import InputsLike, device_for, entries_of, entry_weight_args, execute, run_entries  # noqa: F401
from ..core.vm import select_bucket, split_outputs  # noqa: F401 (re-exported)
from ..core.weights_file import ALIGNMENT, WeightsFile, read_weights

DEVICE_COPY_CHUNK = 64 << 20  # bytes per host -> device copy of external weights

_MACHINE_ELF = {"x86_64": cuda_code.EM_X86_64, "AMD64": cuda_code.EM_X86_64,
                "aarch64": cuda_code.EM_AARCH64, "arm64": cuda_code.EM_AARCH64}
_ELF_NAME = {cuda_code.EM_X86_64: "x86_64", cuda_code.EM_AARCH64: "aarch64", 40: "arm", 243: "riscv"}


class Runner:
    """A loaded artifact: ``runner(inputs) -> {task: output}``."""

    def __init__(self, library: Path, manifest: dict[str, Any], vm: relax.VirtualMachine, device: tvm.runtime.Device,
                 weights: Mapping[str, tvm.runtime.Tensor] | None = None):
        self.library = library
        self._manifest = manifest
        self.vm = vm
        self.device = device
        self._weight_args = entry_weight_args(manifest, weights or {}, str(library))

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
        return run_entries(self.vm, self._manifest, inputs, self._weight_args, what=str(self.library),
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
        total: dict[str, float | int] = {}
        for entry, arrays in calls:
            args = [tvm.runtime.tensor(a, self.device) for a in arrays] + self._weight_args[entry["function"]]
            timing = time_main(self.vm, self.device, args, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                               func=entry["function"])
            total = timing if not total else {k: (total[k] + v if k.endswith("_ms") else v) for k, v in timing.items()}
        return total


def load(path: str | Path, device: str = "cpu", *, verify_weights: bool = True) -> Runner:
    """Load ``path`` (the ``.so``/``.tar`` library, or its ``.manifest.json``) on ``device``.

    ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Raises ArtifactError (naming the file)
    when the manifest is missing or corrupt, the library is missing, it was built for another
    device kind or CPU architecture, or TVM cannot load it; and when the external weights file is
    missing, truncated, corrupt (sha256, checked unless ``verify_weights=False``) or not the one
    the manifest describes.
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
    weights = None
    if is_external(manifest):
        weights = load_weights(library, manifest, dev, verify=verify_weights)
    try:
        with quiet_tvm_warnings():
            module = tvm.runtime.load_module(str(library))
        vm = relax.VirtualMachine(module, dev)
    except Exception as err:  # noqa: BLE001 - TVM raises its own error types
        raise ArtifactError(f"cannot load {library}: {one_line(err)}") from err
    return Runner(library, manifest, vm, dev, weights)


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
              min_repeat_ms: int = 0, func: str = "main") -> dict[str, float | int]:
    if number < 1 or repeat < 1:
        raise ValueError("number and repeat must be >= 1")
    timer = vm.time_evaluator(func, dev, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
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
