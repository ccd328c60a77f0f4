"""Helpers shared by the Relax passes: weight parameters, weight content, provenance, counting.

A gmorph module's ``main`` is ``main(*inputs, *weights)`` with attrs ``num_input`` (number of real
inputs) and ``params`` (weight values in parameter order), as TVM's frontends produce with
``keep_params_as_input``. Passes that change the set of weights keep two more things in sync:

* attrs ``params`` — one value per weight parameter, in parameter order;
* attrs ``gmorph.provenance`` (:data:`PROVENANCE_ATTR`) — ``Map[str, Array[str]]`` from each weight
  parameter name to the original weights it stands for, each spelled ``"task/orig"`` (task names
  never contain ``/``; the original name may). After stitching one weight stands for several
  originals (one per task); after folding batch norm into a conv it stands for the conv weight and
  the batch-norm tensors it was computed from. A module without the attr gets a default provenance
  from the weight names ``"<task>.<orig>"`` written by :func:`gmorph_tvm.import_models`.

Weights are compared by content: ``(dtype, shape, structural_hash)`` first, then bit-exact bytes
(:func:`same_content`), so a hash collision can never merge different weights.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from gmorph_tvm.core.ir import op_name, tensor_nbytes  # noqa: F401  (tensor_nbytes re-exported)
from gmorph_tvm.core.provenance import (  # noqa: F401  (re-exported for the passes)
    PROVENANCE_ATTR,
    Provenance,
    default_provenance,
    encode_provenance,
    merge_entries,
    num_inputs,
    provenance_of,
    raw_provenance,
    weight_params,
    with_provenance,
)

# ---- weight parameters ------------------------------------------------------------------------


def rebuild_function(
    func: relax.Function,
    body: relax.Expr,
    weights: Sequence[tuple[relax.Var, tvm.runtime.Tensor]],
    provenance: Mapping[str, Sequence[str]] | None,
) -> relax.Function:
    """``func`` with ``body``, params = its inputs + ``weights``, attrs params/provenance updated.

    Only weights that ``body`` still uses are kept, so a pass may simply drop uses of a weight.
    """
    inputs = list(func.params)[: num_inputs(func)]
    used = _free_var_set(body)
    kept = [(var, value) for var, value in weights if var in used]
    attrs = dict(func.attrs) if func.attrs else {}
    new = relax.Function(inputs + [var for var, _ in kept], body, func.ret_ty, func.is_pure, func.attrs)
    if "params" in attrs or kept:
        new = new.with_attr("num_input", len(inputs)).with_attr("params", [value for _, value in kept])
    if provenance is not None:
        names = {var.name for var, _ in kept}
        new = new.with_attr(
            PROVENANCE_ATTR, {name: list(entries) for name, entries in provenance.items() if name in names}
        )
    return new


def _free_var_set(expr: relax.Expr) -> set:
    return set(relax.analysis.free_vars(expr))


# ---- weight content ---------------------------------------------------------------------------


def content_key(value: tvm.runtime.Tensor) -> tuple[str, tuple[int, ...], int]:
    """Cheap content key of a tensor: dtype, shape and TVM's structural hash of the data."""
    return (str(value.dtype), tuple(int(d) for d in value.shape), int(tvm_ffi.structural_hash(value)))


def same_content(a: tvm.runtime.Tensor, b: tvm.runtime.Tensor) -> bool:
    """Bit-exact equality of two tensors (dtype, shape and bytes; so -0.0 != 0.0, NaN == same NaN)."""
    if str(a.dtype) != str(b.dtype) or tuple(a.shape) != tuple(b.shape):
        return False
    return np.ascontiguousarray(a.numpy()).tobytes() == np.ascontiguousarray(b.numpy()).tobytes()


class ContentTable:
    """Finds the first-registered tensor with the same content: hash lookup, then exact compare."""

    def __init__(self) -> None:
        self._buckets: dict[tuple, list[tuple[tvm.runtime.Tensor, object]]] = {}

    def find(self, value: tvm.runtime.Tensor) -> Any | None:
        for other, owner in self._buckets.get(content_key(value), []):
            if same_content(other, value):
                return owner
        return None

    def add(self, value: tvm.runtime.Tensor, owner: Any) -> Any:
        """Register ``owner`` for ``value`` unless content-equal one exists; return the canonical owner."""
        found = self.find(value)
        if found is not None:
            return found
        self._buckets.setdefault(content_key(value), []).append((value, owner))
        return owner


# ---- counting -----------------------------------------------------------------------------------


def count_weights(mod: tvm.IRModule) -> tuple[int, int]:
    """(number, bytes) of the distinct weight tensors held by ``mod``.

    Counts the values of weight parameters (attrs ``params``) and every tensor constant in the
    Relax functions, merging tensors of equal content. Called on the module right before VM
    codegen, it gives the tensors of the executable's constant pool, which TVM's ExecBuilder also
    deduplicates by structural (content) equality.
    """
    table = ContentTable()
    count = nbytes = 0

    def add(value: tvm.runtime.Tensor) -> None:
        nonlocal count, nbytes
        marker = object()
        if table.add(value, marker) is marker:
            count += 1
            nbytes += tensor_nbytes(value)

    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for _, value in weight_params(func):
            add(value)
        for const in constants_of(func):
            add(const.value)
    return count, nbytes


def constants_of(expr: relax.Expr) -> list[tvm.ir.GenericConst]:
    """Every distinct tensor constant object in ``expr``, in post order."""
    found, seen = [], set()

    def visit(node):
        if isinstance(node, tvm.ir.GenericConst) and isinstance(node.value, tvm.runtime.Tensor):
            if node not in seen:
                seen.add(node)
                found.append(node)

    relax.analysis.post_order_visit(expr, visit)
    return found


def count_ops(mod: tvm.IRModule, func_name: str = "main") -> Counter:
    """Operator name (e.g. ``"relax.nn.conv2d"``) -> number of calls in ``func_name``."""
    counts: Counter = Counter()

    def visit(node):
        name = op_name(node)
        if name is not None:
            counts[name] += 1

    relax.analysis.post_order_visit(mod[func_name].body, visit)
    return counts


def weight_bytes(mod: tvm.IRModule, func_name: str = "main") -> int:
    """Bytes of the weight parameters of ``func_name`` (attrs ``params``), without merging."""
    return sum(tensor_nbytes(value) for _, value in weight_params(mod[func_name]))


def map_relax_functions(mod: tvm.IRModule, rewrite) -> tvm.IRModule:
    """``mod`` with ``rewrite(func)`` in place of each Relax function; ``mod`` itself when
    ``rewrite`` returned every function unchanged (the same object)."""
    changed = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            new = rewrite(func)
            if new is not func:
                changed[gvar] = new
    if not changed:
        return mod
    out = mod.clone()
    for gvar, func in changed.items():
        out[gvar] = func
    return out


def with_new_body(func: relax.Function, body: relax.Expr) -> relax.Function:
    """``func`` with a rewritten ``body``: bindings canonicalised, unused ones dropped, weight
    parameters and provenance kept as :func:`rebuild_function` keeps them."""
    scratch = relax.Function(list(func.params), body, func.ret_ty, func.is_pure, func.attrs)
    cleaned = relax.analysis.remove_all_unused(
        relax.transform.CanonicalizeBindings()(tvm.IRModule({"f": scratch}))["f"])
    weights = weight_params(func)
    if not weights:
        return cleaned
    provenance = raw_provenance(func) if func.attrs is not None and PROVENANCE_ATTR in func.attrs else None
    return rebuild_function(func, cleaned.body, weights, provenance)


def mutate_body(func: relax.Function, mutator) -> relax.Function:
    """``func`` with its body rewritten by ``mutator`` (a ``PyExprMutator`` that sets
    ``changed``), cleaned as :func:`with_new_body` does; ``func`` itself when nothing changed."""
    if not isinstance(func.body, relax.SeqExpr):
        return func
    body = mutator.visit_expr(func.body)
    return with_new_body(func, body) if mutator.changed else func
