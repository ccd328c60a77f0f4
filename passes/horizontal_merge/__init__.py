"""HorizontalMerge: run structurally equal ops of different models as one wide op (the NetFuse idea).

Several models merged into one ``main`` (:func:`gmorph_tvm.import_models`, usually after
:class:`StitchSharedWeights`) still run every model's layers as separate kernels, even where the
layers have the same shape and differ only in their weights. This pass rewrites each Relax
function so that such ops run once, on a *wide* tensor that holds every branch side by side
(concatenated along the channel / feature axis):

* **Same input** — convs (``groups=1``), matmuls with weights, or embedding lookups (``take``)
  that read the same value (the first layer of every model, heads after a stitched trunk) become
  one conv with the output channels concatenated / one matmul with the weight columns
  concatenated / one lookup in the column-concatenated tables; widths may differ per branch.
* **Lockstep** — N branches that read different values of the same shape and continue with the
  same ops: a conv becomes one grouped conv (``groups = N * groups``, weights stacked), a matmul on
  the feature axis becomes one batched matmul (the wide ``(..., N*F)`` tensor is reshaped —
  without a copy — to ``(..., N, 1, F)`` and multiplied with the stacked ``(N, F, O)`` weights).
  Where the branches read different values a ``concat`` builds the wide tensor once.
* The region then follows the branches through whole chains and DAGs, op by op, as long as every
  branch does the same thing: bias adds and other elementwise ops with per-branch weights (the
  weights are concatenated), ``batch_norm``, activations, pooling, reductions and reshapes that keep
  each branch's block contiguous, ``permute_dims``, residual adds and gates of two wide values,
  softmax on another axis, ``layer_norm`` (normalized per branch, the per-branch affine part as a
  wide multiply/add), and matmuls of two wide values batched along the branch axis (attention).
  Only where the branches end or diverge does one ``split`` hand each branch its part.

Not merged (left as they are, correctly): same-input grouped/depthwise convs, lockstep convs or
matmuls whose branches have different shapes, reshapes that interleave the branch axis with a
leading batch dimension (e.g. attention heads at batch > 1), ops whose branches differ.

Merged weights are computed at pass time, so no ``concat`` of weights runs at inference: with
weights as parameters (``main(*inputs, *weights)``, values in attrs ``params``) each merged weight
becomes a new parameter named ``merged.<w1>+<w2>...`` whose attrs ``gmorph.provenance`` entry lists
every original it holds (in concatenation order); parameters no longer used are dropped. With
weights bound as constants, the merged weight is a new constant.

Whether a region is merged is decided by :class:`~gmorph_tvm.passes.cost_model.MergeCostModel`
(``mode="auto"``): saved kernel launches against the bytes the added ``concat``/``split`` copy.
``mode="always"`` merges every region, ``mode="never"`` leaves the module unchanged.
:func:`merge_report` says, region by region, what the pass does to a module and why.

What is preserved: the function signature (except weight parameters, as above), its attrs, and
the results — every rewrite computes the same arithmetic per element (a grouped conv computes each
group exactly as the separate conv; concatenation only moves data), so outputs match the
unmerged module to float32 rounding of the compiled kernels' reduction order.

The package's parts, in the order they run on each dataflow block:

* :mod:`.analysis` — types, weight values at pass time, dependencies, operand categories;
* :mod:`.planner` — seeds (same-input / lockstep anchors) and region growth;
* :mod:`.base` / :mod:`.rules` — one rule per op family in a registry: ``match`` (can these N calls
  run as one wide op?) and ``fuse`` (emit it);
* :mod:`.schedule` — the cost decision per region (:class:`RegionReport`) and the emission order;
* :mod:`.rewrite` — the mutator that emits the merged block;
* :mod:`.transform` — the pass, :func:`merge_report` and :func:`horizontal_merge`.
"""

from gmorph_tvm.passes.horizontal_merge.base import MergeRule, register_rule, registered_rules, rules_for
from gmorph_tvm.passes.horizontal_merge.schedule import RegionReport
from gmorph_tvm.passes.horizontal_merge.transform import (
    HorizontalMerge,
    MergeMode,
    MergeResult,
    horizontal_merge,
    merge_module,
    merge_report,
)

__all__ = [
    "HorizontalMerge",
    "MergeMode",
    "MergeResult",
    "MergeRule",
    "RegionReport",
    "horizontal_merge",
    "merge_module",
    "merge_report",
    "register_rule",
    "registered_rules",
    "rules_for",
]
