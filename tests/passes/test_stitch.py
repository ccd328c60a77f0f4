"""StitchSharedWeights: identical weights are held once and identical ops computed once — on chains
and DAGs, for weights as parameters and as constants, across PyTorch and ONNX — and nothing else
is merged (different weights, equal weights on different inputs, hash collisions)."""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import onnx
import pytest
import torch
import tvm
from helpers import randomize_batch_norms
from random_models import assert_close, run_module
from torch import nn
from tvm import relax

import gmorph_tvm.passes._util as passes_util
from gmorph_tvm import import_models
from gmorph_tvm.frontend import params_of
from gmorph_tvm.passes import CanonicalizeOps, StitchSharedWeights, stitch
from gmorph_tvm.passes._util import PROVENANCE_ATTR, count_ops, count_weights, provenance_of, weight_bytes


class PrefixNet(nn.Module):
    """Three conv+BN+ReLU layers (the frozen backbone) and a task head."""

    def __init__(self, classes: int):
        super().__init__()
        layers = []
        for cin, cout in [(3, 6), (6, 8), (8, 8)]:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.backbone(x).mean((-1, -2)))


class DagNet(nn.Module):
    """Two inputs, residual add, concat, split (tuple output) and a conv with bias before BN."""

    def __init__(self):
        super().__init__()
        self.cx = nn.Conv2d(3, 4, 3, padding=1)
        self.cy = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(8)
        self.res = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_res = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x, y):
        h = torch.relu(self.bn(torch.cat([self.cx(x), self.cy(y)], 1)))
        h = torch.relu(self.bn_res(self.res(h)) + h)
        a, b = torch.split(h, [4, 4], dim=1)  # (torch.chunk exports shape arithmetic to ONNX)
        h = torch.cat([b, a], 1)
        return self.fc(h.mean((-1, -2)))


def _state_bytes(module: nn.Module) -> int:
    return sum(v.numel() * v.element_size() for v in module.state_dict().values() if v.is_floating_point())


@pytest.fixture(scope="module")
def prefix_pair():
    torch.manual_seed(0)
    a = randomize_batch_norms(PrefixNet(4), 0)
    b = randomize_batch_norms(PrefixNet(3), 1)
    b.backbone.load_state_dict(a.backbone.state_dict())  # bit-identical frozen backbone
    x = torch.randn(1, 3, 8, 8)
    return a, b, x, import_models({"a": a, "b": b}, x)


@pytest.fixture(scope="module")
def dag_models():
    torch.manual_seed(1)
    net = randomize_batch_norms(DagNet(), 2)
    x, y = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    return net, x, y


def _torch_out(models, *inputs):
    with torch.no_grad():
        return [m(*inputs).numpy() for m in models]


# ---- identical prefix --------------------------------------------------------------------------------


def test_identical_prefix_is_computed_once_and_stored_once(prefix_pair):
    a, b, x, mm = prefix_pair
    before = count_ops(mm.mod)
    only = StitchSharedWeights()(mm.mod)
    relax.analysis.well_formed(only)
    after = count_ops(only)
    assert before["relax.nn.conv2d"] == 6 and after["relax.nn.conv2d"] == 3
    assert before["relax.nn.batch_norm"] == 6 and after["relax.nn.batch_norm"] == 3
    assert after["relax.matmul"] == 2  # heads differ
    # Weight parameters drop by exactly the shared backbone.
    backbone_tensors = [v for v in a.backbone.state_dict().values() if v.is_floating_point()]
    assert len(params_of(mm.mod)) - len(params_of(only)) == len(backbone_tensors)
    assert weight_bytes(mm.mod) - weight_bytes(only) == _state_bytes(a.backbone)
    assert_close(run_module(only, [x]), _torch_out([a, b], x))


def test_stitch_with_canonicalize_folds_then_shares(prefix_pair):
    a, b, x, mm = prefix_pair
    fused = stitch(mm)
    relax.analysis.well_formed(fused.mod)
    ops = count_ops(fused.mod)
    assert ops["relax.nn.conv2d"] == 3 and ops["relax.nn.batch_norm"] == 0 and ops["relax.matmul"] == 2
    # Each folded backbone weight is one parameter standing for both tasks' originals.
    first = "a.backbone.0.weight.bnfold"
    assert fused.provenance[first] == [
        ("a", "backbone.0.weight"), ("a", "backbone.1.weight"), ("a", "backbone.1.running_var"),
        ("b", "backbone.0.weight"), ("b", "backbone.1.weight"), ("b", "backbone.1.running_var"),
    ]
    assert fused.weight_tasks(first) == ["a", "b"]
    assert fused.weight_tasks("b.head.weight") == ["b"]
    assert set(fused.params) == set(params_of(fused.mod))
    assert weight_bytes(fused.mod) == count_weights(fused.mod)[1]  # no duplicate content left
    assert_close(run_module(fused.mod, [x]), _torch_out([a, b], x))


def test_sequential_use_is_valid_and_idempotent(prefix_pair):
    _, _, _, mm = prefix_pair
    seq = tvm.transform.Sequential([CanonicalizeOps(), StitchSharedWeights()])
    once = seq(mm.mod)
    relax.analysis.well_formed(once)
    func = once["main"]
    assert len(func.attrs["params"]) == len(func.params) - int(func.attrs["num_input"])
    assert set(func.attrs[PROVENANCE_ATTR].keys()) == set(params_of(once))
    twice = seq(once)
    assert count_ops(twice) == count_ops(once)
    assert params_of(twice).keys() == params_of(once).keys()
    assert provenance_of(twice) == provenance_of(once)


# ---- torch vs ONNX --------------------------------------------------------------------------------


def test_torch_and_onnx_copies_of_one_backbone_stitch_completely(dag_models):
    net, x, y = dag_models
    buf = io.BytesIO()
    torch.onnx.export(net, (x, y), buf, dynamo=False, opset_version=17, input_names=["x", "y"])
    mm = import_models({"pt": net, "ox": onnx.load_from_string(buf.getvalue())}, (x, y))
    assert [s.name for s in mm.inputs] == ["x", "y"]
    # Without canonicalisation the spellings differ and almost nothing is shared.
    assert count_ops(StitchSharedWeights()(mm.mod))["relax.nn.conv2d"] == 6
    fused = stitch(mm)
    relax.analysis.well_formed(fused.mod)
    single = CanonicalizeOps()(import_models({"pt": net}, (x, y)).mod)
    assert count_ops(fused.mod) == count_ops(single)
    assert weight_bytes(fused.mod) == weight_bytes(single)
    assert all({task for task, _ in entries} == {"pt", "ox"} for entries in fused.provenance.values())
    expected = _torch_out([net], x, y)
    assert_close(run_module(fused.mod, [x, y]), expected * 2)


# ---- DAGs, inputs, no false sharing ----------------------------------------------------------------


def test_dag_copies_share_everything_and_swapped_inputs_share_nothing(dag_models):
    net, x, y = dag_models

    class Swapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, y):
            return self.inner(y, x)

    copy_net = copy.deepcopy(net)
    swapped = Swapped(copy.deepcopy(net)).eval()
    mm = import_models({"a": net, "b": copy_net, "c": swapped}, (x, y))
    fused = stitch(mm)
    relax.analysis.well_formed(fused.mod)
    single = count_ops(CanonicalizeOps()(import_models({"a": net}, (x, y)).mod))
    ops = count_ops(fused.mod)
    # a and b merge completely (split/TupleGetItem included); c reads the inputs the other way
    # round, so only its weight-only ops (bias reshape, weight transpose) are shared with them.
    weight_only = {"relax.reshape", "relax.permute_dims"}
    for op, n in single.items():
        assert ops[op] == (n if op in weight_only else 2 * n), op
    assert weight_bytes(fused.mod) == weight_bytes(CanonicalizeOps()(import_models({"a": net}, (x, y)).mod))
    assert_close(run_module(fused.mod, [x, y]), _torch_out([net, copy_net, swapped], x, y))


def test_same_architecture_different_weights_stitches_nothing():
    torch.manual_seed(3)
    a, b = randomize_batch_norms(PrefixNet(4), 3), randomize_batch_norms(PrefixNet(4), 4)
    x = torch.randn(1, 3, 8, 8)
    mm = import_models({"a": a, "b": b}, x)
    fused = stitch(mm)
    canon = CanonicalizeOps()(mm.mod)
    assert count_ops(fused.mod) == count_ops(canon)
    assert len(fused.params) == len(params_of(canon))
    assert all(len({task for task, _ in entries}) == 1 for entries in fused.provenance.values())
    assert_close(run_module(fused.mod, [x]), _torch_out([a, b], x))


def test_hash_collisions_never_merge_different_weights(prefix_pair, monkeypatch):
    """Every same-shape weight collides: the exact compare alone must keep them apart."""
    a, b, x, mm = prefix_pair
    expected_ops = count_ops(StitchSharedWeights()(mm.mod))
    expected_params = set(params_of(StitchSharedWeights()(mm.mod)))
    calls = []

    def colliding_key(value):
        calls.append(1)
        return (str(value.dtype), tuple(int(d) for d in value.shape), 0)

    monkeypatch.setattr(passes_util, "content_key", colliding_key)
    only = StitchSharedWeights()(mm.mod)
    assert calls, "the pass must look weights up by content_key"
    assert count_ops(only) == expected_ops
    assert set(params_of(only)) == expected_params
    assert_close(run_module(only, [x]), _torch_out([a, b], x))


# ---- constants mode and the built artifact -----------------------------------------------------------


def _pool_tensor_count(ex) -> int:
    """Tensor constants in a VM executable's constant pool (from its statistics text)."""
    line = ex.stats().split("Constant pool")[1].split("\n")[0]
    body = line[line.index(": [") + 3:]
    body = re.sub(r'"ErrorContext.*?\) "', "", body)  # strings may hold brackets
    return len(re.findall(r"(?:^|, )(?:scalar|\[[0-9, ]*\])", body))


def test_bound_constants_stitch_like_parameters_and_are_stored_once_in_the_so(prefix_pair, tmp_path):
    a, b, x, mm = prefix_pair
    by_params = stitch(mm)
    bound = tvm.transform.Sequential([CanonicalizeOps(), StitchSharedWeights()])(mm.bound_module())
    relax.analysis.well_formed(bound)
    assert count_ops(bound) == count_ops(relax.transform.FoldConstant()(by_params.bound_module()))
    assert count_weights(bound) == count_weights(by_params.mod)
    assert_close(run_module(bound, [x]), _torch_out([a, b], x))

    # Artifacts: the stitched .so against one .so per task (deploying the models separately).
    # (Within one executable TVM's ExecBuilder also merges content-equal constants, so the bytes
    # a merged module saves come from stitching's canonical, shared weights.)
    target = tvm.target.Target({"kind": "llvm"})

    def build(mod, name):
        with target:
            lowered = relax.get_pipeline("default")(mod)
        ex = tvm.compile(mod, target=target)
        path = tmp_path / f"{name}.so"
        ex.export_library(str(path))
        assert _pool_tensor_count(ex) == count_weights(lowered)[0]  # = the executable's constant pool
        return count_weights(lowered), lowered, path.read_bytes()

    (count, nbytes), lowered, blob = build(bound, "stitched")
    separate = [build(CanonicalizeOps()(import_models({t: m}, x).bound_module()), t)[0] for t, m in [("a", a), ("b", b)]]
    shared = [v for name, v in by_params.params.items() if by_params.weight_tasks(name) == ["a", "b"]]
    assert len(shared) == 6  # 3 folded conv weights + 3 folded biases
    assert count == sum(c for c, _ in separate) - len(shared)
    assert nbytes == sum(n for _, n in separate) - sum(v.numpy().nbytes for v in shared)
    # Every stored weight appears exactly once in the shared object, the shared backbone included.
    for const in passes_util.constants_of(lowered["main"]):
        raw = const.value.numpy().tobytes()
        if len(raw) >= 32:
            assert blob.count(raw) == 1
    for value in shared:
        assert blob.count(value.numpy().tobytes()) == 1


def test_module_without_weight_params_is_left_valid():
    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    w = np.arange(9, dtype="float32").reshape(3, 3)
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            p = bb.emit(relax.op.matmul(x, relax.const(w)))
            q = bb.emit(relax.op.matmul(x, relax.const(w.copy())))  # equal content, separate object
            out = bb.emit_output(relax.op.add(p, q))
        bb.emit_func_output(out)
    mod = bb.get()
    stitched = StitchSharedWeights()(mod)
    relax.analysis.well_formed(stitched)
    assert count_ops(stitched)["relax.matmul"] == 1
    assert count_weights(stitched) == (1, w.nbytes)
    inp = np.ones((2, 3), "float32")
    assert_close(run_module(stitched, [inp]), [2 * inp @ w])


def test_constant_equal_to_a_weight_parameter_becomes_that_parameter():
    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    w = relax.Var("t.w", relax.TensorType((3, 3), "float32"))
    value = np.random.default_rng(0).standard_normal((3, 3)).astype("float32")
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            p = bb.emit(relax.op.matmul(x, w))
            q = bb.emit(relax.op.matmul(x, relax.const(value.copy())))
            out = bb.emit_output(relax.op.add(p, q))
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("num_input", 1).with_attr("params", [tvm.runtime.tensor(value)])
    stitched = StitchSharedWeights()(mod)
    relax.analysis.well_formed(stitched)
    assert count_ops(stitched)["relax.matmul"] == 1
    assert count_weights(stitched) == (1, value.nbytes)
    assert provenance_of(stitched) == {"t.w": [("t", "w")]}  # default: "<task>.<orig>" names
    inp = np.ones((2, 3), "float32")
    assert_close(run_module(stitched, [inp]), [2 * inp @ value])


def test_provenance_attr_round_trips():
    w = relax.Var("a.w", relax.TensorType((2,), "float32"))
    func = relax.Function([w], w).with_attr("num_input", 0)
    func = func.with_attr("params", [tvm.runtime.tensor(np.zeros(2, "float32"))])
    mod = tvm.IRModule({"main": func})
    assert provenance_of(mod) == {"a.w": [("a", "w")]}  # default from the name
    prov = {"a.w": [("a", "w"), ("b", "dir/w.0")]}  # original names may contain '/' and '.'
    tagged = passes_util.with_provenance(mod, prov)
    assert {k: list(v) for k, v in tagged["main"].attrs[PROVENANCE_ATTR].items()} == {"a.w": ["a/w", "b/dir/w.0"]}
    assert provenance_of(tagged) == prov
