"""Distillation fine-tuning: recovers agreement, stops early, learning-curve termination."""

from __future__ import annotations

import pytest
import torch

from gmorph_tvm.errors import SearchError
from gmorph_tvm.lossy.distill import DistillConfig, Teacher, distill, extrapolate
from gmorph_tvm.lossy.mutate import Calibration, build_fused
from gmorph_tvm.lossy.plan import FusionPlan, Share


@pytest.fixture(scope="module")
def teacher(tiny_models, tiny_data):
    return Teacher(tiny_models, tiny_data, train_samples=800, seed=0)


def _deep_share(graphs, teacher):
    # coarse4 keeps only its head and reads class10's last conv block: a large change.
    plan = FusionPlan((Share("coarse4", 3, "class10", 2),))
    return build_fused(graphs, plan, Calibration(graphs, teacher.x[:64]))


def test_distillation_recovers_accuracy_and_leaves_other_tasks_alone(tiny_graphs, tiny_data, teacher):
    fused = _deep_share(tiny_graphs, teacher)
    size3_before = [p.detach().clone() for p in fused.task_module("size3").parameters()]
    config = DistillConfig(max_epochs=2, train_samples=800, batch_size=32, lr=3e-3, evals_per_epoch=2, curve_margin=1e9)
    result = distill(fused, teacher, tiny_data.val_x, tiny_data.val_y, max_accuracy_drop=0.0, config=config, seed=0)
    initial, final = result.curve[0][1], result.max_drop
    assert final < initial - 1.0, result.curve
    assert result.val_drops["class10"] <= 1.0  # the host, trained jointly, stays close to its original
    # size3 was not touched by the plan: its layers are frozen, its accuracy is the original's.
    assert result.val_drops["size3"] == 0.0
    for before, after in zip(size3_before, fused.task_module("size3").parameters()):
        assert torch.equal(before, after)
    assert result.stop_reason in ("max_epochs", "target_met")
    assert 0 < result.epochs <= 2.0


def test_stops_as_soon_as_the_target_is_met(tiny_graphs, tiny_data, teacher):
    fused = build_fused(tiny_graphs, FusionPlan())
    result = distill(fused, teacher, tiny_data.val_x, tiny_data.val_y, max_accuracy_drop=1.0, config=DistillConfig(max_epochs=3))
    assert result.passed and result.stop_reason == "target_met" and result.steps == 0 and result.max_drop == 0.0


def test_learning_curve_ends_hopeless_fine_tunes(tiny_graphs, tiny_data, teacher):
    fused = _deep_share(tiny_graphs, teacher)
    # lr=0: the curve is flat, far above the target, so the extrapolation cannot reach it.
    config = DistillConfig(max_epochs=4, train_samples=800, batch_size=32, lr=0.0, evals_per_epoch=2, curve_margin=0.5)
    result = distill(fused, teacher, tiny_data.val_x, tiny_data.val_y, max_accuracy_drop=0.0, config=config)
    assert result.stop_reason == "learning_curve" and not result.passed
    assert result.epochs == pytest.approx(1.0, abs=0.05)  # two training evaluations, out of 4 epochs


def test_extrapolate_fits_the_last_points():
    curve = [(0.0, 50.0), (1.0, 10.0), (2.0, 8.0), (3.0, 6.0)]
    assert extrapolate(curve, 5.0, points=3) == pytest.approx(2.0)
    assert extrapolate([(1.0, 4.0)], 9.0, points=3) == 4.0


def test_bad_config_is_rejected():
    with pytest.raises(SearchError, match="loss"):
        DistillConfig(loss="mse")
    with pytest.raises(SearchError, match="train"):
        DistillConfig(train="some")


def test_device_argument_trains_there_and_returns_on_the_cpu(tiny_graphs, tiny_data, teacher):
    """The path a Ray worker with a GPU takes (device="cuda"), here with device="cpu" (a GPU where there
    is one): the same seed gives the same result as the default, and the model comes back on the CPU."""
    config = DistillConfig(max_epochs=0.25, train_samples=800, batch_size=32, evals_per_epoch=2, curve_margin=1e9)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    runs = []
    for device in [None, *devices]:
        fused = _deep_share(tiny_graphs, teacher)
        result = distill(fused, teacher, tiny_data.val_x, tiny_data.val_y, 0.0, config, seed=0, device=device)
        assert all(p.device.type == "cpu" for p in fused.parameters())
        runs.append((result.steps, result.val_drops))
    assert runs[1] == runs[0]
    for steps, val_drops in runs[2:]:  # GPU: float rounding may move an accuracy by a sample or two
        assert steps == runs[0][0] and all(abs(val_drops[t] - runs[0][1][t]) <= 1.0 for t in val_drops)
