"""Real third-party models (gmorph_tvm.zoo.real) import as users have them and match their runtimes.

Each model is imported alone (as the CLI would, static shapes only), then each group of models that
read the same input is imported together (``input_map`` joins torch's default input names to the
shared one), fused losslessly, built for llvm (untuned) and compared with onnxruntime / PyTorch
within 1e-4 relative (max |err| / max |ref|). The CPU lowering of every model has no ``stack`` glue
and channels-last convolutions, and the ONNX exports of EfficientNet-Lite0 and all-MiniLM-L6-v2 lower
to the kernels of their torch routes (MiniLM: but for two clips, which ONNX bounds at FLT_MAX).
"""

from __future__ import annotations

import collections
import re
import warnings

import pytest
import torch
import tvm
import tvm_ffi

from gmorph_tvm import build, import_models
from gmorph_tvm.frontend.importer import SimilarInputsWarning
from gmorph_tvm.pipeline import fuse_lossless
from gmorph_tvm.zoo import real

NAMES = ["ocr_det", "effnet_torch", "effnet_onnx_legacy", "effnet_onnx_dynamo", "ocr_cls", "ocr_rec",
         "minilm_torch", "minilm_onnx_legacy", "minilm_onnx_dynamo", "vad_seq", "vad_stream"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    models = real.zoo_models(tmp_path_factory.mktemp("real_zoo"))
    assert [m.name for m in models] == NAMES
    return {m.name: m for m in models}


def _shapes(m: real.RealModel) -> dict:
    return {name: list(a.shape) for name, a in zip(m.input_names, m.inputs)}


@pytest.mark.parametrize("name", NAMES)
def test_real_model_imports_alone(zoo, name):
    m = zoo[name]
    examples = [torch.from_numpy(a) for a in m.inputs] if m.source == "torch" else None
    mm = import_models({name: m.model}, examples, input_shapes=_shapes(m))
    assert [s.name for s in mm.inputs] == m.input_names
    assert [s.shape for s in mm.inputs] == [a.shape for a in m.inputs]
    assert [o.shape for o in mm.tasks[0].outputs] == [r.shape for r in m.reference()]
    # Every TIR function the frontend emitted is kept and defined (the importer used to drop them).
    tvm.relax.analysis.well_formed(mm.mod)


@pytest.mark.slow
@pytest.mark.parametrize("group", list(real.GROUPS))
def test_real_model_group_fused_builds_and_matches(zoo, group):
    members = [m for m in zoo.values() if m.group == group]
    shared = real.GROUPS[group]
    examples = {m.name: tuple(torch.from_numpy(a) for a in m.inputs) for m in members if m.source == "torch"}
    shapes = {name: list(a.shape) for name, a in zip(shared, members[0].inputs)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", SimilarInputsWarning)  # the map leaves no look-alike inputs
        mm = import_models({m.name: m.model for m in members}, examples, input_shapes=shapes,
                           input_map=real.input_map_for(members))
    assert [s.name for s in mm.inputs] == shared
    fused = fuse_lossless(mm)
    artifact = build(fused, "llvm")
    outputs = artifact.run(dict(zip(shared, members[0].inputs)))
    for m in members:
        got = outputs[m.name]
        got = got if isinstance(got, list) else [got]
        for g, want in zip(got, m.reference()):
            assert g.shape == want.shape
            assert real.max_rel_err(g, want) <= 1e-4, (m.name, real.max_rel_err(g, want))


# ---- the CPU lowering of every zoo model: no glue, channels-last convs, one kernel list per model ----

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


@pytest.fixture(scope="module")
def lowered(zoo):
    """name -> (fused Relax module, its CPU lowering), made once per model when first asked."""
    from gmorph_tvm.passes.channels_last import ChannelsLastWarning
    from gmorph_tvm.tuning.pipeline import prepare

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            m = zoo[name]
            examples = [torch.from_numpy(a) for a in m.inputs] if m.source == "torch" else None
            fused = fuse_lossless(import_models({name: m.model}, examples, input_shapes=_shapes(m)))
            with warnings.catch_warnings():
                warnings.simplefilter("error", ChannelsLastWarning)  # ConvertLayout must not give up
                cache[name] = (fused.mod, prepare(fused.bound_module(), TARGET))
        return cache[name]

    return get


def _calls(mod: tvm.IRModule):
    found = []
    relax_ = tvm.relax
    for _, func in mod.functions_items():
        if isinstance(func, relax_.Function):
            relax_.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, relax_.Call) else None)
    return found


def _kernels(low: tvm.IRModule) -> collections.Counter:
    """Multiset of the structural hashes of the kernels ``main`` calls (names aside), by name too."""
    names = collections.Counter(c.args[0].name_hint for c in _calls(low)
                                if isinstance(c.op, tvm.ir.Op) and c.op.name == "relax.call_tir")
    out: collections.Counter = collections.Counter()
    for gv, func in low.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and names[gv.name_hint]:
            key = (tvm_ffi.structural_hash(func.without_attr("global_symbol"), map_free_vars=True),
                   re.sub(r"\d+", "", gv.name_hint))
            out[key] += names[gv.name_hint]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_cpu_lowering_has_no_stack_glue_and_channels_last_convs(lowered, name):
    fused, low = lowered(name)
    for call in _calls(fused):
        op = getattr(call.op, "name", "")
        assert op != "relax.stack", f"{name}: stack glue {call}"
        ty = call.ty
        if isinstance(ty, tvm.relax.TensorType) and ty.ndim >= 5:  # the models' own 5-D tensors only (SVTR's qkv)
            assert op not in ("relax.broadcast_to", "relax.concat", "relax.expand_dims"), f"{name}: 5-D {op}"
    layouts = collections.Counter()
    for gv, func in low.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint and "transpose" not in gv.name_hint:
            layouts.update(b for b in re.findall(r'T\.sblock\("([^"]*conv2d[^"]*)"', func.script()))
    assert all("nhwc" in block for block in layouts), (name, dict(layouts))


@pytest.mark.slow
@pytest.mark.parametrize("route", ["effnet_onnx_legacy", "effnet_onnx_dynamo"])
def test_efficientnet_onnx_routes_give_the_torch_routes_kernels(lowered, route):
    assert _kernels(lowered(route)[1]) == _kernels(lowered("effnet_torch")[1])


@pytest.mark.slow
@pytest.mark.parametrize("route", ["minilm_onnx_legacy", "minilm_onnx_dynamo"])
def test_minilm_onnx_routes_give_the_torch_routes_kernels(lowered, route):
    """The whole kernel list of the torch route (names aside): attention's 4-D matmuls (torch.export
    writes broadcast_to + reshape + 3-D matmul), the embedding lookups (int32 cast + flatten vs
    ONNX Gather's negative-index handling), the attention mask (index_tensor vs Gather vs GatherND),
    F.normalize's norm (pow vs ReduceL2's sqrt), layer norms and GELUs.

    One difference is the models' own: ``clamp(min=eps)`` has no upper bound in torch (+inf stays
    +inf), and both exporters write it as an ONNX Clip without ``max``, which the specification
    (and onnxruntime) bound at FLT_MAX. The two kernels holding those clips (the mean-pooling
    divide and the L2 normalisation) are compared with the ONNX bound read as +inf, and only them."""
    flt_max = "T.float32(340282346638528859811704183484516925440.0)"

    def unbounded(low: tvm.IRModule) -> tvm.IRModule:
        out = low.clone()
        for gv, func in low.functions_items():
            if isinstance(func, tvm.tirx.PrimFunc) and flt_max in func.script():
                out[gv] = tvm.script.from_source(func.script().replace(flt_max, 'T.float32("inf")'))
        return out

    onnx_low, torch_low = lowered(route)[1], lowered("minilm_torch")[1]
    onnx_kernels, torch_kernels = _kernels(onnx_low), _kernels(torch_low)
    assert sum(torch_kernels.values()) >= 13 + 6 + 12 + 3  # layer norms, GELUs, attention matmuls, lookups
    differ = onnx_kernels - torch_kernels
    assert sorted(k[1] for k in differ) == ["fused_clip_divide", "fused_tir_sqrt_clip_broadcast_to_divide"]
    assert _kernels(unbounded(onnx_low)) == torch_kernels
