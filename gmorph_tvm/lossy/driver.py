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

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import GmorphError, SearchError
from .data import MultiTaskData
from .distill import DistillConfig, Teacher, distill, drops, evaluate
from .features import FeatureExtractor
from .graph import LayerGraph
from .latency import TimingConfig, compile_multimodel, time_artifact
from .mutate import Calibration, FusedModel, build_fused, to_multimodel
from .plan import FusionPlan
from .predictor import PredictiveFilter
from .sampler import make_sampler
from ..core.targets import target_dict
from ..tuning import tune

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
    def from_json(obj: Mapping) -> "Candidate":
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
                for n, line in enumerate(lines.read_text().splitlines()):
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
        meta_file.write_text(json.dumps(meta, indent=1, sort_keys=True))

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
        name = f"{plan.digest()}.pt"
        if self.dir is None:
            self.memory[name] = {k: v.clone() for k, v in fused.state_dict().items()}
        else:
            torch.save(fused.state_dict(), self.dir / "weights" / name)
        return name

    def weights(self, name: str) -> dict | None:
        if name in self.memory:
            return self.memory[name]
        path = None if self.dir is None else self.dir / "weights" / name
        if path is None or not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


def _hash_models(models: Mapping[str, nn.Module]) -> dict[str, str]:
    import hashlib

    out = {}
    for task, model in models.items():
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
        out[task] = digest.hexdigest()[:16]
    return out


def search(
    models: Mapping[str, nn.Module],
    data: MultiTaskData,
    max_accuracy_drop: float = 1.0,
    budget: int = 20,
    predictor: str | None = "xgboost",
    *,
    sampler: str = "annealing",
    seed: int = 0,
    work_dir: str | os.PathLike | None = None,
    resume: bool = True,
    target: Any = "llvm",
    distill_config: DistillConfig | None = None,
    timing: TimingConfig | None = None,
    latency_fn: Callable[[Any], float] | None = None,
    plans: Sequence[FusionPlan] = (),
    time_budget_s: float | None = None,
    calibration_size: int = 128,
    probe_size: int = 500,
    filter_min_samples: int = 4,
    drop_min_samples: int = 6,
    drop_margin: float = 0.5,
    tune_trials: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> SearchResult:
    """Fuse ``models`` (task name -> model, all reading the same input) into one faster multi-task model
    whose per-task accuracy drop is at most ``max_accuracy_drop`` points on ``data``'s test split.

    ``budget`` plans are proposed (``plans`` first, then by ``sampler``: ``"annealing"`` or
    ``"random"``); ``predictor`` is ``"xgboost"`` (default), ``"linear"`` or ``None`` (no predictive
    filter: every plan is compiled and fine-tuned). ``work_dir`` holds the checkpoint
    (``candidates.jsonl``), ``report.json``, ``pareto.png`` and the final artifact; a search
    restarted on the same work dir re-uses every candidate already evaluated. Latency is measured on
    the artifact compiled for ``target`` (timed on this machine), or by ``latency_fn(multi_model) ->
    milliseconds`` when given. ``tune_trials`` > 0 tunes the final pick with MetaSchedule.
    """
    started = time.perf_counter()
    say = log or (lambda msg: None)
    if isinstance(predictor, str) and predictor.lower() in ("none", "off", ""):
        predictor = None  # the CLI spelling of "no filter"
    models = _check_models(models, data)
    if not 0 <= max_accuracy_drop < 100:
        raise SearchError(f"max_accuracy_drop must be between 0 and 100 points, got {max_accuracy_drop}")
    if not isinstance(budget, int) or budget < 0:
        raise SearchError(f"budget must be a non-negative number of candidate plans, got {budget!r}")
    distill_config = distill_config or DistillConfig()
    timing = timing or TimingConfig()
    tasks = list(models)
    example = data.val_x[:1]

    graphs = {t: LayerGraph.trace(t, m, example) for t, m in models.items()}
    teacher = Teacher(models, data, distill_config.train_samples, seed)
    calibration = Calibration(graphs, teacher.x[:calibration_size])
    probe_x = data.val_x[:probe_size]
    probe_y = {t: y[:probe_size] for t, y in data.val_y.items()}
    base_probe = evaluate(_identity(graphs), tasks, probe_x, probe_y)
    features = FeatureExtractor(graphs, calibration, probe_x, probe_y, base_probe)


    meta = {
        "format": _FORMAT, "tasks": tasks, "models": _hash_models(models), "max_accuracy_drop": max_accuracy_drop,
        "seed": seed, "sampler": sampler, "predictor": predictor, "distill": distill_config.to_json(),
        "target": json.loads(json.dumps(target_dict(target), default=str)),
        "data": {s: int(data.x(s).shape[0]) for s in ("train", "val", "test")},
        "filter": {"min_samples": filter_min_samples, "drop_min_samples": drop_min_samples, "drop_margin": drop_margin}
        if predictor else None,
    }  # fmt: skip
    store = _Checkpoint(Path(work_dir) if work_dir is not None else None, meta, resume)
    if store.records:
        say(f"resuming: {len(store.records)} candidate(s) already evaluated in {work_dir}")

    # Compiling and timing are separate steps so the baseline is compiled once and timed thrice.
    compile_for_timing = (lambda multi: multi) if latency_fn else (lambda multi: compile_multimodel(multi, target))
    time_compiled = latency_fn or (lambda artifact: time_artifact(artifact, timing))
    measure = lambda multi: time_compiled(compile_for_timing(multi))  # noqa: E731
    filt = None
    if predictor:
        filt = PredictiveFilter(predictor, filter_min_samples, drop_margin, seed=seed,
                                latency_linear_on=features.names().index("mac_fraction"),
                                drop_min_samples=drop_min_samples)
    proposer = make_sampler(sampler, graphs, seed, similarity=features.transfer_r2)

    # The unfused models: the latency to beat, and the answer when no plan meets the target.
    identity = FusionPlan()
    baseline = store.get(identity.key())
    if baseline is None:
        t0 = time.perf_counter()
        fused = _identity(graphs)
        feats = features(identity, fused)
        try:
            compiled = compile_for_timing(to_multimodel(fused, example))
            # Every candidate is compared with this number: take the best of three measurements.
            latency = min(float(time_compiled(compiled)) for _ in range(3))
        except GmorphError as err:
            raise SearchError(f"the unfused models cannot be compiled and timed: {err}") from None
        baseline = Candidate(0, identity, "baseline", feats, None, latency, seconds=time.perf_counter() - t0)
        store.add(baseline)
    say(f"unfused models: {baseline.latency_ms:.4f} ms compiled; val accuracy " +
        ", ".join(f"{t} {a:.2f}%" for t, a in teacher.accuracy_val.items()))
    candidates = [baseline]
    proposer.observe(identity, True, baseline.latency_ms)
    if filt is not None:
        filt.add_latency(features.vector(baseline.features), 1.0)
    best_latency = baseline.latency_ms
    seen = {identity.key()}
    queue = [p for p in plans]
    pass_line = max_accuracy_drop - distill_config.target_margin  # a candidate passes at or below it

    bar = _progress(budget, progress)
    try:
        for index in range(1, budget + 1):
            if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
                say(f"time budget of {time_budget_s:.0f} s reached after {index - 1} candidate(s)")
                break
            plan = None
            while queue and plan is None:
                head = queue.pop(0)
                head.validate(graphs)
                plan = head if head.key() not in seen else None
            if plan is None:
                plan = proposer.propose(seen)
            if plan is None:
                say("no new plan could be proposed: the plan space is exhausted")
                break
            seen.add(plan.key())
            cand = store.get(plan.key())
            if cand is None:
                failed = [c for c in candidates if c.fine_tuned and not c.passed]
                cand = _evaluate(index, plan, graphs, calibration, features, filt, measure, teacher, data,
                                 max_accuracy_drop, distill_config, best_latency, baseline.latency_ms, seed, store,
                                 example, failed, pass_line)
                store.add(cand)
            candidates.append(cand)
            if filt is not None and cand.features:
                vec = features.vector(cand.features)
                if cand.latency_ms is not None:
                    filt.add_latency(vec, cand.latency_ms / baseline.latency_ms)
                if cand.fine_tuned:
                    filt.add_drop(vec, cand.max_drop)
            proposer.observe(plan, cand.passed, cand.latency_ms, _failing_tasks(cand, pass_line))
            if cand.passed and cand.latency_ms < best_latency:
                best_latency = cand.latency_ms
            bar.update(1)
            bar.set_postfix_str(
                f"best {best_latency:.3f} ms, fine-tunes {sum(c.fine_tuned for c in candidates)}, "
                f"skipped {sum(c.status.startswith('skipped') for c in candidates)}"
            )
    finally:
        bar.close()
    search_seconds = time.perf_counter() - started

    result = _finish(candidates, graphs, calibration, teacher, data, max_accuracy_drop, target, timing,
                     latency_fn, store, example, tune_trials, say)
    result.report.update(_report(candidates, baseline, max_accuracy_drop, meta, teacher, search_seconds,
                                 time.perf_counter() - started, result))
    result.candidates = candidates
    if store.dir is not None:
        (store.dir / "report.json").write_text(json.dumps(result.report, indent=1, default=_json_default))
        try:
            plot_pareto(result.report, store.dir / "pareto.png")
        except ImportError:
            say("matplotlib is not installed: no pareto.png (report.json has the same data)")
        result.work_dir = store.dir
    return result


# ---- one candidate ---------------------------------------------------------------------------------------


def _failing_tasks(cand: Candidate, pass_line: float) -> list[str]:
    """Tasks that sank a candidate: measured ones, or those of the failed plan a rule skip cited."""
    if cand.distill is not None:
        return [t for t, d in cand.distill["val_drops"].items() if d > pass_line]
    return list((cand.prediction or {}).get("failing_tasks", []))


def _evaluate(index, plan, graphs, calibration, features, filt, measure, teacher, data, max_drop, config,
              best_latency, base_latency, seed, store, example, failed, pass_line) -> Candidate:
    t0 = time.perf_counter()
    cand = Candidate(index, plan, "error")
    try:
        if filt is not None:
            worse_than = next((f for f in failed if plan.at_least_as_aggressive(f.plan)), None)
            if worse_than is not None:
                cand.status = "skipped_rule"
                cand.prediction = {"skip": True, "reason": "rule", "failed_plan": worse_than.key,
                                   "failing_tasks": _failing_tasks(worse_than, pass_line)}
                return cand
        fused = build_fused(graphs, plan, calibration)
        cand.features = features(plan, fused)
        if filt is not None:
            decision = filt.decide(features.vector(cand.features), max_drop, best_latency / base_latency)
            cand.prediction = decision.to_json()
            if decision.skip:
                cand.status = f"skipped_{decision.reason}"
                return cand
        cand.latency_ms = float(measure(to_multimodel(fused, example)))
        if filt is not None and cand.latency_ms >= best_latency:
            cand.status = "skipped_measured_latency"  # cannot beat the best, whatever its accuracy
            return cand
        outcome = distill(fused, teacher, data.val_x, data.val_y, max_drop, config, seed=seed + index)
        cand.distill = outcome.to_json()
        if outcome.passed:
            cand.status = "passed"
            cand.weights = store.keep(plan, fused)
        else:
            cand.status = "aborted" if outcome.stop_reason == "learning_curve" else "failed"
        return cand
    except GmorphError as err:
        cand.error = f"{type(err).__name__}: {err}"
        return cand
    finally:
        cand.seconds = time.perf_counter() - t0


# ---- final pick -------------------------------------------------------------------------------------------


def _finish(candidates, graphs, calibration, teacher, data, max_drop, target, timing, latency_fn, store,
            example, tune_trials, say) -> SearchResult:
    tasks = list(graphs)
    base_test = teacher.accuracy_test(data)
    passing = sorted((c for c in candidates if c.status == "passed"), key=lambda c: (c.latency_ms, c.index))
    checks = []
    chosen, fused, test_acc = None, None, None
    for cand in passing:
        model = _restore(cand, graphs, calibration, store)
        if model is None:
            continue
        acc = evaluate(model, tasks, data.test_x, data.test_y)
        test_drops = drops(base_test, acc)
        ok = max(test_drops.values()) <= max_drop
        checks.append({"key": cand.key, "latency_ms": cand.latency_ms, "test_accuracy": acc, "test_drops": test_drops,
                       "passed": ok})
        say(f"test check {cand.key}: worst drop {max(test_drops.values()):.2f} pt -> {'ok' if ok else 'rejected'}")
        if ok:
            chosen, fused, test_acc = cand, model, acc
            break
    if chosen is None:
        chosen = candidates[0]
        fused = _identity(graphs)
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
    say(message)
    fused.eval()
    multi = to_multimodel(fused, example)
    artifact = compile_multimodel(multi, target)
    latency = float(latency_fn(multi)) if latency_fn is not None else time_artifact(artifact, timing)
    final: dict[str, Any] = {"latency_ms": latency}
    if tune_trials > 0:
        final.update(_tune(multi, target, tune_trials, store, timing, say))
        if "artifact" in final:
            artifact = final.pop("artifact")
    if store.dir is not None:
        (store.dir / "final").mkdir(exist_ok=True)
        path = artifact.export(store.dir / "final" / "fused.so")
        final["library"] = str(path)
    report = {"test_checks": checks, "final": final}
    return SearchResult(chosen.plan, fused, multi, artifact, final.get("tuned_latency_ms", latency), base_test, test_acc,
                        report, message)


def _tune(multi, target, trials, store, timing, say) -> dict[str, Any]:
    import tempfile

    work = (store.dir / "tuning") if store.dir is not None else Path(tempfile.mkdtemp(prefix="gmorph_tune_"))
    t0 = time.perf_counter()
    tune(multi.bound_module(), target, trials=trials, work_dir=work, progress=False)
    artifact = compile_multimodel(multi, target, tuning_db=work)
    return {"artifact": artifact, "tuned_latency_ms": time_artifact(artifact, timing),
            "tuning_seconds": time.perf_counter() - t0, "tuning_trials": trials}


def _restore(cand: Candidate, graphs, calibration, store) -> FusedModel | None:
    state = store.weights(cand.weights) if cand.weights else None
    if state is None:
        return None
    model = build_fused(graphs, cand.plan, calibration)
    model.load_state_dict(state)
    return model.eval()


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
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="fusion search", unit="plan", disable=not enabled, leave=False)


# ---- report and plot -----------------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (latency, drop, key) not dominated in both latency and drop, fastest first."""
    front: list[tuple[float, float, str]] = []
    for lat, drop, key in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or drop < front[-1][1]:
            front.append((lat, drop, key))
    return front


def _report(candidates, baseline, max_drop, meta, teacher, search_seconds, total_seconds, result) -> dict[str, Any]:
    counts = {s: 0 for s in ("passed", "failed", "aborted", "skipped_rule", "skipped_predicted_drop",
                             "skipped_predicted_latency", "skipped_measured_latency", "error")}
    for c in candidates[1:]:
        counts[c.status] = counts.get(c.status, 0) + 1
    counts["proposed"] = len(candidates) - 1
    counts["fine_tuned"] = sum(c.fine_tuned for c in candidates)
    counts["fine_tunes_saved"] = counts["proposed"] - counts["fine_tuned"]
    points = [(c.latency_ms, c.max_drop, c.key) for c in candidates if c.latency_ms is not None and c.max_drop is not None]
    best = min((c for c in candidates if c.passed), key=lambda c: c.latency_ms)
    return {
        "config": meta,
        "base_accuracy": {"val": teacher.accuracy_val, "test": result.base_test_accuracy},
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
        "candidates": [c.to_json() for c in candidates],
    }


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
