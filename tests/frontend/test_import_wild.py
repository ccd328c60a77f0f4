"""Import of graphs as exporters and users leave them: TIR functions the frontend emits, ONNX local
functions, external data, run-time shape computations, torch's default input names (input_map and
the look-alike warning), dynamic .pt2 programs, and one-line errors naming node and op."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tvm
from helpers import run_relax
from onnx import TensorProto, helper, numpy_helper

from gmorph_tvm import import_models, zoo
from gmorph_tvm.errors import InputSpecError, ModelImportError
from gmorph_tvm.frontend.importer import SimilarInputsWarning, _short


def _model(nodes, inputs, outputs, inits=(), functions=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(f.domain, 1) for f in functions]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _reflect_pad_model(shift: float) -> onnx.ModelProto:
    """A reflect Pad: TVM's frontend emits a TIR ``mirror_pad`` function for it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])
    nodes = [
        helper.make_node("Constant", [], ["pads"], value=numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64))),
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect", name="pad"),
        helper.make_node("Add", ["p", "shift"], ["y"], name="add"),
    ]
    inits = [numpy_helper.from_array(np.full([6], shift, np.float32), "shift")]
    return _model(nodes, [x], [y], inits)


def test_tir_functions_the_frontend_emits_are_kept_per_task():
    a, b = _reflect_pad_model(1.0), _reflect_pad_model(-2.0)
    mm = import_models({"a": a, "b": b})
    names = {gv.name_hint for gv in mm.mod.get_global_vars()}
    # Kept under the task's name; b's are structurally equal to a's, so the builder shares them.
    assert any(n.startswith("a_") and "pad" in n for n in names), names
    tvm.relax.analysis.well_formed(mm.mod)
    x = np.random.default_rng(0).normal(size=(4, 4)).astype("float32")
    got = run_relax(mm.bound_module(), [x])
    for g, model in zip(got, (a, b)):
        np.testing.assert_allclose(g, _ort(model, {"x": x})[0], rtol=1e-6, atol=1e-6)


def test_onnx_local_functions_are_inlined():
    fn = helper.make_function(
        "custom", "AddRelu", ["p", "q"], ["r"],
        [helper.make_node("Add", ["p", "q"], ["s"]), helper.make_node("Relu", ["s"], ["r"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    bias = numpy_helper.from_array(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "bias")
    model = _model([helper.make_node("AddRelu", ["x", "bias"], ["y"], domain="custom")], [x], [y], [bias], [fn])
    xv = np.random.default_rng(1).normal(size=(2, 3)).astype("float32")
    got = run_relax(import_models({"f": model}).bound_module(), [xv])[0]
    np.testing.assert_allclose(got, _ort(model, {"x": xv})[0], rtol=1e-6)


def test_run_time_shape_computation_is_folded_and_external_data_is_read(tmp_path):
    # Reshape to a shape computed at run time (Shape -> Gather -> Concat), with batch symbolic, as
    # exporters write it; the weights live in a separate file.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(np.random.default_rng(2).normal(size=(6, 6)).astype("float32"), "w")]
    model = _model(nodes, [x], [y], inits)
    xv = np.random.default_rng(3).normal(size=(5, 2, 3)).astype("float32")
    want = _ort(model, {"x": xv})[0]
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    mm = import_models({"m": str(path)}, input_shapes={"x": [5, 2, 3]})
    np.testing.assert_allclose(run_relax(mm.bound_module(), [xv])[0], want, rtol=1e-5)
    (tmp_path / "m.data").unlink()
    with pytest.raises(ModelImportError, match=r"model 'm': .* keeps its weights in 'm.data'"):
        import_models({"m": str(path)}, input_shapes={"x": [5, 2, 3]})


def _mlp_onnx(tmp_path, seed: int, input_name: str):
    model = zoo.make("mlp", seed=seed)
    x = zoo.example_input("mlp", 1)
    path = tmp_path / f"mlp{seed}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=[input_name])
    return model, x, str(path)


def test_input_map_joins_torch_default_input_name_and_look_alikes_warn(tmp_path):
    m0, x, p0 = _mlp_onnx(tmp_path, 0, "x")
    m1, _, p1 = _mlp_onnx(tmp_path, 1, "input.1")
    with pytest.warns(SimilarInputsWarning, match=r"'x' and 'input.1'.*--input-map b.input.1=x"):
        apart = import_models({"a": p0, "b": p1})
    assert [s.name for s in apart.inputs] == ["x", "input.1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SimilarInputsWarning)
        joined = import_models({"a": p0, "b": p1}, input_map={"b.input.1": "x"})
    assert [s.name for s in joined.inputs] == ["x"]
    assert [s.name for s in joined.task("b").inputs] == ["x"]
    got = run_relax(joined.bound_module(), [x.numpy()])
    with torch.no_grad():
        for g, m in zip(got, (m0, m1)):
            np.testing.assert_allclose(g, m(x).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputSpecError, match=r"input_map key 'b.input.2': model 'b' has no input 'input.2'.*'input.1'"):
        import_models({"a": p0, "b": p1}, input_map={"b.input.2": "x"})
    with pytest.raises(InputSpecError, match=r"input_map key 'c.x': no model named 'c'"):
        import_models({"a": p0, "b": p1}, input_map={"c.x": "x"})


def _dynamic_pt2(tmp_path):
    model = zoo.make("mlp", seed=3)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (zoo.example_input("mlp", 2),), dynamic_shapes=({0: batch},))
    path = tmp_path / "dyn.pt2"
    torch.export.save(ep, str(path))
    return model, str(path)


def test_dynamic_exported_program_is_specialised_to_the_given_shape(tmp_path):
    model, path = _dynamic_pt2(tmp_path)
    with pytest.raises(InputSpecError, match=r"model 'dyn': input 'x' of the exported program has dynamic dims "
                                             r"\[\?,1,28,28\].*--input-shape x="):
        import_models({"dyn": path})
    mm = import_models({"dyn": path}, input_shapes={"x": [3, 1, 28, 28]})
    assert mm.inputs[0].shape == (3, 1, 28, 28)
    x = zoo.example_input("mlp", 3)
    with torch.no_grad():
        np.testing.assert_allclose(run_relax(mm.bound_module(), [x.numpy()])[0], model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_input_shapes_of_a_torch_model_are_used_and_checked():
    """A shape given for a PyTorch model's input counts as used, and must be the example's shape."""
    model, x = zoo.make("mlp", seed=3), zoo.example_input("mlp", 2)
    mm = import_models({"m": model}, x, input_shapes={"x": [2, 1, 28, 28]})
    assert mm.inputs[0].shape == (2, 1, 28, 28)
    with pytest.raises(InputSpecError, match=r"model 'm': input_shapes gives input 'x' the shape \[4, 1, 28, 28\], "
                                             r"but the program reads \[2, 1, 28, 28\]"):
        import_models({"m": model}, x, input_shapes={"x": [4, 1, 28, 28]})
    with pytest.raises(InputSpecError, match=r"shape for 'y', but no model has an input of that name"):
        import_models({"m": model}, x, input_shapes={"y": [2, 1, 28, 28]})


def test_cli_build_takes_input_shape_for_pt2_and_input_map(tmp_path):
    _, pt2 = _dynamic_pt2(tmp_path)
    _, x, onnx_path = _mlp_onnx(tmp_path, 1, "input.1")
    out = tmp_path / "both.so"
    proc = subprocess.run(
        [sys.executable, "-m", "gmorph_tvm.cli", "build", pt2, onnx_path, "--names", "dyn,b", "--no-fuse",
         "--input-shape", "x=1,1,28,28", "--input-map", "b.input.1=x", "-o", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    info = subprocess.run([sys.executable, "-m", "gmorph_tvm.cli", "info", str(out)], capture_output=True, text=True)
    assert [ln for ln in info.stdout.splitlines() if ln.startswith("input")] == ["input     x: float32[1, 1, 28, 28]"]
    bad = subprocess.run([sys.executable, "-m", "gmorph_tvm.cli", "build", onnx_path, "--input-map", "nodot=x",
                          "-o", str(tmp_path / "bad.so")], capture_output=True, text=True)
    assert bad.returncode == 2 and "TASK.INPUT=SHARED" in bad.stderr


def test_node_that_tvm_cannot_convert_is_named_in_one_line():
    # The Reshape target depends on the data (ArgMax), so no static shape can fold it.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", "c", "d"])
    nodes = [
        helper.make_node("ArgMax", ["x"], ["am"], axis=0, keepdims=0, name="argmax"),
        helper.make_node("Reshape", ["x", "am"], ["y"], name="data_dependent_reshape"),
    ]
    with pytest.raises(ModelImportError) as info:
        import_models({"odd": _model(nodes, [x], [y])})
    msg = str(info.value)
    assert "\n" not in msg
    assert "model 'odd'" in msg and "node 'data_dependent_reshape' (Reshape)" in msg and "--input-shape x=4,4" in msg
    assert "Check failed" not in msg and "Traceback" not in msg


def test_unsupported_op_error_names_the_first_node_using_it():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    model = _model([helper.make_node("Det", ["x"], ["y"], name="geometry_det")], [x], [y])
    with pytest.raises(ModelImportError, match=r"model 'geo': .*Det \(node 'geometry_det'\).*; try "):
        import_models({"geo": model})


def test_tvm_check_conditions_are_cut_from_messages():
    err = RuntimeError("Traceback (most recent call last):\n  File \"x.py\", line 1\nInternalError: Check failed: "
                       "(data_ty->shape.has_value()) is false: Reshape expects the input tensor to have known shape.")
    assert _short(err) == "Reshape expects the input tensor to have known shape."
