"""Converters for ONNX operators that TVM's Relax ONNX frontend lacks, one file per family.

:data:`CONVERTERS` maps an ONNX op type to an ``OnnxOpConverter`` subclass; the importer
(``gmorph_tvm.frontend.onnx_frontend``) consults it before TVM's own converter map.
"""

from .gru import GRU
from .lstm import LSTM

CONVERTERS = {"LSTM": LSTM, "GRU": GRU}

__all__ = ["CONVERTERS", "GRU", "LSTM"]
