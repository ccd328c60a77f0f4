"""The one timing loop of gmorph-tvm (host-side clocks; TVM artifacts use ``vm.time_evaluator``)."""

from __future__ import annotations

import time
from collections.abc import Callable

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def seconds_per_call(fn: Callable[[], object], number: int, repeat: int = 1, clock: str = "wall") -> list[float]:
    """``repeat`` samples, each the mean seconds of ``number`` back-to-back calls of ``fn``, measured
    with the ``"wall"`` (elapsed) or ``"cpu"`` (this process's CPU time) clock. No warm-up call."""
    if number < 1 or repeat < 1:
        raise ValueError("number and repeat must be >= 1")
    now = CLOCKS[clock]
    samples = []
    for _ in range(repeat):
        start = now()
        for _ in range(number):
            fn()
        samples.append((now() - start) / number)
    return samples
