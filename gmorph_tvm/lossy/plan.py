"""Fusion plans: which layers of one task reuse which layers of another, and which layers are dropped.

A plan is a set of edits on the tasks' :class:`~gmorph_tvm.lossy.graph.LayerGraph` s, named by cut
point indices (so plans are small, hashable and JSON-able, and mean the same thing on any copy of
the models):

* ``Share(task, cut, host, host_cut)``: ``task``'s layers up to its cut point ``cut`` are deleted;
  its remaining layers read ``host``'s activation at ``host_cut`` through an adapter (1x1 conv for
  channels, interpolation for spatial size, linear for flat features). ``task`` now branches off
  ``host``'s trunk. Each task shares from at most one host and hosts form a forest.
* ``Drop(task, start, end)``: ``task``'s layers between cut points ``start`` and ``end`` are
  removed; the activation at ``start`` goes on directly (through an adapter when shapes differ).

The empty plan is the original, unfused set of models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import SearchError
from .graph import LayerGraph


@dataclass(frozen=True, order=True)
class Share:
    """``task`` drops its layers up to cut ``cut`` and reads ``host``'s activation at ``host_cut``."""

    task: str
    cut: int
    host: str
    host_cut: int

    def to_json(self) -> dict:
        return {"task": self.task, "cut": self.cut, "host": self.host, "host_cut": self.host_cut}


@dataclass(frozen=True, order=True)
class Drop:
    """``task``'s layers after cut ``start`` up to and including cut ``end`` are removed."""

    task: str
    start: int
    end: int

    def to_json(self) -> dict:
        return {"task": self.task, "start": self.start, "end": self.end}


@dataclass(frozen=True)
class FusionPlan:
    """A canonical (sorted, merged) set of shares and drops; equal plans have equal :meth:`key`."""

    shares: tuple[Share, ...] = field(default=())
    drops: tuple[Drop, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "shares", tuple(sorted(self.shares)))
        object.__setattr__(self, "drops", _merge_drops(self.drops))

    # ---- identity / serialisation ---------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        return not self.shares and not self.drops

    def key(self) -> str:
        """Canonical text form, used to skip duplicate plans and to name checkpoints."""
        parts = [f"{s.task}@{s.cut}<{s.host}@{s.host_cut}" for s in self.shares]
        parts += [f"{d.task}-[{d.start},{d.end}]" for d in self.drops]
        return ";".join(parts) or "identity"

    def digest(self) -> str:
        return hashlib.sha1(self.key().encode()).hexdigest()[:12]

    def to_json(self) -> dict:
        return {"shares": [s.to_json() for s in self.shares], "drops": [d.to_json() for d in self.drops]}

    @staticmethod
    def from_json(obj: Mapping) -> FusionPlan:
        try:
            shares = tuple(Share(str(s["task"]), int(s["cut"]), str(s["host"]), int(s["host_cut"])) for s in obj.get("shares", []))
            drops = tuple(Drop(str(d["task"]), int(d["start"]), int(d["end"])) for d in obj.get("drops", []))
        except (KeyError, TypeError, ValueError) as err:
            raise SearchError(f"malformed fusion plan {json.dumps(obj)[:200]}: {err}") from err
        return FusionPlan(shares, drops)

    def __str__(self) -> str:
        return self.key()

    # ---- structure -----------------------------------------------------------------------------
    def share_of(self, task: str) -> Share | None:
        return next((s for s in self.shares if s.task == task), None)

    def drops_of(self, task: str) -> list[Drop]:
        return [d for d in self.drops if d.task == task]

    def own_start(self, task: str) -> int:
        """First cut point of ``task``'s own remaining layers (0 when it reads the model input)."""
        share = self.share_of(task)
        return share.cut if share else 0

    def task_order(self, tasks: Sequence[str]) -> list[str]:
        """Tasks with every host before the tasks that read from it (stable w.r.t. ``tasks``)."""
        order: list[str] = []
        pending = list(tasks)
        while pending:
            progressed = False
            for t in list(pending):
                share = self.share_of(t)
                if share is None or share.host in order:
                    order.append(t)
                    pending.remove(t)
                    progressed = True
            if not progressed:
                raise SearchError(f"fusion plan {self.key()}: tasks {', '.join(pending)} share from each other in a cycle")
        return order

    def exports(self, task: str) -> set[int]:
        """Cut points of ``task`` that other tasks read."""
        return {s.host_cut for s in self.shares if s.host == task}

    def validate(self, graphs: Mapping[str, LayerGraph]) -> None:
        """Raise :class:`SearchError` naming the first edit that cannot be applied to ``graphs``."""
        tasks = list(graphs)
        seen: set[str] = set()
        for s in self.shares:
            for name in (s.task, s.host):
                if name not in graphs:
                    raise SearchError(f"fusion plan {self.key()}: unknown task {name!r}; tasks are {', '.join(tasks)}")
            if s.task == s.host:
                raise SearchError(f"fusion plan {self.key()}: task {s.task!r} shares with itself (use a drop)")
            if s.task in seen:
                raise SearchError(f"fusion plan {self.key()}: task {s.task!r} shares from two hosts")
            seen.add(s.task)
            g, h = graphs[s.task], graphs[s.host]
            if not 1 <= s.cut < g.num_cuts:
                raise SearchError(f"fusion plan {self.key()}: task {s.task!r} has no cut point {s.cut} (1..{g.num_cuts - 1})")
            if not 1 <= s.host_cut < h.num_cuts:
                raise SearchError(f"fusion plan {self.key()}: host {s.host!r} has no cut point {s.host_cut} (1..{h.num_cuts - 1})")
            if g.cut(s.cut).rank != h.cut(s.host_cut).rank:
                raise SearchError(
                    f"fusion plan {self.key()}: {s.task!r} cut {s.cut} {list(g.cut(s.cut).shape)} and "
                    f"{s.host!r} cut {s.host_cut} {list(h.cut(s.host_cut).shape)} have different ranks"
                )
        self.task_order(tasks)
        for d in self.drops:
            if d.task not in graphs:
                raise SearchError(f"fusion plan {self.key()}: unknown task {d.task!r}; tasks are {', '.join(tasks)}")
            g = graphs[d.task]
            if not self.own_start(d.task) <= d.start < d.end < g.num_cuts:
                raise SearchError(
                    f"fusion plan {self.key()}: drop [{d.start},{d.end}] of {d.task!r} is outside its own layers "
                    f"({self.own_start(d.task)}..{g.num_cuts - 1})"
                )
            if g.cut(d.start).rank != g.cut(d.end).rank:
                raise SearchError(f"fusion plan {self.key()}: drop [{d.start},{d.end}] of {d.task!r} changes the rank")
        for s in self.shares:
            if s.host_cut < self.own_start(s.host):
                raise SearchError(
                    f"fusion plan {self.key()}: {s.task!r} reads {s.host!r} at cut {s.host_cut}, which {s.host!r} itself no longer computes"
                )
            for d in self.drops_of(s.host):
                if d.start < s.host_cut <= d.end:
                    raise SearchError(f"fusion plan {self.key()}: {s.task!r} reads {s.host!r} at cut {s.host_cut}, which is dropped")

    def is_valid(self, graphs: Mapping[str, LayerGraph]) -> bool:
        try:
            self.validate(graphs)
        except SearchError:
            return False
        return True

    def at_least_as_aggressive(self, other: FusionPlan) -> bool:
        """Whether this plan removes at least what ``other`` removes (GMorph's rule filter).

        True when each share of ``other`` is matched by a share of the same task from the same host
        cut at least as deep, and each of its drops lies inside a drop of this plan. If ``other``
        missed the accuracy target, this plan almost surely misses it too.
        """
        if other.is_identity:
            return True
        for s in other.shares:
            mine = self.share_of(s.task)
            if mine is None or mine.host != s.host or mine.cut < s.cut:
                return False
        for d in other.drops:
            if not any(m.start <= d.start and m.end >= d.end for m in self.drops_of(d.task)):
                return False
        return True

    # ---- editing (used by the samplers) --------------------------------------------------------------
    def with_share(self, share: Share) -> FusionPlan:
        """This plan with ``share.task``'s share replaced by ``share`` (its drops before the cut removed)."""
        shares = tuple(s for s in self.shares if s.task != share.task) + (share,)
        drops = tuple(d for d in self.drops if d.task != share.task or d.start >= share.cut)
        return FusionPlan(shares, drops)

    def without_share(self, task: str) -> FusionPlan:
        return FusionPlan(tuple(s for s in self.shares if s.task != task), self.drops)

    def without_tasks(self, tasks) -> FusionPlan:
        """This plan without the shares and drops of ``tasks`` (always valid if this one is)."""
        tasks = set(tasks)
        return FusionPlan(tuple(s for s in self.shares if s.task not in tasks),
                          tuple(d for d in self.drops if d.task not in tasks))

    def with_drop(self, drop: Drop) -> FusionPlan:
        return FusionPlan(self.shares, self.drops + (drop,))

    def without_drop(self, drop: Drop) -> FusionPlan:
        return FusionPlan(self.shares, tuple(d for d in self.drops if d != drop))


def _merge_drops(drops: Sequence[Drop]) -> tuple[Drop, ...]:
    """Sort drops and merge overlapping or touching ranges of the same task (one adapter, not two)."""
    merged: list[Drop] = []
    for d in sorted(drops):
        if merged and merged[-1].task == d.task and d.start <= merged[-1].end:
            last = merged.pop()
            merged.append(Drop(d.task, last.start, max(last.end, d.end)))
        else:
            merged.append(d)
    return tuple(merged)
