"""Predictive filter: XGBoost regressors trained online; skip rules; plan features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmorph_tvm.errors import SearchError
from gmorph_tvm.lossy.features import FeatureExtractor, linear_cka
from gmorph_tvm.lossy.mutate import Calibration, build_fused
from gmorph_tvm.lossy.plan import FusionPlan, Share
from gmorph_tvm.lossy.predictor import PredictiveFilter


def _synthetic(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(n, 4))
    drop = 8.0 * x[:, 0]  # deeper sharing -> larger drop
    latency = 1.0 - 0.6 * x[:, 1]  # more removed compute -> faster
    return x, drop, latency


def test_predictions_appear_after_min_samples_and_learn_the_trend():
    filt = PredictiveFilter("xgboost", min_samples=4, drop_min_samples=4, drop_margin=0.5, seed=0)
    x, drop, lat = _synthetic(30)
    assert filt.decide(x[0], 1.0, 0.9).predicted_drop is None
    for i in range(3):
        filt.add_drop(x[i], drop[i])
        filt.add_latency(x[i], lat[i])
    assert not filt.ready
    for i in range(3, 30):
        filt.add_drop(x[i], drop[i])
        filt.add_latency(x[i], lat[i])
    assert filt.ready
    easy, hard = np.array([0.02, 0.9, 0.5, 0.5]), np.array([0.95, 0.9, 0.5, 0.5])
    d_easy, d_hard = filt.decide(easy, 1.0, None), filt.decide(hard, 1.0, None)
    assert d_easy.predicted_drop < 1.5 < 6.0 < d_hard.predicted_drop
    assert not d_easy.skip
    assert d_hard.skip and d_hard.reason == "predicted_drop"


def test_predicted_slower_than_best_is_skipped():
    filt = PredictiveFilter("xgboost", min_samples=4, seed=0)
    x, _, lat = _synthetic(30, seed=1)
    for i in range(30):
        filt.add_latency(x[i], lat[i])
    slow, fast = np.array([0.1, 0.0, 0.5, 0.5]), np.array([0.1, 1.0, 0.5, 0.5])
    decision = filt.decide(slow, 1.0, best_relative_latency=0.6)
    assert decision.skip and decision.reason == "predicted_latency" and decision.predicted_drop is None
    assert not filt.decide(fast, 1.0, best_relative_latency=0.6).skip


def test_linear_predictor_and_bad_names():
    filt = PredictiveFilter("linear", min_samples=2, drop_min_samples=2)
    for v in (0.0, 1.0, 2.0):
        filt.add_drop(np.array([v]), 2 * v)
    assert filt.decide(np.array([3.0]), 1.0, None).predicted_drop == pytest.approx(5.0, abs=0.6)
    with pytest.raises(SearchError, match="unknown predictor"):
        PredictiveFilter("forest")


def test_linear_cka():
    torch.manual_seed(0)
    a = torch.randn(64, 10)
    assert linear_cka(a, a) == pytest.approx(1.0)
    assert linear_cka(a, 3.0 * a @ torch.linalg.qr(torch.randn(10, 10))[0]) == pytest.approx(1.0)  # rotation/scale
    assert linear_cka(a, torch.randn(64, 7)) < 0.5


def test_plan_features(tiny_graphs, tiny_models, tiny_data):
    from gmorph_tvm.lossy.distill import evaluate

    calibration = Calibration(tiny_graphs, tiny_data.train_x[:64])
    tasks = list(tiny_graphs)
    probe_x, probe_y = tiny_data.val_x[:100], {t: y[:100] for t, y in tiny_data.val_y.items()}
    base = evaluate(build_fused(tiny_graphs, FusionPlan()), tasks, probe_x, probe_y)
    extract = FeatureExtractor(tiny_graphs, calibration, probe_x, probe_y, base)
    identity = extract(FusionPlan(), build_fused(tiny_graphs, FusionPlan(), calibration))
    assert identity["mac_fraction"] == pytest.approx(1.0) and identity["param_fraction"] == pytest.approx(1.0)
    assert identity["max_initial_drop"] == 0.0
    plan = FusionPlan((Share("coarse4", 3, "class10", 2),))
    feats = extract(plan, build_fused(tiny_graphs, plan, calibration))
    assert sorted(feats) == sorted(extract.names())
    assert feats["coarse4.removed_params"] == pytest.approx(
        tiny_graphs["coarse4"].cut(3).params_before / tiny_graphs["coarse4"].total_params
    )
    assert 0 < feats["coarse4.branch_cka"] <= 1 and feats["class10.branch_cka"] == 1.0
    assert feats["mac_fraction"] < 1.0 and feats["adapters"] == 1.0
    assert extract.vector(feats).shape == (len(extract.names()),)


def test_no_drop_predictions_before_a_pass_and_a_miss():
    filt = PredictiveFilter("xgboost", min_samples=3, drop_min_samples=3, seed=0)
    for v in (0.1, 0.5, 0.9, 0.7):
        filt.add_drop(np.array([v, 0.0]), 5.0 + v)  # every candidate so far missed a 1-point target
    assert filt.decide(np.array([0.2, 0.0]), 1.0, None).predicted_drop is None
    filt.add_drop(np.array([0.0, 0.0]), 0.3)  # the first one that met it
    assert filt.decide(np.array([0.2, 0.0]), 1.0, None).predicted_drop is not None


def test_latency_model_extrapolates_along_compute():
    x = np.array([[m, 0.0] for m in (1.0, 0.9, 0.8, 0.7, 0.6)])
    lat = 0.2 + 0.8 * x[:, 0]  # untuned latency ~ linear in the compute left
    linear = PredictiveFilter("xgboost", min_samples=4, latency_linear_on=0)
    trees = PredictiveFilter("xgboost", min_samples=4)
    for row, y in zip(x, lat):
        linear.add_latency(row, y)
        trees.add_latency(row, y)
    probe = np.array([0.3, 0.0])  # far less compute than any plan seen
    assert linear.decide(probe, 1.0, None).predicted_latency == pytest.approx(0.44, abs=0.03)
    assert trees.decide(probe, 1.0, None).predicted_latency > 0.55  # trees cannot go below what they saw
