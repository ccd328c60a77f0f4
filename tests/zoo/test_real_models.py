"""Real third-party models (gmorph_tvm.zoo.real) import as users have them and match their runtimes.

Each model is imported alone (as the CLI would, static shapes only), then each group of models that
read the same input is imported together (``input_map`` joins torch's default input names to the
shared one), fused losslessly, built for llvm (untuned) and compared with onnxruntime / PyTorch
within 1e-4 relative (max |err| / max |ref|).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import tvm

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
