"""How many threads TVM's CPU runtime runs kernels on.

TVM's thread pool is sized once, when a process first runs a parallel kernel, from
``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``); unset, it takes ``hardware_concurrency() / 2`` on
x86 on the assumption that every core has two hardware threads. Where cores have one (most cloud
VMs, this project's 2-core machines) that leaves half the cores idle: on 2 cores every kernel ran
on one thread, and EfficientNet-Lite0 took 8.99 ms instead of 5.31 ms. Importing ``gmorph_tvm``
therefore sets ``TVM_NUM_THREADS`` to the number of physical cores this process may run on,
unless the user set either variable (their choice is kept). Child processes (the tuning worker,
MetaSchedule's measuring processes) inherit it, so kernels are tuned with the threads they run on.
"""

from __future__ import annotations

import os

THREAD_ENV = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (at least 1)."""
    import psutil

    physical = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    logical = psutil.cpu_count() or physical
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = logical
    # An affinity mask narrower than the machine (taskset, a container's cpuset) bounds it, at
    # the machine's ratio of hardware threads to cores.
    return max(1, min(physical, allowed * physical // logical or 1))


def ensure_tvm_threads() -> int | None:
    """Set ``TVM_NUM_THREADS`` to :func:`physical_cores` unless a thread variable is set; returns
    the number set (None when the user's setting is kept)."""
    if any(os.environ.get(name) for name in THREAD_ENV):
        return None
    cores = physical_cores()
    os.environ["TVM_NUM_THREADS"] = str(cores)
    return cores
