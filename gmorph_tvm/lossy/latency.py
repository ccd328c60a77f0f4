"""Latency of a fused plan = latency of its COMPILED TVM artifact (never PyTorch eager).

The candidate's MultiModel is built with :func:`gmorph_tvm.build` for the search target and
timed on fixed random inputs. The statistic is the minimum over ``repeat`` short measurements
(each the mean of ``number`` calls): on a shared machine the minimum is the most stable estimate
of what the code itself costs.

Two clocks:

* ``"wall"`` (default): the VM's ``time_evaluator``, i.e. real elapsed time;
* ``"cpu"``: CPU time of this process (``time.process_time``) over the same calls. With a single-
  threaded runtime (``TVM_NUM_THREADS=1``, ``torch.set_num_threads(1)``) this is the compute time
  of one inference, unaffected by other processes competing for the cores; on a machine shared
  with other jobs it ranks plans far more reliably than elapsed time. It is NOT a latency for a
  multi-threaded runtime (it adds up all threads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ..artifact import build
from ..core.inputs import random_inputs
from ..core.timing import seconds_per_call, time_main
from ..errors import SearchError


@dataclass(frozen=True)
class TimingConfig:
    number: int = 3
    repeat: int = 25
    min_repeat_ms: int = 0
    clock: str = "wall"  # "wall" | "cpu"

    def __post_init__(self) -> None:
        if self.clock not in ("wall", "cpu"):
            raise SearchError(f"timing clock must be 'wall' or 'cpu', not {self.clock!r}")
        if self.number < 1 or self.repeat < 1:
            raise SearchError("timing needs number >= 1 and repeat >= 1")

    def to_json(self) -> dict:
        return {"number": self.number, "repeat": self.repeat, "min_repeat_ms": self.min_repeat_ms, "clock": self.clock}


def compile_multimodel(multi, target, tuning_db=None):
    """:func:`gmorph_tvm.build` of ``multi`` (an Artifact)."""
    return build(multi, target, tuning_db=tuning_db)


def min_cpu_time_ms(call: Callable[[], object], number: int, repeat: int) -> float:
    """Minimum over ``repeat`` runs of the mean CPU time (ms) of ``number`` calls of ``call``."""
    call()  # warm up
    return float(min(seconds_per_call(call, number, repeat, clock="cpu")) * 1e3)


def time_artifact(artifact, timing: TimingConfig = TimingConfig(), seed: int = 0) -> float:
    """Milliseconds per call of the in-process artifact (min over repeats)."""
    import tvm
    from tvm import relax


    manifest = artifact.manifest
    if manifest["device"] != "cpu":
        raise SearchError(
            f"the search times candidates on this machine's CPU, but the target builds for {manifest['device']}; "
            "pass latency_fn= to measure on the device (e.g. over RPC)"
        )
    dev = tvm.cpu()
    vm = relax.VirtualMachine(artifact.executable, dev)
    args = [tvm.runtime.tensor(a, dev) for a in random_inputs(manifest, seed)] + artifact.weight_args()
    main = vm["main"]
    main(*args)  # warm up (first-call allocations)
    if timing.clock == "cpu":
        return min_cpu_time_ms(lambda: main(*args), timing.number, timing.repeat)
    stats = time_main(vm, dev, args, number=timing.number, repeat=timing.repeat, min_repeat_ms=timing.min_repeat_ms)
    return float(stats["min_ms"])


def time_torch_eager(models: Iterable, x, timing: TimingConfig = TimingConfig()) -> float:
    """Milliseconds to run every model one after another in PyTorch eager (no grad), min over repeats."""
    import torch

    models = list(models)
    for m in models:
        m.eval()

    def run_all():
        for m in models:
            m(x)

    with torch.no_grad():
        if timing.clock == "cpu":
            return min_cpu_time_ms(run_all, timing.number, timing.repeat)
        run_all()
        results = seconds_per_call(run_all, timing.number, timing.repeat)
    return float(np.min(results) * 1e3)
