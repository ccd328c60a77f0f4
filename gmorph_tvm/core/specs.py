"""Specs of tensors and tasks (what a model reads and returns), shared by import, build and run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import RuntimeInputError


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and dtype of one input or output tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(obj: Mapping) -> TensorSpec:
        return TensorSpec(str(obj["name"]), tuple(int(d) for d in obj["shape"]), str(obj["dtype"]))

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class TaskInfo:
    """One task (one original model) of a MultiModel."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    source: str  # "torch" or "onnx"
    source_hash: str  # sha256 of the model's weights (torch) or serialized file (onnx)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "source": self.source,
            "source_sha256": self.source_hash,
        }

    @staticmethod
    def from_json(obj: Mapping) -> TaskInfo:
        return TaskInfo(
            name=str(obj["name"]),
            inputs=tuple(TensorSpec.from_json(s) for s in obj["inputs"]),
            outputs=tuple(TensorSpec.from_json(s) for s in obj["outputs"]),
            source=str(obj["source"]),
            source_hash=str(obj["source_sha256"]),
        )


def check_inputs(
    specs: Sequence[TensorSpec], values: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray
) -> list[np.ndarray]:
    """Validate run-time inputs against ``specs``; error messages name the input and the mismatch."""
    if isinstance(values, np.ndarray) or hasattr(values, "__array__") and not isinstance(values, (list, tuple, Mapping)):
        values = [values]  # type: ignore[list-item]  # one array-like: the only input
    if isinstance(values, Mapping):
        unknown = sorted(set(values) - {s.name for s in specs})
        if unknown:
            raise RuntimeInputError(
                f"unknown input {unknown[0]!r}; expected {', '.join(s.describe() for s in specs)}"
            )
        missing = [s.name for s in specs if s.name not in values]
        if missing:
            raise RuntimeInputError(f"missing input {missing[0]!r}; expected {', '.join(s.describe() for s in specs)}")
        ordered = [values[s.name] for s in specs]
    else:
        ordered = list(values)
        if len(ordered) != len(specs):
            raise RuntimeInputError(
                f"expected {len(specs)} input(s) ({', '.join(s.describe() for s in specs)}), got {len(ordered)}"
            )
    arrays = []
    for spec, value in zip(specs, ordered):
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        if tuple(arr.shape) != spec.shape:
            raise RuntimeInputError(
                f"input {spec.name!r}: expected shape {list(spec.shape)}, given {list(arr.shape)}"
            )
        if str(arr.dtype) != spec.dtype:
            raise RuntimeInputError(f"input {spec.name!r}: expected dtype {spec.dtype}, given {arr.dtype}")
        arrays.append(np.ascontiguousarray(arr))
    return arrays


def check_index_bounds(bounds: Mapping[str, Mapping[str, int]], specs: Sequence[TensorSpec],
                       arrays: Sequence[np.ndarray]) -> None:
    """Refuse index inputs outside the range their tables accept (``bounds``: name -> low/high)."""
    for spec, arr in zip(specs, arrays):
        limits = bounds.get(spec.name)
        if limits is None or arr.size == 0:
            continue
        low, high = int(limits["low"]), int(limits["high"])
        bad = (arr < low) | (arr >= high)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise RuntimeInputError(
                f"input {spec.name!r}: index {arr[where]} at {list(where)} is out of range; it indexes a table of "
                f"{high} entries (valid {low}..{high - 1})"
            )
