"""The one cost model of a tuning run: MetaSchedule's XGBoost model, kept in a pickle-free file.

All kernels of a :func:`gmorph_tvm.tuning.tune` run share one :class:`XGBModel` (the search of
each kernel ranks its candidates with what was learned on every kernel measured before it). Its
features are MetaSchedule's ``per-store-feature`` ones, computed from the scheduled TIR alone
(loop extents, vector/parallel annotations, buffer access strides and reuse), not from the
target, so measurements of one CPU class train a model used on another.

The model and its training data (feature rows, measured seconds, one group per workload) are
stored in a ``.npz`` of plain arrays plus the booster as XGBoost's JSON (``np.load`` with
``allow_pickle=False``: a model file can hold data only, never code) — MetaSchedule's own
``XGBModel.save``/``load`` pickle Python objects. The run's model is saved in the work dir
(:data:`STATE_FILE`) after every measured batch, so a worker restarted after a crash, and the
next run in the same work dir, go on from it; a fresh work dir starts from the pre-trained model
shipped beside the records (``tuning/records/cost_model.npz``, :func:`shipped_model_path`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

# In a tuning work dir: the run's cost model (loaded by the next run there).
STATE_FILE = "cost_model.npz"
# The pre-trained model shipped with gmorph-tvm (made by ``python -m gmorph_tvm.tuning.pretrain``).
SHIPPED_FILE = Path(__file__).resolve().parent / "records" / "cost_model.npz"
# Measurements before the model's predictions are used (MetaSchedule's default is 100, which no
# kernel of a short run ever reached when each kernel had its own model: every search was random).
WARMUP_SAMPLES = 32
_FORMAT = 1


def new_model(num_threads: int | None = None, warmup: int = WARMUP_SAMPLES):
    """A fresh XGBModel (untrained: random predictions until ``warmup`` measurements)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.cost_model.XGBModel(num_tuning_cores=num_threads, num_warmup_samples=warmup)


def shipped_model_path() -> Path | None:
    return SHIPPED_FILE if SHIPPED_FILE.is_file() else None


def save(model: Any, path: str | os.PathLike) -> None:
    """Write ``model``'s booster and training data to ``path`` (atomically)."""
    groups = list(model.data.values())
    rows = [f for g in groups for f in g.features]
    width = next((f.shape[1] for f in rows if f.ndim == 2 and f.shape[0]), 0)
    arrays = {
        "format": np.array([_FORMAT], dtype=np.int64),
        "group_hash": np.array([str(g.group_hash) for g in groups], dtype=np.str_),
        "group_size": np.array([len(g.features) for g in groups], dtype=np.int64),
        "row_count": np.array([f.shape[0] for f in rows], dtype=np.int64),
        "features": (np.concatenate([f.reshape(-1, width) for f in rows], axis=0).astype(np.float32)
                     if rows and width else np.zeros((0, 0), dtype=np.float32)),
        "costs": (np.concatenate([np.asarray(g.costs, dtype=np.float32) for g in groups])
                  if groups else np.zeros(0, dtype=np.float32)),
        "booster": (np.frombuffer(bytes(model.booster.save_raw("json")), dtype=np.uint8)
                    if model.booster is not None else np.zeros(0, dtype=np.uint8)),
    }
    path = Path(path)
    staging = path.with_name(f"{path.stem}.new{os.getpid()}.npz")
    np.savez_compressed(staging, **arrays)
    staging.replace(path)


def load(model: Any, path: str | os.PathLike) -> int:
    """Fill ``model`` (an XGBModel) from ``path``; returns the number of measurements it holds.

    Raises ``ValueError`` for a file that is not such a model (callers then start fresh).
    """
    import xgboost as xgb
    from tvm.s_tir.meta_schedule.cost_model.xgb_model import FeatureGroup

    with np.load(path, allow_pickle=False) as data:
        if int(data["format"][0]) != _FORMAT:
            raise ValueError(f"cost model format {int(data['format'][0])}, expected {_FORMAT}")
        hashes, sizes, counts = data["group_hash"], data["group_size"], data["row_count"]
        features, costs, booster_json = data["features"], data["costs"], data["booster"]
    if int(sizes.sum()) != len(counts) or len(costs) != len(counts) or int(counts.sum()) != len(features):
        raise ValueError("inconsistent cost model arrays")
    groups: OrderedDict[str, Any] = OrderedDict()
    row, cand = 0, 0
    for group_hash, size in zip(hashes, sizes):
        feats = []
        for count in counts[cand:cand + size]:
            feats.append(features[row:row + count])
            row += int(count)
        groups[str(group_hash)] = FeatureGroup(str(group_hash), feats, np.asarray(costs[cand:cand + size]))
        cand += int(size)
    booster = None
    if booster_json.size:
        booster = xgb.Booster()
        booster.load_model(bytearray(booster_json.tobytes()))
    model.data, model.data_size, model.booster = groups, len(costs), booster
    model.last_train_size = len(costs)
    return len(costs)


def add_measurements(model: Any, group_hash: str, features: list[np.ndarray], seconds: list[float]) -> None:
    """Add measured candidates (feature rows per candidate, mean seconds) of one workload."""
    from tvm.s_tir.meta_schedule.cost_model.xgb_model import FeatureGroup

    costs = np.asarray(seconds, dtype=np.float32)
    group = model.data.get(group_hash)
    if group is None:
        model.data[group_hash] = FeatureGroup(group_hash, list(features), costs)
    else:
        group.append(list(features), costs)
    model.data_size += len(costs)


def retrain(model: Any) -> None:
    """Train ``model``'s booster on all its data (as XGBModel.update does after new measurements)."""
    feature_list = [f for g in model.data.values() for f in g.features]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.concatenate([
            np.divide(g.min_cost, g.costs, out=np.zeros_like(g.costs), where=g.costs != 0)
            for g in model.data.values()
        ])
    model._train(xs=feature_list, ys=ratios)  # noqa: SLF001 - MetaSchedule's own training step
    model.last_train_size = model.data_size
