"""HorizontalMerge's op rules, one class per op family (see :mod:`.base` for the interface).

Anchors (ops with weights) start regions: convs, matmuls, embedding lookups. The others continue a
region through whole chains and DAGs: elementwise ops (with per-branch weights concatenated),
activations, normalisations, pooling, reductions and layout ops. Every rule keeps the arithmetic
per element unchanged: a wide op computes each branch's block with exactly the separate op's
operations (concatenation and reshapes only move data).
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from gmorph_tvm.core.ir import normalize_axis
from gmorph_tvm.passes.horizontal_merge.analysis import (
    WeightValues,
    attrs_key,
    dtype_of,
    is_tensor,
    known_shape,
    shape_of,
    vars_of_all,
)
from gmorph_tvm.passes.horizontal_merge.base import (
    TUPLE_GET_ITEM,
    Match,
    MergeRule,
    OrigSource,
    Source,
    WeightSource,
    WideSource,
    broadcasts_along,
    concat_weights,
    layout_ok,
    op_names,
    register_rule,
    stack_elementwise_operand,
    wide_feed,
)

# ---- anchors: ops with weights ------------------------------------------------------------------


_CONV_LAYOUTS = {"relax.nn.conv1d": ("NCW", "OIW"), "relax.nn.conv2d": ("NCHW", "OIHW")}


@register_rule
class ConvRule(MergeRule):
    """Convs with weights. Same input (``groups=1``): one conv with the output channels
    concatenated. Lockstep (different inputs of one shape): one grouped conv, ``groups = N *
    groups``, weights stacked along the output channels."""

    ops = frozenset(("relax.nn.conv1d", "relax.nn.conv2d"))
    heavy = True
    needs_wide_input = False

    def seed_keys(self, value, weights):
        if not _weighted_anchor(value, weights):
            return None
        data, wshape = value.args[0], shape_of(value.args[1])
        same = None
        if isinstance(data, relax.Var) and wshape is not None and int(value.attrs.groups) == 1:
            same = (value.op.name, data, wshape[1:], attrs_key(value), dtype_of(value))
        return same, _lockstep_key(value)

    def match(self, cand, plan):
        call0 = cand.call
        attrs = call0.attrs
        data_layout, kernel_layout = _CONV_LAYOUTS[call0.op.name]
        if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != (
            data_layout, kernel_layout, data_layout
        ):
            return None
        data, weight = cand.operands
        if weight.values is None:
            return None
        groups = int(attrs.groups)
        widths = [s[1] for s in cand.out_shapes]
        if data.kind == "same":  # one input, output channels concatenated
            if groups != 1 or len({v.shape[1:] for v in weight.values}) != 1:
                return None
            merged = WeightSource(concat_weights(weight.values, 0), weight.sources)
            arg = call0.args[0]
            return Match(self, 1, widths, {"call": call0, "data": OrigSource(arg), "weight": merged, "groups": 1},
                         orig_deps=[arg] if isinstance(arg, relax.Var) else [])
        # Lockstep: different inputs of one shape -> one grouped conv.
        in_shapes = data.shapes()
        if len({v.shape for v in weight.values}) != 1 or len(set(in_shapes)) != 1 or len(set(cand.out_shapes)) != 1:
            return None
        feed = wide_feed(data, 1, in_shapes, plan)
        if feed is None:
            return None
        merged = WeightSource(concat_weights(weight.values, 0), weight.sources)
        info = {"call": call0, "data": feed.source, "weight": merged, "groups": groups * len(cand.calls)}
        return Match(self, 1, widths, info, feed.wide_deps, feed.orig_deps, feed.entry_bytes, feed.entries)

    def fuse(self, match, em):
        call0, attrs = match.data["call"], match.data["call"].attrs
        data_layout, kernel_layout = _CONV_LAYOUTS[call0.op.name]
        conv = relax.op.nn.conv2d if call0.op.name == "relax.nn.conv2d" else relax.op.nn.conv1d
        return conv(
            match.data["data"].get(em), match.data["weight"].get(em), attrs.strides, attrs.padding, attrs.dilation,
            match.data["groups"], data_layout, kernel_layout, data_layout, dtype_of(call0),
        )


@register_rule
class MatmulRule(MergeRule):
    """Matmuls. Same input with 2-D weights: one matmul with the weight columns concatenated.
    Lockstep on the feature axis: ``(..., N*F)`` reshaped (no copy) to ``(..., N, 1, F)`` times the
    stacked ``(N, F, O)`` weights. Two wide operands batched along one axis (attention): the matmul
    itself on the wide values."""

    ops = frozenset(("relax.matmul",))
    heavy = True
    needs_wide_input = False

    def seed_keys(self, value, weights):
        if not _weighted_anchor(value, weights):
            return None
        data, wshape = value.args[0], shape_of(value.args[1])
        same = None
        if isinstance(data, relax.Var) and wshape is not None and len(wshape) == 2:
            same = ("matmul", data, wshape[0], attrs_key(value), dtype_of(value))
        return same, _lockstep_key(value)

    def match(self, cand, plan):
        call0, out_shapes = cand.call, cand.out_shapes
        lhs, rhs = cand.operands
        if rhs.kind == "wide" and lhs.kind == "wide":
            return self._batched(cand, plan)
        if rhs.values is None or any(v.ndim != 2 for v in rhs.values):
            return None
        rank = len(out_shapes[0])
        if lhs.kind == "same":  # one input, weight columns concatenated
            if len({v.shape[0] for v in rhs.values}) != 1:
                return None
            data = call0.args[0]
            info = {"mode": "columns", "call": call0, "data": OrigSource(data),
                    "weight": WeightSource(concat_weights(rhs.values, 1), rhs.sources)}
            return Match(self, rank - 1, [s[-1] for s in out_shapes], info,
                         orig_deps=[data] if isinstance(data, relax.Var) else [])
        # Lockstep on the feature axis: (..., N*F) -> (..., N, 1, F) @ (N, F, O) -> (..., N*O).
        in_shapes = lhs.shapes()
        if len({v.shape for v in rhs.values}) != 1 or len(set(in_shapes)) != 1:
            return None
        in_rank = len(in_shapes[0])
        feed = wide_feed(lhs, in_rank - 1, in_shapes, plan)
        if feed is None:
            return None
        n = len(cand.calls)
        features, outs = rhs.values[0].shape
        info = {"mode": "stacked", "call": call0, "data": feed.source, "n": n, "features": features, "outs": outs,
                "prefix": list(in_shapes[0][:-1]),
                "weight": WeightSource(np.ascontiguousarray(np.stack(rhs.values, axis=0)), rhs.sources)}
        return Match(self, in_rank - 1, [outs] * n, info, feed.wide_deps, feed.orig_deps, feed.entry_bytes,
                     feed.entries)

    def _batched(self, cand, plan):
        """Both operands wide along a batch axis: the matmul itself, on the wide values."""
        out_shapes = cand.out_shapes
        rank = len(out_shapes[0])
        axes = set()
        for operand in cand.operands:
            g = plan.group(operand.group)
            r = len(known_shape(operand.args[0]))
            if g.axis >= r - 2:
                return None
            axes.add(g.axis + rank - r)
            if [known_shape(a)[g.axis] for a in operand.args] != [s[g.axis + rank - r] for s in out_shapes]:
                return None
        if len(axes) != 1:
            return None
        axis = axes.pop()
        if not layout_ok(out_shapes, axis):
            return None
        lt, rt = cand.operands[0].group, cand.operands[1].group
        info = {"mode": "batched", "call": cand.call, "operands": [WideSource(lt), WideSource(rt)]}
        return Match(self, axis, [s[axis] for s in out_shapes], info, wide_deps=[lt, rt])

    def fuse(self, match, em):
        info = match.data
        call0 = info["call"]
        if info["mode"] == "batched":
            return super().fuse(match, em)
        out_dtype = dtype_of(call0)
        if info["mode"] == "columns":
            return relax.op.matmul(info["data"].get(em), info["weight"].get(em), out_dtype=out_dtype)
        prefix, n = info["prefix"], info["n"]
        grouped = em.emit(relax.op.reshape(info["data"].get(em), prefix + [n, 1, info["features"]]))
        product = em.emit(relax.op.matmul(grouped, info["weight"].get(em), out_dtype=out_dtype))
        return relax.op.reshape(product, prefix + [n * info["outs"]])


@register_rule
class TakeRule(MergeRule):
    """Embedding lookups (``take`` on axis 0 of a 2-D table) of one index tensor: one lookup in the
    column-concatenated tables."""

    ops = frozenset(("relax.take",))
    heavy = True
    needs_wide_input = False

    def seed_keys(self, value, weights):
        table = weights.resolve(value.args[0])
        if not (table is not None and table[0].ndim == 2 and int(value.attrs.axis) == 0
                and isinstance(value.args[1], relax.Var) and weights.resolve(value.args[1]) is None):
            return None
        rows = known_shape(value.args[0])[0]
        return ("take", value.args[1], rows, attrs_key(value), dtype_of(value)), None

    def match(self, cand, plan):
        table, indices = cand.operands
        if indices.kind != "same" or table.values is None or len({v.shape[0] for v in table.values}) != 1:
            return None
        if any(v.ndim != 2 for v in table.values) or int(cand.call.attrs.axis) != 0:
            return None
        call0 = cand.call
        operands = [WeightSource(concat_weights(table.values, 1), table.sources), OrigSource(call0.args[1])]
        axis = len(cand.out_shapes[0]) - 1
        return Match(self, axis, [s[-1] for s in cand.out_shapes], {"call": call0, "operands": operands},
                     orig_deps=vars_of_all([call0.args[1]]))


def _weighted_anchor(value: relax.Call, weights: WeightValues) -> bool:
    """A conv / matmul of a run-time value with a weight (weight @ weight is FoldConstant's job)."""
    if shape_of(value) is None or weights.resolve(value.args[1]) is None:
        return False
    return weights.resolve(value.args[0]) is None


def _lockstep_key(value: relax.Call) -> tuple:
    return (value.op.name, attrs_key(value), shape_of(value.args[0]), shape_of(value.args[1]), dtype_of(value))


# ---- elementwise --------------------------------------------------------------------------------


@register_rule
class ElementwiseRule(MergeRule):
    """Binary elementwise ops (bias adds, residual adds, gates). Per operand: a wide value, one value
    broadcast along the branch axis, per-branch weights (concatenated into one), or per-branch
    values of the result's shape (concatenated at entry). The wide operand may come second
    (torch's ``add(bias, x)``)."""

    ops = op_names("relax.", "add subtract multiply divide maximum minimum power floor_divide")
    needs_wide_input = False

    def match(self, cand, plan):
        out_shapes = cand.out_shapes
        rank = len(out_shapes[0])
        axis = None
        for operand in cand.operands:
            if operand.kind == "wide":
                g = plan.group(operand.group)
                aligned = g.axis + rank - len(known_shape(operand.args[0]))
                if axis is not None and aligned != axis:
                    return None
                axis = aligned
        if axis is None or not layout_ok(out_shapes, axis):
            return None
        widths = [s[axis] for s in out_shapes]
        sources: list[Source] = []
        wide_deps, orig_deps = [], []
        entry_bytes = entries = 0
        for operand in cand.operands:
            shapes = operand.shapes() if is_tensor(operand.args[0]) else None
            if operand.kind == "wide":
                assert shapes is not None, "a wide operand is a tensor"
                a = axis - (rank - len(shapes[0]))
                if [s[a] for s in shapes] != widths or plan.group(operand.group).widths != widths:
                    return None  # would broadcast along the branch axis
                sources.append(WideSource(operand.group))
                wide_deps.append(operand.group)
            elif operand.kind == "same" and (shapes is None or broadcasts_along(shapes[0], axis, rank)):
                sources.append(OrigSource(operand.args[0]))
                orig_deps.extend(vars_of_all([operand.args[0]]))
            elif operand.values is not None:  # per-branch weights -> one concatenated weight
                value = stack_elementwise_operand(operand.values, axis, rank, out_shapes)
                if value is None:
                    return None
                sources.append(WeightSource(value, operand.sources))
            elif operand.kind == "distinct" and shapes == out_shapes:
                feed = wide_feed(operand, axis, shapes, plan)
                if feed is None:
                    return None
                sources.append(feed.source)
                orig_deps.extend(feed.orig_deps)
                entry_bytes += feed.entry_bytes
                entries += feed.entries
            else:
                return None
        info = {"call": cand.call, "operands": sources}
        return Match(self, axis, widths, info, wide_deps, orig_deps, entry_bytes, entries)


@register_rule
class UnaryRule(MergeRule):
    """Activations and other per-element ops whose extra operands (if any) are not tensors."""

    ops = op_names(
        "relax.",
        "nn.relu nn.gelu nn.gelu_tanh nn.silu nn.leakyrelu nn.softplus nn.selu sigmoid tanh clip exp log erf "
        "sqrt rsqrt negative abs square astype floor ceil round sign sin cos trunc",
    )

    def match(self, cand, plan):
        if any(o.kind != "same" or is_tensor(o.args[0]) for o in cand.operands[1:]):
            return None
        g = plan.group(cand.operands[0].group)
        axis = g.axis if cand.operands[0].shapes() == cand.out_shapes else None
        return self.same_op(cand, plan, axis)


# ---- normalisation ------------------------------------------------------------------------------


@register_rule
class BatchNormRule(MergeRule):
    """``batch_norm`` over the branch axis whose only use is its normalised output (index 0): one
    batch norm with the per-channel tensors concatenated."""

    ops = frozenset(("relax.nn.batch_norm",))

    def match(self, cand, plan):
        g = plan.group(cand.operands[0].group)
        call0 = cand.call
        rank = len(cand.operands[0].shapes()[0])
        if normalize_axis(int(call0.attrs.axis), rank) != g.axis:
            return None
        for var in cand.vars:
            for use in plan.users_of(var):
                if not (isinstance(use, relax.TupleGetItem) and use.index == 0):
                    return None  # mean/var outputs are per branch: keep BN separate
        operands: list[Source] = [WideSource(g.gid)]
        for operand in cand.operands[1:]:
            if operand.values is None or any(v.ndim != 1 for v in operand.values):
                return None
            operands.append(WeightSource(concat_weights(operand.values, 0), operand.sources))
        return Match(self, g.axis, list(g.widths), {"call": call0, "operands": operands}, wide_deps=[g.gid])


@register_rule
class TupleGetItemRule(MergeRule):
    """Item 0 of a wide tuple value (a merged ``batch_norm``'s output)."""

    ops = frozenset((TUPLE_GET_ITEM,))

    def match(self, cand, plan):
        g = plan.group(cand.operands[0].group)
        if not g.is_tuple_typed or cand.call.index != 0:
            return None
        return Match(self, g.axis, list(g.widths), {}, wide_deps=[g.gid])

    def fuse(self, match, em):
        return relax.TupleGetItem(em.wide(match.wide_deps[0]), 0)


@register_rule
class LayerNormRule(MergeRule):
    """Layer norm without its affine part on the wide value, then the per-branch scale and shift as
    one wide multiply / add. Normalising over the branch axis itself (features last) first
    reshapes ``(..., N*F)`` to ``(..., N, F)`` so each branch is normalised on its own."""

    ops = frozenset(("relax.nn.layer_norm",))
    heavy = True

    def match(self, cand, plan):
        data, gamma, beta = cand.operands
        g = plan.group(data.group)
        call0, attrs = cand.call, cand.call.attrs
        in_shape = known_shape(data.args[0])
        rank, n = len(in_shape), len(cand.calls)
        axes = sorted(normalize_axis(int(a), rank) for a in attrs.axes)
        if gamma.values is None or beta.values is None or any(s != in_shape for s in data.shapes()):
            return None
        norm_shape = [in_shape[d] for d in axes]
        axis = g.axis
        if axis in axes:
            if axes != [rank - 1] or axis != rank - 1 or len(set(g.widths)) != 1:
                return None
            split_shape = list(in_shape[:-1]) + [n, in_shape[-1]]
            work_axes = [rank]
            scale = np.stack([v.reshape(norm_shape) for v in gamma.values]).reshape(split_shape[-2:])
            shift = np.stack([v.reshape(norm_shape) for v in beta.values]).reshape(split_shape[-2:])
        else:
            split_shape, work_axes = None, axes
            full = [in_shape[d] if d in axes else 1 for d in range(rank)]
            out_shapes = [in_shape] * n
            scale_or_none = stack_elementwise_operand([v.reshape(full) for v in gamma.values], axis, rank, out_shapes)
            shift_or_none = stack_elementwise_operand([v.reshape(full) for v in beta.values], axis, rank, out_shapes)
            if scale_or_none is None or shift_or_none is None:
                return None
            scale, shift = scale_or_none, shift_or_none
        dtype = dtype_of(call0)
        wide_shape = list(in_shape)
        wide_shape[axis] *= n
        info = {
            "attrs": attrs, "split_shape": split_shape, "work_axes": work_axes, "wide_shape": wide_shape,
            "ones": np.ones(norm_shape, dtype), "zeros": np.zeros(norm_shape, dtype),
            "scale": WeightSource(scale, gamma.sources), "shift": WeightSource(shift, beta.sources),
        }
        return Match(self, axis, list(g.widths), info, wide_deps=[g.gid])

    def fuse(self, match, em):
        info, attrs = match.data, match.data["attrs"]
        value = em.wide(match.wide_deps[0])
        if info["split_shape"] is not None:
            value = em.emit(relax.op.reshape(value, info["split_shape"]))
        value = em.emit(relax.op.nn.layer_norm(
            value, relax.const(info["ones"]), relax.const(info["zeros"]), info["work_axes"], attrs.epsilon, True, True
        ))
        if bool(attrs.scale):
            value = em.emit(relax.op.multiply(value, info["scale"].get(em)))
        if bool(attrs.center):
            value = em.emit(relax.op.add(value, info["shift"].get(em)))
        return relax.op.reshape(value, info["wide_shape"]) if info["split_shape"] is not None else value


@register_rule
class SoftmaxRule(MergeRule):
    """``softmax`` / ``log_softmax`` on an axis other than the branch axis."""

    ops = op_names("relax.nn.", "softmax log_softmax")
    heavy = True

    def match(self, cand, plan):
        g = plan.group(cand.operands[0].group)
        rank = len(known_shape(cand.operands[0].args[0]))
        if normalize_axis(int(cand.call.attrs.axis), rank) == g.axis:
            return None
        return self.same_op(cand, plan, g.axis)


# ---- pooling, reductions and layout ---------------------------------------------------------------


@register_rule
class PoolRule(MergeRule):
    """Pooling in an ``NC...`` layout with the branches along the channels."""

    ops = op_names(
        "relax.nn.",
        "max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d "
        "adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d",
    )
    heavy = True

    def match(self, cand, plan):
        layout = str(cand.call.attrs.layout)
        g = plan.group(cand.operands[0].group)
        if layout[:2] != "NC" or str(cand.call.attrs.out_layout) != layout or g.axis != 1:
            return None
        return self.same_op(cand, plan, 1)


@register_rule
class ReduceRule(MergeRule):
    """Reductions over axes other than the branch axis (the branch axis moves if dims are dropped)."""

    ops = op_names("relax.", "mean sum max min prod variance std")
    heavy = True

    def match(self, cand, plan):
        g = plan.group(cand.operands[0].group)
        attrs = cand.call.attrs
        rank = len(known_shape(cand.operands[0].args[0]))
        if attrs.axis is None:
            return None
        axes = {normalize_axis(int(a), rank) for a in attrs.axis}
        if g.axis in axes:
            return None
        axis = g.axis
        if not bool(attrs.keepdims):
            axis -= sum(1 for a in axes if a < g.axis)
        return self.same_op(cand, plan, axis)


@register_rule
class ReshapeRule(MergeRule):
    """Reshapes (and ``broadcast_to`` that keeps the shape) that keep each branch's block contiguous:
    equal-width branches, and a prefix of the dims before the branch axis keeps its size."""

    ops = op_names("relax.", "reshape flatten squeeze expand_dims broadcast_to")

    def match(self, cand, plan):
        g = plan.group(cand.operands[0].group)
        in_shapes, out_shapes = cand.operands[0].shapes(), cand.out_shapes
        if cand.call.op.name == "relax.broadcast_to" and in_shapes != out_shapes:
            return None
        if len(set(in_shapes)) != 1 or len(set(out_shapes)) != 1 or len(set(g.widths)) != 1:
            return None
        src, dst = in_shapes[0], out_shapes[0]
        prefix = int(np.prod(src[: g.axis], dtype=np.int64))
        # The branch blocks stay contiguous for any split of the dims after a prefix of equal size;
        # take the innermost such axis (so (1, C) -> (1, C, 1, 1) keeps axis 1).
        axis = None
        for a in range(len(dst)):
            if int(np.prod(dst[:a], dtype=np.int64)) == prefix and dst[a] > 0:
                axis = a
        if axis is None:
            return None
        n = len(cand.calls)
        shape = list(dst)
        shape[axis] *= n
        return Match(self, axis, [dst[axis]] * n, {"shape": shape}, wide_deps=[g.gid])

    def fuse(self, match, em):
        return relax.op.reshape(em.wide(match.wide_deps[0]), match.data["shape"])


@register_rule
class PermuteDimsRule(MergeRule):
    """``permute_dims``: the branch axis moves with the permutation."""

    ops = frozenset(("relax.permute_dims",))

    def match(self, cand, plan):
        g = plan.group(cand.operands[0].group)
        rank = len(cand.out_shapes[0])
        axes = cand.call.attrs.axes
        axes = list(range(rank))[::-1] if axes is None else [normalize_axis(int(a), rank) for a in axes]
        return self.same_op(cand, plan, axes.index(g.axis))
