"""Random test inputs, made in one place: for timing an artifact, checking a tuned build against an
untuned one, or timing a candidate group.

Every dtype gets values a model accepts: floating point (float16/32/64, bfloat16 and the float8
types through ml_dtypes) standard-normal, complex normal in both parts, booleans 0/1, and integers
in ``{0, 1}`` (valid token ids, type ids, masks and indices of any table with two or more rows) or,
where the artifact records the valid range of an index input (manifest ``index_bounds``), inside
that range. A dtype with no such value is refused with one line naming the input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

try:
    import ml_dtypes  # noqa: F401  (registers bfloat16 and the float8 types with numpy)
except ImportError:  # pragma: no cover - TVM depends on it
    pass

from ..errors import InputSpecError
from .manifest import input_specs
from .specs import TensorSpec

Bounds = Mapping[str, Mapping[str, int]]


def random_inputs(specs: Sequence[TensorSpec] | Mapping[str, Any], seed: int = 0, *,
                  index_bounds: Bounds | None = None) -> list[np.ndarray]:
    """Deterministic random arrays for ``specs`` (tensor specs, or an artifact manifest: its inputs and
    its ``index_bounds``), in their order; the same ``seed`` gives the same arrays."""
    if isinstance(specs, Mapping):
        index_bounds = specs.get("index_bounds") or {} if index_bounds is None else index_bounds
        specs = input_specs(specs)
    rng = np.random.default_rng(seed)
    return [random_array(spec, rng, (index_bounds or {}).get(spec.name)) for spec in specs]


def random_array(spec: TensorSpec, rng: np.random.Generator, bounds: Mapping[str, int] | None = None) -> np.ndarray:
    """One array of ``spec``'s shape and dtype (see the module docstring for the values)."""
    try:
        dtype = np.dtype(spec.dtype)
    except TypeError as err:
        raise InputSpecError(f"input {spec.name!r}: no random values for dtype {spec.dtype!r}") from err
    shape = tuple(int(d) for d in spec.shape)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    if dtype.kind in "iu":
        low, high = _int_range(dtype, bounds)
        return rng.integers(low, high, shape).astype(dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.kind == "f" or (dtype.kind == "V" and _is_float(dtype)):
        return rng.standard_normal(shape).astype(dtype)
    raise InputSpecError(f"input {spec.name!r}: no random values for dtype {spec.dtype!r}")


def _int_range(dtype: np.dtype, bounds: Mapping[str, int] | None) -> tuple[int, int]:
    """[low, high) of the integers to draw: {0, 1}, within an index input's recorded bounds."""
    low, high = 0, 2
    if bounds is not None:
        valid_low, valid_high = int(bounds["low"]), int(bounds["high"])
        low = max(valid_low, 0) if valid_high > 0 else valid_low
        high = max(low + 1, min(valid_high, low + 2))
    info = np.iinfo(dtype)
    low = max(low, int(info.min))
    return low, max(low + 1, min(high, int(info.max) + 1))


def _is_float(dtype: np.dtype) -> bool:
    try:
        return bool(np.isfinite(np.array(0.5, dtype=dtype)))
    except (TypeError, ValueError):
        return False
