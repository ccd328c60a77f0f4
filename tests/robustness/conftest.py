"""A tiny two-task artifact (relu of x; rows of a table picked by int64 ids) and its numpy reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import onnx_model
from onnx import TensorProto, helper

import gmorph_tvm

TABLE = (np.arange(15, dtype=np.float32).reshape(5, 3) - 7) / 3


def reference(x: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"relu": np.where(x < 0, 0, x).astype(np.float32), "rows": TABLE[ids]}


@pytest.fixture(scope="session")
def tiny_reference():
    return reference


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    relu = onnx_model([helper.make_node("Relu", ["x"], ["y"])], [("x", TensorProto.FLOAT, [2, 3])],
                      [("y", TensorProto.FLOAT, [2, 3])])
    rows = onnx_model([helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)], [("ids", TensorProto.INT64, [2])],
                      [("y", TensorProto.FLOAT, [2, 3])], [("table", TABLE)])
    onnx.save(relu, str(tmp / "relu.onnx"))
    onnx.save(rows, str(tmp / "rows.onnx"))
    mm = gmorph_tvm.import_models({"relu": relu, "rows": rows})
    return gmorph_tvm.build(mm).export(tmp / "tiny.so")
