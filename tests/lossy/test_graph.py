"""LayerGraph: fx DAG cut points (residual-safe, layer boundaries) and segments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gmorph_tvm import zoo
from gmorph_tvm.errors import SearchError
from gmorph_tvm.lossy.graph import LayerGraph

X = torch.randn(2, 1, 28, 28)


def test_vgg_chain_cuts_at_layer_boundaries():
    model = zoo.make("vgg", in_channels=1, image_size=28, widths=(8, 16), pool_after=(0, 1), seed=0)
    g = LayerGraph.trace("vgg", model, X)
    names = [c.node for c in g.cuts]
    # conv -> BN -> ReLU -> pool: cuts after ReLU and after pool, never between conv/BN/ReLU.
    assert names == ["x", "features_2", "features_3", "features_6", "features_7", "classifier_0"]
    assert [c.shape for c in g.cuts[:3]] == [(1, 28, 28), (8, 28, 28), (8, 14, 14)]
    assert g.cut(3).params_before == sum(p.numel() for p in model.features[:6].parameters())
    assert g.total_params == sum(p.numel() for p in model.parameters())
    # 3x3 convs: 28*28*8*1*9 + 14*14*16*8*9 MACs, then the linear head.
    assert g.total_macs == 28 * 28 * 8 * 9 + 14 * 14 * 16 * 8 * 9 + 16 * 7 * 7 * 10


def test_residual_blocks_are_never_split():
    model = zoo.make("resnet", in_channels=1, image_size=28, width=4, blocks_per_stage=(1, 1), seed=0)
    g = LayerGraph.trace("resnet", model, X)
    names = [c.node for c in g.cuts]
    # Inside a basic block the block input and the branch are both live: only block outputs are cuts.
    assert names == ["x", "stem_2", "layers_0_relu_1", "layers_1_relu_1", "pool", "flatten"]
    assert not any("conv" in n or n.startswith("add") for n in names)


def test_segments_compose_to_the_model():
    model = zoo.make("mobilenet", in_channels=1, image_size=28, width=4, seed=0)
    g = LayerGraph.trace("mobilenet", model, X)
    with torch.no_grad():
        ref = model(X)
        for cut in range(1, g.num_cuts):
            head, tail = g.segment(0, cut), g.segment(cut, None)
            assert torch.allclose(tail(head(X)), ref, atol=1e-6), g.cut(cut).node
        acts = g.activations(X, [2, 5])
        assert torch.allclose(g.segment(2, 5)(acts[2]), acts[5], atol=1e-6)


def test_segments_share_the_model_parameters():
    model = zoo.make("vgg", in_channels=1, image_size=28, widths=(8, 16), pool_after=(0, 1), seed=0)
    g = LayerGraph.trace("vgg", model, X)
    seg = g.segment(0, 2)
    original = {id(p) for p in model.features[:3].parameters()}
    assert {id(p) for p in seg.parameters()} == original
    copy = g.copy()
    assert not {id(p) for p in copy.segment(0, 2).parameters()} & original


class _TwoInputs(nn.Module):
    def forward(self, a, b):
        return a + b


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_untraceable_models_are_reported_by_name():
    with pytest.raises(SearchError, match="'two'.*one input"):
        LayerGraph.trace("two", _TwoInputs(), X)
    with pytest.raises(SearchError, match="'dyn'.*torch.fx cannot trace"):
        LayerGraph.trace("dyn", _DataDependent(), X)
