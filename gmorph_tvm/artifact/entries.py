"""Normalise what :func:`gmorph_tvm.build` is given into entry points: one module each, with its
function name, weights-bound Relax module and signature (inputs, tasks, batch).

* a MultiModel or an IRModule: one entry point ``main``;
* ``{1: mm1, 8: mm8}``: batch buckets ``main_b1``, ``main_b8`` (same inputs and tasks, batched on axis 0);
* ``[group0, group1]``: the groups of a grouped build, ``main_g0``, ... (no task in two groups).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import tvm
from tvm import relax

from ..errors import BuildError
from ..frontend import MultiModel, TaskInfo, TensorSpec, bind_weights

ModelLike: TypeAlias = MultiModel | tvm.IRModule
BuildInput: TypeAlias = ModelLike | Mapping[int, ModelLike] | Sequence[MultiModel]


@dataclass
class Entry:
    """One entry point to compile: its function name, weights-bound module and signature."""

    function: str
    mod: tvm.IRModule
    inputs: list[TensorSpec]
    tasks: list[TaskInfo]
    batch: int | None = None
    params: Mapping[str, tvm.runtime.Tensor] = field(default_factory=dict)  # names for lifted weights


def entry_json(entry: Entry, weights: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "function": entry.function,
        "inputs": [s.to_json() for s in entry.inputs],
        "tasks": [t.name for t in entry.tasks],
        "outputs": [o.to_json() for t in entry.tasks for o in t.outputs],
        "weights": weights,
    }
    if entry.batch is not None:
        out["batch"] = entry.batch
    return out


def _one_entry(model: Any, function: str, what: str) -> Entry:
    if isinstance(model, MultiModel):
        return Entry(function, model.bound_module(), list(model.inputs), list(model.tasks), params=model.params)
    if isinstance(model, tvm.IRModule):
        if "main" not in [gv.name_hint for gv in model.get_global_vars()]:
            raise BuildError(f"the IRModule to build{what} has no 'main' function")
        mod = bind_weights(model)
        inputs, tasks = _signature_specs(mod)
        return Entry(function, mod, inputs, tasks)
    raise BuildError(f"build() takes a MultiModel or a tvm.IRModule{what}, not {type(model).__name__}")


def normalise_entries(model: Any) -> list[Entry]:
    if isinstance(model, (MultiModel, tvm.IRModule)):
        return [_one_entry(model, "main", "")]
    if isinstance(model, Mapping):
        if not model or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in model):
            raise BuildError("batch buckets must map batch sizes (integers >= 1) to models, e.g. {1: mm1, 8: mm8}")
        entries = []
        for batch in sorted(model):
            entry = _one_entry(model[batch], f"main_b{batch}", f" (batch bucket {batch})")
            entry.batch = batch
            entries.append(entry)
        _check_buckets(entries)
        return entries
    if isinstance(model, Sequence) and not isinstance(model, (str, bytes)):
        if not model:
            raise BuildError("build() was given an empty list of groups")
        entries = [_one_entry(m, f"main_g{i}", f" (group {i})") for i, m in enumerate(model)]
        seen: dict[str, int] = {}
        for i, entry in enumerate(entries):
            for task in entry.tasks:
                if task.name in seen:
                    raise BuildError(f"task {task.name!r} is in group {seen[task.name]} and group {i}; "
                                     "groups must not share tasks")
                seen[task.name] = i
        return entries
    raise BuildError(f"build() takes a MultiModel or a tvm.IRModule, not {type(model).__name__}")


def _check_buckets(entries: list[Entry]) -> None:
    """Every bucket: the same inputs and tasks, every input and output batched along axis 0."""
    first = entries[0]

    def unbatched(specs):
        return [(s.name, s.dtype, s.shape[1:]) for s in specs]

    for entry in entries:
        for spec in [*entry.inputs, *(o for t in entry.tasks for o in t.outputs)]:
            if not spec.shape or spec.shape[0] != entry.batch:
                raise BuildError(f"batch bucket {entry.batch}: {spec.name} has shape {list(spec.shape)}; every input "
                                 f"and output of a bucket must have the batch size {entry.batch} as its first dimension")
        if unbatched(entry.inputs) != unbatched(first.inputs):
            raise BuildError(f"batch bucket {entry.batch} has other inputs than bucket {first.batch}: "
                             f"{[s.describe() for s in entry.inputs]} vs {[s.describe() for s in first.inputs]}")
        outs = [(t.name, unbatched(t.outputs)) for t in entry.tasks]
        if outs != [(t.name, unbatched(t.outputs)) for t in first.tasks]:
            raise BuildError(f"batch bucket {entry.batch} has other tasks or outputs than bucket {first.batch}")


def artifact_signature(entries: list[Entry]) -> tuple[list[TensorSpec], list[TaskInfo]]:
    """The artifact's inputs and tasks: a bucket's (the smallest), or the union over groups."""
    if len(entries) == 1 or entries[0].batch is not None:
        return list(entries[0].inputs), list(entries[0].tasks)
    inputs: dict[str, TensorSpec] = {}
    for i, entry in enumerate(entries):
        for spec in entry.inputs:
            if spec.name in inputs and inputs[spec.name] != spec:
                raise BuildError(f"group {i} reads input {spec.describe()}, another group "
                                 f"{inputs[spec.name].describe()}; groups must agree on shared inputs")
            inputs.setdefault(spec.name, spec)
    return list(inputs.values()), [t for e in entries for t in e.tasks]


def _signature_specs(mod: tvm.IRModule) -> tuple[list[TensorSpec], list[TaskInfo]]:
    """Inputs from ``main``'s parameters; one task ``out<i>`` per output of a bare IRModule."""
    func = mod["main"]
    inputs = []
    for param in func.params:
        inputs.append(_spec(param.name, param.ty, f"input {param.name!r}"))
    ret = func.ret_ty
    leaves = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    digest = hashlib.sha256(str(_module_hash(mod)).encode()).hexdigest()
    tasks = []
    for i, ty in enumerate(leaves):
        out = _spec(f"out{i}", ty, f"output {i}")
        tasks.append(TaskInfo(f"out{i}", tuple(inputs), (out,), "relax", digest))
    return inputs, tasks


def _module_hash(mod: tvm.IRModule) -> int:
    import tvm_ffi

    return tvm_ffi.structural_hash(mod)


def _spec(name: str, ty: Any, what: str) -> TensorSpec:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise BuildError(f"main's {what} is not a tensor of static shape ({ty}); build needs static shapes")
    try:
        shape = tuple(int(d) for d in ty.shape.values)
    except (TypeError, AttributeError) as err:
        raise BuildError(f"main's {what} has a symbolic shape {ty.shape}; build needs static shapes") from err
    dtype = ty.dtype
    return TensorSpec(name, shape, str(getattr(dtype, "dtype", dtype)))
