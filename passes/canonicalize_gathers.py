"""CanonicalizeGathers: index lookups written one way, whichever frontend wrote them.

TVM's PyTorch importer and the two torch ONNX exporters write the same index lookups of a
transformer with different ops: an embedding lookup is ``reshape`` + ``take`` + ``reshape`` of
int32-cast ids (torch.export) or an ONNX ``Gather`` with negative-index handling
(``where(ids < 0, ids + n, ids)``); an attention mask ``m[:, None, None, :]`` is an
``index_tensor`` with ``arange`` indices (torch.export), a ``Gather`` of constant indices (legacy
exporter) or a ``GatherND`` (dynamo exporter), each followed by an ``and`` with an all-true
constant. Every spelling is its own kernel. This pass rewrites, wherever it appears:

================================================================  ===================================
chain                                                             becomes
================================================================  ===================================
``take(w, where(i < 0, i + n, i), axis=a)``, n = w.shape[a]         ``take(w, i, axis=a, mode="wrap")``
``take(w, i, axis=a, mode="fast")``, ``i`` computed at run time     ``take(w, i, axis=a, mode="wrap")``
``reshape(take(w, reshape(i, [k]), axis=0), i.shape + w.shape[1:])``  ``take(w, i, axis=0)``
``take(w, astype(i, "int32"))`` with ``i`` int64, at run time        ``take(w, i)``
``take`` / ``gather_nd`` / ``index_tensor`` with indices known at     ``reshape(x, result shape)``
compile time that read every element of ``x`` once, in order
``logical_and`` / ``bitwise_and`` (bool) with an all-true operand     ``broadcast_to(other, result shape)``
                                                                  (``other`` where the shapes agree)
================================================================  ===================================

Indices "known at compile time" are constants, ``arange``, ``full``, ``shape_of`` of static shapes
and elementwise / layout ops of those, evaluated here with numpy (small tensors only).

What is preserved: every value wherever the original is defined. ``mode="wrap"`` gives ONNX's
``Gather`` result for every index in ``[-n, n)`` (the range ONNX allows) and torch's for every index
in ``[0, n)`` (torch raises on others); where the original read out of bounds (``mode="fast"`` with
an index outside that range: undefined behaviour, a wild read) it now reads ``w[i mod n]``. Dropping
the int64 -> int32 cast (before a ``wrap`` take) changes only ids outside int32, for which torch
raises (the cast would have truncated them to another row). The reshape and ``and`` rewrites move the same elements to the same places.
A ``Gather`` whose indices are computed at run time is never turned into a plain (``fast``) take.
Bindings the rewrite leaves unused are removed; a function with nothing to rewrite is returned as
it is.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from gmorph_tvm.core.ir import dtype_str, op_name, static_shape
from gmorph_tvm.passes._util import (
    map_relax_functions,
    mutate_body,
)

# Compile-time index tensors and probed data tensors: small ones only.
_MAX_ELEMENTS = 1 << 16
_BINARY = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.less": np.less, "relax.less_equal": np.less_equal, "relax.greater": np.greater,
    "relax.greater_equal": np.greater_equal, "relax.equal": np.equal, "relax.not_equal": np.not_equal,
    "relax.logical_and": np.logical_and, "relax.logical_or": np.logical_or,
    "relax.bitwise_and": np.bitwise_and, "relax.bitwise_or": np.bitwise_or,
}
_AND_OPS = ("relax.logical_and", "relax.bitwise_and")


@tvm.transform.module_pass(opt_level=0, name="CanonicalizeGathers")
class CanonicalizeGathers:
    """Write index lookups one way (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_relax_functions(mod, canonicalize_gathers)


def canonicalize_gathers(func: relax.Function) -> relax.Function:
    """``func`` with its index lookups rewritten (``func`` itself when there is none)."""
    return mutate_body(func, _Gathers())


@relax.expr_functor.mutator
class _Gathers(relax.PyExprMutator):
    def __init__(self) -> None:
        super().__init__()
        self.changed = False
        self.memo: dict[relax.Var, np.ndarray | None] = {}

    # -- looking through bindings

    def _value(self, expr: relax.Expr) -> relax.Expr:
        """The value bound to ``expr``, through var-to-var bindings (a rewrite to a var leaves one)."""
        while isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is None:
                break
            expr = bound
        return expr

    def _producer(self, expr: relax.Expr, *names: str) -> relax.Call | None:
        value = self._value(expr)
        return value if op_name(value) in names else None

    def known(self, expr: relax.Expr) -> np.ndarray | None:
        """The value of ``expr`` if it is known at compile time (a small tensor), else None."""
        if isinstance(expr, relax.Var):
            if expr not in self.memo:
                self.memo[expr] = None  # cycles cannot happen in SSA; guards re-entry anyway
                bound = self.lookup_binding(expr)
                self.memo[expr] = None if bound is None else self._evaluate(bound)
            return self.memo[expr]
        return self._evaluate(expr)

    def _evaluate(self, expr: relax.Expr) -> np.ndarray | None:
        if isinstance(expr, tvm.ir.GenericConst):
            value = expr.value
            if isinstance(value, tvm.runtime.Tensor) and _numel(value.shape) <= _MAX_ELEMENTS:
                return value.numpy()
            return None
        if isinstance(expr, relax.Var):
            return self.known(expr)
        name = op_name(expr)
        if name is None:
            return None
        if name == "relax.shape_to_tensor":
            return self._shape_tensor(expr.args[0])
        shape = static_shape(expr.ty) if isinstance(expr.ty, relax.TensorType) else None
        dtype = dtype_str(expr.ty) if isinstance(expr.ty, relax.TensorType) else None
        if shape is None or dtype is None or _numel(shape) > _MAX_ELEMENTS:
            return None
        try:
            out = self._evaluate_call(expr, name, shape)
        except (ValueError, IndexError, TypeError):  # numpy refused: leave the expression alone
            return None
        if out is None:
            return None
        out = np.asarray(out).astype(dtype)
        return out if tuple(out.shape) == tuple(shape) else None

    def _shape_tensor(self, arg: relax.Expr) -> np.ndarray | None:
        source = self._value(arg)
        if op_name(source) == "relax.shape_of":
            dims = static_shape(source.args[0].ty)
            return None if dims is None else np.array(dims, dtype="int64")
        if isinstance(source, relax.ShapeExpr) and all(isinstance(d, tvm.tirx.IntImm) for d in source.values):
            return np.array([int(d) for d in source.values], dtype="int64")
        return None

    def _evaluate_call(self, call: relax.Call, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        args = call.args
        if name == "relax.arange":
            bounds = [_prim(a) for a in args[:3]]
            if any(b is None for b in bounds):
                return None
            return np.arange(*[float(b) if isinstance(b, float) else int(b) for b in bounds if b is not None])
        if name in ("relax.full", "relax.zeros", "relax.ones"):
            if name != "relax.full":
                return np.full(shape, 0 if name == "relax.zeros" else 1)
            filled = self.known(args[1])
            if filled is None or filled.size != 1:
                return None
            return np.full(shape, filled.reshape(()))
        inputs: list[np.ndarray] = []
        for arg in args:
            if isinstance(arg.ty, relax.TensorType):
                value = self.known(arg)
                if value is None:
                    return None
                inputs.append(value)
        if not inputs:
            return None
        if name in _BINARY and len(inputs) == 2:
            return _BINARY[name](inputs[0], inputs[1])
        if name == "relax.where" and len(inputs) == 3:
            return np.where(inputs[0], inputs[1], inputs[2])
        if name == "relax.broadcast_to":
            return np.broadcast_to(inputs[0], shape)
        if name in ("relax.astype", "relax.reshape", "relax.expand_dims", "relax.squeeze"):
            return inputs[0].reshape(shape)
        if name == "relax.permute_dims":
            axes = call.attrs.axes
            return np.transpose(inputs[0], None if axes is None else [int(a) for a in axes])
        if name == "relax.strided_slice":
            parts = [[int(e.value) for e in a.fields] for a in args[1:] if isinstance(a, relax.Tuple)]
            if len(parts) < 3:
                return None
            index = [slice(None)] * inputs[0].ndim
            strides = parts[3] if len(parts) > 3 else [1] * len(parts[0])
            for axis, begin, end, stride in zip(parts[0], parts[1], parts[2], strides):
                index[axis] = slice(begin, end, stride)
            return inputs[0][tuple(index)]
        if name in ("relax.take", "relax.gather_nd", "relax.gather_elements"):
            return _gather(call, name, inputs[0], inputs[1:])
        if name == "relax.index_tensor":
            return _gather(call, name, inputs[0], self._index_list(call))
        return None

    def _index_list(self, call: relax.Call) -> list[np.ndarray] | None:
        if len(call.args) < 2 or not isinstance(call.args[1], relax.Tuple):
            return None
        values = []
        for field in call.args[1].fields:
            value = self.known(field)
            if value is None:
                return None
            values.append(value)
        return values

    # -- rewriting

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        name = op_name(call)
        new: relax.Expr | None = None
        if name in ("relax.take", "relax.gather_nd", "relax.index_tensor"):
            new = self._in_order(call, name)
            if new is None and name == "relax.take":
                new = self._take(call)
        elif name == "relax.reshape":
            new = self._flat_take(call)
        elif name in _AND_OPS:
            new = self._and_true(call)
        if new is None:
            return call
        self.changed = True
        return new

    def _in_order(self, call: relax.Call, name: str) -> relax.Expr | None:
        """A gather with compile-time indices reading every element once, in order: a reshape."""
        data = call.args[0]
        shape, out_shape = static_shape(data.ty), static_shape(call.ty)
        if shape is None or out_shape is None or _numel(shape) > _MAX_ELEMENTS or self.known(data) is not None:
            return None
        if name == "relax.index_tensor":
            indices = self._index_list(call)
        else:
            index = self.known(call.args[1])
            indices = None if index is None else [index]
        if indices is None:
            return None
        probe = np.arange(_numel(shape), dtype="int64").reshape(shape)
        try:
            picked = _gather(call, name, probe, indices)
        except (ValueError, IndexError, TypeError):
            return None
        if picked is None or picked.size != probe.size or tuple(picked.shape) != tuple(out_shape):
            return None
        if not np.array_equal(picked.reshape(-1), probe.reshape(-1)):
            return None
        return self.builder_.normalize(relax.op.reshape(data, out_shape))

    def _take(self, call: relax.Call) -> relax.Expr | None:
        """``take`` of run-time indices: ONNX's negative-index ``where`` and torch's plain ``fast``
        take both become ``mode="wrap"``, reading the int64 ids directly."""
        weight, index = call.args
        axis = int(call.attrs.axis) if call.attrs.axis is not None else None
        w_shape = static_shape(weight.ty)
        if axis is None or w_shape is None or self.known(index) is not None:
            return None
        axis %= len(w_shape)
        mode = str(call.attrs.mode)
        if mode == "wrap":  # already the canonical mode: only the int32 cast may go
            source = self._uncast(index)
            return None if source is index else self.builder_.normalize(relax.op.take(weight, source, axis, mode=mode))
        if mode != "fast":  # "clip" / "nan" define out-of-range reads: another function
            return None
        unwrapped = self._negative_wrap_source(index, w_shape[axis])
        source = self._uncast(index if unwrapped is None else unwrapped)
        return self.builder_.normalize(relax.op.take(weight, source, axis, mode="wrap"))

    def _negative_wrap_source(self, index: relax.Expr, n: int) -> relax.Expr | None:
        """``i`` of ``where(i < 0, i + n, i)`` (ONNX Gather's negative indices), else None."""
        where = self._producer(index, "relax.where")
        if where is None:
            return None
        cond, shifted, plain = where.args
        less = self._producer(cond, "relax.less")
        if less is None or not less.args[0].same_as(plain):
            return None
        zero = self.known(less.args[1])
        if zero is None or zero.size != 1 or int(zero.reshape(())) != 0:
            return None
        add = self._producer(shifted, "relax.add")
        if add is None:
            return None
        for a, b in (tuple(add.args), tuple(add.args)[::-1]):
            if a.same_as(plain):
                offset = self.known(b)
                if offset is not None and offset.size == 1 and int(offset.reshape(())) == n:
                    return plain
        return None

    def _flat_take(self, call: relax.Call) -> relax.Expr | None:
        """``reshape(take(w, reshape(i, [k]), axis=0), i.shape + w.shape[1:])`` -> ``take(w, i)``."""
        take = self._producer(call.args[0], "relax.take")
        out_shape = static_shape(call.ty)
        if take is None or out_shape is None:
            return None
        weight, flat = take.args
        w_shape = static_shape(weight.ty)
        if w_shape is None or int(take.attrs.axis) % len(w_shape) != 0:
            return None
        reshape = self._producer(flat, "relax.reshape")
        if reshape is None or len(static_shape(flat.ty) or ()) != 1:
            return None
        source = reshape.args[0]
        i_shape = static_shape(source.ty)
        if i_shape is None or tuple(out_shape) != tuple(i_shape) + tuple(w_shape[1:]):
            return None
        mode = str(take.attrs.mode)
        source = self._uncast(source) if mode == "wrap" else source
        return self.builder_.normalize(relax.op.take(weight, source, 0, mode=mode))

    def _uncast(self, index: relax.Expr) -> relax.Expr:
        """``i`` of ``astype(i, "int32")`` with ``i`` int64 (torch's embedding ids), else ``index``."""
        cast = self._producer(index, "relax.astype")
        if cast is not None and dtype_str(index.ty) == "int32" and dtype_str(cast.args[0].ty) == "int64":
            return cast.args[0]
        return index

    def _and_true(self, call: relax.Call) -> relax.Expr | None:
        """``x and True`` (bool) -> ``x``, broadcast to the result's shape."""
        out_shape = static_shape(call.ty)
        if dtype_str(call.ty) != "bool" or out_shape is None:
            return None
        a, b = call.args
        for mask, other in ((a, b), (b, a)):
            value = self.known(mask)
            if value is None or not bool(np.all(value)) or self.known(other) is not None:
                continue
            if static_shape(other.ty) == tuple(out_shape):
                return other
            return self.builder_.normalize(relax.op.broadcast_to(other, out_shape))
        return None


def _gather(call: relax.Call, name: str, data: np.ndarray, indices: list[np.ndarray] | None) -> np.ndarray | None:
    """numpy's result of the gather ``call`` on ``data`` (None: an index out of bounds)."""
    if indices is None:
        return None
    if name == "relax.take":
        index = indices[0].astype("int64")
        axis = int(call.attrs.axis) % data.ndim if call.attrs.axis is not None else None
        size = data.shape[axis] if axis is not None else data.size
        mode = str(call.attrs.mode)
        if mode == "wrap":
            index = np.mod(index, size)
        elif mode == "clip":
            index = np.clip(index, 0, size - 1)
        elif np.any((index < 0) | (index >= size)):
            return None
        return np.take(data, index, axis=axis)
    if name == "relax.gather_nd":
        index = indices[0].astype("int64")
        if int(call.attrs.batch_dims) != 0 or index.shape[-1] > data.ndim:
            return None
        if np.any(index < 0) or any(np.any(index[..., d] >= data.shape[d]) for d in range(index.shape[-1])):
            return None
        return data[tuple(index[..., d] for d in range(index.shape[-1]))]
    if name == "relax.index_tensor":
        per_axis = [i.astype("int64") for i in indices]
        if len(per_axis) > data.ndim or any(np.any((i < 0) | (i >= data.shape[d])) for d, i in enumerate(per_axis)):
            return None
        return data[tuple(per_axis)]
    if name == "relax.gather_elements":
        index = indices[0].astype("int64")
        axis = int(call.attrs.axis) % data.ndim
        if np.any((index < 0) | (index >= data.shape[axis])):
            return None
        return np.take_along_axis(data, index, axis=axis)
    return None


def _prim(value) -> int | float | None:
    inner = getattr(value, "value", None)
    if isinstance(inner, (int, float)):
        return inner
    if isinstance(inner, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
        return inner.value
    return None


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)
