"""Converters for ONNX operators that TVM's Relax ONNX frontend lacks or lowers badly, one file per family.

:data:`CONVERTERS` maps an ONNX op type to an ``OnnxOpConverter`` subclass; the importer
(``gmorph_tvm.frontend.onnx_convert``) consults it before TVM's own converter map. LSTM and GRU are
missing from TVM; Clip, Max/Min/Sum/Mean, HardSigmoid and opset<13 Softmax/LogSoftmax are written
as the PyTorch importer writes them (TVM's forms are TIR functions, 5-D ``stack`` glue or
reshapes that the fusion and the channels-last conversion cannot see through).
"""

from .activations import HardSigmoid, LogSoftmax, Softmax
from .clip import Clip
from .gru import GRU
from .lstm import LSTM
from .variadic import Max, Mean, Min, Sum

CONVERTERS = {
    "LSTM": LSTM, "GRU": GRU, "Clip": Clip, "Max": Max, "Min": Min, "Sum": Sum, "Mean": Mean,
    "HardSigmoid": HardSigmoid, "Softmax": Softmax, "LogSoftmax": LogSoftmax,
}

__all__ = ["CONVERTERS", "Clip", "GRU", "HardSigmoid", "LSTM", "LogSoftmax", "Max", "Mean", "Min", "Softmax", "Sum"]
