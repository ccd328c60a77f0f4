"""StitchSharedWeights: compute once what several models compute identically (the MTS idea).

Multi-task deployments are often several models fine-tuned from one backbone with the early
layers frozen, so those layers' weights are bit-identical across models. In a merged module
(:func:`gmorph_tvm.import_models`) this pass rewrites every Relax function in three steps:

1. **Weight parameters** (``main(*inputs, *weights)``, values in attrs ``params``) with identical
   content — dtype, shape, ``structural_hash``, then bit-exact bytes — are replaced by the first
   one and dropped from the signature and from attrs ``params``. Their provenance is merged into
   attrs ``gmorph.provenance`` (weight -> ``["task/orig", ...]``; see :mod:`._util`).
2. **Constants** (weights bound with ``BindParams``) with identical content become one constant
   object (or the weight parameter of equal content, when the function has one).
3. TVM's ``EliminateCommonSubexpr(call_only=False)`` then computes every op once whose op, attrs
   and operands are now identical; it runs in binding order, so this reaches through chains and
   DAGs (residual adds, concatenations, multi-output ops such as ``split``/``batch_norm`` and their
   ``TupleGetItem``\\ s), and unused bindings are removed.

Run :class:`CanonicalizeOps` first when the models came through different frontends, so that
ops spelled differently compare equal (``stitch`` below does both).

What is preserved: results are bit-identical to the unstitched module — only duplicate
computations of identical pure ops on identical operands are removed; nothing is approximated.
Ops are merged only when their weights are exactly equal (a hash match is always confirmed by a
byte compare), never for "same architecture, different weights", and never for equal weights
applied to different inputs.
"""

from __future__ import annotations

import tvm
from tvm import relax

from gmorph_tvm.frontend.multimodel import MultiModel
from gmorph_tvm.passes._util import (
    ContentTable,
    merge_entries,
    raw_provenance,
    rebuild_function,
    weight_params,
)
from gmorph_tvm.passes.canonicalize_ops import CanonicalizeOps


@tvm.transform.module_pass(opt_level=0, name="StitchSharedWeights")
class StitchSharedWeights:
    """Share identical weights (parameters and constants) and compute identical ops once."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        out = mod.clone()
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                out[gvar] = _dedup_constants(_dedup_weight_params(func))
        out = relax.transform.EliminateCommonSubexpr(call_only=False)(out)
        for gvar, func in out.functions_items():
            if isinstance(func, relax.Function):
                out[gvar] = relax.analysis.remove_all_unused(func)
        return out


def _dedup_weight_params(func: relax.Function) -> relax.Function:
    """Replace each weight parameter by the first one of identical content."""
    weights = weight_params(func)
    if not weights:
        return func
    provenance = raw_provenance(func)
    table = ContentTable()
    replace: dict[relax.Var, relax.Var] = {}
    kept = []
    for var, value in weights:
        first = table.add(value, var)
        if first is var:
            kept.append((var, value))
        else:
            replace[var] = first
            provenance[first.name] = merge_entries(provenance[first.name], provenance.pop(var.name, []))
    if not replace:
        return func
    return rebuild_function(func, func.bind_params(replace).body, kept, provenance)


@relax.expr_functor.mutator
class _ConstantDeduplicator(relax.PyExprMutator):
    """Maps each tensor constant to the first constant (or weight parameter) of equal content."""

    def __init__(self, table: ContentTable) -> None:
        super().__init__()
        self.table = table

    def visit_generic_const_(self, const: tvm.ir.GenericConst) -> relax.Expr:
        if not isinstance(const.value, tvm.runtime.Tensor):
            return const
        return self.table.add(const.value, const)


def _dedup_constants(func: relax.Function) -> relax.Function:
    table = ContentTable()
    for var, value in weight_params(func):  # a constant equal to a weight param becomes the param
        table.add(value, var)
    rewritten = _ConstantDeduplicator(table).visit_expr(func)
    return rewritten if isinstance(rewritten, relax.Function) else func


# ---- MultiModel convenience ---------------------------------------------------------------------


def stitch(mm: MultiModel, canonicalize: bool = True) -> MultiModel:
    """``mm`` with shared weights stitched: ``CanonicalizeOps`` (optional) then ``StitchSharedWeights``.

    The result's ``provenance`` lists, for each surviving weight, every original weight
    (task, name) it stands for (see :meth:`MultiModel.apply`).
    """
    passes = ([CanonicalizeOps()] if canonicalize else []) + [StitchSharedWeights()]
    return mm.apply(tvm.transform.Sequential(passes))


__all__ = ["StitchSharedWeights", "stitch"]
