"""The HorizontalMerge pass, and the functions that run it and report on it (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import tvm
from tvm import relax

from gmorph_tvm.frontend.multimodel import MultiModel
from gmorph_tvm.passes.cost_model import MergeCostModel, MergeOptionError
from gmorph_tvm.passes.horizontal_merge.rewrite import merge_function
from gmorph_tvm.passes.horizontal_merge.schedule import RegionReport

# The merge modes, defined here only: the pipeline, the CLI and the benchmark recipe import them.
MergeMode = Literal["auto", "always", "never"]
MERGE_MODES: tuple[MergeMode, ...] = ("auto", "always", "never")


@dataclass(frozen=True)
class MergeResult:
    """The merged module and one :class:`RegionReport` per region considered (in block order)."""

    mod: tvm.IRModule
    regions: list[RegionReport]


def merge_module(
    mod: tvm.IRModule,
    mode: MergeMode = "auto",
    cost_model: MergeCostModel | None = None,
    target=None,
    min_branches: int = 2,
) -> MergeResult:
    """What :class:`HorizontalMerge` does to ``mod``: the merged module and the region reports.

    Every Relax function of ``mod`` is rewritten except primitive ones; ``mod`` is not changed.
    """
    mode, cost_model, min_branches = _options(mode, cost_model, target, min_branches)
    if mode == "never":
        return MergeResult(mod, [])
    out = mod.clone()
    reports: list[RegionReport] = []
    for gvar, func in mod.functions_items():
        if not isinstance(func, relax.Function) or (func.attrs and "Primitive" in func.attrs):
            continue
        new_func, report = merge_function(func, mode, cost_model, min_branches)
        reports.extend(report)
        if new_func is not func:
            out[gvar] = new_func
    return MergeResult(out, reports)


def merge_report(
    model: tvm.IRModule | MultiModel,
    mode: MergeMode = "auto",
    cost_model: MergeCostModel | None = None,
    target=None,
    min_branches: int = 2,
) -> list[RegionReport]:
    """One :class:`RegionReport` per region :class:`HorizontalMerge` (same options) considers in
    ``model`` (an IRModule or a :class:`~gmorph_tvm.MultiModel`): its branches and ops, the cost
    rule's numbers, and whether it is merged. Empty for ``mode="never"``."""
    mod = model.mod if isinstance(model, MultiModel) else model
    return merge_module(mod, mode, cost_model, target, min_branches).regions


@tvm.transform.module_pass(opt_level=0, name="HorizontalMerge")
class HorizontalMerge:
    """Merge same-shaped ops of different models into wide ops (see the package docstring).

    Parameters
    ----------
    mode:
        ``"auto"`` merges a region when ``cost_model`` says it pays, ``"always"`` merges every
        region found, ``"never"`` returns the module unchanged.
    cost_model:
        The launch-vs-copy rule; default :meth:`MergeCostModel.for_target` of ``target``.
    target:
        Target whose default cost numbers to use (``None``: CPU numbers).
    min_branches:
        Smallest number of branches worth a wide op (at least 2).

    The pass keeps no state; :func:`merge_report` tells what it does to a module, region by region.
    """

    def __init__(
        self,
        mode: MergeMode = "auto",
        cost_model: MergeCostModel | None = None,
        target=None,
        min_branches: int = 2,
    ) -> None:
        self.mode, self.cost_model, self.min_branches = _options(mode, cost_model, target, min_branches)

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return merge_module(mod, self.mode, self.cost_model, None, self.min_branches).mod


def horizontal_merge(
    model: MultiModel | tvm.IRModule, mode: MergeMode = "auto", cost_model: MergeCostModel | None = None, target=None
) -> MultiModel | tvm.IRModule:
    """``model`` with :class:`HorizontalMerge` applied: a :class:`~gmorph_tvm.MultiModel` comes back as
    one whose merged weights' provenance lists every original weight (task, name) they hold; an
    IRModule comes back as an IRModule."""
    if isinstance(model, MultiModel):
        return model.apply(HorizontalMerge(mode=mode, cost_model=cost_model, target=target))
    return merge_module(model, mode, cost_model, target).mod


def _options(mode, cost_model, target, min_branches) -> tuple[MergeMode, MergeCostModel, int]:
    if mode not in MERGE_MODES:
        raise MergeOptionError(f"HorizontalMerge: mode must be 'auto', 'always' or 'never', got {mode!r}")
    return cast(MergeMode, mode), cost_model or MergeCostModel.for_target(target), max(2, int(min_branches))
