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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, overload

import tvm

from .errors import FusionError
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
