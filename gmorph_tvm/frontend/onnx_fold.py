"""Make an exported ONNX graph importable at the user's static shapes, before TVM's frontend sees it.

Exported graphs compute shapes at run time (``Shape -> Gather -> Concat -> Reshape``, TF-style
"same" padding from the input size) which TVM's Relax ONNX frontend rejects (``Reshape requires the
input new shape to be Shape``, ``Dynamic pads are not supported yet``). With the input shapes fixed,
those computations are constants. What this module does, in order:

1. inline ONNX local functions (``onnx.inliner``; torch's dynamo exporter may emit them);
2. give unnamed nodes a name ``<OpType>_<index>`` so that errors can point at a node;
3. fold shape computations and constants with **onnxslim** (``slim(model, input_shapes=...)``),
   which also runs ONNX shape inference;
4. turn non-float initialisers (the folded shapes, axes, indices) into ``Constant`` nodes: TVM's
   frontend makes every initialiser a weight parameter when weights are kept as inputs, and an
   ``Expand`` / ``Tile`` ... whose shape is a parameter is dynamic again.

Why onnxslim (measured on this project's real models, 2 CPU cores): it folds all of PaddleOCR
det/cls/rec and EfficientNet-Lite0 from both torch exporters in 0.3-2.1 s each, after which TVM imports
all five. onnxscript's optimizer (``onnxscript.optimizer.optimize``) is as fast but leaves
EfficientNet-Lite0's dynamic ``Pad`` (legacy exporter) unfolded; onnxsim is not maintained for
current onnx/Python releases. If onnxslim itself fails on a graph, the graph is used unfolded with a
warning (TVM's frontend may still take it).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Mapping, Sequence

import onnx
import onnx.inliner
import onnxslim


class FoldWarning(UserWarning):
    """onnxslim could not fold a graph; it is imported as exported."""


def prepare(proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], what: str) -> onnx.ModelProto:
    """``proto`` with local functions inlined, nodes named and shapes folded at ``shapes``.

    ``shapes`` maps every graph input (not initialisers) to its static shape; ``what`` names the
    model in warnings. The caller's proto is not modified.
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    _name_nodes(model.graph)
    _set_input_shapes(model.graph, shapes)
    spec = [f"{name}:{','.join(str(int(d)) for d in dims)}" for name, dims in shapes.items()]
    try:
        with _quiet():
            folded = onnxslim.slim(model, input_shapes=spec) if spec else onnxslim.slim(model)
    except Exception as err:  # onnxslim raises many types; the unfolded graph may still import
        first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        warnings.warn(f"{what}: onnxslim could not fold shape computations ({first[:200]}); importing as exported",
                      FoldWarning, stacklevel=3)
        return _constants_for_non_float_initializers(model)
    return _constants_for_non_float_initializers(folded)


def _constants_for_non_float_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    keep, constants = [], []
    for init in graph.initializer:
        if init.data_type in _FLOAT_TYPES:
            keep.append(init)
        else:
            constants.append(onnx.helper.make_node("Constant", [], [init.name], name=f"{init.name}_const", value=init))
    if not constants:
        return model
    declared = {init.name for init in constants}
    inputs = [inp for inp in graph.input if inp.name not in declared]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(constants + nodes)
    return model


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _name_nodes(graph: onnx.GraphProto) -> None:
    taken = {node.name for node in graph.node if node.name}
    for index, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _set_input_shapes(graph: onnx.GraphProto, shapes: Mapping[str, Sequence[int]]) -> None:
    """Write the static shapes into the graph's input declarations (what shape inference starts from)."""
    for inp in graph.input:
        if inp.name not in shapes:
            continue
        shape = inp.type.tensor_type.shape
        shape.ClearField("dim")
        for d in shapes[inp.name]:
            shape.dim.add().dim_value = int(d)


@contextlib.contextmanager
def _quiet():
    """onnxslim logs and prints progress; keep the user's terminal for our own messages."""
    logger = logging.getLogger("onnxslim")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
