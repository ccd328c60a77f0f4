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
:mod:`.driver` (the search loop, checkpoints, report) -> :mod:`.parallel` (candidates as Ray tasks).
:mod:`.modelfile` loads task models from files without running their code; :mod:`.tasks` is the
Fashion-MNIST 3-task benchmark. Names are resolved on first use (PEP 562), so the CLI can import
:mod:`.cli` to declare its arguments without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers and IDEs
    from .data import MultiTaskData
    from .distill import DistillConfig, DistillResult, distill
    from .driver import Candidate, SearchConfig, Searcher, SearchResult, plot_pareto, search
    from .graph import CutPoint, LayerGraph
    from .latency import TimingConfig
    from .mutate import Adapter, FusedModel, build_fused, to_multimodel
    from .plan import Drop, FusionPlan, Share
    from .predictor import PredictiveFilter
    from .sampler import AnnealingSampler, RandomSampler

# public name -> module that defines it
_EXPORTS = {
    "MultiTaskData": ".data", "DistillConfig": ".distill", "DistillResult": ".distill", "distill": ".distill",
    "Candidate": ".driver", "SearchConfig": ".driver", "Searcher": ".driver", "SearchResult": ".driver",
    "plot_pareto": ".driver", "search": ".driver", "CutPoint": ".graph", "LayerGraph": ".graph",
    "TimingConfig": ".latency", "Adapter": ".mutate", "FusedModel": ".mutate", "build_fused": ".mutate",
    "to_multimodel": ".mutate", "Drop": ".plan", "FusionPlan": ".plan", "Share": ".plan",
    "PredictiveFilter": ".predictor", "AnnealingSampler": ".sampler", "RandomSampler": ".sampler",
}  # fmt: skip

__all__ = [
    "Adapter", "AnnealingSampler", "Candidate", "CutPoint", "DistillConfig", "DistillResult", "Drop", "FusedModel",
    "FusionPlan", "LayerGraph", "MultiTaskData", "PredictiveFilter", "RandomSampler", "SearchConfig", "Searcher",
    "SearchResult", "Share", "TimingConfig", "build_fused", "distill", "plot_pareto", "search", "to_multimodel",
]  # fmt: skip


assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        try:  # a submodule (gmorph_tvm.lossy.tasks) reached as an attribute
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'gmorph_tvm.lossy' has no attribute {name!r}") from err
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
