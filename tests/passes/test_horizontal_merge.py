"""HorizontalMerge: same-input ops become one wide op, lockstep branches one grouped conv / batched
matmul per layer (one concat/split around the whole chain), weights concatenated at pass time (as
parameters with provenance, or as constants), a cost rule that refuses copy-heavy merges in "auto",
and outputs equal to PyTorch's within 1e-5."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from helpers import randomize_batch_norm
from hypothesis import HealthCheck, given, settings
from random_models import assert_close, multi_model_cases, run_module
from torch import nn
from tvm import relax

from gmorph_tvm import import_models, zoo
from gmorph_tvm.passes._util import PROVENANCE_ATTR, count_ops, provenance_of
from gmorph_tvm.passes.cost_model import MergeCost, MergeCostModel, MergeOptionError
from gmorph_tvm.passes.horizontal_merge import HorizontalMerge, horizontal_merge, merge_report
from gmorph_tvm.passes.stitch_shared_weights import stitch

CONV, MATMUL, SPLIT, CONCAT = "relax.nn.conv2d", "relax.matmul", "relax.split", "relax.concat"


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Seeded weights and non-trivial batch-norm statistics (eval BN is then a real affine map)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in model.modules():
            if isinstance(sub, (nn.Conv2d, nn.Linear)):
                sub.weight.copy_((torch.rand(sub.weight.shape, generator=gen) - 0.5) * 0.6)
                if sub.bias is not None:
                    sub.bias.copy_(torch.rand(sub.bias.shape, generator=gen) - 0.5)
            elif isinstance(sub, nn.BatchNorm2d):
                randomize_batch_norm(sub, gen)
    return model.eval()


def _torch_outputs(models, *inputs) -> list[np.ndarray]:
    with torch.no_grad():
        return [m(*inputs).numpy() for m in models.values()]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Branch(nn.Module):
    """Three conv-BN-ReLU layers (one residual), max pool, flatten, linear."""

    def __init__(self, c: int = 6, classes: int = 5):
        super().__init__()
        self.l1, self.l2, self.l3 = _conv_bn_relu(c, c), _conv_bn_relu(c, c), _conv_bn_relu(c, c)
        self.fc = nn.Linear(c * 4 * 4, classes)

    def forward(self, x):
        y = self.l1(x)
        y = self.l3(self.l2(y)) + y
        return self.fc(torch.flatten(nn.functional.max_pool2d(y, 2), 1))


class StemNet(nn.Module):
    def __init__(self, stem: nn.Module):
        super().__init__()
        self.stem, self.branch = stem, Branch()

    def forward(self, x):
        return self.branch(self.stem(x))


# ---- same input ---------------------------------------------------------------------------------


class FirstConvNet(nn.Module):
    """A conv(3->width) + bias + ReLU first layer, then an architecture of its own."""

    def __init__(self, width: int, variant: int):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.rest = [
            nn.Sequential(nn.Conv2d(width, 4, 1), nn.ReLU()),
            nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(width, 4, 3)),
            nn.Sequential(nn.Conv2d(width, 4, 3, stride=2), nn.Sigmoid()),
        ][variant]

    def forward(self, x):
        return self.rest(torch.relu(self.conv(x))).mean((-1, -2))


@pytest.mark.parametrize("bound", [False, True], ids=["params", "constants"])
def test_first_convs_reading_the_same_input_become_one_conv(bound):
    models = {f"m{i}": _init(FirstConvNet(width, i), i) for i, width in enumerate((8, 6, 4))}
    x = torch.randn(1, 3, 12, 12)
    mm = import_models(models, x)
    mod = mm.bound_module() if bound else mm.mod
    merged = HorizontalMerge(mode="auto")(mod)
    before, after = count_ops(mod), count_ops(merged)
    assert before[CONV] == 6 and after[CONV] == 4  # the three first convs run as one
    assert after[SPLIT] == 1 and after[CONCAT] == 0
    # bias add and ReLU run once on the wide tensor, before the split
    assert after["relax.nn.relu"] == before["relax.nn.relu"] - 2
    relax.analysis.well_formed(merged)
    assert_close(run_module(merged, [x]), _torch_outputs(models, x))


def test_heads_after_a_stitched_trunk_become_one_matmul():
    trunk = _init(nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()), 0)
    models = {
        f"h{i}": _init(nn.Sequential(copy.deepcopy(trunk), nn.Linear(16, classes)), 10 + i)
        for i, classes in enumerate((3, 5, 7))
    }
    for model in models.values():  # _init redrew the trunk: restore the shared copy
        model[0].load_state_dict(trunk.state_dict())
    x = torch.randn(2, 10)
    stitched = stitch(import_models(models, x))
    assert count_ops(stitched.mod)[MATMUL] == 2 + 3
    merged = horizontal_merge(stitched)
    ops = count_ops(merged.mod)
    assert ops[MATMUL] == 2 + 1 and ops[SPLIT] == 1
    assert_close(run_module(merged.mod, [x]), _torch_outputs(models, x))


# ---- lockstep -----------------------------------------------------------------------------------


@pytest.mark.parametrize("canonicalize", [False, True], ids=["raw", "bn-folded"])
def test_lockstep_branches_after_a_shared_stem_run_one_grouped_conv_per_layer(canonicalize):
    stem = _init(_conv_bn_relu(3, 6), 0)
    models = {}
    for i in range(4):
        model = _init(StemNet(copy.deepcopy(stem)), 100 + i)
        model.stem.load_state_dict(stem.state_dict())
        models[f"t{i}"] = model
    x = torch.randn(1, 3, 8, 8)
    stitched = stitch(import_models(models, x), canonicalize=canonicalize)
    assert count_ops(stitched.mod)[CONV] == 1 + 4 * 3
    merged = horizontal_merge(stitched, mode="auto")
    ops = count_ops(merged.mod)
    # stem + one conv per branch layer: the first reads the stem output (output channels
    # concatenated), the next two are grouped convs over the four branches.
    assert ops[CONV] == 1 + 3
    groups = sorted(_conv_groups(merged.mod))
    assert groups == [1, 1, 4, 4]
    assert ops[MATMUL] == 1  # the four heads as one batched matmul
    assert ops[SPLIT] == 1 and ops[CONCAT] == 0  # wide from the stem output to the logits
    assert_close(run_module(merged.mod, [x]), _torch_outputs(models, x))


class TwoInputBranch(nn.Module):
    """Branch on its own input (named ``a``/``b``/``c`` so each task has a separate input)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(_conv_bn_relu(3, 6), _conv_bn_relu(6, 6), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(6, 4))


class BranchA(TwoInputBranch):
    def forward(self, a):
        return self.net(a)


class BranchB(TwoInputBranch):
    def forward(self, b):
        return self.net(b)


class BranchC(TwoInputBranch):
    def forward(self, c):
        return self.net(c)


def test_lockstep_branches_on_different_inputs_concat_once():
    models = {name: _init(cls(), i) for i, (name, cls) in enumerate([("a", BranchA), ("b", BranchB), ("c", BranchC)])}
    inputs = {name: torch.randn(1, 3, 8, 8) for name in models}
    mm = import_models(models, {name: (x,) for name, x in inputs.items()})
    assert [s.name for s in mm.inputs] == ["a", "b", "c"]
    merged = HorizontalMerge(mode="always")(mm.mod)
    ops = count_ops(merged)
    assert ops[CONV] == 2 and sorted(_conv_groups(merged)) == [3, 3]
    assert ops[CONCAT] == 1 and ops[SPLIT] == 1 and ops[MATMUL] == 1
    expected = [models[n](inputs[n]).detach().numpy() for n in models]
    assert_close(run_module(merged, list(inputs.values())), expected)


def test_mlp_lockstep_uses_batched_matmul():
    models = {
        f"m{i}": _init(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3)), i)
        for i in range(3)
    }
    x = torch.randn(1, 12)
    mm = import_models(models, x)
    merged = horizontal_merge(mm, mode="auto")
    ops = count_ops(merged.mod)
    assert ops[MATMUL] == 3 and ops[SPLIT] == 1 and ops[CONCAT] == 0
    weight_ranks = sorted(len(v.shape) for name, v in merged.params.items() if name.endswith(".weight"))
    assert weight_ranks == [2, 3, 3]  # first layer: columns concatenated; then stacked (N, in, out)
    assert_close(run_module(merged.mod, [x]), _torch_outputs(models, x))


@pytest.mark.parametrize("arch", ["resnet", "mobilenet"])
def test_zoo_models_merge_layer_by_layer(arch):
    """Residual adds, squeeze-excite gates, hardswish (add/clip/multiply/divide), depthwise convs."""
    models = {f"{arch}{i}": zoo.make(arch, seed=i) for i in range(2)}
    x = zoo.example_input(arch, 1)
    mm = import_models(models, x)
    merged = horizontal_merge(mm, mode="always")
    ops = count_ops(merged.mod)
    assert ops[CONV] == count_ops(mm.mod)[CONV] // 2 and ops[SPLIT] == 1
    assert_close(run_module(merged.mod, [x]), _torch_outputs(models, x))


def test_transformers_run_in_lockstep_end_to_end():
    """Embedding lookup, layer norm over the feature axis, multi-head attention as batched matmuls."""
    models = {f"tr{i}": zoo.make("transformer", seed=i) for i in range(2)}
    x = zoo.example_input("transformer", 1)
    mm = stitch(import_models(models, x))  # one copy of the shared index preprocessing
    merged = horizontal_merge(mm, mode="always")
    ops = count_ops(merged.mod)
    assert ops[MATMUL] == count_ops(mm.mod)[MATMUL] // 2 and ops["relax.take"] == 1
    assert ops[SPLIT] == 1 and ops[CONCAT] == 0
    assert_close(run_module(merged.mod, [x]), _torch_outputs(models, x))


def _conv_groups(mod: tvm.IRModule) -> list[int]:
    groups = []

    def visit(node):
        if isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.Op) and node.op.name == CONV:
            groups.append(int(node.attrs.groups))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return groups


# ---- weights and provenance ---------------------------------------------------------------------


def test_merged_weights_are_new_parameters_with_provenance():
    models = {f"m{i}": _init(nn.Sequential(nn.Linear(8, 6), nn.ReLU()), i) for i in range(2)}
    x = torch.randn(1, 8)
    mm = import_models(models, x)
    merged = horizontal_merge(mm, mode="always")
    main = merged.mod["main"]
    names = [p.name for p in main.params[int(main.attrs["num_input"]):]]
    assert len(names) == len(main.attrs["params"]) == len(merged.params)
    assert names == ["merged.m0.0.weight+m1.0.weight", "merged.m0.0.bias+m1.0.bias"]
    assert merged.provenance["merged.m0.0.weight+m1.0.weight"] == [("m0", "0.weight"), ("m1", "0.weight")]
    assert provenance_of(merged.mod) == merged.provenance
    assert PROVENANCE_ATTR in main.attrs
    # the value is the pass-time concatenation: no concat of weights at inference
    w = merged.params["merged.m0.0.weight+m1.0.weight"].numpy()
    expected = np.concatenate([models["m0"][0].weight.detach().numpy().T, models["m1"][0].weight.detach().numpy().T], 1)
    np.testing.assert_array_equal(w, expected)
    assert count_ops(merged.mod)[CONCAT] == 0


# ---- cost rule ----------------------------------------------------------------------------------


def _wide_pointwise_models():
    """Two tiny 1x1 convs on a large input: one kernel saved, a 1 MB split added."""
    return {f"p{i}": _init(nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU()), i) for i in range(2)}


def test_auto_refuses_a_merge_whose_copies_cost_more_than_it_saves():
    models = _wide_pointwise_models()
    x = torch.randn(1, 8, 64, 64)
    mm = import_models(models, x)
    unchanged = HorizontalMerge(mode="auto")(mm.mod)
    assert count_ops(unchanged)[CONV] == 2 and count_ops(unchanged)[SPLIT] == 0
    [region] = merge_report(mm.mod, mode="auto")
    assert not region.merged and region.saved_us < 0 and region.branches == 2
    assert region.ops == (CONV, "relax.add", "relax.nn.relu")
    assert region.cost == MergeCost(saved_kernels=1, added_kernels=1, copy_sizes=(2 * 2 * 8 * 64 * 64 * 4,))

    merged = HorizontalMerge(mode="always")(mm.mod)
    assert count_ops(merged)[CONV] == 1 and count_ops(merged)[SPLIT] == 1
    assert [r.merged for r in merge_report(mm, mode="always")] == [True]  # a MultiModel works too
    assert merge_report(mm.mod, mode="never") == []
    assert_close(run_module(merged, [x]), _torch_outputs(models, x))


def test_never_leaves_the_module_unchanged():
    mm = import_models(_wide_pointwise_models(), torch.randn(1, 8, 4, 4))
    out = HorizontalMerge(mode="never")(mm.mod)
    assert tvm_ffi.structural_equal(out, mm.mod)


def test_cost_model_rule_and_options():
    flat = MergeCostModel(kernel_overhead_us=1.0, copy_gbps=1.0, cached_copy_gbps=1.0)  # 1 kernel = 1000 B
    assert flat.pays(MergeCost(saved_kernels=3, added_kernels=1, copy_sizes=(1500, 500)))
    assert not flat.pays(MergeCost(saved_kernels=3, added_kernels=1, copy_sizes=(1500, 501)))
    assert not flat.pays(MergeCost(saved_kernels=1, added_kernels=1))
    cached = MergeCostModel(kernel_overhead_us=1.0, copy_gbps=1.0, cached_copy_gbps=10.0, cache_bytes=5000)
    assert cached.pays(MergeCost(2, 1, (5000,))) and not cached.pays(MergeCost(2, 1, (5001,)))
    gpu = MergeCostModel.for_target({"kind": "cuda", "arch": "sm_87"})
    assert gpu.kernel_overhead_us > MergeCostModel.for_target("llvm").kernel_overhead_us
    with pytest.raises(MergeOptionError, match="copy_gbps"):
        MergeCostModel(copy_gbps=0)
    with pytest.raises(MergeOptionError, match="mode must be"):
        HorizontalMerge(mode="sometimes")


# ---- property: random multi-model graphs --------------------------------------------------------


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=multi_model_cases(min_models=2, max_models=4))
def test_random_models_merge_exactly(case):
    mm = stitch(import_models(case.models, case.inputs))
    merged = horizontal_merge(mm, mode="always")
    relax.analysis.well_formed(merged.mod)
    main = merged.mod["main"]
    assert len(main.attrs["params"]) == len(main.params) - int(main.attrs["num_input"])
    before, after = count_ops(mm.mod), count_ops(merged.mod)
    assert after[CONV] + after[MATMUL] <= before[CONV] + before[MATMUL]
    assert_close(run_module(merged.mod, case.inputs), case.torch_outputs())
