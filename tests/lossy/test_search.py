"""The search driver: compiled latency, checkpoint/resume, determinism, the accuracy guarantee."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gmorph_tvm
import gmorph_tvm.lossy.driver as search_module
from gmorph_tvm.errors import SearchError
from gmorph_tvm.lossy import DistillConfig, FusionPlan, SearchConfig, Searcher, Share, TimingConfig, search
from gmorph_tvm.lossy.distill import DistillResult
from gmorph_tvm.lossy.distill import distill as real_distill

FAST = DistillConfig(max_epochs=1, train_samples=600, batch_size=32, lr=3e-3, evals_per_epoch=2)
CPU_TIMING = TimingConfig(number=2, repeat=5, clock="cpu")


def _mac_latency(multi) -> float:
    """Deterministic stand-in for a timer: conv/matmul work in the stitched Relax graph."""
    script = multi.mod["main"].script()
    return 1e-3 * (script.count("R.nn.conv2d(") * 10 + script.count("R.matmul(") + len(multi.params))


@pytest.fixture(scope="module")
def first_run(tiny_models, tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("search")
    result = search(tiny_models, tiny_data, max_accuracy_drop=5.0, budget=2, predictor=None, sampler="random", seed=0,
                    work_dir=work, distill_config=FAST, timing=CPU_TIMING, progress=False, log=None)
    return work, result


def test_search_measures_compiled_latency_and_reports(first_run, tiny_data):
    work, result = first_run
    report = json.loads((work / "report.json").read_text())
    assert (work / "pareto.png").stat().st_size > 1000
    assert (work / "final" / "fused.so").is_file()
    assert report["counts"]["proposed"] == 2 and report["counts"]["fine_tuned"] == 2
    statuses = [c["status"] for c in report["candidates"]]
    assert statuses[0] == "baseline" and all(c["latency_ms"] > 0 for c in report["candidates"])
    # The returned model is the one compiled: same outputs from the artifact and from PyTorch.
    x = tiny_data.val_x[:1]
    outs = result.artifact.run(x.numpy())
    with torch.no_grad():
        ref = result.fused_model(x)
    for task, r in zip(result.fused_model.task_names, ref):
        np.testing.assert_allclose(outs[task], r.numpy(), atol=1e-4, rtol=1e-4)
    assert result.plan.is_identity or max(result.test_drops.values()) <= 5.0
    assert report["chosen"]["key"] == result.plan.key()


def test_resume_reuses_checkpointed_candidates(first_run, tiny_models, tiny_data, monkeypatch):
    work, first = first_run
    calls = []
    monkeypatch.setattr(search_module, "distill", lambda *a, **k: calls.append(1))
    again = search(tiny_models, tiny_data, max_accuracy_drop=5.0, budget=2, predictor=None, sampler="random", seed=0,
                   work_dir=work, distill_config=FAST, timing=CPU_TIMING, progress=False, log=None)
    assert calls == []
    assert [c.key for c in again.candidates] == [c.key for c in first.candidates]
    assert again.plan == first.plan
    with pytest.raises(SearchError, match="other settings"):
        search(tiny_models, tiny_data, max_accuracy_drop=2.0, budget=2, predictor=None, sampler="random", seed=0,
               work_dir=work, distill_config=FAST, timing=CPU_TIMING, progress=False, log=None)


def test_same_seed_same_search(tiny_models, tiny_data):
    """Same seed, same search -- whether the options come as keywords or as a SearchConfig."""
    options = dict(max_accuracy_drop=5.0, budget=2, predictor=None, sampler="annealing", seed=7,
                   distill_config=FAST, latency_fn=_mac_latency, progress=False, log=None)
    runs = [
        search(tiny_models, tiny_data, **options),
        search(tiny_models, tiny_data, SearchConfig(**{**options, "seed": 3, "budget": 5}), seed=7, budget=2),
    ]
    a, b = ([(c.key, c.status, c.distill and c.distill["val_drops"]) for c in r.candidates] for r in runs)
    assert a == b
    assert runs[0].plan == runs[1].plan


def test_a_plan_above_the_target_is_never_returned(tiny_models, tiny_data, monkeypatch):
    """Validation claims both plans pass; the test split exposes the faster one: the slower is returned."""
    broken = FusionPlan((Share("coarse4", 4, "class10", 4),))  # coarse4 = a head on class10's features
    mild = FusionPlan((Share("size3", 1, "class10", 1),))

    def lying_distill(fused, teacher, val_x, val_y, max_drop, config, seed=0):
        if fused.plan == broken:  # wreck it: coarse4 now outputs a constant
            with torch.no_grad():
                for p in fused.blocks["coarse4__share_from_class10_4_4"].parameters():
                    p.zero_()
        return DistillResult({t: 0.0 for t in teacher.tasks}, {t: 0.0 for t in teacher.tasks}, True, "target_met",
                             0.0, 0, 0.0)

    monkeypatch.setattr(search_module, "distill", lying_distill)
    latency = {broken.key(): 1.0, mild.key(): 2.0}

    def fake_latency(multi):
        return latency.get(multi.__dict__.get("_plan_key"), 3.0)

    # Latency by plan: the identity (3.0) is slowest, the broken plan fastest.
    original_to_mm = search_module.to_multimodel

    def tagged_to_multimodel(fused, example):
        multi = original_to_mm(fused, example)
        multi._plan_key = fused.plan.key()
        return multi

    monkeypatch.setattr(search_module, "to_multimodel", tagged_to_multimodel)
    result = search(tiny_models, tiny_data, max_accuracy_drop=3.0, budget=2, predictor=None, seed=0, plans=[broken, mild],
                    distill_config=FAST, latency_fn=fake_latency, progress=False, log=None)
    checks = result.report["test_checks"]
    assert [c["key"] for c in checks] == [broken.key(), mild.key()]
    assert not checks[0]["passed"] and checks[0]["test_drops"]["coarse4"] > 3.0
    assert result.plan == mild and max(result.test_drops.values()) <= 3.0

    # A target nothing meets for real (no learning): the unfused models come back.
    monkeypatch.setattr(search_module, "distill", real_distill)
    strict = search(tiny_models, tiny_data, max_accuracy_drop=0.0, budget=1, predictor=None, seed=0, plans=[broken],
                    distill_config=DistillConfig(max_epochs=0.5, train_samples=200, lr=0.0), latency_fn=fake_latency,
                    progress=False, log=None)
    assert strict.candidates[1].status != "passed"
    assert strict.plan.is_identity and "returning the original models" in strict.message
    assert strict.test_drops == {t: 0.0 for t in tiny_models}


def test_search_config_validates_its_fields():
    assert gmorph_tvm.SearchConfig is SearchConfig
    assert SearchConfig(predictor="none").predictor is None and SearchConfig(predictor="off").predictor is None
    for bad, match in [(dict(budget=-1), "budget"), (dict(budget=2.5), "budget"), (dict(max_accuracy_drop=100), "max_acc"),
                       (dict(sampler="grid"), "unknown sampler"), (dict(predictor="forest"), "unknown predictor"),
                       (dict(seed=-3), "seed"), (dict(probe_size=0), "probe_size"), (dict(time_budget_s=-1), "time_budget"),
                       (dict(distill_config={"max_epochs": 1}), "DistillConfig"), (dict(timing=None), "TimingConfig"),
                       (dict(plans=["coarse4@6<class10@8"]), "FusionPlan")]:
        with pytest.raises(SearchError, match=match):
            SearchConfig(**bad)
    config = SearchConfig.with_overrides(SearchConfig(budget=3, seed=1), {"seed": 2})
    assert (config.budget, config.seed) == (3, 2)


def test_search_rejects_unknown_options_and_non_configs(tiny_models, tiny_data):
    with pytest.raises(SearchError, match="unknown search option.*bugdet"):
        search(tiny_models, tiny_data, bugdet=3)
    with pytest.raises(SearchError, match="config must be a gmorph_tvm.SearchConfig, not float"):
        search(tiny_models, tiny_data, 1.0)  # the old third positional (max_accuracy_drop)
    with pytest.raises(SearchError, match="config must be"):
        Searcher(tiny_models, tiny_data, {"budget": 1})


def test_searcher_stages(tiny_models, tiny_data):
    """The stages one by one: baseline, a given plan first, its evaluation, the observation."""
    plan = FusionPlan((Share("size3", 1, "class10", 1),))
    searcher = Searcher(tiny_models, tiny_data, SearchConfig(budget=1, predictor=None, plans=[plan], seed=0,
                                                             distill_config=FAST, latency_fn=_mac_latency, log=None))
    baseline = searcher.measure_baseline()
    assert baseline.status == "baseline" and searcher.best_latency == baseline.latency_ms
    assert searcher.next_plan() == plan
    cand = searcher.evaluate(1, plan)
    assert cand.status in ("passed", "failed", "aborted") and cand.latency_ms > 0 and cand.distill is not None
    searcher.observe(cand)
    assert searcher.candidates == [baseline, cand]


def test_bad_arguments(tiny_models, tiny_data):
    with pytest.raises(SearchError, match="max_accuracy_drop"):
        search(tiny_models, tiny_data, max_accuracy_drop=-1)
    with pytest.raises(SearchError, match="tasks"):
        search({"class10": tiny_models["class10"]}, tiny_data)
    with pytest.raises(SearchError, match="unknown predictor"):
        search(tiny_models, tiny_data, budget=0, predictor="forest", latency_fn=_mac_latency, log=None)


@pytest.mark.slow
def test_final_pick_can_be_tuned(tiny_models, tiny_data, tmp_path):
    result = search(tiny_models, tiny_data, max_accuracy_drop=5.0, budget=0, predictor=None, work_dir=tmp_path,
                    timing=CPU_TIMING, tune_trials=16, progress=False, log=None)
    final = result.report["final"]
    assert final["tuned_latency_ms"] > 0 and final["tuning_trials"] == 16
    assert result.latency_ms == final["tuned_latency_ms"]
    x = tiny_data.val_x[:1]
    outs = result.artifact.run(x.numpy())
    with torch.no_grad():
        for task, ref in zip(result.fused_model.task_names, result.fused_model(x)):
            np.testing.assert_allclose(outs[task], ref.numpy(), atol=1e-4, rtol=1e-4)
