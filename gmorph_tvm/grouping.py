"""Grouping by measurement: pick the group size that runs fastest on this machine.

:func:`gmorph_tvm.passes.group_tasks` partitions tasks by rule; given a ``latency`` function it
times each candidate partition instead. :func:`measured_latency` is that function: it fuses one
group (default: stitch + HorizontalMerge), builds it with default schedules for a target that runs
here, and times ``main``. It compiles and runs code, so it lives above the build and run stages,
not among the passes.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax

from .artifact import build
from .core.inputs import random_inputs
from .core.targets import host_is_native, resolve_target
from .core.timing import seconds_per_call
from .errors import BuildError, GmorphError, one_line
from .frontend import MultiModel
from .passes import GroupingError, horizontal_merge, stitch

Fuse = Callable[[MultiModel], MultiModel]


def _default_fuse(mm: MultiModel) -> MultiModel:
    return horizontal_merge(stitch(mm))


def _local_target(target) -> tvm.target.Target:
    resolved = resolve_target(target or "llvm")
    if resolved.kind.name != "llvm" or not host_is_native(resolved):
        raise GroupingError(
            f"grouping by measurement builds and times groups on this machine, where target "
            f"{resolved.kind.name!r} ({resolved.attrs.get('mtriple', 'host')}) does not run; "
            "group by rule or give max_group_size"
        )
    return resolved


def measured_latency(target=None, fuse: Fuse | None = None, number: int = 5) -> Callable[[MultiModel], float]:
    """A ``latency`` function for :func:`~gmorph_tvm.passes.group_tasks`: seconds per run of a
    group after ``fuse``, built for ``target`` (default this CPU) and timed ``number`` times."""
    tvm_target = _local_target(target)
    fuse = fuse or _default_fuse
    number = max(1, int(number))

    def latency(mm: MultiModel) -> float:
        fused = fuse(mm)
        try:
            artifact = build(fused, tvm_target)
        except GmorphError as err:
            raise BuildError(f"building group {', '.join(mm.task_names)} for timing failed: {one_line(err)}") from err
        vm = relax.VirtualMachine(artifact.executable, tvm.cpu())
        # Integer inputs (token ids, masks) get valid values within the recorded index bounds, not
        # zeros; external weights (the default build) follow the inputs.
        args = [tvm.runtime.tensor(arr) for arr in random_inputs(artifact.manifest)] + artifact.weight_args()
        vm["main"](*args)  # warm up
        return seconds_per_call(lambda: vm["main"](*args), number)[0]

    return latency
