"""`MultiTaskData`: the images every task reads plus each task's labels, in fixed train/val/test splits.

The search fine-tunes on ``train``, decides on ``val`` and confirms its final pick on ``test``,
which it never looks at before that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import SearchError

SPLITS = ("train", "val", "test")


@dataclass
class MultiTaskData:
    """Shared inputs (``[N, C, H, W]`` float32) and per-task int64 labels for each split."""

    train_x: torch.Tensor
    val_x: torch.Tensor
    test_x: torch.Tensor
    train_y: dict[str, torch.Tensor]
    val_y: dict[str, torch.Tensor]
    test_y: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        tasks = list(self.train_y)
        if not tasks:
            raise SearchError("MultiTaskData needs labels for at least one task")
        for split in SPLITS:
            x, ys = self.x(split), self.y(split)
            if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() < 2:
                raise SearchError(f"MultiTaskData: {split} inputs must be a float32 tensor [N, ...], got {getattr(x, 'dtype', type(x))}")
            if list(ys) != tasks:
                raise SearchError(f"MultiTaskData: {split} labels are for tasks {list(ys)}, train labels for {tasks}")
            for task, y in ys.items():
                if y.shape != (x.shape[0],):
                    raise SearchError(
                        f"MultiTaskData: {split} labels of task {task!r} have shape {list(y.shape)}, expected [{x.shape[0]}]"
                    )

    @property
    def tasks(self) -> list[str]:
        return list(self.train_y)

    def x(self, split: str) -> torch.Tensor:
        return getattr(self, f"{_check(split)}_x")

    def y(self, split: str) -> dict[str, torch.Tensor]:
        return getattr(self, f"{_check(split)}_y")

    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def limited(self, train: int | None = None, val: int | None = None, test: int | None = None) -> MultiTaskData:
        """The first ``n`` samples of each split (``None``: all); for quick runs and tests."""
        def cut(split: str, n: int | None):
            x, ys = self.x(split), self.y(split)
            if n is None:
                return x, ys
            return x[:n], {t: y[:n] for t, y in ys.items()}

        (trx, try_), (vx, vy), (tex, tey) = cut("train", train), cut("val", val), cut("test", test)
        return MultiTaskData(trx, vx, tex, try_, vy, tey)

    def check_tasks(self, tasks: Mapping[str, object] | list[str]) -> None:
        names = list(tasks)
        if sorted(names) != sorted(self.tasks):
            raise SearchError(f"models are for tasks {names} but the data has labels for {self.tasks}")


def _check(split: str) -> str:
    if split not in SPLITS:
        raise SearchError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 500) -> list[torch.Tensor]:
    """Outputs of ``model`` (one tensor or a tuple per task) on ``x``, as a list of tensors, eval mode."""
    was_training = model.training
    model.eval()
    chunks: list[list[torch.Tensor]] = []
    for start in range(0, x.shape[0], batch_size):
        out = model(x[start : start + batch_size])
        chunks.append(list(out) if isinstance(out, (tuple, list)) else [out])
    model.train(was_training)
    return [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(dim=1) == labels).float().mean() * 100.0)
