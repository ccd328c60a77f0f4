"""Side-by-side measurement of what users run today against gmorph-tvm artifacts.

Every system is timed the way its users would run it at its best, on the same inputs: PyTorch
eager model by model (``torch.inference_mode``) with a stated thread count, ONNX Runtime
sessions model by model (default sessions, and sessions with
``session.intra_op.allow_spinning=0``: several default sessions run back to back spin their idle
thread pools against each other), the models compiled separately by TVM (one artifact each, run
one after another), and the fused artifact(s). TVM artifacts are timed with TVM's
``time_evaluator`` (no Python in the loop), the others with ``time.perf_counter`` around a full
pass over all models.

:func:`measure` takes one sample of every system in turn, many rounds over (interleaved), with
a short pause between systems so one's spinning threads have gone quiet before the next runs:
a slow phase of a busy machine then hits every system alike. Each :class:`Timing` keeps its
samples; tables report the median and the spread (half the 10-90 percentile range).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .core.table import markdown_table
from .core.timing import calls_to_last, seconds_per_call, time_main
from .core.vm import entries_of

# A sample: seconds per call of one full pass, timed over enough calls to last ``min_time_s``.
Sampler = Callable[[], float]


@dataclass
class Timing:
    """Samples (ms per full pass) of one system."""

    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.samples_ms))

    @property
    def spread_pct(self) -> float:
        """Half the 10-90 percentile range, in % of the median."""
        p10, p90 = np.percentile(self.samples_ms, [10, 90])
        return float(50.0 * (p90 - p10) / self.median_ms) if self.median_ms else 0.0


@dataclass
class Row:
    """One line of a comparison table."""

    system: str
    median_ms: float
    weight_bytes: int | None = None
    peak_mb: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)
    spread_pct: float | None = None

    @classmethod
    def timed(cls, system: str, timing: Timing, weight_bytes: int | None = None, **kw) -> Row:
        return cls(system, timing.median_ms, weight_bytes, spread_pct=timing.spread_pct, **kw)


def loop_sampler(fn: Callable[[], object], *, min_time_s: float = 0.02, warmup: int = 3) -> Sampler:
    """A sampler timing ``fn()`` calls in a loop long enough to last about ``min_time_s``."""
    number = calls_to_last(fn, min_time_s, warmup=warmup)
    return lambda: seconds_per_call(fn, number)[0]


def measure(samplers: Mapping[str, Sampler], *, samples: int = 31, gap_s: float = 0.005,
            settle: bool = True) -> dict[str, Timing]:
    """Interleaved samples of every system: ``samples`` rounds of one sample each.

    ``settle``: each system runs one untimed sample before its timed one whenever it follows
    another system. The runtime that ran before may still have threads busy: after ONNX Runtime's
    default (spinning) sessions, TVM's first run on all cores took 44 ms instead of 0.07 ms on
    2 cores (its workers wait for cores the spinning threads hold); the untimed run absorbs that.
    """
    out: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(samples):
        for name, sample in samplers.items():
            if settle and len(samplers) > 1:
                sample()
            out[name].append(sample() * 1e3)
            time.sleep(gap_s)
    return {name: Timing(values) for name, values in out.items()}


def time_callable(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 30, min_time_s: float = 0.2) -> float:
    """Median wall time of ``fn()`` in milliseconds (each sample runs ``fn`` enough times to last)."""
    sampler = loop_sampler(fn, min_time_s=min_time_s / 10, warmup=warmup)
    return measure({"fn": sampler}, samples=repeat, gap_s=0.0)["fn"].median_ms


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_sampler(models: Mapping[str, torch.nn.Module], inputs: Mapping[str, Sequence], *,  # noqa: F821
                  threads: int, min_time_s: float = 0.02) -> Sampler:
    """Running every model once, one after another, in PyTorch eager mode on ``threads`` threads."""
    import torch

    calls = [(m.eval(), tuple(torch.as_tensor(x) for x in inputs[name])) for name, m in models.items()]

    def run_all():
        with torch.inference_mode():
            for model, args in calls:
                model(*args)

    with torch_threads(threads):
        inner = loop_sampler(run_all, min_time_s=min_time_s)

    def sample() -> float:
        with torch_threads(threads):
            return inner()

    return sample


def onnxruntime_sessions(paths: Mapping[str, str], *, spinning: bool = True, threads: int | None = None):
    """One ONNX Runtime CPU session per model; ``spinning=False`` sets
    ``session.intra_op.allow_spinning=0`` (idle pool threads sleep instead of spinning)."""
    import onnxruntime as ort

    sessions = {}
    for name, path in paths.items():
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return sessions


def onnxruntime_sampler(paths: Mapping[str, str], inputs: Mapping[str, Mapping[str, np.ndarray]], *,
                        spinning: bool = True, threads: int | None = None, min_time_s: float = 0.02) -> Sampler:
    """Running every ONNX model once with its own session, one after another."""
    sessions = onnxruntime_sessions(paths, spinning=spinning, threads=threads)
    feeds = [(sess, {i.name: inputs[name][i.name] for i in sess.get_inputs()}) for name, sess in sessions.items()]

    def run_all():
        for sess, feed in feeds:
            sess.run(None, feed)

    return loop_sampler(run_all, min_time_s=min_time_s)


def openvino_sampler(paths: Mapping[str, str], inputs: Mapping[str, Mapping[str, np.ndarray]], *,
                     min_time_s: float = 0.02) -> Sampler:
    """Running every ONNX model once with OpenVINO on the CPU (one compiled model each, latency hint),
    one after another."""
    import openvino

    core = openvino.Core()
    requests = []
    for name, path in paths.items():
        compiled = core.compile_model(path, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        feed = {port.get_any_name(): inputs[name][port.get_any_name()] for port in compiled.inputs}
        requests.append((compiled.create_infer_request(), feed))

    def run_all():
        for request, feed in requests:
            request.infer(feed)

    return loop_sampler(run_all, min_time_s=min_time_s)


def tvm_sampler(runners: Sequence, inputs: Mapping[str, np.ndarray], *, min_time_s: float = 0.02) -> Sampler:
    """Running every artifact once, one after another, timed by ``time_evaluator``: its ``main``, or
    each group's entry point of a grouped artifact (entry points that repeat tasks already timed, such
    as batch buckets, are left out: one call runs one of them)."""
    import tvm

    calls = []
    for runner in runners:
        covered: set[str] = set()
        for entry in entries_of(runner.manifest):
            if not set(entry["tasks"]) - covered:
                continue
            covered |= set(entry["tasks"])
            function = entry["function"]
            args = ([tvm.runtime.tensor(inputs[s["name"]], runner.device) for s in entry["inputs"]]
                    + runner.weight_args(function))
            calls.append((runner, function, args))
    prepared = [(runner, function, args, calls_to_last(lambda runner=runner, function=function, args=args:
                                                        runner.vm[function](*args), min_time_s / len(calls)))
                for runner, function, args in calls]

    def sample() -> float:
        return sum(time_main(runner.vm, runner.device, args, number=number, repeat=1, func=function)["median_ms"] / 1e3
                   for runner, function, args, number in prepared)

    return sample


def torch_weight_bytes(models: Mapping[str, torch.nn.Module]) -> int:  # noqa: F821
    """Bytes of every parameter and buffer, counted once per model (what separate models hold)."""
    return sum(sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m in models.values())


def format_table(rows: Sequence[Row], *, baseline: str, title: str | None = None, compare: str | None = None,
                 compare_label: str | None = None) -> str:
    """A markdown table: system, median latency (± spread when rows have one), speedup over the
    ``baseline`` row, speedup over the ``compare`` row (when given; its column is headed
    ``compare_label`` or the row's name), weights (and peak memory, notes when any row has them).
    The speedup columns name what they divide by: ``x vs <baseline>``."""
    base = next((r.median_ms for r in rows if r.system == baseline), None)
    if base is None:
        raise ValueError(f"baseline {baseline!r} is not a row of the table ({', '.join(r.system for r in rows)})")
    other = next((r.median_ms for r in rows if r.system == compare), None) if compare else None
    with_spread = any(r.spread_pct is not None for r in rows)
    with_peak = any(r.peak_mb is not None for r in rows)
    with_note = any(r.note for r in rows)
    header = ["system", "median ms", *(["±"] if with_spread else []), f"x vs {baseline}",
              *([f"x vs {compare_label or compare}"] if other else []), "weights MB",
              *(["peak MB"] if with_peak else []), *(["note"] if with_note else [])]
    cells = []
    for r in rows:
        row = [r.system, f"{r.median_ms:.3f}"]
        if with_spread:
            row.append(f"{r.spread_pct:.0f}%" if r.spread_pct is not None else "-")
        row.append(f"{base / r.median_ms:.2f}x")
        if other:
            row.append(f"{other / r.median_ms:.2f}x")
        row.append(f"{r.weight_bytes / 1e6:.2f}" if r.weight_bytes is not None else "-")
        if with_peak:
            row.append(f"{r.peak_mb:.1f}" if r.peak_mb is not None else "-")
        if with_note:
            row.append(r.note)
        cells.append(row)
    return markdown_table(header, cells, numeric=[0 < i and h != "note" for i, h in enumerate(header)], title=title)
