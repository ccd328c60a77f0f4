"""`MultiModel`: several task models held in one Relax IRModule.

The module's ``main`` takes the distinct model inputs first, then every weight as a function
parameter (attrs ``num_input`` = number of real inputs, ``params`` = the weight values in parameter
order, as TVM's own frontends do with ``keep_params_as_input``). Keeping weights as parameters —
rather than anonymous constants — is what lets passes see which model a weight came from and
compare weights by content; ``bound_module()`` turns them into constants for compilation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from ..core.ir import tensor_nbytes
from ..core.provenance import PROVENANCE_ATTR, Provenance, encode_provenance, params_of, read_provenance_attr
from ..core.specs import TaskInfo, TensorSpec, check_inputs


@dataclass
class MultiModel:
    """Every task's model in one IRModule, with its weights, inputs and per-task metadata."""

    mod: tvm.IRModule
    params: dict[str, tvm.runtime.Tensor]
    inputs: list[TensorSpec]
    tasks: list[TaskInfo]
    provenance: Provenance = field(default_factory=dict)

    # ---- queries -------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskInfo:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task named {name!r}; tasks are {', '.join(self.task_names)}")

    def output_index(self, task: str) -> list[int]:
        """Positions of ``task``'s outputs in the flat output tuple of ``main``."""
        start = 0
        for t in self.tasks:
            if t.name == task:
                return list(range(start, start + len(t.outputs)))
            start += len(t.outputs)
        raise KeyError(f"no task named {task!r}; tasks are {', '.join(self.task_names)}")

    @property
    def weight_bytes(self) -> int:
        return sum(tensor_nbytes(t) for t in self.params.values())

    def weight_tasks(self, weight: str) -> list[str]:
        """Tasks that use weight ``weight`` (several after stitching)."""
        return sorted({task for task, _ in self.provenance.get(weight, [])})

    # ---- transformations -------------------------------------------------------------------
    def with_module(
        self,
        mod: tvm.IRModule,
        params: Mapping[str, tvm.runtime.Tensor] | None = None,
        provenance: Provenance | None = None,
    ) -> MultiModel:
        """A copy holding ``mod``; params/provenance default to those of ``mod``'s ``main``."""
        if params is None:
            params = params_of(mod)
        if provenance is None:
            provenance = read_provenance_attr(mod) or {name: list(self.provenance.get(name, [])) for name in params}
        return MultiModel(mod, dict(params), list(self.inputs), list(self.tasks), dict(provenance))

    def apply(self, transform: tvm.transform.Pass) -> MultiModel:
        """``transform`` run on the module, with weight provenance carried through the passes.

        Provenance travels as attrs ``gmorph.provenance`` on ``main`` (passes that share, fold or
        merge weights keep it current) and is read back into the result's ``provenance``.
        """
        mod = self.mod.clone()
        main = mod["main"]
        names = set(params_of(mod))
        prov = {n: e for n, e in self.provenance.items() if n in names}
        if prov:
            mod["main"] = main.with_attr(PROVENANCE_ATTR, encode_provenance(prov))
        return self.with_module(transform(mod))

    def bound_module(self) -> tvm.IRModule:
        """The module to compile: weights bound as constants, ``main(*inputs)`` only."""
        return bind_weights(self.mod)

    def input_arrays(self, values: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """Check inputs against the specs (name, shape, dtype) and return them in ``main`` order."""
        return check_inputs(self.inputs, values)


def bind_weights(mod: tvm.IRModule, func_name: str = "main") -> tvm.IRModule:
    """Bind the weight parameters of ``func_name`` as constants (drops attrs ``params``)."""
    func = mod[func_name]
    attrs = func.attrs or {}
    if "params" not in attrs:
        return mod
    num_input = int(attrs["num_input"])
    binding = {p: relax.const(v) for p, v in zip(list(func.params)[num_input:], attrs["params"])}
    bound = func.bind_params(binding).without_attr("params")
    if PROVENANCE_ATTR in attrs:
        bound = bound.without_attr(PROVENANCE_ATTR)
    out = mod.clone()
    out[func_name] = bound
    return relax.transform.FoldConstant()(out)


def with_weight_params(
    func: relax.Function, num_input: int, weights: Iterable[tvm.runtime.Tensor]
) -> relax.Function:
    """Re-attach ``num_input``/``params`` attrs to a function whose tail params are weights."""
    return func.with_attr("num_input", num_input).with_attr("params", list(weights))
