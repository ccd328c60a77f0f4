"""Grouping by measurement (gmorph_tvm.grouping): the measured partition is valid, and measuring on a
target that does not run here, or with both a size and a latency, is refused; groups are timed on the
one random-input helper (gmorph_tvm.core.inputs), whose values are valid for every dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gmorph_tvm import import_models
from gmorph_tvm.core.inputs import random_inputs
from gmorph_tvm.core.specs import TensorSpec
from gmorph_tvm.errors import InputSpecError
from gmorph_tvm.grouping import measured_latency
from gmorph_tvm.passes import GroupingError, group_tasks

X = torch.randn(2, 16)


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_measured_group_size_is_a_valid_partition():
    mm = import_models({f"t{i}": _mlp(i) for i in range(3)}, X)
    groups = group_tasks(mm, latency=measured_latency(number=1), candidate_sizes=[1, 3])
    assert groups in ([["t0"], ["t1"], ["t2"]], [["t0", "t1", "t2"]])
    with pytest.raises(GroupingError, match="does not run"):
        measured_latency(target="cuda")
    with pytest.raises(GroupingError, match="not both"):
        group_tasks(mm, 2, latency=measured_latency(number=1))


class _Embed(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.table, self.head = nn.Embedding(5, 8), nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.table(ids).mean(1))


def test_measured_latency_feeds_integer_inputs_valid_random_values(monkeypatch):
    """The group is timed on the one random-input helper's values (it fed zeros to integer inputs:
    every token id 0), drawn within the table bounds the artifact records."""
    import gmorph_tvm.grouping as grouping

    drawn = []

    def spy(manifest, *args, **kwargs):
        arrays = random_inputs(manifest, *args, **kwargs)
        drawn.append((manifest.get("index_bounds"), arrays))
        return arrays

    monkeypatch.setattr(grouping, "random_inputs", spy)
    ids = torch.tensor([[0, 1, 2, 3, 4, 1]])
    mm = import_models({f"t{i}": _Embed(i) for i in range(2)}, ids)
    assert measured_latency(number=1)(mm) > 0
    ((bounds, (arr,)),) = drawn
    assert bounds == {"ids": {"low": 0, "high": 5}} and arr.dtype == np.int64
    assert set(np.unique(arr)) == {0, 1}  # valid ids, not all zeros


def test_random_inputs_give_valid_values_for_every_dtype():
    specs = [TensorSpec(n, (64,), d) for n, d in [("f", "float32"), ("h", "float16"), ("bf", "bfloat16"),
                                                  ("b", "bool"), ("i", "int64"), ("u", "uint8"), ("c", "complex64")]]
    arrays = random_inputs(specs, seed=3)
    assert [str(a.dtype) for a in arrays] == [s.dtype for s in specs]
    assert all(np.isfinite(a.astype(np.complex128)).all() and a.shape == (64,) for a in arrays)
    floats = arrays[0]
    assert floats.std() > 0.5 and set(np.unique(arrays[4])) == {0, 1} and set(np.unique(arrays[3])) == {False, True}
    np.testing.assert_array_equal(floats, random_inputs(specs, seed=3)[0])  # deterministic
    # An index input's recorded range is kept (here only 3 and 4 are valid ids).
    (ids,) = random_inputs([TensorSpec("ids", (32,), "int32")], index_bounds={"ids": {"low": 3, "high": 5}})
    assert set(np.unique(ids)) == {3, 4}
    manifest = {"inputs": [{"name": "ids", "shape": [8], "dtype": "int32"}],
                "index_bounds": {"ids": {"low": 2, "high": 3}}}
    assert set(random_inputs(manifest)[0]) == {2}
    with pytest.raises(InputSpecError, match="input 'v': no random values for dtype 'void'"):
        random_inputs([TensorSpec("v", (1,), "void")])
