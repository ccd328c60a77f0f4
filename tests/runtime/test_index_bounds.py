"""Out-of-range indices into a table (ONNX Gather, nn.Embedding) are refused, like onnxruntime and
PyTorch do, instead of reading other memory or crashing (TVM's take has no bounds check)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import onnx_model
from onnx import TensorProto, helper

import gmorph_tvm
from gmorph_tvm.errors import RuntimeInputError
from gmorph_tvm.passes import index_bounds
from gmorph_tvm.runtime import load

TABLE = np.arange(40, dtype=np.float32).reshape(10, 4)


@pytest.fixture(scope="module")
def gather():
    return onnx_model([helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
                      [("ids", TensorProto.INT64, [1, 3])], [("y", TensorProto.FLOAT, [1, 3, 4])], [("table", TABLE)])


@pytest.fixture(scope="module")
def runners(gather, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("take")
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(10, 4).eval()
    onnx_art = gmorph_tvm.build(gmorph_tvm.import_models({"g": gather}))
    torch_art = gmorph_tvm.build(gmorph_tvm.import_models({"e": embedding}, example_inputs=torch.tensor([[1, 2, 3]])))
    return load(onnx_art.export(tmp / "g.so")), load(torch_art.export(tmp / "e.so")), embedding


def test_bounds_are_recorded_per_index_input(gather):
    assert index_bounds(gmorph_tvm.import_models({"g": gather}).bound_module()) == {"ids": {"low": -10, "high": 10}}


@pytest.mark.parametrize("ids", [[0, 9, -1], [-10, 5, 3]])
def test_valid_indices_match_onnxruntime(runners, gather, ids):
    ids = np.array([ids], np.int64)
    expected = ort.InferenceSession(gather.SerializeToString()).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(runners[0](ids)["g"], expected)


@pytest.mark.parametrize("bad", [10, 100_000_000, -11, 2**40])
def test_out_of_range_indices_are_refused(runners, bad):
    onnx_runner, torch_runner, embedding = runners
    ids = np.array([[0, bad, 1]], np.int64)
    with pytest.raises(RuntimeInputError, match=rf"input 'ids': index {bad} at \[0, 1\] is out of range; it indexes "
                                                r"a table of 10 entries \(valid -10\.\.9\)"):
        onnx_runner(ids)
    with pytest.raises(RuntimeInputError, match=rf"index {bad} at \[0, 1\] is out of range.*valid 0\.\.9"):
        torch_runner(ids)
    with pytest.raises(IndexError):  # what PyTorch does
        embedding(torch.from_numpy(ids))


def test_negative_index_is_refused_for_an_embedding(runners):
    with pytest.raises(RuntimeInputError, match=r"index -1 .*valid 0\.\.9"):
        runners[1](np.array([[0, -1, 1]], np.int64))
    with torch.no_grad():
        np.testing.assert_allclose(runners[1](np.array([[0, 9, 1]], np.int64))["e"],
                                   runners[2](torch.tensor([[0, 9, 1]])).numpy(), rtol=1e-6)
