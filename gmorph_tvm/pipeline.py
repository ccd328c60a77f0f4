"""The one place that decides the order of gmorph-tvm's passes (like TVM's ``relax/pipeline.py``).

Lossless fusion of a :class:`~gmorph_tvm.frontend.MultiModel`:

1. ``CanonicalizeOps``      spell every op one way (frontends differ), fold batch norm into convs;
2. ``StitchSharedWeights``  identical weights stored once, identical ops on them computed once;
3. ``HorizontalMerge``      compatible ops with different weights run as one wide / grouped op.

With many models, :func:`fuse_grouped` first partitions the tasks (``group_tasks``: tasks that
share weights stay together, groups bounded in size / FLOPs / weight bytes, or chosen by
measurement, with :mod:`gmorph_tvm.grouping`) and fuses each group on its own, one module per group.

Every step keeps the outputs equal to the separate models' (float32 rounding). Lowering to a
target (legalisation, tuning database, weight pre-packing, codegen) happens in
:mod:`gmorph_tvm.tuning` and :mod:`gmorph_tvm.artifact`, after this.

Importing this module also registers the fusion with TVM's pipeline registry as ``"gmorph"``
(:data:`TVM_PIPELINE`), as MLC-LLM registers ``"mlc_llm"``: ``tvm.compile(mod, target,
relax_pipeline="gmorph")`` runs :func:`lossless_passes` and then TVM's default build for the
target, with no gmorph-tvm call in between (:func:`gmorph_relax_pipeline`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, overload

import tvm
from tvm import relax

from .errors import FusionError
from .frontend.importer import import_models
from .frontend.multimodel import MultiModel
from .passes import CanonicalizeOps, HorizontalMerge, StitchSharedWeights
from .passes.group_models import group_tasks, split_into_groups

MergeMode = Literal["auto", "always", "never"]


def lossless_passes(*, stitch: bool = True, merge: MergeMode = "auto", target=None) -> tvm.transform.Pass:
    """The lossless fusion passes as one ``tvm.transform.Sequential`` (usable on any IRModule)."""
    passes: list[tvm.transform.Pass] = [CanonicalizeOps()]
    if stitch:
        passes.append(StitchSharedWeights())
    if merge != "never":
        passes.append(HorizontalMerge(mode=merge, target=target))
    return tvm.transform.Sequential(passes, name="GmorphLosslessFusion")


@overload
def fuse_lossless(model: MultiModel, *, stitch: bool = ..., merge: MergeMode = ..., target=...) -> MultiModel: ...
@overload
def fuse_lossless(model: tvm.IRModule, *, stitch: bool = ..., merge: MergeMode = ..., target=...) -> tvm.IRModule: ...


def fuse_lossless(model, *, stitch: bool = True, merge: MergeMode = "auto", target=None):
    """``model`` fused by :func:`lossless_passes` (public as :func:`gmorph_tvm.fuse`).

    A :class:`MultiModel` (what :func:`gmorph_tvm.import_models` returns) comes back as a MultiModel
    whose every surviving (shared or merged) weight still lists the original (task, parameter)
    pairs it stands for; a plain IRModule (e.g. from TVM's own ``from_onnx``) comes back as an
    IRModule. ``merge``: ``"auto"`` (cost rule), ``"always"`` or ``"never"``; ``target`` informs the
    cost rule.
    """
    passes = lossless_passes(stitch=stitch, merge=merge, target=target)
    if isinstance(model, MultiModel):
        return model.apply(passes)
    if isinstance(model, tvm.IRModule):
        return passes(model)
    raise FusionError(f"fuse() takes a MultiModel or a tvm.IRModule, not {type(model).__name__}")


def fuse_grouped(
    mm: MultiModel,
    *,
    max_group_size: int | None = None,
    groups: list[list[str]] | None = None,
    latency: Callable[[MultiModel], float] | None = None,
    merge: MergeMode = "auto",
    target=None,
) -> list[MultiModel]:
    """Partition ``mm``'s tasks into groups and fuse each group losslessly on its own.

    ``groups`` overrides the rule; ``latency`` (e.g. :func:`gmorph_tvm.grouping.measured_latency`)
    times candidate group sizes instead.
    """
    chosen = group_tasks(mm, max_group_size, groups=groups, latency=latency)
    return [fuse_lossless(part, merge=merge, target=target) for part in split_into_groups(mm, chosen)]


fuse = fuse_lossless


def fuse_separately(models: Mapping[str, Any], example_inputs=None, **import_options) -> dict[str, MultiModel]:
    """Each model imported on its own and fused as ``gmorph-tvm build`` fuses a single model (ops
    canonical, batch norm folded into convs; nothing shared between models): the models compiled
    separately, the baseline fusion is measured against. ``import_options`` go to ``import_models``."""
    return {task: fuse_lossless(import_models({task: model}, example_inputs, **import_options))
            for task, model in models.items()}


# ---- the same fusion as a TVM relax pipeline ------------------------------------------------------

TVM_PIPELINE = "gmorph"


def gmorph_relax_pipeline(*, stitch: bool = True, merge: MergeMode = "auto") -> tvm.transform.Pass:
    """The lossless fusion, then TVM's default build for the current target, as one pass.

    Registered with TVM as ``relax_pipeline="gmorph"`` (``relax.get_pipeline("gmorph", ...)`` takes
    the same keywords). ``tvm.compile`` runs it inside ``with target:``; the target informs
    HorizontalMerge's cost rule and picks TVM's build: what ``relax_pipeline="default"`` would run
    (the target's own pipeline on GPUs, ``default_build`` otherwise), so compiling a module with
    ``"gmorph"`` differs from the default only by the fusion.
    """

    @tvm.transform.module_pass(opt_level=0, name="GmorphRelaxPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        target = tvm.target.Target.current(allow_none=True)
        fused = lossless_passes(stitch=stitch, merge=merge, target=target)(mod)
        return _default_build(target)(fused)

    return _pipeline


def _default_build(target: tvm.target.Target | None) -> tvm.transform.Pass:
    """The relax pipeline ``tvm.compile(..., relax_pipeline="default")`` picks for ``target``."""
    if target is not None and "gpu" in target.keys:
        try:
            return relax.get_default_pipeline(target)
        except (ValueError, AttributeError):
            pass  # a GPU kind without a pipeline of its own: the generic build, as tvm.compile does
    return relax.get_pipeline("default")


if TVM_PIPELINE not in relax.pipeline.PIPELINE_MAP:  # once per process (re-imports keep the first)
    relax.pipeline.register_pipeline(TVM_PIPELINE)(gmorph_relax_pipeline)
