"""ONNX ``GRU`` -> Relax, unrolled over the static sequence length (see ``_rnn.py``).

Forward, reverse and bidirectional; ``layout`` 0 and 1; optional bias and initial state; ``clip``;
``linear_before_reset`` 0 (the specification's default) and 1 (what PyTorch exports); any
activations of the ONNX list. Gate order of W/R/B is ``z, r, h``. Outputs ``Y`` and ``Y_h``.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from . import _rnn


class GRU(OnnxOpConverter):
    """Gated recurrent unit layer (ONNX opset 7, 14: ``layout`` added in 14)."""

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        rnn = _rnn.setup(bb, inputs, attr, gates=3)
        acts = _rnn.activations(attr, ("Sigmoid", "Tanh"), len(rnn.directions), rnn.dtype)
        linear_before_reset = bool(attr.get("linear_before_reset", 0))
        h0 = _rnn.initial_state(bb, inputs[5], rnn)
        hidden_seqs, last_h = [], []
        one = relax.const(1.0, rnn.dtype)
        for d, direction in enumerate(rnn.directions):
            w = _rnn.direction_slice(bb, inputs[1], d)
            r = _rnn.direction_slice(bb, inputs[2], d)
            r_zr, r_h = _split_rows(bb, r, rnn.hidden)
            wb, rb = _rnn.bias_halves(bb, _rnn.direction_slice(bb, inputs[3], d), 3 * rnn.hidden)
            rb_zr, rb_h = _split_rows(bb, rb, rnn.hidden) if rb is not None else (None, None)
            f_act, g_act = acts[d]
            xs = _rnn.input_projection(bb, rnn, w, wb)
            h = _rnn.direction_slice(bb, h0, d) if h0 is not None else bb.emit(_rnn.zeros(rnn))
            outs: list = [None] * rnn.seq_len
            order = range(rnn.seq_len) if direction == "forward" else reversed(range(rnn.seq_len))
            for t in order:
                x_z, x_r, x_h = _rnn.split_gates(bb, xs[t], 3)
                zr = relax.op.matmul(h, r_zr)
                if rb_zr is not None:
                    zr = relax.op.add(zr, rb_zr)
                h_z, h_r = _rnn.split_gates(bb, bb.emit(zr), 2)
                z = f_act(bb, _rnn.maybe_clip(bb, bb.emit(relax.op.add(x_z, h_z)), rnn))
                reset = f_act(bb, _rnn.maybe_clip(bb, bb.emit(relax.op.add(x_r, h_r)), rnn))
                if linear_before_reset:
                    rec = relax.op.matmul(h, r_h)
                    if rb_h is not None:
                        rec = relax.op.add(rec, rb_h)
                    rec = relax.op.multiply(reset, rec)
                else:
                    rec = relax.op.matmul(relax.op.multiply(reset, h), r_h)
                    if rb_h is not None:
                        rec = relax.op.add(rec, rb_h)
                cand = g_act(bb, _rnn.maybe_clip(bb, bb.emit(relax.op.add(x_h, rec)), rnn))
                h = bb.emit(relax.op.add(relax.op.multiply(relax.op.subtract(one, z), cand), relax.op.multiply(z, h)))
                outs[t] = h
            hidden_seqs.append(outs)
            last_h.append(h)
        return relax.Tuple(_rnn.stack_outputs(bb, rnn, hidden_seqs, [last_h]))


def _split_rows(bb: relax.BlockBuilder, value: relax.Expr, hidden: int) -> tuple[relax.Expr, relax.Expr]:
    """Split R ([3H, H]) or Rb ([3H]) into the z/r rows and the h rows, transposing R for ``h @ R^T``."""
    parts = bb.emit(relax.op.split(value, [2 * hidden], axis=0))
    zr, h = bb.emit(relax.TupleGetItem(parts, 0)), bb.emit(relax.TupleGetItem(parts, 1))
    if len(value.ty.shape.values) == 2:
        zr = bb.emit(relax.op.permute_dims(zr, [1, 0]))
        h = bb.emit(relax.op.permute_dims(h, [1, 0]))
    return zr, h
