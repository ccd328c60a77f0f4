"""Lossless fusion verbs and the ``"gmorph"`` relax pipeline, both made of the ONE pipeline object.

Every pass order lives in :class:`gmorph_tvm.tuning.pipeline.Pipeline` (phases import_cleanup,
lossless_fusion, target_lowering, apply_tuning, weights_and_signature, finalize); this module
runs its first two phases on a :class:`~gmorph_tvm.frontend.MultiModel` (keeping the provenance of
every shared or merged weight) and registers the whole object with TVM:

1. ``CanonicalizeOps``      spell every op one way (frontends differ), fold batch norm into convs;
2. ``StitchSharedWeights``  identical weights stored once, identical ops on them computed once;
3. ``HorizontalMerge``      compatible ops with different weights run as one wide / grouped op.

With many models, :func:`fuse_grouped` first partitions the tasks (``group_tasks``: tasks that
share weights stay together, groups bounded in size / FLOPs / weight bytes, or chosen by
measurement, with :mod:`gmorph_tvm.grouping`) and fuses each group on its own, one module per group.

Every step keeps the outputs equal to the separate models' (float32 rounding).

Importing this module registers the pipeline with TVM's registry as ``"gmorph"``
(:data:`TVM_PIPELINE`), as MLC-LLM registers ``"mlc_llm"``: ``tvm.compile(mod, target,
relax_pipeline="gmorph")`` runs every phase, fusion included, with the lowering, NaN semantics,
kernel layouts and verified tuning records of :func:`gmorph_tvm.build` (weights stay embedded).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, overload

import tvm
from tvm import relax

from .errors import FusionError
from .frontend.importer import import_models
from .frontend.multimodel import MultiModel
from .passes.group_models import group_tasks, split_into_groups
from .passes.horizontal_merge.transform import MergeMode
from .tuning.pipeline import Pipeline


def lossless_passes(*, stitch: bool = True, merge: MergeMode = "auto", target=None) -> tvm.transform.Pass:
    """The pipeline's import_cleanup and lossless_fusion phases as one ``tvm.transform.Sequential``
    (usable on any IRModule)."""
    pipe = Pipeline(target, fuse=True, stitch=stitch, merge=merge)
    passes = [p for phase in ("import_cleanup", "lossless_fusion") for p in pipe.phase_passes(phase, target)]
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


# ---- the whole pipeline as a TVM relax pipeline -------------------------------------------------

TVM_PIPELINE = "gmorph"


def gmorph_relax_pipeline(
    *,
    stitch: bool = True,
    merge: MergeMode = "auto",
    fuse: bool = True,
    channels_last: bool | None = None,
    tuning_db: str | os.PathLike | None = None,
    shipped_records: bool = True,
    dump_ir: str | os.PathLike | None = None,
    transfer_records: bool = False,
) -> tvm.transform.Pass:
    """The :class:`Pipeline` as one pass, registered with TVM as ``relax_pipeline="gmorph"``
    (``relax.get_pipeline("gmorph", ...)`` takes the same keywords). ``tvm.compile`` runs it inside
    ``with target:``: fusion, then the lowering, tuning records and finalisation ``gmorph_tvm.build``
    runs, so both compile paths give the same kernels and the same outputs (NaN included)."""
    return Pipeline(None, fuse=fuse, stitch=stitch, merge=merge, channels_last=channels_last, tuning_db=tuning_db,
                    shipped_records=shipped_records, dump_ir=dump_ir, transfer=transfer_records).as_pass()


if TVM_PIPELINE not in relax.pipeline.PIPELINE_MAP:  # once per process (re-imports keep the first)
    relax.pipeline.register_pipeline(TVM_PIPELINE)(gmorph_relax_pipeline)
