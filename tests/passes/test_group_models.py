"""GroupModels: tasks sharing a prefix land in one group, size limits and budgets are respected and
balanced, user groups are honoured (and checked), and each
group's module computes exactly its tasks' outputs with only its own inputs and weights."""

from __future__ import annotations

import copy

import pytest
import torch
from random_models import assert_close, run_module
from torch import nn

from gmorph_tvm import import_models
from gmorph_tvm.passes.group_models import (
    DEFAULT_MAX_GROUP_SIZE,
    GroupingError,
    group_tasks,
    split_into_groups,
    task_costs,
)
from gmorph_tvm.passes.horizontal_merge import horizontal_merge
from gmorph_tvm.passes.stitch_shared_weights import stitch


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
    return module.eval()


def _mlp(seed: int, hidden: int = 8, classes: int = 3) -> nn.Module:
    return _seeded(nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, classes)), seed)


TRUNK = _seeded(nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU()), 99)


def _trunk_task(seed: int, classes: int) -> nn.Module:
    return nn.Sequential(copy.deepcopy(TRUNK), _seeded(nn.Linear(12, classes), seed)).eval()


def _mixed_models() -> dict[str, nn.Module]:
    """Two trunk-sharing tasks interleaved with independent MLPs."""
    return {
        "a": _mlp(1),
        "s1": _trunk_task(2, 4),
        "b": _mlp(3),
        "s2": _trunk_task(4, 2),
        "c": _seeded(nn.Sequential(nn.Linear(16, 5)), 5),
    }


X = torch.rand(1, 16) - 0.5


def _check_partition(groups: list[list[str]], tasks: list[str], max_size: int) -> None:
    flat = [t for g in groups for t in g]
    assert sorted(flat) == sorted(tasks) and len(flat) == len(set(flat))
    assert all(1 <= len(g) <= max_size for g in groups)


@pytest.mark.parametrize("stitched", [False, True], ids=["identical-content", "stitched"])
def test_tasks_sharing_a_prefix_are_grouped_together(stitched):
    mm = import_models(_mixed_models(), X)
    if stitched:
        mm = stitch(mm)
    groups = group_tasks(mm, 2)
    _check_partition(groups, mm.task_names, 2)
    assert ["s1", "s2"] in groups
    assert ["a", "b"] in groups  # same architecture next to each other (lockstep-mergeable)


def test_size_limit_is_respected_and_balanced():
    models = {f"t{i}": _mlp(i, hidden=4 + i % 3) for i in range(10)}
    mm = import_models(models, X)
    groups = group_tasks(mm, 8)
    _check_partition(groups, mm.task_names, 8)
    assert sorted(len(g) for g in groups) == [5, 5]  # not 8 + 2
    three = group_tasks(mm, 3)
    _check_partition(three, mm.task_names, 3)
    assert len(three) == 4
    assert group_tasks(mm) == group_tasks(mm, DEFAULT_MAX_GROUP_SIZE)


def test_budgets_bound_each_group():
    models = {f"t{i}": _mlp(i) for i in range(4)}
    mm = import_models(models, X)
    costs = task_costs(mm)
    one = costs["t0"]
    assert one.flops > 2 * 16 * 8 and one.weight_bytes == 4 * (16 * 8 + 8 + 8 * 3 + 3)
    groups = group_tasks(mm, 4, flops_budget=2 * one.flops)
    _check_partition(groups, mm.task_names, 2)
    assert len(groups) == 2
    groups = group_tasks(mm, 4, weight_budget_bytes=one.weight_bytes)
    assert all(len(g) == 1 for g in groups)


def test_user_groups_are_honoured_and_checked():
    mm = import_models(_mixed_models(), X)
    assert group_tasks(mm, groups=[["c", "a"], ["b", "s1", "s2"]]) == [["a", "c"], ["s1", "b", "s2"]]
    with pytest.raises(GroupingError, match="unknown task 'zz'"):
        group_tasks(mm, groups=[["a", "zz"], ["b", "c", "s1", "s2"]])
    with pytest.raises(GroupingError, match="more than one group"):
        group_tasks(mm, groups=[["a", "b"], ["b", "c", "s1", "s2"]])
    with pytest.raises(GroupingError, match="'c' is in no group"):
        group_tasks(mm, groups=[["a", "b", "s1", "s2"]])
    with pytest.raises(GroupingError, match="max_group_size"):
        group_tasks(mm, 0)


def test_each_group_module_equals_the_separate_models():
    models = _mixed_models()
    mm = stitch(import_models(models, X))
    groups = group_tasks(mm, 2)
    subs = split_into_groups(mm, groups)
    assert [s.task_names for s in subs] == groups
    for sub in subs:
        fused = horizontal_merge(stitch(sub), mode="always")
        with torch.no_grad():
            expected = [models[t](X).numpy() for t in sub.task_names]
        assert_close(run_module(sub.mod, [X]), expected)
        assert_close(run_module(fused.mod, [X]), expected)
        # only the group's own weights, each with its provenance
        owners = {task for entries in sub.provenance.values() for task, _ in entries}
        assert owners == set(sub.task_names)
        assert set(sub.params) == set(sub.provenance)
    assert sum(len(s.params) for s in subs) == len(mm.params)


class OnA(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = _seeded(nn.Linear(4, 2), 7)

    def forward(self, a):
        return self.fc(a)


class OnB(OnA):
    def forward(self, b):
        return self.fc(b) * 2


def test_groups_keep_only_the_inputs_they_read():
    models = {"ta": OnA().eval(), "tb": OnB().eval()}
    a, b = torch.rand(1, 4), torch.rand(1, 4)
    mm = import_models(models, {"ta": (a,), "tb": (b,)})
    sub_a, sub_b = split_into_groups(mm, [["ta"], ["tb"]])
    assert [s.name for s in sub_a.inputs] == ["a"] and [s.name for s in sub_b.inputs] == ["b"]
    assert int(sub_b.mod["main"].attrs["num_input"]) == 1
    assert_close(run_module(sub_b.mod, [b]), [models["tb"](b).detach().numpy()])


