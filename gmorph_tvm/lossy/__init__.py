"""Accuracy-aware fusion of heterogeneous models (the GMorph half of gmorph-tvm).

Models trained separately, with different architectures, are fused into one multi-task model that
shares layers, fine-tuned by distillation until every task is within a maximum accuracy drop, and
compiled with TVM::

    result = gmorph_tvm.search(models, data, max_accuracy_drop=1.0, budget=20, predictor="xgboost")
    # or: gmorph_tvm.search(models, data, gmorph_tvm.SearchConfig(max_accuracy_drop=1.0, budget=20))
    result.plan, result.fused_model, result.artifact, result.report

Stages: :mod:`.graph` (fx DAG + cut points) -> :mod:`.plan` (fusion plans) -> :mod:`.mutate`
(plan -> fused PyTorch model -> Relax MultiModel) -> :mod:`.distill` (accuracy recovery) ->
:mod:`.features` / :mod:`.predictor` (XGBoost filter) -> :mod:`.sampler` (annealing / random) ->
:mod:`.driver` (the search loop, checkpoints, report). :mod:`.tasks` is the Fashion-MNIST 3-task benchmark.
"""

from __future__ import annotations

from .data import MultiTaskData
from .distill import DistillConfig, DistillResult, distill
from .driver import Candidate, SearchConfig, Searcher, SearchResult, plot_pareto, search
from .graph import CutPoint, LayerGraph
from .latency import TimingConfig
from .mutate import Adapter, FusedModel, build_fused, to_multimodel
from .plan import Drop, FusionPlan, Share
from .predictor import PredictiveFilter
from .sampler import AnnealingSampler, RandomSampler

__all__ = [
    "Adapter", "AnnealingSampler", "Candidate", "CutPoint", "DistillConfig", "DistillResult", "Drop", "FusedModel",
    "FusionPlan", "LayerGraph", "MultiTaskData", "PredictiveFilter", "RandomSampler", "SearchConfig", "Searcher", "SearchResult", "Share",
    "TimingConfig", "build_fused", "distill", "plot_pareto", "search", "to_multimodel",
]  # fmt: skip

