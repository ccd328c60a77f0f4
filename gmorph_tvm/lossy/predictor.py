"""Predictive filter: XGBoost regressors, trained online, that decide which candidates to fine-tune.

Two regressors learn from the candidates evaluated so far, on the plan features of
:mod:`gmorph_tvm.lossy.features`:

* the worst per-task accuracy drop after fine-tuning (validation split), from fine-tuned candidates;
* the latency of the compiled fused graph relative to the unfused models, from every compiled one.

Once the latency model has ``min_samples`` examples and the drop model ``drop_min_samples`` (more:
accuracy after fine-tuning is much harder to predict than latency, which is close to linear in the
compute left), including at least one candidate that met the target and one that did not, a
candidate is not fine-tuned (nor compiled) when its
predicted drop exceeds the target by more than ``drop_margin`` points, or its predicted latency is
above the best latency found so far (of a candidate meeting the target) by more than ``latency_margin``.
GMorph's code carries an XGBoost pass/fail classifier on sharing features but never uses it; here
the filter is part of the loop and its savings are counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SearchError


@dataclass
class FilterDecision:
    skip: bool
    reason: str  # "" | "predicted_drop" | "predicted_latency"
    predicted_drop: float | None
    predicted_latency: float | None  # relative to the unfused models

    def to_json(self) -> dict:
        return {"skip": self.skip, "reason": self.reason, "predicted_drop": self.predicted_drop,
                "predicted_latency": self.predicted_latency}


class _Regressor:
    """An XGBoost regressor refitted from scratch whenever new examples arrive.

    With ``linear_on`` (a feature index) the trees are boosted from a least-squares line on that
    feature instead of from a constant: latency is close to linear in the remaining compute, and a
    line extrapolates to plans faster than any seen so far, which trees alone cannot.
    """

    def __init__(self, seed: int, kind: str, linear_on: int | None = None) -> None:
        self.seed, self.kind, self.linear_on = seed, kind, linear_on
        self.x: list[np.ndarray] = []
        self.y: list[float] = []
        self._model = None
        self._line = (0.0, 0.0)
        self._fitted_on = 0

    def add(self, x: np.ndarray, y: float) -> None:
        self.x.append(np.asarray(x, dtype=np.float64))
        self.y.append(float(y))

    def __len__(self) -> int:
        return len(self.y)

    def _base(self, x: np.ndarray) -> np.ndarray:
        if self.linear_on is None:
            return np.full(x.shape[0], float(np.mean(self.y)))
        slope, intercept = self._line
        return slope * x[:, self.linear_on] + intercept

    def predict(self, x: np.ndarray) -> float:
        if self._fitted_on != len(self.y):
            self._fit()
        row = np.asarray(x, dtype=np.float64)[None, :]
        if self.kind == "xgboost":
            return float(self._model.predict(row, base_margin=self._base(row))[0])
        return float(self._model.predict(row)[0] + self._base(row)[0])

    def _fit(self) -> None:
        x, y = np.stack(self.x), np.array(self.y)
        if self.linear_on is not None:
            column = x[:, self.linear_on]
            self._line = tuple(np.polyfit(column, y, 1)) if np.ptp(column) > 0 else (0.0, float(y.mean()))
        base = self._base(x)
        if self.kind == "xgboost":
            import xgboost

            model = xgboost.XGBRegressor(n_estimators=60, max_depth=3, learning_rate=0.15, min_child_weight=1.0,
                                         subsample=1.0, reg_lambda=1.0, random_state=self.seed, n_jobs=1)
            model.fit(x, y, base_margin=base)
        else:  # "linear": a ridge baseline, useful when xgboost is unavailable
            from sklearn.linear_model import Ridge

            model = Ridge(alpha=1.0)
            model.fit(x, y - base)
        self._model, self._fitted_on = model, len(self.y)


PREDICTORS = ("xgboost", "linear")


def check_predictor(kind: str) -> None:
    """Raise SearchError unless ``kind`` names a predictor (``None``, no filter, is checked by the caller)."""
    if kind not in PREDICTORS:
        raise SearchError(f"unknown predictor {kind!r}; use 'xgboost', 'linear' or None")


class PredictiveFilter:
    """Online accuracy-drop and latency predictors plus the skip rule."""

    def __init__(self, kind: str = "xgboost", min_samples: int = 4, drop_margin: float = 0.5,
                 latency_margin: float = 0.02, seed: int = 0, latency_linear_on: int | None = None,
                 drop_min_samples: int = 6) -> None:
        check_predictor(kind)
        needs = {"xgboost": ("xgboost", "xgboost-cpu"), "linear": ("sklearn", "scikit-learn")}[kind]
        try:
            __import__(needs[0])
        except ImportError as err:
            raise SearchError(f"predictor={kind!r} needs the {needs[1]} package (pip install {needs[1]})") from err
        self.kind = kind
        self.min_samples = min_samples
        self.drop_min_samples = drop_min_samples
        self.drop_margin = drop_margin
        self.latency_margin = latency_margin
        self.drop_model = _Regressor(seed, kind)
        self.latency_model = _Regressor(seed, kind, linear_on=latency_linear_on)

    def add_drop(self, features: np.ndarray, max_drop: float) -> None:
        self.drop_model.add(features, max_drop)

    def add_latency(self, features: np.ndarray, relative_latency: float) -> None:
        self.latency_model.add(features, relative_latency)

    def _drop_ready(self, max_accuracy_drop: float) -> bool:
        # Until it has seen a candidate meet the target AND one miss it, the regressor can only echo
        # the mean of what it saw (after a few aggressive failures it would skip everything).
        ys = self.drop_model.y
        return len(ys) >= self.drop_min_samples and min(ys) <= max_accuracy_drop < max(ys)

    @property
    def ready(self) -> bool:
        return len(self.drop_model) >= self.drop_min_samples or len(self.latency_model) >= self.min_samples

    def decide(self, features: np.ndarray, max_accuracy_drop: float, best_relative_latency: float | None) -> FilterDecision:
        """Whether to skip a candidate (predictions are None until a model has enough examples)."""
        pred_drop = self.drop_model.predict(features) if self._drop_ready(max_accuracy_drop) else None
        pred_lat = self.latency_model.predict(features) if len(self.latency_model) >= self.min_samples else None
        if pred_lat is not None and best_relative_latency is not None and pred_lat > best_relative_latency * (1 + self.latency_margin):
            return FilterDecision(True, "predicted_latency", pred_drop, pred_lat)
        if pred_drop is not None and pred_drop > max_accuracy_drop + self.drop_margin:
            return FilterDecision(True, "predicted_drop", pred_drop, pred_lat)
        return FilterDecision(False, "", pred_drop, pred_lat)
