"""Proposing fusion plans: random mutations, simulated annealing with an elite set, random sampling.

Mutations (each keeps the plan valid, else it is re-drawn):

* ``share``   a task branches off another task's trunk: pick the task, its branch cut (shallow ones
  more often), a host and a host cut of the same rank (same shape, then same H,W or same C,
  similar relative depth and -- when a similarity is given -- host activations that linearly
  predict the task's own on a calibration batch are preferred; host and layer are drawn jointly);
* ``shift``   move an existing branch point one cut deeper or shallower (on either side);
* ``unshare`` undo a share;
* ``drop``    remove one or two layer blocks inside a task's own layers;
* ``undrop``  undo a drop.

:class:`AnnealingSampler` mutates either its current state or a member of the elite set (the
fastest plans that met the target) and accepts a measured candidate with the Metropolis rule on
the relative latency change, cooling geometrically. When a fine-tuned plan misses the target
because of some tasks only, it next proposes the plan without those tasks' edits (a repair: GMorph
throws the whole candidate away, though the per-task drops say which edit sank it). :class:`RandomSampler` (the baseline) draws 1-3
mutations from the unfused plan. Both skip plans already seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..errors import SearchError
from .graph import LayerGraph
from .plan import Drop, FusionPlan, Share

_OPS = ("share", "shift", "unshare", "drop", "undrop")
_OP_WEIGHTS = np.array([0.45, 0.25, 0.08, 0.15, 0.07])


Similarity = Callable[[str, int, str, int], float]


class Mutator:
    """Random plan edits on fixed task graphs, driven by one numpy Generator.

    ``similarity(task, cut, host, host_cut)`` (optional, in [0, 1]; e.g. how well the host's
    activation linearly predicts the task's own on a calibration batch) makes hosts and host
    layers that already carry what the task needs more likely partners.
    """

    def __init__(self, graphs: Mapping[str, LayerGraph], rng: np.random.Generator,
                 similarity: Similarity | None = None) -> None:
        self.graphs = graphs
        self.tasks = list(graphs)
        self.rng = rng
        self.similarity = similarity

    def mutate(self, plan: FusionPlan, tries: int = 30) -> FusionPlan | None:
        """One valid random edit of ``plan`` (None if none was found in ``tries`` draws)."""
        for _ in range(tries):
            op = _OPS[self.rng.choice(len(_OPS), p=_OP_WEIGHTS)]
            new = getattr(self, f"_{op}")(plan)
            if new is not None and new != plan and new.is_valid(self.graphs):
                return new
        return None

    # ---- edits -----------------------------------------------------------------------------------------
    def _share(self, plan: FusionPlan) -> FusionPlan | None:
        if len(self.tasks) < 2:
            return None
        task = self.tasks[self.rng.integers(len(self.tasks))]
        g = self.graphs[task]
        # New branch points lean shallow (cheap to recover); "shift" deepens the ones that pass.
        depths = np.arange(1, g.num_cuts) / max(1, g.num_cuts - 1)
        lean = np.exp(-1.5 * depths)
        cut = int(1 + self.rng.choice(len(lean), p=lean / lean.sum()))
        # Host and host layer are drawn together, so a similarity also steers which task is read.
        options: list[tuple[str, int]] = []
        for host in self.tasks:
            if host == task or _reads_from(plan, host, task):
                continue
            h = self.graphs[host]
            dropped = {c for d in plan.drops_of(host) for c in range(d.start + 1, d.end + 1)}
            options += [(host, c) for c in range(max(1, plan.own_start(host)), h.num_cuts)
                        if c not in dropped and h.cut(c).rank == g.cut(cut).rank]
        if not options:
            return None
        weights = np.array([_affinity(g, cut, self.graphs[h], c) for h, c in options])
        if self.similarity is not None:
            weights = weights * np.array([0.05 + self.similarity(task, cut, h, c) for h, c in options]) ** 2
        host, host_cut = options[self.rng.choice(len(options), p=weights / weights.sum())]
        return plan.with_share(Share(task, cut, host, host_cut))

    def _shift(self, plan: FusionPlan) -> FusionPlan | None:
        if not plan.shares:
            return None
        share = plan.shares[self.rng.integers(len(plan.shares))]
        delta = int(self.rng.choice([-1, 1]))
        if self.rng.random() < 0.5:
            return plan.with_share(Share(share.task, share.cut + delta, share.host, share.host_cut))
        return plan.with_share(Share(share.task, share.cut, share.host, share.host_cut + delta))

    def _unshare(self, plan: FusionPlan) -> FusionPlan | None:
        if not plan.shares:
            return None
        share = plan.shares[self.rng.integers(len(plan.shares))]
        # Tasks reading the un-shared task past its old branch point stay valid; others are re-drawn.
        return plan.without_share(share.task)

    def _drop(self, plan: FusionPlan) -> FusionPlan | None:
        task = self.tasks[self.rng.integers(len(self.tasks))]
        g = self.graphs[task]
        start_low = plan.own_start(task)
        if start_low >= g.num_cuts - 1:
            return None
        start = int(self.rng.integers(start_low, g.num_cuts - 1))
        end = min(g.num_cuts - 1, start + int(self.rng.integers(1, 3)))
        return plan.with_drop(Drop(task, start, end))

    def _undrop(self, plan: FusionPlan) -> FusionPlan | None:
        if not plan.drops:
            return None
        return plan.without_drop(plan.drops[self.rng.integers(len(plan.drops))])


def _reads_from(plan: FusionPlan, task: str, other: str) -> bool:
    """Whether ``task`` (transitively) reads ``other``'s activations."""
    seen = set()
    share = plan.share_of(task)
    while share is not None and share.host not in seen:
        if share.host == other:
            return True
        seen.add(share.host)
        share = plan.share_of(share.host)
    return False


def _affinity(g: LayerGraph, cut: int, h: LayerGraph, host_cut: int) -> float:
    """Preference for pairing ``g``'s cut with ``h``'s: same shape, then same H,W or C, similar depth."""
    a, b = g.cut(cut).shape, h.cut(host_cut).shape
    if a == b:
        shape = 4.0
    elif len(a) == 3 and (a[1:] == b[1:] or a[0] == b[0]):
        shape = 2.0
    else:
        shape = 1.0
    depth_a = cut / max(1, g.num_cuts - 1)
    depth_b = host_cut / max(1, h.num_cuts - 1)
    return shape * math.exp(-3.0 * abs(depth_a - depth_b))


def _new_mutation(mutator: Mutator, base: FusionPlan, count: int, seen: set[str]) -> FusionPlan | None:
    """``count`` random mutations of ``base`` (a mutation that finds nothing to do keeps the plan);
    None when the result is the unfused plan or one already ``seen``."""
    plan = base
    for _ in range(count):
        plan = mutator.mutate(plan) or plan
    if plan.is_identity or plan.key() in seen:
        return None
    return plan


class RandomSampler:
    """Baseline: 1-3 random mutations of the unfused plan, duplicates skipped."""

    name = "random"

    def __init__(self, graphs: Mapping[str, LayerGraph], seed: int = 0, similarity: Similarity | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.mutator = Mutator(graphs, self.rng, similarity)

    def propose(self, seen: set[str], tries: int = 200) -> FusionPlan | None:
        for _ in range(tries):
            plan = _new_mutation(self.mutator, FusionPlan(), int(self.rng.integers(1, 4)), seen)
            if plan is not None:
                return plan
        return None

    def observe(self, plan: FusionPlan, passed: bool, latency: float | None,
                failing_tasks: Sequence[str] = ()) -> None:
        """Random sampling ignores outcomes."""

    def state(self) -> dict:
        return {}


class AnnealingSampler:
    """Simulated annealing over plans with an elite set of the fastest plans that met the target.

    ``temperature`` is in percent of latency: a candidate 10% slower than the current state is
    accepted with probability exp(-10 / T). ``alpha`` cools it after every observed candidate.
    """

    name = "annealing"

    def __init__(self, graphs: Mapping[str, LayerGraph], seed: int = 0, temperature: float = 10.0, alpha: float = 0.93,
                 elite_size: int = 8, elite_prob: float = 0.3, mutations: tuple[int, int] = (1, 2),
                 similarity: Similarity | None = None) -> None:
        if temperature <= 0 or not 0 < alpha <= 1 or elite_size < 1 or not 0 <= elite_prob <= 1:
            raise SearchError("annealing needs temperature > 0, 0 < alpha <= 1, elite_size >= 1, 0 <= elite_prob <= 1")
        self.rng = np.random.default_rng(seed)
        self.mutator = Mutator(graphs, self.rng, similarity)
        self.temperature = temperature
        self.alpha = alpha
        self.elite_size = elite_size
        self.elite_prob = elite_prob
        self.mutations = mutations
        self.current = FusionPlan()
        self.current_latency: float | None = None
        self.elite: list[tuple[float, str, FusionPlan]] = []  # (latency, key, plan), fastest first
        self.repairs: list[FusionPlan] = []

    def propose(self, seen: set[str], tries: int = 200) -> FusionPlan | None:
        while self.repairs:
            plan = self.repairs.pop(0)
            if plan.key() not in seen:
                return plan
        for _ in range(tries):
            if self.elite and self.rng.random() < self.elite_prob:
                base = self.elite[int(self.rng.integers(len(self.elite)))][2]
            else:
                base = self.current
            count = int(self.rng.integers(self.mutations[0], self.mutations[1] + 1))
            plan = _new_mutation(self.mutator, base, count, seen)
            if plan is not None:
                return plan
        return None

    def observe(self, plan: FusionPlan, passed: bool, latency: float | None,
                failing_tasks: Sequence[str] = ()) -> None:
        """Update elite set and current state with a candidate's outcome (skipped ones: passed=False).

        ``failing_tasks``: tasks of a fine-tuned plan that missed the target. The plan without their
        edits is proposed next (a repair): when one task's edit sinks a plan, the others may be fine.
        """
        if not passed and failing_tasks:
            repaired = plan.without_tasks(failing_tasks)
            if not repaired.is_identity and repaired != plan:
                self.repairs.append(repaired)
        if passed and latency is not None:
            self.elite.append((latency, plan.key(), plan))
            self.elite.sort(key=lambda e: (e[0], e[1]))
            del self.elite[self.elite_size :]
            if self.current_latency is None or latency < self.current_latency:
                self.current, self.current_latency = plan, latency
            else:
                worse = 100.0 * (latency - self.current_latency) / self.current_latency
                if self.rng.random() < math.exp(-worse / max(self.temperature, 1e-9)):
                    self.current, self.current_latency = plan, latency
        self.temperature *= self.alpha

    def state(self) -> dict:
        return {"temperature": self.temperature, "current": self.current.key(), "current_latency": self.current_latency,
                "elite": [e[1] for e in self.elite]}


SAMPLERS = ("annealing", "random")


def check_sampler(name: str) -> None:
    """Raise SearchError unless ``name`` is one of :data:`SAMPLERS`."""
    if name not in SAMPLERS:
        raise SearchError(f"unknown sampler {name!r}; use 'annealing' or 'random'")


def make_sampler(name: str, graphs: Mapping[str, LayerGraph], seed: int, similarity: Similarity | None = None,
                 **options) -> AnnealingSampler | RandomSampler:
    check_sampler(name)
    if name == "annealing":
        return AnnealingSampler(graphs, seed, similarity=similarity, **options)
    return RandomSampler(graphs, seed, similarity)
