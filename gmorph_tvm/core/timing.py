"""The one timing loop of gmorph-tvm, and the one reader of TVM's ``time_evaluator``.

* :func:`seconds_per_call`: host-side clock around back-to-back calls (PyTorch, ONNX Runtime,
  Python callables; the ``"cpu"`` clock for single-threaded, load-independent rankings);
* :func:`calls_to_last`: how many calls make one sample last a given time;
* :func:`time_main`: a compiled function timed on its device by TVM's ``time_evaluator`` (no Python
  in the loop), as median / mean / std / min milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import InputSpecError

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


def calls_to_last(fn: Callable[[], object], min_time_s: float, *, warmup: int = 3) -> int:
    """Calls of ``fn`` that take about ``min_time_s`` together (at least 1), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    (once,) = seconds_per_call(fn, 1)
    return max(1, int(min_time_s / max(once, 1e-6)))


def time_main(vm: Any, dev: Any, args: list, *, number: int, repeat: int, min_repeat_ms: int = 0,
              func: str = "main") -> dict[str, float | int]:
    """``func`` of ``vm`` (a Relax VM, or any module with ``time_evaluator``) timed on ``dev`` by
    TVM: ``repeat`` samples of ``number`` calls each; milliseconds per call."""
    if number < 1 or repeat < 1:
        raise InputSpecError(f"number and repeat must be >= 1 (given number={number}, repeat={repeat})")
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
