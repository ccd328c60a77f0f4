"""Task extraction (dedup of identical kernels, cost shares) and trial-budget allocation."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from gmorph_tvm.tuning import allocate, extract, prepare
from gmorph_tvm.tuning.tasks import (
    MIN_USEFUL_TRIALS,
    SKIPPED_BUDGET,
    SKIPPED_FILTER,
    SKIPPED_SHARE,
    TaskPlan,
)

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})


def _const(rng: np.random.Generator, *shape: int) -> relax.Expr:
    return relax.const(rng.standard_normal(shape).astype("float32"))


def _conv_relu(bb: relax.BlockBuilder, x: relax.Expr, rng, cin: int, cout: int) -> relax.Expr:
    y = bb.emit(relax.op.nn.conv2d(x, _const(rng, cout, cin, 3, 3), padding=1))
    return bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(y, _const(rng, 1, cout, 1, 1)))))


def _models_module(num_models: int, size: int = 16) -> tvm.IRModule:
    """``num_models`` copies of conv(3->8)-relu-conv(8->8)-relu on one input, different weights.

    The copies' kernels are structurally identical (weights are arguments of the kernels, not
    part of them), as when several models of the same architecture are fused.
    """
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, size, size), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = []
            for seed in range(num_models):
                rng = np.random.default_rng(seed)
                h = _conv_relu(bb, x, rng, 3, 8)
                outs.append(_conv_relu(bb, h, rng, 8, 8))
            out = bb.emit_output(relax.Tuple(outs) if num_models > 1 else outs[0])
        bb.emit_func_output(out)
    return bb.get()


def test_identical_kernels_of_two_models_are_one_task_each():
    one = extract(prepare(_models_module(1), TARGET, channels_last=False), TARGET)
    two = extract(prepare(_models_module(2), TARGET, channels_last=False), TARGET)
    assert len(one) == 2 and all(p.calls == 1 for p in one)
    # Same distinct kernels, each now called twice (once per model).
    assert len(two) == len(one)
    assert sorted(p.calls for p in two) == [2, 2]
    assert sorted(p.flops for p in two) == sorted(p.flops for p in one)


def test_flops_shares_follow_hand_count():
    plans = extract(prepare(_models_module(1, size=16), TARGET, channels_last=False), TARGET)
    # conv3x3 multiply-adds (2 FLOPs) + bias add + relu per output element.
    conv1 = 16 * 16 * 8 * (2 * 3 * 9 + 2)
    conv2 = 16 * 16 * 8 * (2 * 8 * 9 + 2)
    assert sorted(p.flops for p in plans) == pytest.approx(sorted([conv1, conv2]), rel=0.05)
    assert sum(p.share for p in plans) == pytest.approx(1.0)
    big = max(plans, key=lambda p: p.flops)
    assert big.share == pytest.approx(conv2 / (conv1 + conv2), rel=0.05)


def _plan(name: str, share: float) -> TaskPlan:
    return TaskPlan(name, workload=None, calls=1, flops=share * 1e6, share=share)  # type: ignore[arg-type]


def test_budget_split_by_share_with_floor_and_exact_total():
    plans = [_plan("conv_a", 0.6), _plan("conv_b", 0.3), _plan("matmul", 0.09), _plan("mean", 0.01)]
    tuned = allocate(plans, 200, min_flops_share=0.02, min_trials_per_task=16)
    assert [p.name for p in tuned] == ["conv_a", "conv_b", "matmul"]
    assert sum(p.trials for p in tuned) == 200
    assert all(p.trials >= 16 for p in tuned)
    assert tuned[0].trials > tuned[1].trials > tuned[2].trials
    assert plans[3].status == SKIPPED_SHARE and plans[3].trials == 0


def test_short_budget_shrinks_the_floor_before_dropping_tasks():
    plans = [_plan("a", 0.5), _plan("b", 0.3), _plan("c", 0.2)]
    tuned = allocate(plans, 40, min_trials_per_task=16)
    assert [(p.name, p.trials) for p in tuned] == [("a", 14), ("b", 13), ("c", 13)]


def test_budget_too_small_for_every_task_drops_the_smallest():
    plans = [_plan("a", 0.5), _plan("b", 0.3), _plan("c", 0.2)]
    tuned = allocate(plans, 20, min_trials_per_task=16)
    # Floor 8 (MIN_USEFUL_TRIALS) does not fit 3 tasks: c goes; the 4 spare trials split 5:3.
    assert [(p.name, p.trials) for p in tuned] == [("a", 11), ("b", 9)]
    assert plans[2].status == SKIPPED_BUDGET and plans[2].trials == 0


def test_tiny_budget_goes_to_the_largest_task():
    plans = [_plan("a", 0.3), _plan("b", 0.7)]
    tuned = allocate(plans, 8, min_trials_per_task=16)
    assert [(p.name, p.trials) for p in tuned] == [("b", 8)]


def test_op_names_filter_and_zero_budget():
    plans = [_plan("fused_conv2d_add", 0.5), _plan("fused_matmul_add", 0.5)]
    tuned = allocate(plans, 32, op_names=["matmul"])
    assert [p.name for p in tuned] == ["fused_matmul_add"] and tuned[0].trials == 32
    assert plans[0].status == SKIPPED_FILTER
    assert allocate(plans, 0) == []


def test_trials_per_task_gives_every_kept_task_exactly_that_many():
    plans = [_plan("fused_conv2d_a", 0.7), _plan("fused_conv2d_b", 0.25), _plan("fused_matmul", 0.04),
             _plan("mean", 0.01)]
    tuned = allocate(plans, 0, op_names=["conv2d", "matmul"], min_flops_share=0.02, trials_per_task=24)
    # Not split by share: the small matmul gets as many as the big conv; the filters still apply.
    assert [(p.name, p.trials) for p in tuned] == [("fused_conv2d_a", 24), ("fused_conv2d_b", 24),
                                                    ("fused_matmul", 24)]
    assert plans[3].status == SKIPPED_FILTER and plans[3].trials == 0


def _dense_and_depthwise_module(channels: int = 128, size: int = 16) -> tvm.IRModule:
    """A dense 3x3 conv next to a 3x3 depthwise conv of the same width (as in MobileNet blocks)."""
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, channels, size, size), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            dense = bb.emit(relax.op.nn.conv2d(x, _const(rng, channels, channels, 3, 3), padding=1))
            depthwise = relax.op.nn.conv2d(dense, _const(rng, channels, 1, 3, 3), padding=1, groups=channels)
            out = bb.emit_output(bb.emit(depthwise))
        bb.emit_func_output(out)
    return bb.get()


def test_depthwise_conv_is_weighted_by_memory_traffic_not_flops():
    plans = extract(prepare(_dense_and_depthwise_module(), TARGET), TARGET)
    depthwise = next(p for p in plans if p.flops < 1e6)
    flops_share = depthwise.total_flops / sum(p.total_flops for p in plans)
    assert flops_share < 0.01  # by FLOPs alone it would be left untuned
    # It reads and writes 2 activations of 128x16x16 floats and its weights.
    assert depthwise.bytes == pytest.approx(4 * (2 * 128 * 16 * 16 + 128 * 9), rel=0.05)
    assert depthwise.share > 0.01
    tuned = allocate(plans, 64, min_trials_per_task=16)
    assert depthwise in tuned and depthwise.trials >= 16


def test_tasks_dropped_for_budget_say_why_and_how_many_trials_would_do():
    plans = [_plan("a", 0.5), _plan("b", 0.3), _plan("c", 0.2)]
    allocate(plans, 20, min_trials_per_task=16)
    assert plans[2].status == SKIPPED_BUDGET and "at least 24" in plans[2].note
    allocate(plans, 20, min_flops_share=0.25)
    assert plans[2].status == SKIPPED_SHARE and "min_flops_share" in plans[2].note


@settings(max_examples=200, deadline=None)
@given(
    shares=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=40),
    trials=st.integers(0, 3000),
    floor=st.integers(1, 128),
)
def test_every_tuned_task_gets_a_measured_batch_or_a_note(shares, trials, floor):
    total = sum(shares)
    plans = [_plan(f"t{i}", s / total) for i, s in enumerate(shares)]
    tuned = allocate(plans, trials, min_flops_share=0.0, min_trials_per_task=floor)
    if tuned:
        assert sum(p.trials for p in tuned) == trials
    for plan in plans:
        if plan in tuned:
            assert plan.trials >= min(MIN_USEFUL_TRIALS, floor, trials)
        else:
            assert plan.trials == 0 and plan.status == SKIPPED_BUDGET and plan.note
