"""Weight parameters and their provenance: which original (task, parameter) each weight stands for.

A gmorph module's ``main`` is ``main(*inputs, *weights)`` with attrs ``num_input`` (number of real
inputs) and ``params`` (weight values in parameter order), as TVM's frontends produce with
``keep_params_as_input``. Attrs ``gmorph.provenance`` (:data:`PROVENANCE_ATTR`) map each weight
parameter name to the original weights it stands for, each spelled ``"task/orig"`` (task names never
contain ``/``; the original name may). After stitching one weight stands for several originals (one
per task); after folding batch norm into a conv it stands for the conv weight and the batch-norm
tensors it was computed from. A module without the attr gets a default provenance from the weight
names ``"<task>.<orig>"`` written by :func:`gmorph_tvm.import_models`.

This is the one home of the format: the importer writes it, passes keep it current,
:class:`~gmorph_tvm.MultiModel` reads it back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import tvm
from tvm import relax

PROVENANCE_ATTR = "gmorph.provenance"

Provenance = dict[str, list[tuple[str, str]]]


def num_inputs(func: relax.Function) -> int:
    """Number of real (non-weight) parameters: attrs ``num_input``, or all params without it."""
    attrs = func.attrs or {}
    if "num_input" in attrs:
        return int(attrs["num_input"])
    return len(func.params)


def weight_params(func: relax.Function) -> list[tuple[relax.Var, tvm.runtime.Tensor]]:
    """``(param, value)`` for every weight parameter whose value is in attrs ``params``."""
    attrs = func.attrs or {}
    if "params" not in attrs:
        return []
    return list(zip(list(func.params)[num_inputs(func):], list(attrs["params"])))


def params_of(mod: tvm.IRModule, func_name: str = "main") -> dict[str, tvm.runtime.Tensor]:
    """Weight name -> value for the weight parameters of ``func_name`` (attrs ``params``)."""
    func = mod[func_name]
    attrs = func.attrs or {}
    if "num_input" not in attrs or "params" not in attrs:
        return {}
    num_input = int(attrs["num_input"])
    return {p.name: v for p, v in zip(list(func.params)[num_input:], attrs["params"])}


def read_provenance_attr(mod: tvm.IRModule, func_name: str = "main") -> Provenance:
    """Provenance recorded by the passes in attrs ``gmorph.provenance`` ("task/orig" strings)."""
    attrs = mod[func_name].attrs or {}
    if PROVENANCE_ATTR not in attrs:
        return {}
    return {
        str(name): [tuple(str(e).split("/", 1)) for e in entries]  # type: ignore[misc]
        for name, entries in attrs[PROVENANCE_ATTR].items()
    }


def encode_provenance(prov: Mapping[str, Sequence[tuple[str, str]]]) -> dict[str, list[str]]:
    return {name: [f"{task}/{orig}" for task, orig in entries] for name, entries in prov.items()}


def default_provenance(names: Iterable[str]) -> dict[str, list[str]]:
    """Provenance implied by weight names ``"<task>.<orig>"`` (a name without a dot: ``"/name"``)."""
    out = {}
    for name in names:
        task, dot, orig = name.partition(".")
        out[name] = [f"{task}/{orig}"] if dot else [f"/{name}"]
    return out


def raw_provenance(func: relax.Function) -> dict[str, list[str]]:
    """Weight name -> ``["task/orig", ...]`` from attrs, defaulted from names for missing weights."""
    names = [var.name for var, _ in weight_params(func)]
    prov = default_provenance(names)
    attrs = func.attrs or {}
    if PROVENANCE_ATTR in attrs:
        for name, entries in attrs[PROVENANCE_ATTR].items():
            if str(name) in prov:
                prov[str(name)] = [str(e) for e in entries]
    return prov


def provenance_of(mod: tvm.IRModule | relax.Function, func_name: str = "main") -> Provenance:
    """Weight name -> ``[(task, original name), ...]`` for the weight parameters of ``func_name``.

    This is the parsed form of attrs ``gmorph.provenance`` (the format of
    :attr:`gmorph_tvm.MultiModel.provenance`).
    """
    func = mod[func_name] if isinstance(mod, tvm.IRModule) else mod
    return {name: [_split_entry(e) for e in entries] for name, entries in raw_provenance(func).items()}


def _split_entry(entry: str) -> tuple[str, str]:
    task, _, orig = entry.partition("/")
    return task, orig


def with_provenance(mod: tvm.IRModule, prov: Mapping[str, Sequence[tuple[str, str]]], func_name: str = "main") -> tvm.IRModule:
    """A copy of ``mod`` whose ``func_name`` carries ``prov`` as attrs ``gmorph.provenance``."""
    out = mod.clone()
    out[func_name] = mod[func_name].with_attr(PROVENANCE_ATTR, encode_provenance(prov))
    return out


def merge_entries(*lists: Iterable[str]) -> list[str]:
    """Concatenate provenance entry lists, keeping the first occurrence of each."""
    seen, out = set(), []
    for entries in lists:
        for entry in entries:
            if entry not in seen:
                seen.add(entry)
                out.append(entry)
    return out
