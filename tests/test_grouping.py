"""Grouping by measurement (gmorph_tvm.grouping): the measured partition is valid, and measuring on a
target that does not run here, or with both a size and a latency, is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gmorph_tvm import import_models
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
