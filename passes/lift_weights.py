"""``LiftWeights``: the tensor constants of a lowered function become its trailing parameters.

Run after lowering (the pipeline's apply-tuning phase, :mod:`gmorph_tvm.tuning.pipeline`), when every weight the kernels read is final:
folded batch norms, transposes and the tuned CPU layouts (``SplitLayoutRewritePreproc`` +
``FoldConstant``) are already evaluated into constants. Each non-scalar constant becomes one new
parameter after the existing ones (constants of equal dtype, shape and bytes become one), and
``num_input`` is set to the number of original parameters, TVM's ``keep_params_as_input``
convention. The values are returned, in parameter order, by :meth:`LiftWeights.lifted`.

Rewrites: ``GenericConst`` tensors of rank >= 1 in the named functions. Preserves: the kernels
(the same ``call_tir`` callees with the same arguments, now variables), results bit for bit,
scalar constants (kept embedded), every other function. A parameter is named after the first
kernel that reads it and its argument position (``fused_matmul_add1.arg1``), or with ``names``
after the weight whose bytes it carries unchanged (also when reshaped), ``<weight>.T`` for a
transposed matrix, ``<weight>.OHWI`` for a conv weight made channels-last (CPU lowering).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import tvm
from tvm import relax


class _Collector:
    """Non-scalar constants of a function in first-use order, keyed by content."""

    def __init__(self, names: Mapping[bytes, str]):
        self.names = names
        self.order: list[tuple[str, tvm.runtime.Tensor, np.ndarray]] = []
        self.index: dict[tuple, list[int]] = {}
        self.of_const: dict[int, int] = {}  # id(GenericConst handle) -> position in order
        self.used: set[str] = set()

    def add(self, const: tvm.ir.GenericConst, where: str) -> None:
        value = const.value
        if not isinstance(value, tvm.runtime.Tensor) or len(value.shape) == 0:
            return
        handle = const.__hash__()
        if handle in self.of_const:
            return
        array = value.numpy()
        digest = hashlib.blake2b(np.ascontiguousarray(array).data.cast("B"), digest_size=16).digest()
        key = (str(array.dtype), tuple(array.shape), digest)
        match = next((i for i in self.index.get(key, []) if np.array_equal(self.order[i][2], array)), None)
        if match is None:
            name = self.names.get(_content_key(array)) or where
            base, n = name, 1
            while name in self.used:
                name, n = f"{base}.{n}", n + 1
            self.used.add(name)
            match = len(self.order)
            self.index.setdefault(key, []).append(match)
            self.order.append((name, value, array))
        self.of_const[handle] = match


def _content_key(array: np.ndarray) -> bytes:
    """dtype and bytes, not shape: a reshaped weight (a bias as (1, C, 1, 1)) keeps its name."""
    data = np.ascontiguousarray(array).data.cast("B")
    return str(array.dtype).encode() + hashlib.blake2b(data, digest_size=16).digest()


def content_names(weights: Mapping[str, tvm.runtime.Tensor]) -> dict[bytes, str]:
    """A ``names`` table for :class:`LiftWeights`: content key -> weight name (``<name>.T`` for the
    transpose of a matrix, the form a linear layer's weight takes after lowering; ``<name>.OHWI``
    for an OIHW conv weight as the CPU lowering stores it)."""
    out: dict[bytes, str] = {}
    for name, value in weights.items():
        array = value.numpy()
        out.setdefault(_content_key(array), name)
        if array.ndim == 2:
            out.setdefault(_content_key(array.T), f"{name}.T")
        elif array.ndim == 4:
            out.setdefault(_content_key(array.transpose(0, 2, 3, 1)), f"{name}.OHWI")
    return out


@relax.expr_functor.mutator
class _Replace(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, collector: _Collector, params: Sequence[relax.Var]):
        super().__init__(mod)
        self.collector = collector
        self.params = params

    def visit_generic_const_(self, const):
        position = self.collector.of_const.get(const.__hash__())
        return const if position is None else self.params[position]


@tvm.transform.module_pass(opt_level=0, name="LiftWeights")
class LiftWeights:
    """Lift the weights of ``functions`` (default ``["main"]``) into trailing parameters."""

    def __init__(self, functions: Sequence[str] = ("main",), names: Mapping[bytes, str] | None = None):
        self.functions = list(functions)
        self.names = dict(names or {})
        self._lifted: dict[str, list[tuple[str, tvm.runtime.Tensor]]] = {}

    def lifted(self, function: str = "main") -> list[tuple[str, tvm.runtime.Tensor]]:
        """(parameter name, value) of every weight lifted out of ``function``, in parameter order."""
        return list(self._lifted.get(function, []))

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        out = mod.clone()
        for name in self.functions:
            func = mod[name]
            collector = _Collector(self.names)

            def visit(expr, collector=collector):
                if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name.startswith(
                        "relax.call_tir") and len(expr.args) > 1 and isinstance(expr.args[1], relax.Tuple):
                    kernel = expr.args[0].name_hint if isinstance(expr.args[0], tvm.ir.GlobalVar) else "kernel"
                    for i, arg in enumerate(expr.args[1].fields):
                        if isinstance(arg, tvm.ir.GenericConst):
                            collector.add(arg, f"{kernel}.arg{i}")

            def rest(expr, collector=collector):
                if isinstance(expr, tvm.ir.GenericConst):
                    collector.add(expr, "const")

            relax.analysis.post_order_visit(func.body, visit)  # kernel arguments first, named by kernel
            relax.analysis.post_order_visit(func.body, rest)
            params = [relax.Var(n, relax.TensorType(tuple(int(d) for d in v.shape), str(v.dtype)))
                      for n, v, _ in collector.order]
            body = _Replace(mod, collector, params).visit_expr(func.body)
            num_input = len(func.params)
            new = relax.Function(list(func.params) + params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
            out[name] = new.with_attr("num_input", num_input)
            self._lifted[name] = [(n, v) for n, v, _ in collector.order]
        return out
