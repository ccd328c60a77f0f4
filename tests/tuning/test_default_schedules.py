"""Default CPU schedules (gmorph_tvm.tuning.default_schedules): every rule, on kernels of odd shapes
and on a real zoo model's kernels, computes what the unscheduled kernel computes; kernels already
scheduled are left alone; vector widths come from the target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax, s_tir, tirx

from gmorph_tvm import import_models
from gmorph_tvm.tuning import prepare
from gmorph_tvm.tuning.default_schedules import (
    DefaultCPUSchedules,
    default_cpu_rules,
    default_rules,
    record_schedule,
)
from gmorph_tvm.tuning.default_schedules._tiling import vector_lanes, vector_tile

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
NEON = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae"})


def _host_target() -> tvm.target.Target:
    from gmorph_tvm.core.targets import resolve_target

    return resolve_target("llvm")


class OddShapes(nn.Module):
    """Every op family at extents that divide neither the vector width nor the tiles: batch 2,
    dense 3x3 (padded), 1x1, strided, grouped and depthwise convs with ReLU6 / bias epilogues,
    max / average pools, a spatial mean, a linear, a batch matmul of activations, softmax and
    layer norm."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Conv2d(5, 19, 3, padding=1)
        self.pointwise = nn.Conv2d(19, 24, 1)
        self.strided = nn.Conv2d(24, 10, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(10, 12, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(12, 12, 5, padding=2, groups=12)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.linear = nn.Linear(12, 37)
        self.norm = nn.LayerNorm(37)

    def forward(self, x):
        y = torch.clamp(self.dense(x), 0.0, 6.0)
        y = torch.relu(self.pointwise(y))
        y = self.strided(y)
        y = torch.clamp(self.grouped(y), 0.0, 6.0)
        y = self.depthwise(y) + y
        y = self.pool(y)
        z = self.avg(y)
        feat = y.mean((2, 3)) + z.mean((2, 3))  # [2, 12]
        h = self.linear(feat)  # [2, 37]
        att = torch.softmax(h.unsqueeze(2) @ h.unsqueeze(1), dim=-1)  # batch matmul of activations
        return self.norm((att @ h.unsqueeze(2)).squeeze(2))


def _odd_module(seed: int = 0) -> tuple[tvm.IRModule, np.ndarray, nn.Module]:
    torch.manual_seed(seed)
    net = OddShapes().eval()
    x = np.random.default_rng(seed).standard_normal((2, 5, 11, 13)).astype(np.float32)
    mm = import_models({"odd": net}, {"odd": (torch.from_numpy(x),)})
    return mm.bound_module(), x, net


def _random_args(func: tirx.PrimFunc, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    args = []
    for param in func.params:
        shape = [int(s) for s in param.shape]
        dtype = str(param.dtype)
        if "float" in dtype:
            args.append(rng.standard_normal(shape).astype(dtype))
        elif dtype == "bool":
            args.append(rng.integers(0, 2, shape).astype(bool))
        else:
            args.append(rng.integers(0, 3, shape).astype(dtype))
    return args


def _run_kernel(func: tirx.PrimFunc, args: list[np.ndarray], target) -> np.ndarray:
    lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def _check_kernels(mod: tvm.IRModule, target) -> dict[str, str]:
    """Each kernel of ``mod`` scheduled by the first rule that takes it, compared with the
    unscheduled kernel on random inputs; returns {kernel: rule}."""
    chosen = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        for rule in default_rules():
            sch = rule.apply(func, target, False)
            if sch is None:
                continue
            assert isinstance(sch, s_tir.Schedule)
            args = _random_args(func)
            want = _run_kernel(func, [a.copy() for a in args], target)
            got = _run_kernel(sch.mod["main"], [a.copy() for a in args], target)
            scale = float(np.abs(want).max()) or 1.0
            err = float(np.abs(got.astype(np.float64) - want).max()) / scale
            assert err <= 1e-5, f"{rule.name} on {gvar.name_hint}: max rel err {err:.2e}"
            chosen[gvar.name_hint] = rule.name
            break
    return chosen


def test_every_rule_matches_unscheduled_kernels_on_odd_shapes():
    mod, _, _ = _odd_module()
    target = _host_target()
    prepared = prepare(mod, target)
    chosen = _check_kernels(prepared, target)
    used = set(chosen.values())
    assert {"Conv2D", "Matmul", "Pooling", "Reduction", "Elementwise"} <= used, chosen
    convs = [k for k in chosen if "conv2d" in k]
    assert len(convs) == 5 and all(chosen[k] == "Conv2D" for k in convs), chosen
    assert default_cpu_rules(prepared, target) == chosen


def test_the_default_schedule_stored_as_a_record_is_what_the_build_runs():
    """Tuning stores each kernel's default schedule as a record (record_schedule) so that the
    search never loses to it; replayed as a build replays records it must give the kernel
    DefaultCPUSchedules gives, for every rule: the row reductions (softmax, layer norm) that the
    Reduction rule leaves to dlight's included (a record made by calling the rules' ``schedule``
    directly skipped that fallback and stored another schedule)."""
    target = _host_target()
    prepared = prepare(_odd_module()[0], target)
    scheduled = DefaultCPUSchedules(target)(prepared)
    rules = set()
    for gvar, func in prepared.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        workload = tvm.IRModule({"main": func})
        record, rule = record_schedule(workload, target)
        assert record.trace.insts[0].kind.name == "EnterPostproc"
        replay = s_tir.Schedule(workload)
        record.trace.apply_to_schedule(replay, remove_postproc=False)
        tvm.ir.assert_structural_equal(replay.mod["main"].with_attr("tirx.is_scheduled", True), scheduled[gvar])
        rules.add(rule)
    assert {"Conv2D", "Matmul", "Reduction", "Elementwise"} <= rules, rules


@pytest.mark.parametrize("target", [AVX512, AVX2], ids=["avx512", "avx2"])
def test_whole_module_matches_torch(target):
    """The pass in the CPU lowering (after records, before SplitLayoutRewritePreproc): same
    outputs as PyTorch; weight re-layouts folded at build time."""
    mod, x, net = _odd_module(1)
    prepared = prepare(mod, target)
    with target:
        scheduled = tvm.transform.Sequential([
            DefaultCPUSchedules(target),
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination(),
        ])(prepared)
    kernels = [f for _, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert kernels and all(f.attrs is not None and f.attrs.get("tirx.is_scheduled") for f in kernels)
    assert "layout_rewrite_preproc" not in scheduled.script(show_meta=False)
    vm = relax.VirtualMachine(tvm.compile(scheduled, target=target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    got = (out if hasattr(out, "numpy") else out[0]).numpy()
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_scheduled_kernels_are_skipped():
    mod, _, _ = _odd_module()
    target = _host_target()
    prepared = prepare(mod, target)
    name = next(g for g, f in prepared.functions_items() if isinstance(f, tirx.PrimFunc) and "conv2d" in g.name_hint)
    marked = prepared[name].with_attr("tirx.is_scheduled", True)
    prepared[name] = marked
    assert name.name_hint not in default_cpu_rules(prepared, target)
    out = DefaultCPUSchedules(target)(prepared)
    tvm.ir.assert_structural_equal(out[name], marked)


def test_other_targets_are_left_alone():
    mod, _, _ = _odd_module()
    prepared = prepare(mod, _host_target())
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    assert default_cpu_rules(prepared, cuda) == {}
    tvm.ir.assert_structural_equal(DefaultCPUSchedules(cuda)(prepared), prepared)


def test_vector_width_comes_from_the_target():
    assert (vector_lanes(AVX512), vector_lanes(AVX2), vector_lanes(NEON)) == (16, 8, 4)
    # Whole registers where the extent allows, a divisor always (no tail, no predicate).
    assert vector_tile(1536, 16) == 32 and vector_tile(1536, 8) == 16 and vector_tile(1536, 4) == 8
    assert vector_tile(24, 16) == 8 and vector_tile(1000, 16) == 8 and vector_tile(19, 16) == 19
    assert vector_tile(3, 16) == 3 and vector_tile(37, 16) == 1


def test_conv_vector_loop_follows_the_target():
    """32 output channels: two AVX-512 registers (32 lanes), two AVX2 registers (16), two NEON (8)."""
    net = nn.Conv2d(8, 32, 1).eval()
    x = torch.randn(1, 8, 7, 7)
    mod = import_models({"c": net}, {"c": (x,)}).bound_module()
    for target, tile in ((AVX512, 32), (AVX2, 16), (NEON, 8)):
        prepared = prepare(mod, target)
        func = next(f for g, f in prepared.functions_items() if "conv2d" in g.name_hint)
        sch = default_rules()[0].apply(func, target, False)
        assert sch is not None
        text = sch.mod["main"].script()
        assert f"T.vectorized(T.int64({tile}))" in text, (target, text)


def test_real_zoo_kernels():
    """Every kernel of PaddleOCR's text-line classifier (ONNX as rapidocr ships it) under each rule."""
    from gmorph_tvm.zoo import real

    path = real.ocr_model_path("cls")
    mm = import_models({"cls": str(path)}, input_shapes={"x": [1, 3, 48, 192]})
    target = _host_target()
    chosen = _check_kernels(prepare(mm.bound_module(), target), target)
    assert sum(1 for r in chosen.values() if r == "Conv2D") >= 10, chosen


def test_elementwise_schedule_structure():
    """Before / expected: relu(x + x) on 64x64, AVX-512: 32-lane vectors, the 128 rows x tiles in
    parallel; the caller's module is left as it was (the pass works on a copy)."""
    from tvm.script import tirx as T

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.add(x, x))))
        bb.emit_func_output(out)
    with AVX512:
        before = relax.get_pipeline("zero")(bb.get())

    @T.prim_func(private=True, s_tir=True)
    def expected(x: T.Buffer((T.int64(64), T.int64(64)), "float32"),
                 compute_intermediate: T.Buffer((T.int64(64), T.int64(64)), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for i0_i1_0_fused in T.parallel(T.int64(128)):
            for i1_1 in T.vectorized(T.int64(32)):
                with T.sblock("compute"):
                    v_i0 = T.axis.spatial(T.int64(64), i0_i1_0_fused // T.int64(2))
                    v_i1 = T.axis.spatial(T.int64(64), i0_i1_0_fused % T.int64(2) * T.int64(32) + i1_1)
                    T.reads(x[v_i0, v_i1])
                    T.writes(compute_intermediate[v_i0, v_i1])
                    compute_intermediate[v_i0, v_i1] = T.max(x[v_i0, v_i1] + x[v_i0, v_i1], T.float32(0.0))

    unscheduled = before["fused_add_relu"]
    after = DefaultCPUSchedules(AVX512)(before)
    tvm.ir.assert_structural_equal(after["fused_add_relu"], expected)
    tvm.ir.assert_structural_equal(before["fused_add_relu"], unscheduled)
    assert before["fused_add_relu"].attrs.get("tirx.is_scheduled") is None
    assert default_cpu_rules(before, AVX512) == {"fused_add_relu": "Elementwise"}
