"""TVM's runtime sizes its thread pool as hardware_concurrency() / 2 on x86 (it assumes two
hardware threads a core): on this project's 2-core machines every kernel ran on one thread
(EfficientNet-Lite0 8.99 ms instead of 5.31 ms). ``import gmorph_tvm`` gives it one thread per
physical core unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gmorph_tvm.core.threads import THREAD_ENV, physical_cores

PROBE = "import gmorph_tvm, tvm; print(tvm.get_global_func('runtime.NumThreads')())"


def _threads(before: str = "", **env: str) -> int:
    """TVM's thread count in a fresh process without the parent's thread variables; ``before``
    runs before the import."""
    clean = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    out = subprocess.run([sys.executable, "-c", before + PROBE], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def test_tvm_runs_on_every_physical_core_by_default():
    assert _threads() == physical_cores()


@pytest.mark.parametrize("name", THREAD_ENV)
def test_the_users_thread_setting_is_kept(name):
    assert _threads(**{name: "1"}) == 1


def test_affinity_narrower_than_the_machine_bounds_the_threads():
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a settable affinity over 2+ CPUs")
    cpu = min(os.sched_getaffinity(0))
    assert _threads(f"import os; os.sched_setaffinity(0, {{{cpu}}}); ") == 1
