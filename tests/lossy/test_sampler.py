"""Plan samplers: valid, unique, deterministic proposals; annealing state and elite set."""

from __future__ import annotations

import pytest

from gmorph_tvm.errors import SearchError
from gmorph_tvm.lossy.plan import FusionPlan, Share
from gmorph_tvm.lossy.sampler import AnnealingSampler, Mutator, RandomSampler, make_sampler


def _draw(sampler, n):
    seen, keys = {FusionPlan().key()}, []
    for _ in range(n):
        plan = sampler.propose(seen)
        assert plan is not None
        seen.add(plan.key())
        keys.append(plan.key())
    return keys


@pytest.mark.parametrize("kind", ["random", "annealing"])
def test_proposals_are_valid_unique_and_deterministic(kind, tiny_graphs):
    first = _draw(make_sampler(kind, tiny_graphs, seed=3), 25)
    again = _draw(make_sampler(kind, tiny_graphs, seed=3), 25)
    other = _draw(make_sampler(kind, tiny_graphs, seed=4), 25)
    assert first == again
    assert first != other
    assert len(set(first)) == 25 and "identity" not in first
    # Every proposal is applicable to the graphs.
    sampler = make_sampler(kind, tiny_graphs, seed=3)
    seen = {"identity"}
    for _ in range(25):
        plan = sampler.propose(seen)
        seen.add(plan.key())
        plan.validate(tiny_graphs)


def test_mutations_cover_shares_and_drops(tiny_graphs):
    import numpy as np

    mutator = Mutator(tiny_graphs, np.random.default_rng(0))
    plans = [mutator.mutate(FusionPlan()) for _ in range(60)]
    assert any(p.shares for p in plans) and any(p.drops for p in plans)
    shared = FusionPlan((Share("coarse4", 2, "class10", 1),))
    edits = {mutator.mutate(shared).key() for _ in range(60)}
    assert len(edits) > 10


def test_annealing_moves_to_faster_plans_and_keeps_an_elite(tiny_graphs):
    sampler = AnnealingSampler(tiny_graphs, seed=0, temperature=1e-6, elite_size=2)
    a = FusionPlan((Share("coarse4", 2, "class10", 1),))
    b = FusionPlan((Share("size3", 2, "class10", 1),))
    c = FusionPlan((Share("size3", 3, "class10", 1),))
    sampler.observe(FusionPlan(), True, 10.0)
    sampler.observe(a, True, 8.0)
    assert sampler.current == a
    sampler.observe(b, True, 9.0)  # slower and T ~ 0: rejected, but it met the target: elite
    assert sampler.current == a
    sampler.observe(c, False, 1.0)  # missed the target: never the state, never elite
    assert sampler.current == a
    assert [e[2] for e in sampler.elite] == [a, b]


def test_unknown_sampler():
    with pytest.raises(SearchError, match="unknown sampler"):
        make_sampler("grid", {}, 0)
    assert isinstance(make_sampler("random", {}, 0), RandomSampler)


def test_similarity_steers_the_host_layer(tiny_graphs):
    import numpy as np

    def similar(task, cut, host, host_cut):
        return 1.0 if host_cut == 1 else 0.0

    def fraction_at_1(similarity):
        mutator = Mutator(tiny_graphs, np.random.default_rng(0), similarity=similarity)
        cuts = [s.host_cut for _ in range(80) for s in (mutator._share(FusionPlan()) or FusionPlan()).shares]
        return cuts.count(1) / len(cuts)

    # Flat-feature cuts cannot read host cut 1 (a [C,H,W] activation): not every share can follow.
    assert fraction_at_1(similar) > 0.7 > 2 * fraction_at_1(None)


def test_annealing_repairs_a_plan_sunk_by_one_task(tiny_graphs):
    sampler = AnnealingSampler(tiny_graphs, seed=0)
    both = FusionPlan((Share("coarse4", 2, "class10", 1), Share("size3", 2, "class10", 1)))
    sampler.observe(FusionPlan(), True, 10.0)
    sampler.observe(both, False, 5.0, failing_tasks=["size3"])
    assert sampler.propose({"identity", both.key()}) == FusionPlan((Share("coarse4", 2, "class10", 1),))
