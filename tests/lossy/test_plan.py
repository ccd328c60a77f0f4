"""FusionPlan: canonical form, JSON, validation against task graphs."""

from __future__ import annotations

import pytest

from gmorph_tvm.errors import SearchError
from gmorph_tvm.lossy.plan import Drop, FusionPlan, Share


def test_canonical_key_ignores_order_and_merges_touching_drops():
    a = FusionPlan((Share("b", 2, "a", 3), Share("c", 1, "a", 1)), (Drop("a", 4, 5), Drop("a", 2, 4)))
    b = FusionPlan((Share("c", 1, "a", 1), Share("b", 2, "a", 3)), (Drop("a", 2, 5),))
    assert a == b and a.key() == b.key() and hash(a) == hash(b)
    assert a.drops == (Drop("a", 2, 5),)
    assert FusionPlan().is_identity and FusionPlan().key() == "identity"
    assert FusionPlan.from_json(a.to_json()) == a


def test_malformed_json_is_a_search_error():
    with pytest.raises(SearchError, match="malformed fusion plan"):
        FusionPlan.from_json({"shares": [{"task": "a"}]})


def test_task_order_puts_hosts_first_and_rejects_cycles():
    plan = FusionPlan((Share("a", 1, "c", 2), Share("c", 1, "b", 1)))
    assert plan.task_order(["a", "b", "c"]) == ["b", "c", "a"]
    with pytest.raises(SearchError, match="cycle"):
        FusionPlan((Share("a", 1, "b", 1), Share("b", 1, "a", 1))).task_order(["a", "b"])


def test_validate_names_the_offending_edit(tiny_graphs):
    graphs = tiny_graphs
    ok = FusionPlan((Share("coarse4", 2, "class10", 2),), (Drop("size3", 1, 2),))
    ok.validate(graphs)
    bad = {
        "unknown task": FusionPlan((Share("nope", 1, "class10", 1),)),
        "no cut point 99": FusionPlan((Share("coarse4", 99, "class10", 1),)),
        "different ranks": FusionPlan((Share("coarse4", 5, "class10", 2),)),  # [F] vs [C,H,W]
        "which 'coarse4' itself no longer computes": FusionPlan(
            (Share("coarse4", 3, "class10", 2), Share("size3", 2, "coarse4", 1))
        ),
        "which is dropped": FusionPlan((Share("coarse4", 2, "class10", 2),), (Drop("class10", 1, 3),)),
        "outside its own layers": FusionPlan((Share("coarse4", 3, "class10", 2),), (Drop("coarse4", 1, 4),)),
    }
    for why, plan in bad.items():
        with pytest.raises(SearchError, match=why):
            plan.validate(graphs)
        assert not plan.is_valid(graphs)


def test_with_share_replaces_and_drops_layers_it_deleted():
    plan = FusionPlan((Share("b", 1, "a", 1),), (Drop("b", 1, 2), Drop("b", 3, 4)))
    moved = plan.with_share(Share("b", 3, "a", 2))
    assert moved.shares == (Share("b", 3, "a", 2),)
    assert moved.drops == (Drop("b", 3, 4),)
    assert moved.without_share("b").shares == ()


def test_at_least_as_aggressive_is_gmorphs_rule():
    failed = FusionPlan((Share("b", 2, "a", 3),), (Drop("c", 2, 3),))
    assert FusionPlan((Share("b", 3, "a", 1),), (Drop("c", 1, 4),)).at_least_as_aggressive(failed)
    assert FusionPlan((Share("b", 2, "a", 3), Share("c", 1, "a", 1)), (Drop("c", 2, 3),)).at_least_as_aggressive(failed)
    assert not FusionPlan((Share("b", 1, "a", 3),), (Drop("c", 2, 3),)).at_least_as_aggressive(failed)  # shallower
    assert not FusionPlan((Share("b", 2, "c", 3),), (Drop("c", 2, 3),)).at_least_as_aggressive(failed)  # other host
    assert not FusionPlan((Share("b", 2, "a", 3),)).at_least_as_aggressive(failed)  # keeps c's layers
    assert failed.at_least_as_aggressive(FusionPlan())
