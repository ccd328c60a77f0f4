"""The Fashion-MNIST 3-task benchmark of the fusion search: data, models, training, cached weights.

Three tasks read the same 28x28 image, each solved by a separately trained model of a DIFFERENT
architecture:

=========  =========================================================  ====================
task       label                                                      model
=========  =========================================================  ====================
class10    the 10 Fashion-MNIST classes                               VGG-style (plain conv)
coarse4    tops / bottoms / footwear / bags (``data.fashion_mnist``)  ResNet-style (residual)
size3      how much of the frame the item covers: small / medium /    MobileNet-style
           large (fraction of pixels brighter than 50%, split at the  (inverted residual, SE)
           terciles of the training split)
=========  =========================================================  ====================

``size3`` is our own label: it is a property of the image, not of the class (a small and a large
T-shirt differ), so it needs features the class models may not keep -- sharing is not free.

Weights: :func:`load_benchmark` looks for trained weights bundled with the package
(``gmorph_tvm/lossy/weights/``), then in the cache directory (``$GMORPH_TVM_CACHE`` or
``~/.cache/gmorph_tvm``), and trains them otherwise (about 3-5 minutes on one CPU core):
``python -m gmorph_tvm.lossy.tasks --train``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import zoo
from ..data import fashion_mnist
from ..errors import SearchError
from .data import MultiTaskData, accuracy, predict

TASK_NAMES = ("class10", "coarse4", "size3")
BRIGHT = 0.5  # a pixel "covers" the frame when its intensity (0..1) is above this

# task -> (zoo architecture, constructor keywords, number of classes)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any], int]] = {
    "class10": ("vgg", {"widths": (16, 32, 32, 64), "pool_after": (0, 1, 3)}, 10),
    "coarse4": ("resnet", {"width": 8, "blocks_per_stage": (1, 1, 1)}, 4),
    "size3": ("mobilenet", {"width": 8}, 3),
}
TRAINING = {"epochs": 3, "batch_size": 128, "lr": 3e-3, "seed": 0}
_WEIGHTS_FORMAT = 1
BUNDLED_DIR = Path(__file__).with_name("weights")


def cache_dir() -> Path:
    """Where trained weights are cached: ``$GMORPH_TVM_CACHE`` or ``~/.cache/gmorph_tvm``."""
    return Path(os.environ.get("GMORPH_TVM_CACHE", Path.home() / ".cache" / "gmorph_tvm"))


# ---- data ------------------------------------------------------------------------------------------


def _coverage(images: torch.Tensor) -> torch.Tensor:
    pixels = images * fashion_mnist.STD + fashion_mnist.MEAN  # back to 0..1
    return (pixels > BRIGHT).float().flatten(1).mean(1)


def size_thresholds() -> tuple[float, float]:
    """Coverage terciles of the full training split (fixed by the data, not by a limit)."""
    cov = _coverage(fashion_mnist.load_split("train").images)
    q = torch.quantile(cov, torch.tensor([1 / 3, 2 / 3]))
    return float(q[0]), float(q[1])


def size_labels(images: torch.Tensor, thresholds: tuple[float, float]) -> torch.Tensor:
    """0 small / 1 medium / 2 large: coverage compared with the training terciles."""
    cov = _coverage(images)
    return (cov > thresholds[0]).long() + (cov > thresholds[1]).long()


def load_data(train: int | None = None, val: int | None = None, test: int | None = None) -> MultiTaskData:
    """Fashion-MNIST with the three task labels; optional limits keep the first n of each split."""
    thresholds = size_thresholds()
    splits = {}
    for split, limit in (("train", train), ("val", val), ("test", test)):
        s = fashion_mnist.load_split(split, limit=limit)
        labels = {
            "class10": s.labels,
            "coarse4": fashion_mnist.coarse_labels(s.labels),
            "size3": size_labels(s.images, thresholds),
        }
        splits[split] = (s.images, labels)
    return MultiTaskData(
        splits["train"][0], splits["val"][0], splits["test"][0], splits["train"][1], splits["val"][1], splits["test"][1]
    )


# ---- models ----------------------------------------------------------------------------------------------


def build_models(seed: int = 0) -> dict[str, nn.Module]:
    """Untrained task models (deterministic for ``seed``)."""
    models = {}
    for i, (task, (arch, kw, classes)) in enumerate(ARCHITECTURES.items()):
        models[task] = zoo.make(arch, in_channels=1, image_size=28, num_classes=classes, seed=seed + i, **kw)
    return models


def config_hash() -> str:
    """Identifies architectures + training recipe + label definition; part of the weight file name."""
    spec = {"arch": ARCHITECTURES, "training": TRAINING, "bright": BRIGHT, "format": _WEIGHTS_FORMAT}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()[:12]


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, lr: float,
                seed: int, log=None) -> nn.Module:
    """Plain supervised training (Adam, one-cycle LR, cross-entropy)."""
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (x.shape[0] + batch_size - 1) // batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            order = torch.randperm(x.shape[0], generator=gen)
            total = 0.0
            for i in range(steps_per_epoch):
                batch = order[i * batch_size : (i + 1) * batch_size]
                loss = F.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach())
            if log:
                log(f"  epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f}")
    return model.eval()


def train_models(data: MultiTaskData, log=print) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Train the three task models on ``data.train``; returns models and a summary (accuracies, time)."""
    models = build_models(TRAINING["seed"])
    summary: dict[str, Any] = {"config": config_hash(), "tasks": {}}
    for task, model in models.items():
        started = time.perf_counter()
        if log:
            log(f"training {task} ({ARCHITECTURES[task][0]}) on {data.train_x.shape[0]} images")
        train_model(model, data.train_x, data.train_y[task], TRAINING["epochs"], TRAINING["batch_size"],
                    TRAINING["lr"], TRAINING["seed"], log)
        summary["tasks"][task] = {
            "architecture": ARCHITECTURES[task][0],
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(time.perf_counter() - started, 1),
            "val_accuracy": accuracy(predict(model, data.val_x)[0], data.val_y[task]),
            "test_accuracy": accuracy(predict(model, data.test_x)[0], data.test_y[task]),
        }
        if log:
            log(f"  {task}: val {summary['tasks'][task]['val_accuracy']:.2f}%  test {summary['tasks'][task]['test_accuracy']:.2f}%")
    return models, summary


def weights_file(directory: Path) -> Path:
    return directory / f"fashion3-{config_hash()}.pt"


def save_weights(models: Mapping[str, nn.Module], summary: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"config": config_hash(), "summary": dict(summary), "state_dicts": {t: m.state_dict() for t, m in models.items()}}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written weight file behind


def load_weights(path: Path) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SearchError(f"benchmark weights {path} are unreadable ({type(err).__name__}: {err}); delete the file to retrain") from err
    if state.get("config") != config_hash() or set(state.get("state_dicts", {})) != set(TASK_NAMES):
        raise SearchError(f"benchmark weights {path} were made for another configuration; delete the file to retrain")
    models = build_models(TRAINING["seed"])
    for task, model in models.items():
        model.load_state_dict(state["state_dicts"][task])
        model.eval()
    return models, state["summary"]


def load_benchmark(train_if_missing: bool = True, data: MultiTaskData | None = None, log=print
                   ) -> tuple[dict[str, nn.Module], MultiTaskData, dict[str, Any]]:
    """(trained models, full data, training summary): bundled weights, else cached, else trained now."""
    data = data or load_data()
    for directory in (BUNDLED_DIR, cache_dir()):
        path = weights_file(directory)
        if path.is_file():
            models, summary = load_weights(path)
            return models, data, summary
    if not train_if_missing:
        raise SearchError(
            f"no trained benchmark weights in {BUNDLED_DIR} or {cache_dir()}; run python -m gmorph_tvm.lossy.tasks --train"
        )
    models, summary = train_models(data, log=log)
    save_weights(models, summary, weights_file(cache_dir()))
    return models, data, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train (or show) the Fashion-MNIST 3-task benchmark models.")
    parser.add_argument("--train", action="store_true", help="train now even if weights are cached")
    parser.add_argument("--out", type=Path, default=None, help="weights directory (default: the cache directory)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.train:
        data = load_data()
        models, summary = train_models(data)
        path = weights_file(args.out or cache_dir())
        save_weights(models, summary, path)
        print(f"saved {path}")
    else:
        models, data, summary = load_benchmark()
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
