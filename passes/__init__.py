"""Relax passes of gmorph-tvm: each a ``tvm.transform.Pass`` usable in any ``tvm.transform.Sequential``."""

from gmorph_tvm.passes.canonicalize_ops import CanonicalizeOps
from gmorph_tvm.passes.channels_last import ChannelsLast, ChannelsLastWarning
from gmorph_tvm.passes.conv2d_to_gemm import Conv2dToGemm
from gmorph_tvm.passes.fold_pad_into_conv import FoldPadIntoConv
from gmorph_tvm.passes.stitch_shared_weights import StitchSharedWeights, stitch

__all__ = ["CanonicalizeOps", "ChannelsLast", "ChannelsLastWarning", "Conv2dToGemm", "FoldPadIntoConv", "StitchSharedWeights", "stitch"]

from gmorph_tvm.passes.attach_signature import AttachSignature  # noqa: E402
from gmorph_tvm.passes.cost_model import MergeCost, MergeCostModel, MergeOptionError  # noqa: E402
from gmorph_tvm.passes.group_models import GroupingError, TaskCost, group_tasks, split_into_groups, task_costs  # noqa: E402
from gmorph_tvm.passes.horizontal_merge import HorizontalMerge, RegionReport, horizontal_merge  # noqa: E402
from gmorph_tvm.passes.index_bounds import index_bounds  # noqa: E402
from gmorph_tvm.passes.legalize_fast_math import LegalizeFastMath  # noqa: E402
from gmorph_tvm.passes.legalize_nan_safe import LegalizeNaNSafe  # noqa: E402
from gmorph_tvm.passes.lift_weights import LiftWeights, content_names  # noqa: E402
from gmorph_tvm.passes.recompose_ops import RecomposeOps  # noqa: E402

__all__ += [
    "MergeCost", "MergeCostModel", "MergeOptionError", "HorizontalMerge", "RegionReport", "horizontal_merge",
    "GroupingError", "TaskCost", "group_tasks", "split_into_groups", "task_costs", "index_bounds",
    "LegalizeFastMath", "LegalizeNaNSafe", "RecomposeOps", "LiftWeights", "content_names", "AttachSignature",
]
