"""Benchmark artifacts on a remote device (e.g. a Jetson) over TVM RPC.

Remote benchmarking
-------------------
On the device (needs only the TVM runtime Python package)::

    python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9091

then, on the build machine::

    gmorph-tvm bench fused.so --rpc jetson.local:9091 --compare separate.so

With several boards, run a tracker once and register every board under a key::

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190            # any machine
    python -m tvm.exec.rpc_server --tracker TRACKER_HOST:9190 --key orin  # on each board
    python -m tvm.exec.query_rpc_tracker --host TRACKER_HOST --port 9190  # check who is there
    gmorph-tvm bench fused.so --tracker TRACKER_HOST:9190 --key orin

The library is uploaded, loaded on the device, and ``main`` is timed there with
``time_evaluator`` (inputs generated from the manifest, already on the device, so transfers are
not timed). A ``.so`` must have been linked for the device's CPU (``jetson-*`` presets use
``aarch64-linux-gnu-g++``); a ``.tar`` is linked by the device's own compiler when it is loaded.
From Python: ``remote_benchmark("fused.so", tracker=("tracker", 9190), key="orin",
compare=["separate.so"])`` returns one row per artifact; ``artifact_table(rows)`` renders them.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from ..core.inputs import random_inputs
from ..core.manifest import (
    input_specs,
    is_external,
    library_path_for,
    manifest_path_for,
    read_manifest,
    signature_of,
)
from ..core.specs import check_inputs
from ..core.table import markdown_table
from ..core.timing import time_main
from ..core.vm import entries_of
from ..core.weights_file import read_weights
from ..errors import ArtifactError, GmorphError, one_line
from .loader import InputsLike, load, split_outputs

Address = tuple[str, int]


def parse_address(text: str) -> Address:
    """``"host:port"`` -> ``("host", port)``."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise GmorphError(f"address {text!r} is not of the form HOST:PORT")
    return host, int(port)


@contextlib.contextmanager
def connect(*, rpc: Address | None = None, tracker: Address | None = None, key: str | None = None,
            session_timeout: int = 600) -> Iterator[Any]:
    """An RPC session to a server (``rpc``) or to a device the ``tracker`` assigns for ``key``.

    ``key`` is also passed to a direct server, which checks it when it was started with ``--key``.
    """
    from tvm import rpc as tvm_rpc

    if (rpc is None) == (tracker is None):
        raise GmorphError("give exactly one of rpc=(host, port) or tracker=(host, port)")
    if tracker is not None and not key:
        raise GmorphError("a tracker needs the device key the RPC servers registered with (--key)")
    try:
        if rpc is not None:
            # A server started with --key only accepts clients that present the same key.
            session = tvm_rpc.connect(rpc[0], int(rpc[1]), key=key or "", session_timeout=session_timeout)
        else:
            assert tracker is not None  # exactly one of rpc / tracker, checked above
            client = tvm_rpc.connect_tracker(tracker[0], int(tracker[1]))
            session = client.request(key, priority=1, session_timeout=session_timeout)
    except Exception as err:  # noqa: BLE001 - socket and TVM errors
        where = (f"RPC server {rpc[0]}:{rpc[1]}" if rpc is not None
                 else f"tracker {tracker[0]}:{tracker[1]} (key {key!r})" if tracker is not None else "RPC")
        raise GmorphError(f"cannot connect to {where}: {one_line(err)}") from err
    try:
        yield session
    finally:
        # The server serves one session at a time and ends it when the last reference to the
        # session (and to remote modules/tensors) goes away; collect now, not whenever the GC
        # gets to it, so the next connect does not wait on this one.
        del session
        gc.collect()


def remote_benchmark(
    artifact_path: str | Path,
    *,
    rpc: Address | None = None,
    tracker: Address | None = None,
    key: str | None = None,
    number: int = 10,
    repeat: int = 5,
    compare: Sequence[str | Path] = (),
    min_repeat_ms: int = 0,
    session_timeout: int = 600,
) -> list[dict[str, Any]]:
    """Time ``artifact_path`` (and every ``compare`` artifact) on the remote device.

    Connect to an RPC server with ``rpc=(host, port)`` (and ``key`` if the server was started
    with one), or through a tracker with ``tracker=(host, port), key=...``.

    Returns one row per artifact: ``artifact``, ``target``, ``device``, ``remote``, ``median_ms``,
    ``mean_ms``, ``std_ms``, ``min_ms``, ``repeat``, ``number``, ``speedup`` (first artifact's median
    over this one's) and ``max_abs_diff`` (largest output difference from the first artifact, when
    both have the same tasks and output shapes; None otherwise).
    """
    paths = [Path(artifact_path), *map(Path, compare)]
    where = f"{rpc[0]}:{rpc[1]}" if rpc is not None else f"{tracker[0]}:{tracker[1]}/{key}" if tracker else "?"
    rows = _Rows()
    with connect(rpc=rpc, tracker=tracker, key=key, session_timeout=session_timeout) as session:
        for index, path in enumerate(paths):
            library, manifest = _artifact(path)
            vm, dev = _remote_vm(session, library, manifest, index)
            arrays = random_inputs(manifest)
            args = [tvm.runtime.tensor(a, dev) for a in arrays] + _remote_weights(library, manifest, dev)
            try:
                timing = time_main(vm, dev, args, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
                outputs = _run_remote(vm, manifest, args, str(library))
            except GmorphError:
                raise
            except Exception as err:  # noqa: BLE001
                raise ArtifactError(f"running {library.name} on {where} failed: {one_line(err)}") from err
            rows.add(library, manifest, where, timing, outputs)
    return list(rows)


def local_benchmark(
    artifact_path: str | Path,
    *,
    number: int = 10,
    repeat: int = 5,
    compare: Sequence[str | Path] = (),
    min_repeat_ms: int = 0,
) -> list[dict[str, Any]]:
    """Like :func:`remote_benchmark`, on this machine (each artifact on the device it was built for)."""
    rows = _Rows()
    for path in [Path(artifact_path), *map(Path, compare)]:
        library = library_path_for(path)
        manifest = read_manifest(manifest_path_for(library))
        runner = load(library, device=manifest["device"])
        arrays = random_inputs(manifest)
        timing = runner.benchmark(arrays, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
        rows.add(library, manifest, "local", timing, runner(arrays))
    return list(rows)


class _Rows(list):
    """Result rows; speedup and output difference are relative to the first artifact."""

    def add(self, library: Path, manifest: dict[str, Any], where: str, timing: dict[str, Any],
            outputs: dict[str, Any]) -> None:
        if not self:
            self._first = (timing["median_ms"], outputs, signature_of(manifest))
        first_median, first_outputs, first_signature = self._first
        # A speedup only means something between artifacts that compute the same thing.
        comparable = signature_of(manifest) == first_signature
        self.append({
            "artifact": library.name, "target": _target_label(manifest), "device": manifest["device"],
            "remote": where, **timing, "comparable": comparable,
            "speedup": first_median / timing["median_ms"] if comparable and timing["median_ms"] > 0 else None,
            "max_abs_diff": _max_abs_diff(first_outputs, outputs) if comparable else None,
        })


def remote_run(artifact_path: str | Path, inputs: InputsLike, *, rpc: Address | None = None,
               tracker: Address | None = None, key: str | None = None,
               session_timeout: int = 600) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Run an artifact once on the remote device and return its outputs by task."""
    library, manifest = _artifact(Path(artifact_path))
    arrays = check_inputs(input_specs(manifest), inputs)
    with connect(rpc=rpc, tracker=tracker, key=key, session_timeout=session_timeout) as session:
        vm, dev = _remote_vm(session, library, manifest)
        try:
            args = [tvm.runtime.tensor(a, dev) for a in arrays] + _remote_weights(library, manifest, dev)
            return _run_remote(vm, manifest, args, str(library))
        except GmorphError:
            raise
        except Exception as err:  # noqa: BLE001
            raise ArtifactError(f"running {library.name} remotely failed: {one_line(err)}") from err


def artifact_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`remote_benchmark` / :func:`local_benchmark` rows."""
    header = ["artifact", "target", "device", "median ms", "mean ms", "std ms", "repeat", "speedup", "max abs diff"]
    cells = []
    for row in rows:
        speedup = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
        if row.get("comparable") is False:
            speedup = "not comparable (other inputs/tasks)"
        diff = f"{row['max_abs_diff']:.2e}" if row.get("max_abs_diff") is not None else "-"
        cells.append([row["artifact"], row["target"], f"{row['device']}@{row['remote']}", f"{row['median_ms']:.4f}",
                      f"{row['mean_ms']:.4f}", f"{row['std_ms']:.4f}", f"{row['repeat']}x{row['number']}", speedup, diff])
    return markdown_table(header, cells, numeric=[False] * 3 + [True] * 6)


# ---- helpers -------------------------------------------------------------------------------


def _artifact(path: Path) -> tuple[Path, dict[str, Any]]:
    library = library_path_for(path)
    manifest = read_manifest(manifest_path_for(library))
    if not library.is_file():
        raise ArtifactError(f"library {library} not found")
    return library, manifest


def _remote_vm(session: Any, library: Path, manifest: dict[str, Any], index: int = 0) -> tuple[relax.VirtualMachine, Any]:
    # A distinct remote name per artifact: re-uploading over a library the server has already
    # dlopen'ed (e.g. comparing a file with itself) rewrites mapped pages and crashes it.
    remote_name = f"gmorph{index}_{library.name}"
    try:
        session.upload(str(library), target=remote_name)
        module = session.load_module(remote_name)
        dev = session.cuda(0) if manifest["device"] == "cuda" else session.cpu(0)
        if manifest["device"] == "cuda" and not dev.exist:
            raise ArtifactError(f"{library.name} needs a CUDA GPU, but the remote device has none")
        return relax.VirtualMachine(module, dev), dev
    except GmorphError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ArtifactError(f"cannot load {library.name} on the remote device: {one_line(err)}") from err


def _remote_weights(library: Path, manifest: dict[str, Any], dev: Any) -> list:
    """External weights, read here (checked) and copied to the remote device, in ``main``'s order."""
    entries = entries_of(manifest)
    if len(entries) != 1 or entries[0]["function"] != "main":
        raise ArtifactError(f"{library.name} has {len(entries)} entry points (batch buckets or groups); remote "
                            "benchmarking times single-entry artifacts: build one per batch size or group")
    if not is_external(manifest):
        return []
    weights = read_weights(library.with_name(manifest["weights"]["file"]), manifest["weights"])
    by_name = {e.name: e for e in weights.entries}
    return [tvm.runtime.tensor(np.array(weights.array(by_name[n])), dev) for n in entries[0]["weights"]]


def _run_remote(vm: relax.VirtualMachine, manifest: dict[str, Any], args: list, what: str) -> dict[str, Any]:
    """Call ``main`` remotely. A tuple result stays on the server as an opaque object, so use the
    VM's stateful interface, which returns the outputs field by field."""
    vm.set_input("main", *args)
    vm.invoke_stateful("main")
    return split_outputs(manifest, vm.get_outputs("main"), what)


def _target_label(manifest: dict[str, Any]) -> str:
    target = manifest["target"]
    if target.get("kind") == "cuda":
        return f"cuda {target.get('arch', '')}".strip()
    return f"llvm {target.get('mcpu', '')}".strip()


def _max_abs_diff(reference: dict[str, Any], outputs: dict[str, Any]) -> float | None:
    if list(reference) != list(outputs):
        return None
    worst = 0.0
    for task, ref in reference.items():
        refs = ref if isinstance(ref, list) else [ref]
        outs = outputs[task] if isinstance(outputs[task], list) else [outputs[task]]
        if len(refs) != len(outs) or any(a.shape != b.shape for a, b in zip(refs, outs)):
            return None
        for a, b in zip(refs, outs):
            if a.size:
                worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return worst


