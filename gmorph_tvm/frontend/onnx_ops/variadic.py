"""ONNX variadic ``Max``/``Min``/``Sum``/``Mean`` -> a chain of binary Relax ops.

TVM's converter broadcasts every input to the output shape, stacks them into a tensor one rank
higher and reduces over the new axis: a 5-D tensor for a 4-D activation, which costs a copy of each
input and defeats the channels-last layout conversion (``ConvertLayout`` has no layout for it).
Here one input is itself, two are ``R.maximum`` / ``R.minimum`` / ``R.add`` (what the PyTorch
importer emits for ``torch.maximum`` ...), more are a left-to-right chain of them. ``Mean`` is the
sum times ``1/n``, as onnxruntime computes it (bit for bit). Inputs all known at import fold
to a constant. NaN: ``R.maximum``/``R.minimum`` are lowered NaN-propagating (``LegalizeNaNSafe``),
like onnxruntime's Max/Min.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from ...core.ir import dtype_str


class _Variadic(OnnxOpConverter):
    binary: Callable = relax.op.add
    numpy_binary: Callable = np.add
    mean = False

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        inputs = [i for i in inputs if i is not None]
        if all(isinstance(i, tvm.ir.GenericConst) for i in inputs):
            arrays = [i.value.numpy() for i in inputs]
            value = functools.reduce(cls.numpy_binary, arrays)
            if cls.mean:
                value = value * np.asarray(1.0 / len(arrays), value.dtype)
            return relax.const(np.asarray(value, arrays[0].dtype), str(arrays[0].dtype))
        out = inputs[0]
        for other in inputs[1:]:
            out = cls.binary(out, other)
        if cls.mean and len(inputs) > 1:
            out = relax.op.multiply(out, relax.const(1.0 / len(inputs), dtype_str(inputs[0].ty)))
        return out


class Max(_Variadic):
    """Elementwise maximum of 1..n inputs (broadcasting)."""

    binary = relax.op.maximum
    numpy_binary = np.maximum


class Min(_Variadic):
    """Elementwise minimum of 1..n inputs (broadcasting)."""

    binary = relax.op.minimum
    numpy_binary = np.minimum


class Sum(_Variadic):
    """Elementwise sum of 1..n inputs (broadcasting)."""


class Mean(_Variadic):
    """Elementwise mean of 1..n inputs (broadcasting): the sum times ``1/n``."""

    mean = True
