"""The one place that decides the order of gmorph-tvm's passes (like TVM's ``relax/pipeline.py``).

Lossless fusion of a :class:`~gmorph_tvm.frontend.MultiModel`:

1. ``CanonicalizeOps``      spell every op one way (frontends differ), fold batch norm into convs;
2. ``StitchSharedWeights``  identical weights stored once, identical ops on them computed once;
3. ``HorizontalMerge``      compatible ops with different weights run as one wide / grouped op.

With many models, :func:`fuse_grouped` first partitions the tasks (``group_tasks``: tasks that
share weights stay together, groups bounded in size / FLOPs / weight bytes, or chosen by
measurement) and fuses each group on its own, one module per group.

Every step keeps the outputs equal to the separate models' (float32 rounding). Lowering to a
target (legalisation, tuning database, weight pre-packing, codegen) happens in
:mod:`gmorph_tvm.tuning` and :mod:`gmorph_tvm.build`, after this.
"""

from __future__ import annotations

from typing import Literal

import tvm

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


def fuse_lossless(mm: MultiModel, *, stitch: bool = True, merge: MergeMode = "auto", target=None) -> MultiModel:
    """``mm`` fused by :func:`lossless_passes`; every surviving (shared or merged) weight still
    lists the original (task, parameter) pairs it stands for."""
    return mm.apply(lossless_passes(stitch=stitch, merge=merge, target=target))


def fuse_grouped(
    mm: MultiModel,
    *,
    max_group_size: int | None = None,
    groups: list[list[str]] | None = None,
    measure: bool = False,
    merge: MergeMode = "auto",
    target=None,
) -> list[MultiModel]:
    """Partition ``mm``'s tasks into groups and fuse each group losslessly on its own.

    ``groups`` overrides the rule; ``measure=True`` times candidate group sizes on ``target``.
    """
    chosen = group_tasks(mm, max_group_size, groups=groups, measure=measure, target=target)
    return [fuse_lossless(part, merge=merge, target=target) for part in split_into_groups(mm, chosen)]
