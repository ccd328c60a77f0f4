"""Accuracy recovery: fine-tune a fused model by distillation from the original models.

The original models' outputs (teacher logits) are computed once on a fixed training subsample; a
fused candidate is trained to reproduce them (KL on softened probabilities, or L1 on logits as
GMorph does), every task's loss summed. It is evaluated on the VALIDATION split a few times per
epoch and training stops as soon as every task's accuracy drop is within the target (by a small
safety margin when the budget allows; the candidate passes if its best state is within). A learning-
curve check (a line through the last few evaluations, extrapolated to the end of the budget) ends
candidates that cannot get there, so hopeless plans cost a fraction of a full fine-tune. The best
state seen (lowest worst-task drop) is what the candidate keeps.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SearchError
from .data import MultiTaskData, accuracy, predict
from .mutate import FusedModel


@dataclass
class DistillConfig:
    """Fine-tuning budget and stopping rules."""

    max_epochs: float = 3.0  # over ``train_samples`` images
    train_samples: int = 8000
    batch_size: int = 64
    lr: float = 3e-3
    loss: str = "kl"  # "kl" on softened probabilities, or "l1" on logits (GMorph)
    temperature: float = 4.0  # for "kl"
    train: str = "affected"  # "affected": every layer a modified task uses (shared trunks included);
    #                          "modified": only layers no unmodified task uses; "all"
    trunk_lr_scale: float = 0.3  # lr factor for layers an unmodified task also uses (a host's trunk)
    evals_per_epoch: int = 2
    # A candidate passes validation when its worst drop is this far inside the target: one that only
    # just meets it on validation often misses it on test (which the final pick must meet).
    target_margin: float = 0.25
    curve_points: int = 4  # learning-curve fit uses the last this many evaluations during training
    curve_min_evals: int = 2  # ... and only once this many exist (the state before training is not used)
    curve_margin: float = 0.5  # abort when the extrapolated worst drop > target + margin (points)

    def __post_init__(self) -> None:
        if self.loss not in ("l1", "kl"):
            raise SearchError(f"distillation loss must be 'l1' or 'kl', not {self.loss!r}")
        if self.train not in ("modified", "affected", "all"):
            raise SearchError(f"distillation train must be 'modified', 'affected' or 'all', not {self.train!r}")
        if not 0 <= self.trunk_lr_scale <= 1:
            raise SearchError(f"trunk_lr_scale must be in [0, 1], got {self.trunk_lr_scale}")
        if self.max_epochs < 0 or self.train_samples < 1 or self.batch_size < 1 or self.evals_per_epoch < 1:
            raise SearchError("distillation budget (max_epochs, train_samples, batch_size, evals_per_epoch) must be positive")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class DistillResult:
    """Outcome of one fine-tune, on the validation split."""

    val_accuracy: dict[str, float]
    val_drops: dict[str, float]
    passed: bool
    stop_reason: str  # "target_met" | "learning_curve" | "max_epochs"
    epochs: float
    steps: int
    seconds: float
    curve: list[tuple[float, float]] = field(default_factory=list)  # (epoch, worst drop)

    @property
    def max_drop(self) -> float:
        return max(self.val_drops.values())

    def to_json(self) -> dict:
        return {
            "val_accuracy": self.val_accuracy,
            "val_drops": self.val_drops,
            "max_drop": self.max_drop,
            "passed": self.passed,
            "stop_reason": self.stop_reason,
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": self.seconds,
            "curve": [list(p) for p in self.curve],
        }


class Teacher:
    """The original models' logits on a fixed training subsample, and their accuracies.

    Validation accuracies are computed up front; test accuracies only when asked for, at the very
    end, so nothing in the search can depend on the test split.
    """

    def __init__(self, models: Mapping[str, nn.Module], data: MultiTaskData, train_samples: int, seed: int = 0) -> None:
        data.check_tasks(models)
        self.models = dict(models)
        self.tasks = list(models)
        gen = torch.Generator().manual_seed(seed)
        count = min(train_samples, data.train_x.shape[0])
        self.index = torch.randperm(data.train_x.shape[0], generator=gen)[:count]
        self.x = data.train_x[self.index]
        self.logits = {t: predict(models[t], self.x)[0] for t in self.tasks}
        self.accuracy_val = {t: accuracy(predict(models[t], data.val_x)[0], data.val_y[t]) for t in self.tasks}
        self._accuracy_test: dict[str, float] | None = None

    def accuracy_test(self, data: MultiTaskData) -> dict[str, float]:
        if self._accuracy_test is None:
            self._accuracy_test = {t: accuracy(predict(self.models[t], data.test_x)[0], data.test_y[t]) for t in self.tasks}
        return dict(self._accuracy_test)


def evaluate(model: nn.Module, tasks: list[str], x: torch.Tensor, labels: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per-task accuracy (percent) of a fused model (one output per task, in ``tasks`` order)."""
    outputs = predict(model, x)
    return {t: accuracy(out, labels[t]) for t, out in zip(tasks, outputs)}


def drops(base: Mapping[str, float], acc: Mapping[str, float]) -> dict[str, float]:
    """Accuracy drop per task in points (positive = worse than the original model)."""
    return {t: float(base[t] - acc[t]) for t in base}


def extrapolate(curve: list[tuple[float, float]], at: float, points: int) -> float:
    """Value at ``at`` of the least-squares line through the last ``points`` of ``curve``."""
    tail = curve[-points:]
    xs = np.array([p[0] for p in tail], dtype=float)
    ys = np.array([p[1] for p in tail], dtype=float)
    if len(tail) < 2 or np.ptp(xs) == 0:
        return float(ys[-1])
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(slope * at + intercept)


def _freeze_batch_norm(model: nn.Module) -> None:
    # Few steps on a small subsample would skew running statistics; keep them, train the affine part.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _param_groups(fused: nn.Module, config: DistillConfig) -> list[dict]:
    """Adam parameter groups. Layers no modified task uses stay frozen: their tasks are exactly the
    originals (and Adam would turn float noise in their near-zero gradients into lr-sized steps).
    Layers a modified task shares with an unmodified one (a host's trunk) learn more slowly, so the
    host keeps its accuracy while the task reading it adapts."""
    if config.train == "all" or not isinstance(fused, FusedModel):
        return [{"params": [p for p in fused.parameters() if p.requires_grad], "lr": config.lr}]
    modified = fused.modified_tasks()
    untouched = set(fused.blocks_of([t for t in fused.task_names if t not in modified]))
    groups: dict[bool, list[nn.Parameter]] = {False: [], True: []}
    seen: set[int] = set()
    for name in fused.blocks_of(modified):
        shared_with_untouched = name in untouched
        if shared_with_untouched and config.train == "modified":
            continue
        for p in fused.blocks[name].parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                groups[shared_with_untouched].append(p)
    return [
        {"params": params, "lr": config.lr * (config.trunk_lr_scale if trunk else 1.0)}
        for trunk, params in groups.items()
        if params
    ]


def _loss(outputs, targets, config: DistillConfig) -> torch.Tensor:
    total = outputs[0].new_zeros(())
    for out, ref in zip(outputs, targets):
        if config.loss == "l1":
            total = total + F.l1_loss(out, ref)
        else:
            t = config.temperature
            total = total + F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(ref / t, 1), log_target=True,
                                     reduction="batchmean") * t * t
    return total


def distill(
    fused: nn.Module,
    teacher: Teacher,
    val_x: torch.Tensor,
    val_y: Mapping[str, torch.Tensor],
    max_accuracy_drop: float,
    config: DistillConfig | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> DistillResult:
    """Fine-tune ``fused`` in place until every task's validation drop is <= ``max_accuracy_drop``.

    ``fused(x)`` must return one output per task in ``teacher.tasks`` order. On return the model
    holds the best state seen (lowest worst-task drop), on the CPU. ``device`` (e.g. ``"cuda"``):
    train and evaluate there (the batch order and the result do not depend on it beyond float
    rounding).
    """
    config = config or DistillConfig()
    if device is not None:
        fused.to(device)
        val_x = val_x.to(device)
        val_y = {t: y.to(device) for t, y in val_y.items()}
    tasks = teacher.tasks
    base = teacher.accuracy_val
    started = time.perf_counter()
    steps_per_epoch = max(1, math.ceil(teacher.x.shape[0] / config.batch_size))
    total_steps = int(round(config.max_epochs * steps_per_epoch))
    eval_every = max(1, steps_per_epoch // config.evals_per_epoch)

    def check(epoch: float):
        acc = evaluate(fused, tasks, val_x, val_y)
        d = drops(base, acc)
        return acc, d, max(d.values())

    acc, d, worst = check(0.0)
    curve = [(0.0, worst)]
    best = (worst, acc, d, copy.deepcopy(fused.state_dict()))
    stop_at = max_accuracy_drop - config.target_margin
    reason = "target_met" if worst <= stop_at else "max_epochs"
    step = 0
    groups = _param_groups(fused, config)
    if reason != "target_met" and total_steps > 0 and groups:
        keep = {id(p) for g in groups for p in g["params"]}
        frozen = [p for p in fused.parameters() if p.requires_grad and id(p) not in keep]
        for p in frozen:  # no gradients computed for them at all
            p.requires_grad_(False)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                gen = torch.Generator().manual_seed(seed)
                optimizer = torch.optim.Adam(groups)
                order = torch.randperm(teacher.x.shape[0], generator=gen)
                position = 0
                while step < total_steps:
                    if position >= len(order):
                        order, position = torch.randperm(teacher.x.shape[0], generator=gen), 0
                    batch = order[position : position + config.batch_size]
                    position += config.batch_size
                    fused.train()
                    _freeze_batch_norm(fused)
                    outputs = fused(teacher.x[batch].to(val_x.device))
                    loss = _loss(outputs, [teacher.logits[t][batch].to(val_x.device) for t in tasks], config)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    if step % eval_every and step != total_steps:
                        continue
                    epoch = step / steps_per_epoch
                    acc, d, worst = check(epoch)
                    curve.append((epoch, worst))
                    if worst < best[0]:
                        best = (worst, acc, d, copy.deepcopy(fused.state_dict()))
                    if worst <= stop_at:
                        reason = "target_met"
                        break
                    if len(curve) - 1 >= config.curve_min_evals and step < total_steps:
                        predicted = extrapolate(curve[1:], config.max_epochs, config.curve_points)
                        if predicted > max_accuracy_drop + config.curve_margin:
                            reason = "learning_curve"
                            break
        finally:
            for p in frozen:
                p.requires_grad_(True)
    fused.load_state_dict(best[3])
    fused.to("cpu")
    fused.eval()
    worst, acc, d, _ = best
    return DistillResult(
        val_accuracy=acc,
        val_drops=d,
        passed=worst <= stop_at,
        stop_reason=reason,
        epochs=step / steps_per_epoch,
        steps=step,
        seconds=time.perf_counter() - started,
        curve=curve,
    )
