"""Regenerate the bundled Fashion-MNIST weights in gmorph_tvm/zoo/weights/ (sets B and C).

    python bench/train_zoo.py                 # 14-17 min on one (shared, busy) CPU thread; writes weights + meta
    python bench/train_zoo.py --out /tmp/w    # write somewhere else (e.g. to compare)

Steps (all seeded; torch runs on --threads CPU threads with deterministic algorithms, so a rerun on
the same torch build and CPU reproduces the files bit for bit; checked once: byte-identical .pt files):

1. base: ``fmnist_cnn(10, seed=0)`` trained on the 55k train split for --base-epochs epochs
   (Adam + cosine decay, batch 128).
2. set B: for each task in BACKBONE_TASKS, copy the base, re-initialise the last linear layer for
   the task's label count (seed 100 + i), freeze ``features[:11]`` (the frozen prefix stays in eval
   mode so even its BN statistics are untouched) and train ``features[11:]`` + classifier on the
   cached prefix features with class-balanced cross-entropy. ``class10_a`` / ``class10_b`` use the
   two disjoint halves of a seed-1 permutation of the train split; the rest use all of it.
   The script checks the prefix is bit-identical to the base afterwards.
3. set C: for i in 0..7, copy the base and fine-tune *everything* on a random half of the train
   split (seed 200 + i) for --netfuse-epochs epochs: one architecture, eight sets of weights.
4. evaluate every model on the full test split and on its first 500 samples (accuracy and
   balanced accuracy = mean per-class recall) and on the validation split; write
   weights/fmnist_meta.json and print a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from gmorph_tvm.data import fashion_mnist as fm
from gmorph_tvm.zoo import pretrained as pt

BATCH = 128


def balanced_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    recalls = [(pred[labels == c] == c).float().mean().item() for c in range(num_classes) if (labels == c).any()]
    return sum(recalls) / len(recalls)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])


def evaluate(model: nn.Module, split: fm.Split, label_task: str, num_classes: int) -> dict[str, float]:
    labels = fm.task(label_task)(split.labels)
    pred = predict(model, split.images)
    return {
        "accuracy": (pred == labels).float().mean().item(),
        "balanced_accuracy": balanced_accuracy(pred, labels, num_classes),
    }


def train(
    trainable: nn.Module, forward: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
    epochs: int, lr: float, seed: int, balanced: bool,
) -> None:  # fmt: skip
    """Adam + cosine decay on (x, y); only ``trainable``'s parameters get updated."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in trainable.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * ((len(x) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    counts = torch.bincount(y, minlength=num_classes).float()
    # class-balanced weights so one-vs-rest tasks do not collapse to "rest"
    weight = (len(y) / (num_classes * counts.clamp(min=1))) if balanced else None
    trainable.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH):
            idx = order[i : i + BATCH]
            loss = nn.functional.cross_entropy(forward(x[idx]), y[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    trainable.eval()


@torch.no_grad()
def batched(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    module.eval()
    return torch.cat([module(x[i : i + 1000]) for i in range(0, len(x), 1000)])


def fresh_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """Copy of ``model`` (a 10-class fmnist_cnn) whose last linear layer is re-initialised for ``num_classes``."""
    new = pt.fmnist_cnn(num_classes, seed=seed)
    state = {k: v for k, v in copy.deepcopy(model.state_dict()).items() if not k.startswith("classifier.3.")}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert set(missing) == {"classifier.3.weight", "classifier.3.bias"} and not unexpected, (missing, unexpected)
    return new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=pt.WEIGHTS_DIR)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--base-epochs", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--netfuse-epochs", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()

    train_split, val_split, test_split = fm.load_split("train"), fm.load_split("val"), fm.load_split("test")
    test500 = fm.Split(test_split.images[:500], test_split.labels[:500])
    x, y10 = train_split.images, train_split.labels
    timings: dict[str, float] = {}
    results: dict[str, dict] = {}

    def record(name: str, model: nn.Module, set_name: str, label_task: str, extra: dict) -> None:
        k = fm.task(label_task).num_classes
        row = {"set": set_name, "label_task": label_task, "num_classes": k, **extra}
        for split_name, split in (("val", val_split), ("test", test_split), ("test500", test500)):
            for metric, value in evaluate(model, split, label_task, k).items():
                row[f"{split_name}_{metric}"] = round(value, 4)
        results[name] = row
        acc, bal = row["test_accuracy"], row["test_balanced_accuracy"]
        print(f"{name:16s} set {set_name:4s} test acc {acc:.4f} bal {bal:.4f}", flush=True)

    # 1. base
    t0 = time.time()
    base = pt.fmnist_cnn(10, seed=0)
    train(base, base, x, y10, 10, args.base_epochs, 2e-3, seed=0, balanced=False)
    timings["base"] = time.time() - t0
    record("class10", base, "base", "class10", {"train_samples": len(x), "epochs": args.base_epochs, "seed": 0})

    # 2. set B: frozen prefix, features cached once
    t0 = time.time()
    prefix = pt.frozen_prefix(base)
    cached = batched(prefix, x)
    halves = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    half = len(x) // 2
    subsets = {"class10_a": halves[:half].sort().values, "class10_b": halves[half:].sort().values}
    task_states: dict[str, dict[str, torch.Tensor]] = {}
    for i, task in enumerate(pt.BACKBONE_TASKS):
        label_task = pt.label_task_of(task)
        k = fm.task(label_task).num_classes
        model = fresh_head(base, k, seed=100 + i)
        for p in pt.frozen_prefix(model).parameters():
            p.requires_grad_(False)
        suffix = nn.Sequential(model.features[pt.FROZEN_PREFIX :], model.classifier)
        idx = subsets.get(task, torch.arange(len(x)))
        epochs = args.finetune_epochs * (2 if task in subsets else 1)  # halves: same number of steps
        y = fm.task(label_task)(y10[idx])
        train(suffix, suffix, cached[idx], y, k, epochs, 1e-3, seed=100 + i, balanced=True)
        for key, value in pt.frozen_prefix(model).state_dict().items():
            assert torch.equal(value, pt.frozen_prefix(base).state_dict()[key]), f"{task}: prefix {key} changed"
        task_states[task] = {k2: v.clone() for k2, v in model.state_dict().items() if not pt._is_prefix_key(k2)}
        record(task, model, "B", label_task, {"train_samples": len(idx), "epochs": epochs, "seed": 100 + i})
    timings["set_B"] = time.time() - t0

    # 3. set C: full fine-tunes on random halves
    t0 = time.time()
    netfuse_states: dict[str, dict[str, torch.Tensor]] = {}
    for i, name in enumerate(pt.NETFUSE_TASKS):
        seed = 200 + i
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:half].sort().values
        model = copy.deepcopy(base)
        train(model, model, x[idx], y10[idx], 10, args.netfuse_epochs, 1e-3, seed=seed, balanced=False)
        netfuse_states[name] = {k: v.clone() for k, v in model.state_dict().items()}
        record(name, model, "C", "class10", {"train_samples": len(idx), "epochs": args.netfuse_epochs, "seed": seed})
    timings["set_C"] = time.time() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    backbone_path, netfuse_path = args.out / pt.BACKBONE_FILE, args.out / pt.NETFUSE_FILE
    torch.save({"base": {k: v.clone() for k, v in base.state_dict().items()}, "tasks": task_states}, backbone_path)
    torch.save(netfuse_states, netfuse_path)
    command = "python bench/train_zoo.py " + " ".join(sys.argv[1:])
    meta = {
        "command": command.strip(),
        "torch": torch.__version__,
        "threads": args.threads,
        "architecture": {k: list(v) if isinstance(v, tuple) else v for k, v in pt.FMNIST_ARCH.items()},
        "frozen_prefix_layers": pt.FROZEN_PREFIX,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "files": {
            p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for p in (backbone_path, netfuse_path)
        },
        "models": results,
    }
    (args.out / pt.META_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    print(f"\n`{command.strip()}` (torch {torch.__version__}, {args.threads} thread(s), {time.time() - t_start:.0f} s)\n")
    print("| model | set | label task | classes | train samples | val acc | test acc | test bal. acc | test500 bal. acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['set']} | {r['label_task']} | {r['num_classes']} | {r['train_samples']} | "
            f"{r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {r['test_balanced_accuracy']:.4f} | "
            f"{r['test500_balanced_accuracy']:.4f} |"
        )
    sizes = ", ".join(f"{n}: {v['bytes'] / 1e6:.2f} MB" for n, v in meta["files"].items())
    print(f"\nfiles: {sizes}; timings (s): {meta['timings_s']}")


if __name__ == "__main__":
    main()
