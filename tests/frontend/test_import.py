"""import_models: every zoo architecture, from PyTorch and from ONNX, batch 1 and 8, merged into one
module whose outputs match PyTorch / onnxruntime within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import run_relax

from gmorph_tvm import import_models, zoo
from gmorph_tvm.errors import InputSpecError, ModelImportError

ARCHS = ["vgg", "resnet", "mobilenet", "mlp", "transformer"]


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path) -> str:
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    return str(path)


def _ort(path: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("arch", ARCHS)
def test_zoo_model_from_torch_and_onnx_matches(arch, batch, tmp_path):
    model = zoo.make(arch, seed=1)
    x = zoo.example_input(arch, batch)
    onnx_path = _export_onnx(model, x, tmp_path / f"{arch}.onnx")

    mm = import_models({f"{arch}_torch": model, f"{arch}_onnx": onnx_path}, x)

    # One shared input: both frontends name it "x" with the same shape and dtype.
    assert [s.name for s in mm.inputs] == ["x"]
    assert mm.inputs[0].shape == tuple(x.shape)
    assert [t.source for t in mm.tasks] == ["torch", "onnx"]
    out_torch, out_onnx = run_relax(mm.bound_module(), [x.numpy()])
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(out_torch, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out_onnx, _ort(onnx_path, x.numpy()), rtol=1e-4, atol=1e-4)
    assert mm.tasks[0].outputs[0].shape == tuple(expected.shape)


def test_weights_are_named_parameters_with_provenance():
    model = zoo.make("resnet", seed=0)
    x = zoo.example_input("resnet", 1)
    mm = import_models({"age": model}, x)
    state = model.state_dict()
    # Every float tensor of the state dict (parameters and batch-norm buffers) is a named weight.
    float_state = {k for k, v in state.items() if v.is_floating_point()}
    assert {orig for (_, orig) in sum(mm.provenance.values(), [])} == float_state
    for name, value in mm.params.items():
        (task, orig), = mm.provenance[name]
        assert task == "age" and name == f"age.{orig}"
        np.testing.assert_array_equal(value.numpy(), state[orig].numpy())
    main = mm.mod["main"]
    assert int(main.attrs["num_input"]) == 1
    assert [p.name for p in main.params[1:]] == list(mm.params)


def test_main_takes_distinct_inputs_and_returns_outputs_in_task_order():
    class TwoIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x, meta):
            return self.lin(x) + meta.sum(-1, keepdim=True), meta * 2

    class OneIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    x, meta = torch.randn(2, 4), torch.randn(2, 5)
    a, b = OneIn(), TwoIn()
    mm = import_models({"first": a, "second": b}, {"first": (x,), "second": (x, meta)})
    assert [s.name for s in mm.inputs] == ["x", "meta"]
    assert [o.name for o in mm.task("second").outputs] == ["second:0", "second:1"]
    assert mm.output_index("first") == [0] and mm.output_index("second") == [1, 2]
    outs = run_relax(mm.bound_module(), [x.numpy(), meta.numpy()])
    with torch.no_grad():
        expected = [a(x), *b(x, meta)]
    for got, want in zip(outs, expected):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_exported_program_file_imports(tmp_path):
    model = zoo.make("mlp", seed=3)
    x = zoo.example_input("mlp", 2)
    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    mm = import_models({"mlp": str(path)})
    (out,) = run_relax(mm.bound_module(), [x.numpy()])
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-5, atol=1e-5)


# ---- bad input ----------------------------------------------------------------------------


def test_same_input_name_with_different_shapes_is_rejected():
    a = zoo.make("mlp", seed=0)
    with pytest.raises(InputSpecError, match=r"input 'x' is float32\[1, 1, 28, 28\] in model 'a' but float32\[2, 1, 28, 28\] in model 'b'"):
        import_models({"a": a, "b": a}, {"a": zoo.example_input("mlp", 1), "b": zoo.example_input("mlp", 2)})


def test_corrupt_and_truncated_onnx_files(tmp_path):
    model = zoo.make("mlp", seed=0)
    good = _export_onnx(model, zoo.example_input("mlp", 1), tmp_path / "good.onnx")
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 3])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot an onnx model at all" * 10)
    for path in (truncated, garbage):
        with pytest.raises(ModelImportError, match=rf"model 'm': '{path}' is not a valid ONNX"):
            import_models({"m": str(path)})
    with pytest.raises(ModelImportError, match="does not exist"):
        import_models({"m": str(tmp_path / "missing.onnx")})


def test_unsupported_torch_operator_names_op_and_model():
    class Det(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.det(x)

    with pytest.raises(ModelImportError, match=r"model 'pose'.*not supported.*_linalg_det"):
        import_models({"pose": Det()}, torch.randn(2, 3, 3))


def test_unsupported_onnx_operator_names_op_and_model():
    from onnx import TensorProto, helper

    node = helper.make_node("Det", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelImportError, match=r"model 'geo'.*ONNX frontend: Det"):
        import_models({"geo": proto})


def test_model_that_fails_torch_export_names_model_and_line():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(ModelImportError, match=r"model 'branchy': torch.export failed: .*data-dependent.*in forward"):
        import_models({"branchy": DataDependent()}, torch.randn(3))


def test_bad_task_names_and_model_types():
    with pytest.raises(ModelImportError, match="task name"):
        import_models({"bad name!": zoo.make("mlp")}, zoo.example_input("mlp"))
    with pytest.raises(ModelImportError, match="unsupported model type int"):
        import_models({"m": 3})
    with pytest.raises(ModelImportError, match="needs example_inputs"):
        import_models({"m": zoo.make("mlp")})


def test_symbolic_onnx_shape_needs_input_shapes(tmp_path):
    model = zoo.make("mlp", seed=0)
    x = zoo.example_input("mlp", 1)
    path = str(tmp_path / "dyn.onnx")
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    with pytest.raises(InputSpecError, match=r"ONNX input 'x' has a symbolic shape.*input_shapes"):
        import_models({"dyn": path})
    mm = import_models({"dyn": path}, input_shapes={"x": [4, 1, 28, 28]})
    assert mm.inputs[0].shape == (4, 1, 28, 28)
