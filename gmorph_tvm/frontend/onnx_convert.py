"""TVM's Relax ONNX importer with gmorph-tvm's extra converters and node-level error reports.

``convert`` runs ``tvm.relax.frontend.onnx``'s ``ONNXGraphImporter`` through a subclass that

* consults :data:`gmorph_tvm.frontend.onnx_ops.CONVERTERS` (LSTM, GRU; Clip, Max/Min/Sum/Mean,
  HardSigmoid, opset<13 Softmax written as the PyTorch importer writes them) before TVM's converter map
  (this TVM version has no public hook for custom converters; ``_convert_operator`` and
  ``_check_for_unsupported_ops`` are the two places it looks ops up);
* lists every unsupported op type with the first node that uses it (:class:`UnsupportedOps`);
* wraps a failure inside one node's conversion in :class:`NodeConversionError`, naming the node
  and its op type, so the importer can report it in one line.

Everything else (graph walk, the emitted functions, parameters kept as inputs) is TVM's own.
"""

from __future__ import annotations

import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from .onnx_ops import CONVERTERS

_HANDLED_BY_GRAPH_WALK = {"If", "Constant"}


class UnsupportedOps(Exception):
    """Op types that neither TVM nor gmorph-tvm converts: ``ops`` maps op type -> first node name."""

    def __init__(self, ops: dict[str, str]):
        self.ops = ops
        super().__init__(", ".join(f"{op} (node {name!r})" for op, name in ops.items()))


class NodeConversionError(Exception):
    """Converting one ONNX node failed; ``cause`` is the converter's exception."""

    def __init__(self, op_type: str, node: str, cause: BaseException):
        self.op_type, self.node, self.cause = op_type, node, cause
        super().__init__(f"node {node!r} ({op_type}): {cause}")


def unsupported_ops(graph: onnx.GraphProto) -> dict[str, str]:
    """Op types of ``graph`` (with their domain when not ai.onnx) that nothing converts -> first node."""
    known = onnx_frontend._get_convert_map()
    missing: dict[str, str] = {}
    for node in graph.node:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        # TVM converts some com.microsoft contrib ops by their bare op type, so domains pass.
        if node.op_type not in known and node.op_type not in CONVERTERS and node.op_type not in _HANDLED_BY_GRAPH_WALK:
            missing.setdefault(op, node.name)
    return missing


class _Importer(onnx_frontend.ONNXGraphImporter):
    def _check_for_unsupported_ops(self, graph: onnx.GraphProto) -> None:
        missing = unsupported_ops(graph)
        if missing:
            raise UnsupportedOps(missing)

    def _convert_operator(self, op_name: str, inputs, attrs: dict, opset: int):
        node = attrs.get("tvm_custom", {}).get("name", "")
        try:
            if op_name in CONVERTERS:
                sym = CONVERTERS[op_name].get_converter(opset)(self.bb, inputs, attrs, [self._nodes, self._params])
                return self.bb.normalize(sym) if isinstance(sym, relax.Expr) else sym
            return super()._convert_operator(op_name, inputs, attrs, opset)
        except NodeConversionError:
            raise
        except Exception as err:  # TVM raises ValueError, TVMError, AssertionError, ...
            raise NodeConversionError(op_name, node, err) from err


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ``ai.onnx`` opset version (1 when it declares none)."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def convert(model: onnx.ModelProto, shape_dict: dict, dtype_dict: dict) -> tvm.IRModule:
    """``from_onnx(model, shape_dict, dtype_dict, keep_params_in_input=True)`` with our converters."""
    importer = _Importer(shape_dict, dtype_dict, keep_params_in_input=True, sanitize=True)
    return importer.from_onnx(model.graph, default_opset(model))
