"""Soak: 10,000 calls from 4 threads on one runner: every result exact, resident memory flat."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from gmorph_tvm.runtime import load

CALLS, THREADS = 10_000, 4


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


@pytest.mark.slow
def test_ten_thousand_calls_from_four_threads(tiny_artifact, tiny_reference):
    runner = load(tiny_artifact)
    rng = np.random.default_rng(0)
    cases = [(rng.standard_normal((2, 3)).astype(np.float32), rng.integers(0, 5, 2).astype(np.int64)) for _ in range(64)]
    expected = [tiny_reference(x, ids) for x, ids in cases]
    errors: list[str] = []
    done = [0] * THREADS
    rss: list[float] = []

    def work(k: int, calls: int) -> None:
        try:
            for i in range(calls):
                j = (k * 7 + i) % len(cases)
                x, ids = cases[j]
                out = runner({"x": x, "ids": ids})
                if not (np.array_equal(out["relu"], expected[j]["relu"]) and np.array_equal(out["rows"], expected[j]["rows"])):
                    errors.append(f"thread {k} call {i}: wrong result")
                done[k] += 1
        except Exception as err:  # noqa: BLE001 - any failure fails the soak
            errors.append(f"thread {k}: {type(err).__name__}: {err}")

    def run(calls_per_thread: int) -> None:
        threads = [threading.Thread(target=work, args=(k, calls_per_thread)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    run(250)  # warm-up: every thread's VM, allocator pools, numpy buffers
    gc.collect()
    rss.append(_rss_mb())
    for _ in range(3):  # the remaining 9,000 calls in three rounds, RSS after each
        run((CALLS - 1000) // 3 // THREADS)
        gc.collect()
        rss.append(_rss_mb())
    assert errors == [], errors[:5]
    assert sum(done) == CALLS
    assert max(rss) - rss[0] < 4, f"RSS grew from {rss[0]:.1f} MB: {[round(r, 1) for r in rss]}"
