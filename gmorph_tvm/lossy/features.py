"""Plan features for the predictive filter (cheap: no fine-tuning, no compilation).

Per task (in task order): fraction of its parameters and MACs removed (shared away or dropped),
relative depth of its branch point and of the host layer it reads, similarity (linear CKA) of the
host activation and its own activation at the branch point, R^2 of the least-squares adapter fit
(in-sample, and on held-out calibration images),
similarity across its dropped ranges, and its accuracy drop on a small validation batch right after
building (adapters initialised, nothing fine-tuned). Whole plan: fused / original MACs and
parameters, number of adapters, interpolations, shares and drops, compute layers executed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .distill import evaluate
from .graph import LayerGraph
from .mutate import Adapter, Calibration, FusedModel
from .plan import FusionPlan


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment of two activations on the same batch (any widths), in [0, 1]."""
    a = x.flatten(1).double()
    b = y.flatten(1).double()
    a = a - a.mean(0, keepdim=True)
    b = b - b.mean(0, keepdim=True)
    ka, kb = a @ a.T, b @ b.T
    denom = torch.linalg.norm(ka) * torch.linalg.norm(kb)
    if float(denom) == 0.0:
        return 0.0
    return float((ka * kb).sum() / denom)


class FeatureExtractor:
    """Computes :func:`plan_features` with caches shared across candidates."""

    def __init__(self, graphs: Mapping[str, LayerGraph], calibration: Calibration, probe_x: torch.Tensor,
                 probe_y: Mapping[str, torch.Tensor], base_probe_acc: Mapping[str, float]) -> None:
        self.graphs = graphs
        self.tasks = list(graphs)
        self.calibration = calibration
        self.probe_x, self.probe_y, self.base_probe_acc = probe_x, probe_y, base_probe_acc
        self._cache: dict[tuple, float] = {}
        self.original_macs = sum(g.total_macs for g in graphs.values())
        self.original_params = sum(g.total_params for g in graphs.values())

    def cka(self, task_a: str, cut_a: int, task_b: str, cut_b: int) -> float:
        key = (task_a, cut_a, task_b, cut_b)
        if key not in self._cache:
            self._cache[key] = linear_cka(self.calibration.act(task_a, cut_a), self.calibration.act(task_b, cut_b))
        return self._cache[key]

    def transfer_r2(self, task: str, cut: int, host: str, host_cut: int) -> float:
        """How well ``host``'s activation at ``host_cut`` linearly predicts ``task``'s at ``cut``.

        R^2 of a least-squares adapter fitted on half of the calibration batch and scored on the
        other half, clipped to [0, 1]. Unlike CKA it has a direction: a 10-class model's features
        predict a 4-class model's far better than the reverse.
        """
        key = ("r2", task, cut, host, host_cut)
        if key not in self._cache:
            src, dst = self.calibration.act(host, host_cut), self.calibration.act(task, cut)
            half = src.shape[0] // 2
            adapter = Adapter(src.shape[1:], dst.shape[1:])
            adapter.fit(src[:half], dst[:half])
            with torch.no_grad():
                pred = adapter(src[half:])
            target = dst[half:]
            residual = float(((pred - target) ** 2).sum())
            total = float(((target - target.mean(0, keepdim=True)) ** 2).sum()) or 1e-12
            self._cache[key] = min(1.0, max(0.0, 1.0 - residual / total))
        return self._cache[key]

    def names(self) -> list[str]:
        per_task = ["removed_params", "removed_macs", "branch_depth", "host_depth", "branch_cka", "adapter_r2",
                    "transfer_r2", "dropped_params", "drop_cka", "initial_drop"]
        whole = ["mac_fraction", "param_fraction", "adapters", "resizes", "shares", "drops", "compute_layers",
                 "max_initial_drop"]
        return [f"{t}.{n}" for t in self.tasks for n in per_task] + whole

    def __call__(self, plan: FusionPlan, fused: FusedModel) -> dict[str, float]:
        feats: dict[str, float] = {}
        initial = evaluate(fused, self.tasks, self.probe_x, self.probe_y)
        fused_macs = 0
        for task in self.tasks:
            g = self.graphs[task]
            share = plan.share_of(task)
            start = plan.own_start(task)
            dropped = sum(g.segment_params(d.start, d.end) for d in plan.drops_of(task))
            dropped_macs = sum(g.segment_macs(d.start, d.end) for d in plan.drops_of(task))
            removed = g.cut(start).params_before + dropped
            removed_macs = g.cut(start).macs_before + dropped_macs
            fused_macs += g.total_macs - removed_macs
            feats[f"{task}.removed_params"] = removed / max(1, g.total_params)
            feats[f"{task}.removed_macs"] = removed_macs / max(1, g.total_macs)
            feats[f"{task}.branch_depth"] = start / max(1, g.num_cuts - 1)
            if share is not None:
                host = self.graphs[share.host]
                feats[f"{task}.host_depth"] = share.host_cut / max(1, host.num_cuts - 1)
                feats[f"{task}.branch_cka"] = self.cka(share.host, share.host_cut, task, start)
                feats[f"{task}.transfer_r2"] = self.transfer_r2(task, start, share.host, share.host_cut)
            else:
                feats[f"{task}.host_depth"] = 0.0
                feats[f"{task}.branch_cka"] = 1.0
                feats[f"{task}.transfer_r2"] = 1.0
            r2 = [v for k, v in fused.info.adapter_r2.items() if k.startswith(f"{task}__share")]
            feats[f"{task}.adapter_r2"] = min(r2) if r2 else 1.0
            feats[f"{task}.dropped_params"] = dropped / max(1, g.total_params)
            ckas = [self.cka(task, d.start, task, d.end) for d in plan.drops_of(task)]
            feats[f"{task}.drop_cka"] = min(ckas) if ckas else 1.0
            feats[f"{task}.initial_drop"] = self.base_probe_acc[task] - initial[task]
        adapters = [m for m in fused.modules() if isinstance(m, Adapter)]
        for adapter in adapters:
            fused_macs += _adapter_macs(adapter)
        feats["mac_fraction"] = fused_macs / max(1, self.original_macs)
        feats["param_fraction"] = fused.num_parameters() / max(1, self.original_params)
        feats["adapters"] = float(len(adapters))
        feats["resizes"] = float(sum(a.size is not None for a in adapters))
        feats["shares"] = float(len(plan.shares))
        feats["drops"] = float(len(plan.drops))
        feats["compute_layers"] = float(sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in fused.modules()))
        feats["max_initial_drop"] = max(feats[f"{t}.initial_drop"] for t in self.tasks)
        return feats

    def vector(self, feats: Mapping[str, float]) -> np.ndarray:
        return np.array([float(feats[n]) for n in self.names()], dtype=np.float64)


def _adapter_macs(adapter: Adapter) -> int:
    if isinstance(adapter.proj, nn.Conv2d):
        c_out, h, w = adapter.out_shape
        return adapter.proj.in_channels * c_out * h * w
    return adapter.proj.in_features * adapter.proj.out_features
