"""ONNX ``LSTM`` -> Relax, unrolled over the static sequence length (see ``_rnn.py``).

Forward, reverse and bidirectional; ``layout`` 0 and 1; optional bias, initial states and peepholes
``P``; ``clip``; ``input_forget``; any activations of the ONNX list. Gate order of W/R/B is
``i, o, f, c`` as the specification says. Outputs ``Y``, ``Y_h``, ``Y_c``.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from . import _rnn


class LSTM(OnnxOpConverter):
    """Long short-term memory layer (ONNX opset 7, 14: ``layout`` added in 14)."""

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        rnn = _rnn.setup(bb, inputs, attr, gates=4)
        acts = _rnn.activations(attr, ("Sigmoid", "Tanh", "Tanh"), len(rnn.directions), rnn.dtype)
        input_forget = bool(attr.get("input_forget", 0))
        h0 = _rnn.initial_state(bb, inputs[5], rnn)
        c0 = _rnn.initial_state(bb, inputs[6], rnn)
        hidden_seqs, last_h, last_c = [], [], []
        one = relax.const(1.0, rnn.dtype)
        for d, direction in enumerate(rnn.directions):
            w = _rnn.direction_slice(bb, inputs[1], d)
            r_t = bb.emit(relax.op.permute_dims(_rnn.direction_slice(bb, inputs[2], d), [1, 0]))
            wb, rb = _rnn.bias_halves(bb, _rnn.direction_slice(bb, inputs[3], d), 4 * rnn.hidden)
            peep = _rnn.direction_slice(bb, inputs[7], d)
            p_i, p_o, p_f = _rnn.split_gates(bb, peep, 3) if peep is not None else (None, None, None)
            f_act, g_act, h_act = acts[d]
            xs = _rnn.input_projection(bb, rnn, w, wb)
            h = _rnn.direction_slice(bb, h0, d) if h0 is not None else bb.emit(_rnn.zeros(rnn))
            c = _rnn.direction_slice(bb, c0, d) if c0 is not None else bb.emit(_rnn.zeros(rnn))
            outs: list = [None] * rnn.seq_len
            order = range(rnn.seq_len) if direction == "forward" else reversed(range(rnn.seq_len))
            for t in order:
                gates = relax.op.add(xs[t], relax.op.matmul(h, r_t))
                if rb is not None:
                    gates = relax.op.add(gates, rb)
                i, o, f, cand = _rnn.split_gates(bb, bb.emit(gates), 4)
                if p_i is not None:
                    i = bb.emit(relax.op.add(i, relax.op.multiply(p_i, c)))
                    f = bb.emit(relax.op.add(f, relax.op.multiply(p_f, c)))
                i = f_act(bb, _rnn.maybe_clip(bb, i, rnn))
                f = bb.emit(relax.op.subtract(one, i)) if input_forget else f_act(bb, _rnn.maybe_clip(bb, f, rnn))
                cand = g_act(bb, _rnn.maybe_clip(bb, cand, rnn))
                c = bb.emit(relax.op.add(relax.op.multiply(f, c), relax.op.multiply(i, cand)))
                if p_o is not None:
                    o = bb.emit(relax.op.add(o, relax.op.multiply(p_o, c)))
                o = f_act(bb, _rnn.maybe_clip(bb, o, rnn))
                h = bb.emit(relax.op.multiply(o, h_act(bb, c)))
                outs[t] = h
            hidden_seqs.append(outs)
            last_h.append(h)
            last_c.append(c)
        return relax.Tuple(_rnn.stack_outputs(bb, rnn, hidden_seqs, [last_h, last_c]))
