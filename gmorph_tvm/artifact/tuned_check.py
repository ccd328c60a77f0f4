"""Whole-module check of tuned builds: a tuned artifact must compute what the untuned one does.

:func:`gmorph_tvm.tuning.lower_tuned` already checks every tuned kernel on its own; this check
covers what happens around the kernels (weight pre-packing into tuned layouts, constant
folding, memory planning). Before :func:`gmorph_tvm.build` returns a tuned artifact it
compiles the same module without tuning records, runs both on the same random inputs and
compares every output. On a mismatch it finds the first kernel call whose results differ (VM
instrumentation, both runs side by side), drops that kernel's record and rebuilds; if that does
not settle it, the untuned build is returned. Either way a :class:`TuningWarning` names the
kernels. A target whose code cannot run on this machine is not checked here (warning).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax

from ..core.inputs import random_inputs
from ..core.specs import TensorSpec
from ..core.targets import host_is_native, is_cuda
from ..tuning.report import TuningWarning
from ..tuning.verify import VerifiedTuning, relative_error, rtol_for

# Outputs of the whole module may drift more than one kernel's: reductions reordered in every
# tuned kernel add up. Real faults seen were 1e-1 and more.
MODULE_RTOL = 1e-4
MAX_REBUILDS = 2
_PREPACKED_SUFFIX = "_prepacked"


@dataclass
class ModuleCheck:
    """What the whole-module check of a tuned build found (manifest field ``tuning``)."""

    applied: list[str] = field(default_factory=list)  # kernels whose tuned schedules are in the artifact
    dropped: dict[str, str] = field(default_factory=dict)
    unverified: list[str] = field(default_factory=list)
    max_rel_error: float | None = None  # tuned vs untuned outputs (None: not run here)
    fell_back: bool = False  # True: the artifact is the untuned build
    kernel_seconds: float = 0.0  # the per-kernel checks (all lowerings)
    seconds: float = 0.0  # the whole-module check: untuned build, runs, rebuilds

    def to_json(self) -> dict[str, Any]:
        return {
            "applied": sorted(self.applied),
            "dropped": dict(sorted(self.dropped.items())),
            "unverified": sorted(self.unverified),
            "max_rel_error_vs_untuned": self.max_rel_error,
            "fell_back_to_untuned": self.fell_back,
            "kernel_check_seconds": round(self.kernel_seconds, 3),
            "module_check_seconds": round(self.seconds, 3),
        }


def _flatten(value: Any) -> list[np.ndarray]:
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not hasattr(value, "shape"):
        return [a for item in value for a in _flatten(item)]
    return []


def _kernel_name(name: str) -> str:
    return name.removesuffix(_PREPACKED_SUFFIX)


# How to call a build: (vm, executable, device, inputs) -> outputs; default: ``main(*inputs)``.
Call = Callable[[relax.VirtualMachine, Any, Any, Sequence[np.ndarray]], Any]


def _call_main(vm: relax.VirtualMachine, executable: Any, device: Any, inputs: Sequence[np.ndarray]) -> Any:
    return vm["main"](*[tvm.runtime.tensor(a, device) for a in inputs])


def _run(executable: Any, device: Any, inputs: list[np.ndarray], trace: bool = False, call: Call = _call_main):
    """Outputs of the build (``call``: every entry point) and, with ``trace``, every kernel call as
    (kernel, args after the call). ``executable``: a VM executable, or a build holding one as
    ``.executable`` (passed to ``call`` as is)."""
    vm = relax.VirtualMachine(getattr(executable, "executable", executable), device)
    calls: list[tuple[str, list[np.ndarray]]] = []
    if trace:

        def instrument(func, name, before_run, ret_value, *args):
            name = str(name)
            if not before_run and not name.startswith("vm."):
                calls.append((_kernel_name(name), [a.numpy() for a in args if isinstance(a, tvm.runtime.Tensor)]))
            return 0

        vm.set_instrument(instrument)
    outputs = _flatten(call(vm, executable, device, inputs))
    return outputs, calls


def _max_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    if len(got) != len(want):
        return float("inf")
    return max((relative_error(g, w) for g, w in zip(got, want) if g.shape == w.shape), default=0.0)


def _first_bad_kernel(tuned, baseline, device, inputs, rtol, call: Call = _call_main) -> str | None:
    """The first kernel call whose buffers differ between the tuned and untuned builds."""
    _, tuned_calls = _run(tuned, device, inputs, trace=True, call=call)
    _, base_calls = _run(baseline, device, inputs, trace=True, call=call)
    if [n for n, _ in tuned_calls] != [n for n, _ in base_calls]:
        return None  # different call sequences: cannot pair them up
    for (name, got), (_, want) in zip(tuned_calls, base_calls):
        if _max_error(got, want) > rtol:
            return name
    return None


def can_run_here(target: tvm.target.Target) -> Any:
    """The device to run a build for ``target`` on in this process, or None."""
    if is_cuda(target):
        return tvm.cuda(0) if tvm.cuda(0).exist and host_is_native(target) else None
    return tvm.cpu(0) if host_is_native(target) else None


def verify_tuned_build(
    executable: Any,
    applied: VerifiedTuning,
    target: tvm.target.Target,
    inputs: Sequence[TensorSpec],
    *,
    compile_untuned: Callable[[], Any],
    rebuild: Callable[[Sequence[str]], tuple[Any, VerifiedTuning]],
    seed: int = 0,
    call: Call = _call_main,
) -> tuple[Any, ModuleCheck]:
    """``executable`` (tuned) if it computes what the untuned build computes, else a rebuild
    without the offending kernels' records, else the untuned build; plus what was found."""
    started = time.monotonic()
    report = ModuleCheck(list(applied.applied), dict(applied.dropped), list(applied.unverified))
    report.kernel_seconds = applied.seconds
    device = can_run_here(target)
    if device is None:
        warnings.warn(
            f"the tuned build for {target.kind.name} cannot run on this machine, so it was not compared with "
            f"the untuned build ({len(applied.applied)} tuned kernels were checked one by one only)",
            TuningWarning,
            stacklevel=3,
        )
        report.seconds = time.monotonic() - started
        return executable, report
    data = random_inputs(inputs, seed)
    baseline = compile_untuned()
    want, _ = _run(baseline, device, data, call=call)
    rtol = max(MODULE_RTOL, rtol_for([s.dtype for s in inputs]))
    excluded: list[str] = []
    for _ in range(MAX_REBUILDS + 1):
        got, _ = _run(executable, device, data, call=call)
        error = _max_error(got, want)
        if error <= rtol:
            report.max_rel_error = error
            report.seconds = time.monotonic() - started
            return executable, report
        culprit = _first_bad_kernel(executable, baseline, device, data, rtol, call)
        if culprit is None or culprit in excluded or culprit not in report.applied:
            break
        warnings.warn(
            f"tuning record of kernel {culprit!r} dropped: the tuned build computed different results "
            f"(max relative error {error:.3g} vs the untuned build); it keeps its default schedule",
            TuningWarning,
            stacklevel=3,
        )
        excluded.append(culprit)
        executable, applied = rebuild(excluded)
        report.kernel_seconds += applied.seconds
        report.applied, report.unverified = list(applied.applied), list(applied.unverified)
        report.dropped.update(applied.dropped)
    names = ", ".join(repr(k) for k in sorted(report.applied)) or "none"
    warnings.warn(
        f"the tuned build computes different results from the untuned one (max relative error {error:.3g}) "
        f"and no single tuning record could be blamed; using the untuned build (tuned kernels: {names})",
        TuningWarning,
        stacklevel=3,
    )
    for kernel in report.applied:
        report.dropped.setdefault(kernel, "the tuned build as a whole disagreed with the untuned one")
    report.applied, report.unverified, report.fell_back = [], [], True
    report.max_rel_error = 0.0
    report.seconds = time.monotonic() - started
    return baseline, report
