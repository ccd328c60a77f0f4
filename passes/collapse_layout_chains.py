"""CollapseLayoutChains: chains of layout ops written as the one op they amount to.

TVM's PyTorch importer (``torch.export``) and its ONNX importer write the same attention block
with different layout glue: torch decomposes a 4-D ``matmul`` into ``broadcast_to`` + ``reshape``
to 3-D + a batched 3-D ``matmul`` + ``reshape`` back, splits heads with two ``reshape`` s in a
row and transposes keys with two ``permute_dims`` in a row; the ONNX exporters write one 4-D
``MatMul``, one ``Reshape`` and one ``Transpose``. The glue costs memory-bound copy kernels of
its own (a fused kernel cannot start in the middle of it) and keeps the two routes' kernels
apart. This pass rewrites, wherever it appears, in one post-order walk:

=========================================================  ==================================
chain                                                      becomes
=========================================================  ==================================
``broadcast_to(x, shape)`` with ``shape`` = x's shape       ``x``
``reshape(reshape(x, s1), s2)``                             ``reshape(x, s2)``
``reshape(x, shape of x)``                                  ``x``
``permute_dims(permute_dims(x, p1), p2)``                   ``permute_dims(x, p1[p2])``
``permute_dims(x, identity)``                               ``x``
``reshape(matmul(reshape(a, [B, M, K]),``                   ``matmul(a, b)`` (4-D, or any
``reshape(b, [B, K, N])), batch + [M, N])`` where            rank, batch dims kept)
``a: batch + [M, K]``, ``b: batch + [K, N]``, B = prod(batch)
=========================================================  ==================================

Only static shapes are rewritten; a ``broadcast_to`` that really broadcasts, and a batched
matmul whose operands have different batch dims (one of them broadcast), are left as they are.

What is preserved: every value, bit for bit. The rewrites only drop copies (``reshape``,
``broadcast_to`` to the same shape, ``permute_dims`` compositions move the same elements to the
same places) and a batched matmul computes each batch's product with the same loop and the same
reduction order whether its batch dims are flattened or not. Intermediate values still used
elsewhere stay computed; bindings the rewrite leaves unused are removed. A function with
nothing to rewrite is returned as it is.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax

from gmorph_tvm.core.ir import op_name, static_shape
from gmorph_tvm.passes._util import (
    map_relax_functions,
    mutate_body,
)


@tvm.transform.module_pass(opt_level=0, name="CollapseLayoutChains")
class CollapseLayoutChains:
    """Collapse layout-op chains to the one op they amount to (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_relax_functions(mod, collapse_function)


def collapse_function(func: relax.Function) -> relax.Function:
    """``func`` with every layout chain collapsed (``func`` itself when there is none)."""
    return mutate_body(func, _Collapser())


@relax.expr_functor.mutator
class _Collapser(relax.PyExprMutator):
    def __init__(self) -> None:
        super().__init__()
        self.changed = False

    def _value(self, expr: relax.Expr) -> relax.Expr:
        """The value bound to ``expr``, through var-to-var bindings (a rewrite to a var leaves one)."""
        while isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is None:
                break
            expr = bound
        return expr

    def _producer(self, expr: relax.Expr, name: str) -> relax.Call | None:
        value = self._value(expr)
        return value if op_name(value) == name else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        name = op_name(call)
        new: relax.Expr | None = None
        if name == "relax.broadcast_to":
            new = self._identity(call)
        elif name == "relax.reshape":
            new = self._reshape(call)
        elif name == "relax.permute_dims":
            new = self._permute(call)
        if new is None:
            return call
        self.changed = True
        return new

    @staticmethod
    def _identity(call: relax.Call) -> relax.Expr | None:
        data = call.args[0]
        shape = static_shape(call.ty)
        if shape is not None and shape == static_shape(data.ty) and call.ty.dtype == data.ty.dtype:
            return data
        return None

    def _reshape(self, call: relax.Call) -> relax.Expr | None:
        out_shape = static_shape(call.ty)
        if out_shape is None:
            return None
        identity = self._identity(call)
        if identity is not None:
            return identity
        matmul = self._flat_matmul(call, out_shape)
        if matmul is not None:
            return matmul
        inner = self._producer(call.args[0], "relax.reshape")
        if inner is not None and static_shape(inner.args[0].ty) is not None:
            source = inner.args[0]
            if static_shape(source.ty) == out_shape:
                return source
            return self.builder_.normalize(relax.op.reshape(source, out_shape))
        return None

    def _flat_matmul(self, call: relax.Call, out_shape: tuple[int, ...]) -> relax.Expr | None:
        """``reshape(matmul(reshape(a), reshape(b)), batch + [M, N])`` -> ``matmul(a, b)``."""
        mm = self._producer(call.args[0], "relax.matmul")
        if mm is None or len(out_shape) < 3:
            return None
        mm_shape = static_shape(mm.ty)
        if mm_shape is None or len(mm_shape) != 3:
            return None
        batch, m, n = out_shape[:-2], out_shape[-2], out_shape[-1]
        if mm_shape != (math.prod(batch), m, n):
            return None
        sides = []
        for operand in mm.args:
            flat = self._producer(operand, "relax.reshape")
            if flat is None:
                return None
            source = flat.args[0]
            shape = static_shape(source.ty)
            if shape is None or tuple(shape[:-2]) != tuple(batch):
                return None
            sides.append((source, shape))
        (a, a_shape), (b, b_shape) = sides
        if a_shape[-2] != m or b_shape[-1] != n or a_shape[-1] != b_shape[-2]:
            return None
        return self.builder_.normalize(relax.op.matmul(a, b, out_dtype=mm.attrs.out_dtype))

    def _permute(self, call: relax.Call) -> relax.Expr | None:
        ndim = call.args[0].ty.ndim if isinstance(call.args[0].ty, relax.TensorType) else -1
        if ndim < 0:
            return None
        axes = _axes(call, ndim)
        if axes == list(range(ndim)):
            return call.args[0]
        inner = self._producer(call.args[0], "relax.permute_dims")
        if inner is None:
            return None
        inner_axes = _axes(inner, ndim)
        composed = [inner_axes[a] for a in axes]
        if composed == list(range(ndim)):
            return inner.args[0]
        return self.builder_.normalize(relax.op.permute_dims(inner.args[0], composed))


def _axes(call: relax.Call, ndim: int) -> list[int]:
    axes = call.attrs.axes
    if axes is None:
        return list(range(ndim))[::-1]
    return [int(a) % ndim for a in axes]
