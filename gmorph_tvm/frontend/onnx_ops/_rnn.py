"""What the ONNX recurrent ops (LSTM, GRU) share: attributes, activations, per-direction weights.

The converters (``lstm.py``, ``gru.py``) unroll the recurrence over the static sequence length: the
input projection of every time step is one matmul (``X @ W^T + Wb``), and each step is a matmul with
the recurrence weight plus elementwise gates, all plain Relax ops that legalisation, fusion and
tuning see like any other. Semantics follow the ONNX operator specification (gate order, bias
layout, ``direction``, ``layout``, ``clip``, ``activations`` with ``activation_alpha``/``_beta``
consumed in order by the activations that take them, as onnxruntime does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tvm
from tvm import relax

Activation = Callable[[relax.BlockBuilder, relax.Expr], relax.Expr]

# name -> (takes alpha, takes beta, default alpha, default beta)
_ACTIVATION_PARAMS = {
    "sigmoid": (False, False, 0.0, 0.0),
    "tanh": (False, False, 0.0, 0.0),
    "relu": (False, False, 0.0, 0.0),
    "softsign": (False, False, 0.0, 0.0),
    "softplus": (False, False, 0.0, 0.0),
    "leakyrelu": (True, False, 0.01, 0.0),
    "thresholdedrelu": (True, False, 1.0, 0.0),
    "elu": (True, False, 1.0, 0.0),
    "hardsigmoid": (True, True, 0.2, 0.5),
    "affine": (True, True, 1.0, 0.0),
    "scaledtanh": (True, True, 1.0, 1.0),
}


def _scalar(value: float, dtype: str) -> relax.Expr:
    return relax.const(value, dtype)


def _make_activation(name: str, alpha: float, beta: float, dtype: str) -> Activation:
    op = relax.op

    def act(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        a, b = _scalar(alpha, dtype), _scalar(beta, dtype)
        if name == "sigmoid":
            return bb.emit(op.sigmoid(x))
        if name == "tanh":
            return bb.emit(op.tanh(x))
        if name == "relu":
            return bb.emit(op.nn.relu(x))
        if name == "softsign":
            return bb.emit(op.divide(x, op.add(op.abs(x), _scalar(1.0, dtype))))
        if name == "softplus":
            return bb.emit(op.log(op.add(op.exp(x), _scalar(1.0, dtype))))
        if name == "leakyrelu":
            return bb.emit(op.where(op.greater_equal(x, _scalar(0.0, dtype)), x, op.multiply(x, a)))
        if name == "thresholdedrelu":
            return bb.emit(op.where(op.greater(x, a), x, _scalar(0.0, dtype)))
        if name == "elu":
            neg = op.multiply(a, op.subtract(op.exp(x), _scalar(1.0, dtype)))
            return bb.emit(op.where(op.greater_equal(x, _scalar(0.0, dtype)), x, neg))
        if name == "hardsigmoid":
            return bb.emit(op.clip(op.add(op.multiply(x, a), b), 0.0, 1.0))
        if name == "affine":
            return bb.emit(op.add(op.multiply(x, a), b))
        if name == "scaledtanh":
            return bb.emit(op.multiply(a, op.tanh(op.multiply(x, b))))
        raise AssertionError(name)  # names are checked in activations()

    return act


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def activations(attr: dict, defaults: Sequence[str], num_directions: int, dtype: str) -> list[list[Activation]]:
    """The activation functions of each direction (``defaults`` per direction when not given)."""
    names = [_text(n).lower() for n in attr.get("activations", ())] or [d.lower() for d in defaults] * num_directions
    per_dir = len(defaults)
    if len(names) != per_dir * num_directions:
        raise ValueError(f"expected {per_dir * num_directions} activations, got {len(names)}: {', '.join(names)}")
    alphas = list(attr.get("activation_alpha", ()))
    betas = list(attr.get("activation_beta", ()))
    funcs = []
    for name in names:
        if name not in _ACTIVATION_PARAMS:
            raise ValueError(f"activation {name!r} is not one of {', '.join(sorted(_ACTIVATION_PARAMS))}")
        takes_alpha, takes_beta, alpha, beta = _ACTIVATION_PARAMS[name]
        if takes_alpha and alphas:
            alpha = float(alphas.pop(0))
        if takes_beta and betas:
            beta = float(betas.pop(0))
        funcs.append(_make_activation(name, alpha, beta, dtype))
    return [funcs[d * per_dir:(d + 1) * per_dir] for d in range(num_directions)]


@dataclass
class RnnSetup:
    """Parsed common attributes and inputs of one recurrent node, in the time-major layout."""

    hidden: int
    directions: list[str]  # "forward" / "reverse", one per direction, in output order
    seq_len: int
    batch: int
    dtype: str
    x: relax.Expr  # [seq, batch, input]
    layout: int
    clip: float | None


def static_shape(expr: relax.Expr, what: str) -> list[int]:
    ty = expr.ty
    try:
        return [int(d) for d in ty.shape.values]
    except (AttributeError, TypeError) as err:
        raise ValueError(f"{what} needs a static shape, got {ty}; give static input shapes") from err


def setup(bb: relax.BlockBuilder, inputs, attr: dict, gates: int) -> RnnSetup:
    """Common checks: direction, layout, static shapes, hidden size, unsupported sequence_lens."""
    x = inputs[0]
    direction = _text(attr.get("direction", b"forward"))
    if direction not in ("forward", "reverse", "bidirectional"):
        raise ValueError(f"unknown direction {direction!r}")
    directions = ["forward", "reverse"] if direction == "bidirectional" else [direction]
    layout = int(attr.get("layout", 0))
    if layout == 1:
        x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
    seq_len, batch, _ = static_shape(x, "the input X")
    w_shape = static_shape(inputs[1], "the weight W")
    hidden = int(attr.get("hidden_size", w_shape[1] // gates))
    if w_shape[0] != len(directions) or w_shape[1] != gates * hidden:
        raise ValueError(f"weight W has shape {w_shape}, expected [{len(directions)}, {gates * hidden}, input_size]")
    if inputs[4] is not None:
        lens = inputs[4]
        if not isinstance(lens, tvm.ir.GenericConst) or any(int(v) != seq_len for v in lens.value.numpy().ravel()):
            raise ValueError(
                "per-batch sequence_lens shorter than the sequence are not supported; export without sequence lengths"
            )
    clip = float(attr["clip"]) if "clip" in attr else None
    dtype = str(x.ty.dtype.dtype) if hasattr(x.ty.dtype, "dtype") else str(x.ty.dtype)
    return RnnSetup(hidden, directions, seq_len, batch, dtype, x, layout, clip)


def direction_slice(bb: relax.BlockBuilder, tensor: relax.Expr | None, index: int) -> relax.Expr | None:
    """``tensor[index]`` along axis 0 (the direction axis of W, R, B, initial states)."""
    if tensor is None:
        return None
    part = relax.op.strided_slice(tensor, axes=[0], begin=[index], end=[index + 1])
    return bb.emit(relax.op.squeeze(part, axis=[0]))


def initial_state(bb: relax.BlockBuilder, value: relax.Expr | None, rnn: RnnSetup) -> relax.Expr | None:
    """Initial h / c in [num_directions, batch, hidden] (transposed from layout 1)."""
    if value is None or rnn.layout == 0:
        return value
    return bb.emit(relax.op.permute_dims(value, [1, 0, 2]))


def input_projection(bb: relax.BlockBuilder, rnn: RnnSetup, w: relax.Expr, bias: relax.Expr | None) -> list[relax.Expr]:
    """``X_t @ W^T (+ Wb)`` for every time step, computed as one matmul; a list of [batch, gates*hidden]."""
    proj = bb.emit(relax.op.matmul(rnn.x, relax.op.permute_dims(w, [1, 0])))
    if bias is not None:
        proj = bb.emit(relax.op.add(proj, bias))
    if rnn.seq_len == 1:
        return [bb.emit(relax.op.squeeze(proj, axis=[0]))]
    parts = bb.emit(relax.op.split(proj, rnn.seq_len, axis=0))
    return [bb.emit(relax.op.squeeze(relax.TupleGetItem(parts, t), axis=[0])) for t in range(rnn.seq_len)]


def bias_halves(bb: relax.BlockBuilder, bias: relax.Expr | None, width: int) -> tuple[relax.Expr | None, relax.Expr | None]:
    """The input (Wb) and recurrence (Rb) halves of one direction's bias ``[2 * width]``."""
    if bias is None:
        return None, None
    parts = bb.emit(relax.op.split(bias, 2, axis=0))
    return bb.emit(relax.TupleGetItem(parts, 0)), bb.emit(relax.TupleGetItem(parts, 1))


def split_gates(bb: relax.BlockBuilder, value: relax.Expr, count: int) -> list[relax.Expr]:
    parts = bb.emit(relax.op.split(value, count, axis=-1))
    return [bb.emit(relax.TupleGetItem(parts, i)) for i in range(count)]


def maybe_clip(bb: relax.BlockBuilder, value: relax.Expr, rnn: RnnSetup) -> relax.Expr:
    if rnn.clip is None:
        return value
    return bb.emit(relax.op.clip(value, -rnn.clip, rnn.clip))


def zeros(rnn: RnnSetup) -> relax.Expr:
    return relax.op.zeros((rnn.batch, rnn.hidden), rnn.dtype)


def stack_outputs(bb: relax.BlockBuilder, rnn: RnnSetup, per_direction: list[list[relax.Expr]],
                  finals: list[list[relax.Expr]]) -> list[relax.Expr]:
    """Y ([seq, dirs, batch, hidden], or [batch, seq, dirs, hidden] for layout 1) and the final states."""
    steps = []
    for t in range(rnn.seq_len):
        per_dir = [relax.op.expand_dims(hs[t], axis=0) for hs in per_direction]  # each [1, batch, hidden]
        steps.append(relax.op.expand_dims(relax.op.concat(per_dir, axis=0), axis=0))
    y = bb.emit(relax.op.concat(steps, axis=0))
    outs = [bb.emit(relax.op.concat([relax.op.expand_dims(s, axis=0) for s in states], axis=0)) for states in finals]
    if rnn.layout == 1:
        y = bb.emit(relax.op.permute_dims(y, [2, 0, 1, 3]))
        outs = [bb.emit(relax.op.permute_dims(o, [1, 0, 2])) for o in outs]
    return [y] + outs
