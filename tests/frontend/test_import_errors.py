"""Import: weight names that sanitise alike, a failed import then a good one, input_shapes checks,
task names that collide, and the wrong container for models."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import onnx_model
from onnx import TensorProto, helper

import gmorph_tvm
from gmorph_tvm.errors import InputSpecError, ModelImportError

F = TensorProto.FLOAT
REPO = Path(__file__).resolve().parents[2]


def _adds(names: list[str], sizes: list[int]):
    """x[1,4] + sum_rows(x * w0) + ...: weight i is [k_i, 4], so sizes differ; each product reads
    the input, so constant folding at import cannot fold the weights away."""
    nodes, prev, inits = [], "x", []
    for i, (name, k) in enumerate(zip(names, sizes)):
        inits.append((name, np.full((k, 4), i + 1, np.float32)))
        nodes.append(helper.make_node("Mul", ["x", name], [f"m{i}"]))
        nodes.append(helper.make_node("ReduceSum", [f"m{i}", f"axes{i}"], [f"s{i}"], keepdims=1))
        inits.append((f"axes{i}", np.array([0], np.int64)))
        nodes.append(helper.make_node("Add", [prev, f"s{i}"], [f"y{i}"]))
        prev = f"y{i}"
    return onnx_model(nodes, [("x", F, [1, 4])], [(prev, F, [1, 4])], inits)


_WEIGHT_BYTES = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import gmorph_tvm
    from test_import_errors import _adds
    mm = gmorph_tvm.import_models({"t": _adds(["w.1", "w_1", "_w", "w"], [2, 3, 5, 7])})
    print(mm.weight_bytes, sorted(mm.params))
""")


def test_weight_names_that_sanitise_alike_stay_distinct_for_any_hash_seed():
    outs = set()
    for seed in ("0", "1", "2"):
        proc = subprocess.run([sys.executable, "-c", _WEIGHT_BYTES, str(Path(__file__).parent)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONHASHSEED": seed}, timeout=300,
                              cwd=REPO / "tests")
        assert proc.returncode == 0, proc.stderr
        outs.add(proc.stdout.strip())
    assert len(outs) == 1, outs
    expected_bytes = (2 + 3 + 5 + 7) * 4 * 4  # the float weights (int64 axes become constants at import)
    out = outs.pop()
    assert out.startswith(f"{expected_bytes} [") and all(f"'t.{n}'" in out for n in ("_w", "w", "w.1", "w_1")), out


_BAD_THEN_GOOD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from onnx import TensorProto, helper
    import gmorph_tvm
    from gmorph_tvm.errors import ModelImportError
    from helpers import onnx_model
    F, I = TensorProto.FLOAT, TensorProto.INT64
    bad = onnx_model([helper.make_node("Reshape", ["x", "s"], ["y"])], [("x", F, [1, 4]), ("s", I, [2])], [("y", F, [2, 2])])
    good = onnx_model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, [1, 4])], [("y", F, [1, 4])])
    try:
        gmorph_tvm.import_models({"bad": bad})
    except ModelImportError as err:
        print("refused:", err)
    mm = gmorph_tvm.import_models({"good": good})
    out = gmorph_tvm.build(mm).run(np.array([[-1, 2, -3, 4]], np.float32))["good"]
    print("good:", out.tolist())
""")


def test_failed_import_then_a_good_one_in_one_process():
    proc = subprocess.run([sys.executable, "-c", _BAD_THEN_GOOD, str(REPO / "tests")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "refused: model 'bad': TVM cannot convert ONNX node 'Reshape_0' (Reshape) of the ONNX model: Reshape" in proc.stdout
    assert "good: [[0.0, 2.0, 0.0, 4.0]]" in proc.stdout
    assert "BlockBuilder destroyed" not in proc.stderr and "Error converting operator" not in proc.stdout
    assert proc.stderr.strip() == "", proc.stderr


def _relu(shape):
    return onnx_model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, shape)], [("y", F, shape)])


@pytest.mark.parametrize("shapes,pattern", [
    ({"x": [1, 3]}, r"input 'x' has rank 3 \(\[\?, 3, 4\]\) but input_shapes gives 2 dimensions \[1, 3\]"),
    ({"x": [0, 3, 4]}, r"'x' = \[0, 3, 4\]: dimensions must be positive"),
    ({"x": [-1, 3, 4]}, r"dimensions must be positive"),
    ({"x": []}, r"'x' is an empty shape"),
    ({"x": 5}, r"'x' must be a list of dimensions, not 5"),
    ({"x": "1,3,4"}, r"must be a list of dimensions"),
    ({"x": [1.5, 3, 4]}, r"dimensions must be integers"),
    ({"y": [1, 3, 4]}, r"symbolic shape \[\?,3,4\].*input_shapes names 'y', which is not an input of this model"),
    ({"x": [2, 5, 4]}, r"static shape \[\?, 3, 4\] in the ONNX file; input_shapes cannot change dimension 1 from 3 to 5"),
    ({"other": {"x": [1, 3, 4]}}, r"input_shapes names task 'other', but the tasks are t"),
    ([1, 3, 4], r"input_shapes must map input names to shapes, not a list"),
])
def test_bad_input_shapes_are_clear_errors(shapes, pattern):
    with pytest.raises(InputSpecError, match=pattern):
        gmorph_tvm.import_models({"t": _relu(["batch", 3, 4])}, input_shapes=shapes)


def test_input_shape_for_an_unknown_input_is_an_error():
    with pytest.raises(InputSpecError, match=r"shape for 'y', but no model has an input of that name"):
        gmorph_tvm.import_models({"t": _relu([2, 3, 4])}, input_shapes={"y": [2, 3, 4]})


def test_good_input_shapes_still_work():
    mm = gmorph_tvm.import_models({"t": _relu(["batch", 3, 4])}, input_shapes={"t": {"x": [2, 3, 4]}})
    assert mm.inputs[0].shape == (2, 3, 4)
    mm = gmorph_tvm.import_models({"t": _relu([2, 3, 4])}, input_shapes={"x": [2, 3, 4]})  # equal to the static one
    assert mm.inputs[0].shape == (2, 3, 4)


def test_models_must_be_a_mapping_and_task_names_distinct(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_relu([1, 4]), str(path))
    with pytest.raises(ModelImportError, match=r"import_models takes a mapping task name -> model, not a list"):
        gmorph_tvm.import_models([str(path)])
    with pytest.raises(ModelImportError, match=r"task names 'a-b' and 'a_b' collide"):
        gmorph_tvm.import_models({"a-b": str(path), "a_b": str(path)})


def test_invalid_onnx_model_error_names_the_problem_and_the_node():
    """The checker's problem and its "==> Context" line (the node) both reach the one-line error."""
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu_7", bogus=1)]
    model = onnx_model(nodes, [("x", F, [1, 4])], [("y", F, [1, 4])], [])
    with pytest.raises(ModelImportError) as info:
        gmorph_tvm.import_models({"t": model})
    message = str(info.value)
    assert "\n" not in message
    assert "Unrecognized attribute: bogus" in message and "relu_7" in message, message


def test_an_empty_input_dimension_is_named_as_such_not_symbolic():
    """An ONNX input of shape [0, 3, 16, 16] was reported as "symbolic [?,3,16,16]"."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [0, 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [0, 3, 16, 16])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "empty", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InputSpecError, match=r"ONNX input 'x' has an empty dimension in its shape \[0,3,16,16\]") as info:
        gmorph_tvm.import_models({"m": model})
    assert "symbolic" not in str(info.value)
