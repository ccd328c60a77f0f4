"""The accuracy-aware fusion search (`search`): sample plans, filter, fine-tune, measure, pick, confirm.

For every proposed plan (simulated annealing or random sampling, duplicates skipped):

1. apply it to fresh copies of the models (:func:`~gmorph_tvm.lossy.mutate.build_fused`,
   least-squares adapters) and compute cheap plan features;
2. filter: skip it if it removes at least what an already failed plan removed (GMorph's rule
   filter), or if the XGBoost models trained online predict its accuracy drop misses the target or
   its latency is above the best so far;
3. apply it to the Relax module (:func:`~gmorph_tvm.lossy.mutate.to_multimodel`: import + lossless
   stitching), compile for the target and time the artifact; with the filter on, a plan measured
   slower than the best so far is not fine-tuned either (latency does not depend on the weights);
4. fine-tune by distillation (:func:`~gmorph_tvm.lossy.distill.distill`) until every task's
   VALIDATION drop is within ``max_accuracy_drop`` (minus a small safety margin), or the learning
   curve says it cannot be; when a plan fails because of some tasks only, the sampler next tries
   it without their edits;
5. checkpoint the candidate (one JSON line; weights of passing candidates) so an interrupted
   search resumes where it stopped.

The fastest passing plans are then confirmed on the TEST split, which nothing before touches; the
first that also meets the target there is returned, compiled. If none does, the original models are
returned unfused, with a message saying so: a plan above the target is never returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.targets import target_dict
from ..errors import GmorphError, SearchError
from ..tuning import tune
from .data import MultiTaskData
from .distill import DistillConfig, Teacher, distill, drops, evaluate
from .features import FeatureExtractor
from .graph import LayerGraph
from .latency import TimingConfig, compile_multimodel, time_artifact
from .mutate import Calibration, FusedModel, build_fused, to_multimodel
from .plan import FusionPlan
from .predictor import PredictiveFilter, check_predictor
from .sampler import check_sampler, make_sampler

FINE_TUNED = ("passed", "failed", "aborted")
_FORMAT = 1


@dataclass
class Candidate:
    """One evaluated (or skipped) plan; a line of the checkpoint file."""

    index: int
    plan: FusionPlan
    status: str  # baseline | passed | failed | aborted | skipped_rule | skipped_predicted_drop
    #             | skipped_predicted_latency | skipped_measured_latency | error
    features: dict[str, float] | None = None
    prediction: dict[str, Any] | None = None
    latency_ms: float | None = None
    distill: dict[str, Any] | None = None
    weights: str | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def key(self) -> str:
        return self.plan.key()

    @property
    def fine_tuned(self) -> bool:
        return self.status in FINE_TUNED

    @property
    def passed(self) -> bool:
        return self.status in ("passed", "baseline")

    @property
    def max_drop(self) -> float | None:
        if self.status == "baseline":
            return 0.0
        return None if self.distill is None else float(self.distill["max_drop"])

    def to_json(self) -> dict:
        return {
            "index": self.index, "key": self.key, "plan": self.plan.to_json(), "status": self.status,
            "features": self.features, "prediction": self.prediction, "latency_ms": self.latency_ms,
            "distill": self.distill, "weights": self.weights, "seconds": round(self.seconds, 3), "error": self.error,
        }  # fmt: skip

    @staticmethod
    def from_json(obj: Mapping) -> Candidate:
        return Candidate(
            index=int(obj["index"]), plan=FusionPlan.from_json(obj["plan"]), status=str(obj["status"]),
            features=obj.get("features"), prediction=obj.get("prediction"), latency_ms=obj.get("latency_ms"),
            distill=obj.get("distill"), weights=obj.get("weights"), seconds=float(obj.get("seconds", 0.0)),
            error=obj.get("error"),
        )  # fmt: skip


@dataclass
class SearchResult:
    """The chosen plan, its fine-tuned fused model, the Relax MultiModel and compiled artifact."""

    plan: FusionPlan
    fused_model: FusedModel
    multi_model: Any  # gmorph_tvm.MultiModel
    artifact: Any  # gmorph_tvm.Artifact
    latency_ms: float
    base_test_accuracy: dict[str, float]
    test_accuracy: dict[str, float]
    report: dict[str, Any]
    message: str
    work_dir: Path | None = None
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def test_drops(self) -> dict[str, float]:
        return drops(self.base_test_accuracy, self.test_accuracy)


class _Checkpoint:
    """``candidates.jsonl`` (one line per candidate, appended and flushed) + passing weights + meta."""

    def __init__(self, work_dir: Path | None, meta: dict, resume: bool) -> None:
        self.dir = work_dir
        self.records: dict[str, Candidate] = {}
        self.memory: dict[str, dict] = {}
        if work_dir is None:
            return
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "weights").mkdir(exist_ok=True)
        meta_file, lines = work_dir / "meta.json", work_dir / "candidates.jsonl"
        if resume and meta_file.is_file():
            old = json.loads(meta_file.read_text())
            differing = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if differing:
                raise SearchError(
                    f"work dir {work_dir} holds a search with other settings ({', '.join(differing)}); "
                    "use another work_dir or resume=False to start over"
                )
            if lines.is_file():
                for line in lines.read_text().splitlines():
                    if not line.strip():
                        continue
                    try:
                        cand = Candidate.from_json(json.loads(line))
                    except (ValueError, KeyError, GmorphError):
                        # A line cut short by a crash: everything before it is still good.
                        break
                    self.records[cand.key] = cand
        else:
            if lines.exists():
                lines.unlink()
        tmp = meta_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, meta_file)

    def get(self, key: str) -> Candidate | None:
        return self.records.get(key)

    def add(self, cand: Candidate) -> None:
        self.records[cand.key] = cand
        if self.dir is None:
            return
        with open(self.dir / "candidates.jsonl", "a") as f:
            f.write(json.dumps(cand.to_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def keep(self, plan: FusionPlan, fused: FusedModel) -> str:
        """Save a passing candidate's fine-tuned weights (in memory without a work dir)."""
        return self.keep_state(plan, fused.state_dict())

    def keep_state(self, plan: FusionPlan, state: Mapping[str, torch.Tensor]) -> str:
        name = f"{plan.digest()}.pt"
        if self.dir is None:
            self.memory[name] = {k: v.detach().cpu().clone() for k, v in state.items()}
        else:
            path = self.dir / "weights" / name
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(dict(state), tmp)
            os.replace(tmp, path)  # a kill mid-write never leaves a truncated file under the final name
        return name

    def weights(self, name: str) -> dict | None:
        if name in self.memory:
            return self.memory[name]
        path = None if self.dir is None else self.dir / "weights" / name
        if path is None or not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


def _hash_models(models: Mapping[str, nn.Module]) -> dict[str, str]:
    out = {}
    for task, model in models.items():
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
        out[task] = digest.hexdigest()[:16]
    return out


@dataclass
class SearchConfig:
    """Every option of the fusion search; :func:`search` takes one (or the same names as keywords).

    Invalid values raise :class:`~gmorph_tvm.errors.SearchError` when the config is made.
    """

    #: Largest accuracy drop allowed per task, in percentage points (validation and test split).
    max_accuracy_drop: float = 1.0
    #: Candidate plans to propose (``plans`` first, then by ``sampler``); 0 = only the unfused models.
    budget: int = 20
    #: Predictive filter: ``"xgboost"``, ``"linear"`` or ``None`` (every plan is compiled and
    #: fine-tuned). ``"none"`` / ``"off"`` / ``""`` (the CLI's spellings) mean ``None``.
    predictor: str | None = "xgboost"
    #: How new plans are proposed: ``"annealing"`` (simulated annealing) or ``"random"``.
    sampler: str = "annealing"
    #: Seed of the sampler, the filter, the teacher subsample and each distillation.
    seed: int = 0
    #: Checkpoint (``candidates.jsonl``), ``report.json``, ``pareto.png`` and the final artifact;
    #: ``None`` keeps everything in memory.
    work_dir: str | os.PathLike | None = None
    #: Re-use the candidates a previous search with the same settings left in ``work_dir``.
    resume: bool = True
    #: Target the candidates are compiled for (and timed on this machine): preset name or dict.
    target: Any = "llvm"
    #: Distillation (fine-tuning) settings of every candidate.
    distill_config: DistillConfig = field(default_factory=DistillConfig)
    #: How compiled artifacts are timed (ignored with ``latency_fn``).
    timing: TimingConfig = field(default_factory=TimingConfig)
    #: ``latency_fn(multi_model) -> milliseconds`` instead of compiling and timing.
    latency_fn: Callable[[Any], float] | None = None
    #: Plans evaluated before any the sampler proposes.
    plans: Sequence[FusionPlan] = ()
    #: Stop proposing plans after this many seconds (``None``: only ``budget`` stops it).
    time_budget_s: float | None = None
    #: Training images used to fit the least-squares adapters of a plan.
    calibration_size: int = 128
    #: Validation images used for the cheap plan features.
    probe_size: int = 500
    #: Latency samples the filter needs before it skips a plan.
    filter_min_samples: int = 4
    #: Fine-tuned samples the filter needs before it predicts accuracy drops.
    drop_min_samples: int = 6
    #: Safety margin (points) of the filter's predicted drop.
    drop_margin: float = 0.5
    #: MetaSchedule trials for the final pick (0: untuned).
    tune_trials: int = 0
    #: Show a progress bar.
    progress: bool = True
    #: Where progress messages go (``None``: nowhere).
    log: Callable[[str], None] | None = print
    #: Candidates evaluated at once. Above 1 (or with ``ray_address``) each candidate's compile,
    #: timing and fine-tune is a Ray task (:mod:`~gmorph_tvm.lossy.parallel`, needs ``ray``); 1 runs
    #: the search in this process, without Ray.
    workers: int = 1
    #: Ray cluster address (``ray.init(address=...)``); ``None`` starts a local Ray with ``workers`` CPUs.
    ray_address: str | None = None
    #: Ray resource of the nodes holding the target device: compile + timing run there (one per unit),
    #: fine-tunes anywhere. ``None``: each candidate is timed where it is fine-tuned.
    ray_timing_resource: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.predictor, str) and self.predictor.lower() in ("none", "off", ""):
            self.predictor = None
        if self.predictor is not None:
            check_predictor(self.predictor)
        check_sampler(self.sampler)
        if isinstance(self.max_accuracy_drop, bool) or not isinstance(self.max_accuracy_drop, (int, float)) \
                or not 0 <= self.max_accuracy_drop < 100:
            raise SearchError(f"max_accuracy_drop must be between 0 and 100 points, got {self.max_accuracy_drop!r}")
        for name in ("budget", "seed", "calibration_size", "probe_size", "filter_min_samples", "drop_min_samples",
                     "tune_trials"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                what = "number of candidate plans" if name == "budget" else "integer"
                raise SearchError(f"{name} must be a non-negative {what}, got {value!r}")
        if self.calibration_size < 1 or self.probe_size < 1:
            raise SearchError("calibration_size and probe_size must be at least 1")
        if self.time_budget_s is not None and not self.time_budget_s >= 0:
            raise SearchError(f"time_budget_s must be a number of seconds >= 0 or None, got {self.time_budget_s!r}")
        if not isinstance(self.distill_config, DistillConfig):
            raise SearchError(f"distill_config must be a DistillConfig, not {type(self.distill_config).__name__}")
        if not isinstance(self.timing, TimingConfig):
            raise SearchError(f"timing must be a TimingConfig, not {type(self.timing).__name__}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise SearchError(f"workers must be a positive number of parallel candidates, got {self.workers!r}")
        if not all(isinstance(p, FusionPlan) for p in self.plans):
            raise SearchError("plans must be FusionPlan objects")
        self.plans = tuple(self.plans)

    @staticmethod
    def with_overrides(config: SearchConfig | None, overrides: Mapping[str, Any]) -> SearchConfig:
        """``config`` (default: all defaults) with the fields named in ``overrides`` replaced."""
        names = {f.name for f in fields(SearchConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise SearchError(f"unknown search option(s) {', '.join(unknown)}; SearchConfig has {', '.join(sorted(names))}")
        if config is None:
            return SearchConfig(**overrides)
        if not isinstance(config, SearchConfig):
            raise SearchError(f"config must be a gmorph_tvm.SearchConfig, not {type(config).__name__}")
        return replace(config, **overrides)


def search(
    models: Mapping[str, nn.Module], data: MultiTaskData, config: SearchConfig | None = None, **overrides: Any
) -> SearchResult:
    """Fuse ``models`` (task name -> torch model, all reading the same input) into one faster multi-task
    model whose per-task accuracy drop is at most ``max_accuracy_drop`` points on ``data``'s test split.

    ``data`` is a :class:`~gmorph_tvm.lossy.MultiTaskData` (train / val / test inputs and per-task
    labels). Options come from ``config`` (a :class:`SearchConfig`), with any keyword argument (a
    SearchConfig field name, e.g. ``budget=16``) overriding it. A search restarted on the same
    ``work_dir`` re-uses every candidate already evaluated.
    """
    return Searcher(models, data, SearchConfig.with_overrides(config, overrides)).run()


class Searcher:
    """One fusion search: the state its stages share (graphs, teacher, filter, sampler, checkpoint).

    ``run()`` is the whole search; the stages are :meth:`measure_baseline`, :meth:`next_plan`,
    :meth:`evaluate` (one candidate), :meth:`observe`, :meth:`finish` (test check + compile) and
    :meth:`report`.
    """

    def __init__(self, models: Mapping[str, nn.Module], data: MultiTaskData, config: SearchConfig | None = None) -> None:
        self.started = time.perf_counter()
        self.config = config = config if config is not None else SearchConfig()
        if not isinstance(config, SearchConfig):
            raise SearchError(f"config must be a gmorph_tvm.SearchConfig, not {type(config).__name__}")
        self.say: Callable[[str], None] = config.log or (lambda msg: None)
        self.models = _check_models(models, data)
        self.data = data
        self.tasks = list(self.models)
        self.example = data.val_x[:1]

        self.graphs = {t: LayerGraph.trace(t, m, self.example) for t, m in self.models.items()}
        self.teacher = Teacher(self.models, data, config.distill_config.train_samples, config.seed)
        self.calibration = Calibration(self.graphs, self.teacher.x[: config.calibration_size])
        probe_x = data.val_x[: config.probe_size]
        probe_y = {t: y[: config.probe_size] for t, y in data.val_y.items()}
        base_probe = evaluate(_identity(self.graphs), self.tasks, probe_x, probe_y)
        self.features = FeatureExtractor(self.graphs, self.calibration, probe_x, probe_y, base_probe)

        self.meta = {
            "format": _FORMAT, "tasks": self.tasks, "models": _hash_models(self.models),
            "max_accuracy_drop": config.max_accuracy_drop, "seed": config.seed, "sampler": config.sampler,
            "predictor": config.predictor, "distill": config.distill_config.to_json(),
            "target": json.loads(json.dumps(target_dict(config.target), default=str)),
            "data": {s: int(data.x(s).shape[0]) for s in ("train", "val", "test")},
            "filter": {"min_samples": config.filter_min_samples, "drop_min_samples": config.drop_min_samples,
                       "drop_margin": config.drop_margin} if config.predictor else None,
        }  # fmt: skip
        work_dir = Path(config.work_dir) if config.work_dir is not None else None
        self.store = _Checkpoint(work_dir, self.meta, config.resume)
        if self.store.records:
            self.say(f"resuming: {len(self.store.records)} candidate(s) already evaluated in {work_dir}")

        self.filter: PredictiveFilter | None = None
        if config.predictor:
            self.filter = PredictiveFilter(
                config.predictor, config.filter_min_samples, config.drop_margin, seed=config.seed,
                latency_linear_on=self.features.names().index("mac_fraction"),
                drop_min_samples=config.drop_min_samples,
            )  # fmt: skip
        self.proposer = make_sampler(config.sampler, self.graphs, config.seed, similarity=self.features.transfer_r2)
        self.pass_line = config.max_accuracy_drop - config.distill_config.target_margin  # pass at or below it
        self.candidates: list[Candidate] = []
        self.baseline: Candidate | None = None
        self.best_latency = float("inf")
        self.seen: set[str] = set()
        self.queue: list[FusionPlan] = list(config.plans)
        self.parallel_stats: dict[str, Any] | None = None  # set by the Ray loop (lossy.parallel)

    # ---- latency: compiling and timing are separate so the baseline is compiled once, timed thrice ----

    def compile_for_timing(self, multi: Any) -> Any:
        return multi if self.config.latency_fn else compile_multimodel(multi, self.config.target)

    def time_compiled(self, compiled: Any) -> float:
        if self.config.latency_fn:
            return float(self.config.latency_fn(compiled))
        return time_artifact(compiled, self.config.timing)

    def measure(self, multi: Any) -> float:
        return self.time_compiled(self.compile_for_timing(multi))

    # ---- the search ------------------------------------------------------------------------------------

    def run(self) -> SearchResult:
        """Baseline, then up to ``budget`` candidates, then the test-checked final pick and the report."""
        config = self.config
        baseline = self.measure_baseline()
        if config.workers > 1 or config.ray_address is not None:
            from .parallel import run_parallel

            run_parallel(self)
        else:
            self.run_serial()
        search_seconds = time.perf_counter() - self.started
        return self.conclude(baseline, search_seconds)

    def run_serial(self) -> None:
        """Propose, evaluate and observe one candidate at a time, up to ``budget`` (or the time budget)."""
        config = self.config
        bar = _progress(config.budget, config.progress)
        try:
            for index in range(1, config.budget + 1):
                if config.time_budget_s is not None and time.perf_counter() - self.started > config.time_budget_s:
                    self.say(f"time budget of {config.time_budget_s:.0f} s reached after {index - 1} candidate(s)")
                    break
                plan = self.next_plan()
                if plan is None:
                    self.say("no new plan could be proposed: the plan space is exhausted")
                    break
                self.seen.add(plan.key())
                cand = self.store.get(plan.key())
                if cand is None:
                    cand = self.evaluate(index, plan)
                    self.store.add(cand)
                self.observe(cand)
                bar.update(1)
                bar.set_postfix_str(
                    f"best {self.best_latency:.3f} ms, fine-tunes {sum(c.fine_tuned for c in self.candidates)}, "
                    f"skipped {sum(c.status.startswith('skipped') for c in self.candidates)}"
                )
        finally:
            bar.close()

    def conclude(self, baseline: Candidate, search_seconds: float) -> SearchResult:
        """The test-checked final pick, the report, ``report.json`` and ``pareto.png``."""
        result = self.finish()
        result.report.update(self.report(baseline, search_seconds, time.perf_counter() - self.started, result))
        result.candidates = self.candidates
        if self.store.dir is not None:
            (self.store.dir / "report.json").write_text(json.dumps(result.report, indent=1, default=_json_default))
            try:
                plot_pareto(result.report, self.store.dir / "pareto.png")
            except ImportError:
                self.say("matplotlib is not installed: no pareto.png (report.json has the same data)")
            result.work_dir = self.store.dir
        return result

    def measure_baseline(self) -> Candidate:
        """The unfused models: the latency to beat, and the answer when no plan meets the target."""
        identity = FusionPlan()
        baseline = self.store.get(identity.key())
        if baseline is None:
            t0 = time.perf_counter()
            fused = _identity(self.graphs)
            feats = self.features(identity, fused)
            try:
                compiled = self.compile_for_timing(to_multimodel(fused, self.example))
                # Every candidate is compared with this number: take the best of three measurements.
                latency = min(self.time_compiled(compiled) for _ in range(3))
            except GmorphError as err:
                raise SearchError(f"the unfused models cannot be compiled and timed: {err}") from err
            baseline = Candidate(0, identity, "baseline", feats, None, latency, seconds=time.perf_counter() - t0)
            self.store.add(baseline)
        assert baseline.latency_ms is not None
        self.say(f"unfused models: {baseline.latency_ms:.4f} ms compiled; val accuracy " +
                 ", ".join(f"{t} {a:.2f}%" for t, a in self.teacher.accuracy_val.items()))
        self.baseline = baseline
        self.candidates = [baseline]
        self.proposer.observe(identity, True, baseline.latency_ms)
        if self.filter is not None:
            self.filter.add_latency(self.features.vector(baseline.features), 1.0)
        self.best_latency = baseline.latency_ms
        self.seen = {identity.key()}
        return baseline

    def next_plan(self) -> FusionPlan | None:
        """The next unseen plan: the given ``plans`` first, then the sampler's; ``None`` when exhausted."""
        plan = None
        while self.queue and plan is None:
            head = self.queue.pop(0)
            head.validate(self.graphs)
            plan = head if head.key() not in self.seen else None
        if plan is None:
            plan = self.proposer.propose(self.seen)
        return plan

    def observe(self, cand: Candidate) -> None:
        """Record an evaluated candidate: the filter's training data, the sampler, the best latency."""
        assert self.baseline is not None and self.baseline.latency_ms is not None
        self.candidates.append(cand)
        if self.filter is not None and cand.features:
            vec = self.features.vector(cand.features)
            if cand.latency_ms is not None:
                self.filter.add_latency(vec, cand.latency_ms / self.baseline.latency_ms)
            if cand.fine_tuned:
                self.filter.add_drop(vec, cand.max_drop)
        self.proposer.observe(cand.plan, cand.passed, cand.latency_ms, _failing_tasks(cand, self.pass_line))
        if cand.passed and cand.latency_ms is not None and cand.latency_ms < self.best_latency:
            self.best_latency = cand.latency_ms

    def evaluate(self, index: int, plan: FusionPlan) -> Candidate:
        """Filter, build, time and fine-tune one plan (steps 1-4 of the module docstring)."""
        t0 = time.perf_counter()
        cand, fused = self.screen(index, plan)
        if fused is not None:
            self.measure_and_fine_tune(cand, fused, self.best_latency)
            if cand.status == "passed":
                cand.weights = self.store.keep(plan, fused)
        cand.seconds = time.perf_counter() - t0
        return cand

    def screen(self, index: int, plan: FusionPlan) -> tuple[Candidate, FusedModel | None]:
        """Steps 1-2: the rule filter, the plan applied (features), the predictive filter. Returns the
        candidate and its fused model, or ``None`` for the model when the candidate is already decided
        (skipped, or an error)."""
        assert self.baseline is not None and self.baseline.latency_ms is not None
        config, filt = self.config, self.filter
        cand = Candidate(index, plan, "error")
        try:
            if filt is not None:
                failed = [c for c in self.candidates if c.fine_tuned and not c.passed]
                worse_than = next((f for f in failed if plan.at_least_as_aggressive(f.plan)), None)
                if worse_than is not None:
                    cand.status = "skipped_rule"
                    cand.prediction = {"skip": True, "reason": "rule", "failed_plan": worse_than.key,
                                       "failing_tasks": _failing_tasks(worse_than, self.pass_line)}
                    return cand, None
            fused = build_fused(self.graphs, plan, self.calibration)
            cand.features = self.features(plan, fused)
            if filt is not None:
                decision = filt.decide(self.features.vector(cand.features), config.max_accuracy_drop,
                                       self.best_latency / self.baseline.latency_ms)
                cand.prediction = decision.to_json()
                if decision.skip:
                    cand.status = f"skipped_{decision.reason}"
                    return cand, None
            return cand, fused
        except GmorphError as err:
            cand.error = f"{type(err).__name__}: {err}"
            return cand, None

    def measure_and_fine_tune(self, cand: Candidate, fused: FusedModel, best_latency: float,
                              measure: Callable[[FusionPlan, Any], float] | None = None,
                              device: str | None = None) -> Candidate:
        """Steps 3-4 on a screened candidate: time the compiled plan (``measure(plan, multi_model)``
        instead when given), then -- unless the filter is on and it is not faster than
        ``best_latency`` -- fine-tune it (on ``device``). Sets the candidate's status; saving passing
        weights is the caller's."""
        config = self.config
        try:
            multi = to_multimodel(fused, self.example)
            cand.latency_ms = float(measure(cand.plan, multi) if measure is not None else self.measure(multi))
            if config.predictor is not None and cand.latency_ms >= best_latency:
                cand.status = "skipped_measured_latency"  # cannot beat the best, whatever its accuracy
                return cand
            on_device = {"device": device} if device is not None else {}
            outcome = distill(fused, self.teacher, self.data.val_x, self.data.val_y, config.max_accuracy_drop,
                              config.distill_config, seed=config.seed + cand.index, **on_device)
            cand.distill = outcome.to_json()
            if outcome.passed:
                cand.status = "passed"
            else:
                cand.status = "aborted" if outcome.stop_reason == "learning_curve" else "failed"
        except GmorphError as err:
            cand.error = f"{type(err).__name__}: {err}"
            cand.status = "error"
        return cand

    # ---- final pick -------------------------------------------------------------------------------------

    def finish(self) -> SearchResult:
        """Confirm the fastest passing plans on the test split; compile (and tune) the first that holds."""
        config, data, candidates = self.config, self.data, self.candidates
        max_drop = config.max_accuracy_drop
        base_test = self.teacher.accuracy_test(data)
        passing = sorted((c for c in candidates if c.status == "passed"), key=lambda c: (c.latency_ms, c.index))
        checks = []
        chosen, fused, test_acc = None, None, None
        for cand in passing:
            model = self.restore(cand)
            if model is None:
                continue
            acc = evaluate(model, self.tasks, data.test_x, data.test_y)
            test_drops = drops(base_test, acc)
            ok = max(test_drops.values()) <= max_drop
            checks.append({"key": cand.key, "latency_ms": cand.latency_ms, "test_accuracy": acc,
                           "test_drops": test_drops, "passed": ok})
            self.say(f"test check {cand.key}: worst drop {max(test_drops.values()):.2f} pt -> "
                     f"{'ok' if ok else 'rejected'}")
            if ok:
                chosen, fused, test_acc = cand, model, acc
                break
        if chosen is None or fused is None or test_acc is None:
            chosen = candidates[0]
            fused = _identity(self.graphs)
            test_acc = dict(base_test)
            message = (
                f"no fused plan met the {max_drop:g}-point target on both validation and test "
                f"({len(passing)} passed validation); returning the original models unfused"
            )
        else:
            message = (
                f"plan {chosen.key}: {candidates[0].latency_ms / chosen.latency_ms:.2f}x faster than the unfused "
                f"compiled models, worst test drop {max(drops(base_test, test_acc).values()):.2f} pt"
            )
        self.say(message)
        fused.eval()
        multi = to_multimodel(fused, self.example)
        artifact = compile_multimodel(multi, config.target)
        latency = float(config.latency_fn(multi)) if config.latency_fn is not None else \
            time_artifact(artifact, config.timing)
        final: dict[str, Any] = {"latency_ms": latency}
        if config.tune_trials > 0:
            final.update(self.tune_final(multi))
            if "artifact" in final:
                artifact = final.pop("artifact")
        if self.store.dir is not None:
            (self.store.dir / "final").mkdir(exist_ok=True)
            path = artifact.export(self.store.dir / "final" / "fused.so")
            final["library"] = str(path)
        report = {"test_checks": checks, "final": final}
        return SearchResult(chosen.plan, fused, multi, artifact, final.get("tuned_latency_ms", latency), base_test,
                            test_acc, report, message)

    def tune_final(self, multi: Any) -> dict[str, Any]:
        """Tune the final pick with MetaSchedule (``tune_trials``) and compile it with the records."""
        config, store = self.config, self.store
        work = (store.dir / "tuning") if store.dir is not None else Path(tempfile.mkdtemp(prefix="gmorph_tune_"))
        t0 = time.perf_counter()
        tune(multi.bound_module(), config.target, trials=config.tune_trials, work_dir=work, progress=False)
        artifact = compile_multimodel(multi, config.target, tuning_db=work)
        return {"artifact": artifact, "tuned_latency_ms": time_artifact(artifact, config.timing),
                "tuning_seconds": time.perf_counter() - t0, "tuning_trials": config.tune_trials}

    def restore(self, cand: Candidate) -> FusedModel | None:
        """A passing candidate's fused model with its fine-tuned weights (``None`` if they are gone)."""
        state = self.store.weights(cand.weights) if cand.weights else None
        if state is None:
            return None
        model = build_fused(self.graphs, cand.plan, self.calibration)
        model.load_state_dict(state)
        return model.eval()

    def report(self, baseline: Candidate, search_seconds: float, total_seconds: float,
               result: SearchResult) -> dict[str, Any]:
        """``report.json``'s content: counts per status, Pareto front, the choice, every candidate."""
        candidates = self.candidates
        counts = {s: 0 for s in ("passed", "failed", "aborted", "skipped_rule", "skipped_predicted_drop",
                                 "skipped_predicted_latency", "skipped_measured_latency", "error")}
        for c in candidates[1:]:
            counts[c.status] = counts.get(c.status, 0) + 1
        counts["proposed"] = len(candidates) - 1
        counts["fine_tuned"] = sum(c.fine_tuned for c in candidates)
        counts["fine_tunes_saved"] = counts["proposed"] - counts["fine_tuned"]
        points = [(c.latency_ms, c.max_drop, c.key) for c in candidates
                  if c.latency_ms is not None and c.max_drop is not None]
        best = min((c for c in candidates if c.passed), key=lambda c: c.latency_ms)
        return {
            "config": self.meta,
            "base_accuracy": {"val": self.teacher.accuracy_val, "test": result.base_test_accuracy},
            "baseline_latency_ms": baseline.latency_ms,
            "best_val_latency_ms": best.latency_ms,
            "best_val_plan": best.key,
            "counts": counts,
            "pareto_front": [{"latency_ms": lat, "max_val_drop": d, "key": k} for lat, d, k in pareto_front(points)],
            "chosen": {
                "key": result.plan.key(), "plan": result.plan.to_json(), "test_accuracy": result.test_accuracy,
                "test_drops": result.test_drops, "latency_ms": result.latency_ms,
                "speedup_vs_unfused": baseline.latency_ms / result.latency_ms if result.latency_ms else None,
            },  # fmt: skip
            "message": result.message,
            "search_seconds": search_seconds,
            "total_seconds": total_seconds,
            "parallel": self.parallel_stats,
            "candidates": [c.to_json() for c in candidates],
        }


def _failing_tasks(cand: Candidate, pass_line: float) -> list[str]:
    """Tasks that sank a candidate: measured ones, or those of the failed plan a rule skip cited."""
    if cand.distill is not None:
        return [t for t, d in cand.distill["val_drops"].items() if d > pass_line]
    return list((cand.prediction or {}).get("failing_tasks", []))


def _identity(graphs) -> FusedModel:
    return build_fused(graphs, FusionPlan()).eval()


def _check_models(models, data: MultiTaskData) -> dict[str, nn.Module]:
    if not isinstance(models, Mapping) or not models:
        raise SearchError("search needs a mapping task name -> torch.nn.Module with at least one model")
    for task, model in models.items():
        if not isinstance(model, nn.Module):
            raise SearchError(f"model {task!r} is a {type(model).__name__}; the fusion search fine-tunes PyTorch modules")
    if not isinstance(data, MultiTaskData):
        raise SearchError(f"data must be a gmorph_tvm.lossy.MultiTaskData, not {type(data).__name__}")
    data.check_tasks(models)
    return {t: m.eval() for t, m in models.items()}


def _progress(total: int, enabled: bool):
    return tqdm(total=total, desc="fusion search", unit="plan", disable=not enabled, leave=False)


# ---- report and plot -----------------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (latency, drop, key) not dominated in both latency and drop, fastest first."""
    front: list[tuple[float, float, str]] = []
    for lat, drop, key in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or drop < front[-1][1]:
            front.append((lat, drop, key))
    return front


def plot_pareto(report: Mapping[str, Any], path: Path) -> Path:
    """PNG of validation drop vs compiled latency for every fine-tuned candidate, with the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"passed": "tab:green", "failed": "tab:red", "aborted": "tab:orange", "baseline": "black"}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for status, color in colors.items():
        pts = [(c["latency_ms"], c["distill"]["max_drop"] if c["distill"] else 0.0) for c in report["candidates"]
               if c["status"] == status and c["latency_ms"] is not None]
        if pts:
            ax.scatter(*zip(*pts), c=color, s=22, label=status, zorder=3)
    front = report["pareto_front"]
    if front:
        ax.step([p["latency_ms"] for p in front], [p["max_val_drop"] for p in front], where="post", c="tab:blue",
                lw=1, label="Pareto front")
    ax.axhline(report["config"]["max_accuracy_drop"], ls="--", c="gray", lw=1, label="target")
    chosen = report["chosen"]
    ax.scatter([chosen["latency_ms"]], [max(chosen["test_drops"].values())], marker="*", s=160, c="gold",
               edgecolors="k", zorder=4, label="chosen (test drop)")
    ax.set_xlabel("compiled latency (ms)")
    ax.set_ylabel("worst per-task accuracy drop (points, val)")
    ax.set_title("fusion search: latency vs accuracy drop")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)
