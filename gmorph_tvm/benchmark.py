"""Side-by-side measurement of what users run today against gmorph-tvm artifacts.

Every system is timed the way its users would run it, on the same inputs:
PyTorch eager model by model (``torch.inference_mode``), ONNX Runtime sessions model by model,
the models compiled separately by TVM (one artifact each, run one after another), and the fused
artifact(s). TVM artifacts are timed with TVM's ``time_evaluator`` (no Python in the loop), the
others with ``time.perf_counter`` around a full pass over all models; medians are reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .core.timing import seconds_per_call


@dataclass
class Row:
    """One line of a comparison table."""

    system: str
    median_ms: float
    weight_bytes: int | None = None
    peak_mb: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def time_callable(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 30, min_time_s: float = 0.2) -> float:
    """Median wall time of ``fn()`` in milliseconds (each sample runs ``fn`` enough times to last)."""
    for _ in range(warmup):
        fn()
    single = max(seconds_per_call(fn, 1)[0], 1e-6)
    number = max(1, int(min_time_s / 10 / single))
    return statistics.median(seconds_per_call(fn, number, repeat)) * 1e3


def time_torch_eager(models: Mapping[str, torch.nn.Module], inputs: Mapping[str, Sequence], **kw) -> float:  # noqa: F821
    """Median ms of running every model once, one after another, in PyTorch eager mode."""
    import torch

    calls = [(m.eval(), tuple(torch.as_tensor(x) for x in inputs[name])) for name, m in models.items()]

    def run_all():
        with torch.inference_mode():
            for model, args in calls:
                model(*args)

    return time_callable(run_all, **kw)


def time_onnxruntime(paths: Mapping[str, str], inputs: Mapping[str, Mapping[str, np.ndarray]], **kw) -> float:
    """Median ms of running every ONNX model once with its own ONNX Runtime session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    sessions = [
        (ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]), inputs[name])
        for name, path in paths.items()
    ]

    def run_all():
        for sess, feed in sessions:
            sess.run(None, feed)

    return time_callable(run_all, **kw)


def torch_weight_bytes(models: Mapping[str, torch.nn.Module]) -> int:  # noqa: F821
    """Bytes of every parameter and buffer, counted once per model (what separate models hold)."""
    return sum(sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m in models.values())


def format_table(rows: Sequence[Row], *, baseline: str | None = None, title: str | None = None) -> str:
    """A markdown table: system, median latency, speedup vs ``baseline``, weights (and peak memory,
    notes when any row has them)."""
    base = next((r.median_ms for r in rows if r.system == baseline), rows[0].median_ms if rows else 1.0)
    with_peak = any(r.peak_mb is not None for r in rows)
    with_note = any(r.note for r in rows)
    header = "| system | median ms | speedup | weights MB |" + (" peak MB |" if with_peak else "") + (" note |" if with_note else "")
    rule = "|---|---:|---:|---:|" + ("---:|" if with_peak else "") + ("---|" if with_note else "")
    lines = ([f"**{title}**", ""] if title else []) + [header, rule]
    for r in rows:
        weights = f"{r.weight_bytes / 1e6:.2f}" if r.weight_bytes is not None else "-"
        line = f"| {r.system} | {r.median_ms:.3f} | {base / r.median_ms:.2f}x | {weights} |"
        if with_peak:
            line += f" {r.peak_mb:.1f} |" if r.peak_mb is not None else " - |"
        if with_note:
            line += f" {r.note} |"
        lines.append(line)
    return "\n".join(lines)
