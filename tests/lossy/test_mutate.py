"""Applying plans: fused PyTorch model (sharing, adapters, drops) and the same plan on Relax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmorph_tvm.errors import SearchError
from gmorph_tvm.lossy.mutate import Adapter, Calibration, build_fused, to_multimodel
from gmorph_tvm.lossy.plan import Drop, FusionPlan, Share


def test_identity_plan_reproduces_every_model_exactly(tiny_graphs, tiny_models, tiny_data):
    fused = build_fused(tiny_graphs, FusionPlan()).eval()
    x = tiny_data.val_x[:16]
    with torch.no_grad():
        for task, out in zip(fused.task_names, fused(x)):
            assert torch.equal(out, tiny_models[task](x)), task
    assert fused.num_parameters() == sum(g.total_params for g in tiny_graphs.values())


def test_share_reuses_the_host_layers(tiny_graphs, tiny_data):
    # coarse4 (ResNet) drops its stem + first block and reads class10's (VGG) first block output.
    plan = FusionPlan((Share("coarse4", 2, "class10", 1),))
    fused = build_fused(tiny_graphs, plan, Calibration(tiny_graphs, tiny_data.train_x[:64])).eval()
    host = {id(p) for p in fused.task_module("class10").parameters()}
    sharer = fused.task_module("coarse4")
    trunk = {id(p) for p in fused.blocks["class10__seg_0_1"].parameters()}
    assert trunk and trunk <= host and trunk <= {id(p) for p in sharer.parameters()}
    g_class, g_coarse = tiny_graphs["class10"], tiny_graphs["coarse4"]
    adapter = fused.blocks["coarse4__share_from_class10_1_2"]
    assert isinstance(adapter, Adapter)
    saved = g_coarse.cut(2).params_before
    expected = sum(g.total_params for g in tiny_graphs.values()) - saved + sum(p.numel() for p in adapter.parameters())
    assert fused.num_parameters() == expected
    assert g_class.cut(1).shape == (8, 28, 28) and g_coarse.cut(2).shape == (4, 28, 28)
    # A training step on the fused model cannot make the copies disagree: there is one copy.
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    sum(o.sum() for o in fused.train()(tiny_data.val_x[:4])).backward()
    opt.step()
    x = tiny_data.val_x[:4]
    with torch.no_grad():
        fused.eval()
        assert torch.equal(fused.task_module("coarse4")(x), fused(x)[1])


def test_adapters_change_channels_and_spatial_size():
    conv = Adapter((8, 28, 28), (16, 14, 14))
    assert conv(torch.randn(2, 8, 28, 28)).shape == (2, 16, 14, 14)
    assert conv.size == (14, 14) and conv.proj.kernel_size == (1, 1)
    same = Adapter((8, 7, 7), (4, 7, 7))
    assert same.size is None and same(torch.randn(1, 8, 7, 7)).shape == (1, 4, 7, 7)
    flat = Adapter((32,), (10,))
    assert flat(torch.randn(3, 32)).shape == (3, 10)
    with pytest.raises(SearchError, match="no adapter"):
        Adapter((8, 7, 7), (392,))


def test_least_squares_init_recovers_a_linear_map():
    torch.manual_seed(0)
    src = torch.randn(32, 6, 5, 5)
    weight, bias = torch.randn(3, 6), torch.randn(3)
    target = torch.einsum("oc,nchw->nohw", weight, src) + bias[None, :, None, None]
    adapter = Adapter((6, 5, 5), (3, 5, 5))
    r2 = adapter.fit(src, target, ridge=1e-9)
    assert r2 > 0.999
    assert torch.allclose(adapter(src), target, atol=1e-3)


def test_drop_with_shape_change_gets_an_adapter(tiny_graphs, tiny_data):
    plan = FusionPlan(drops=(Drop("class10", 1, 3),))  # [8,28,28] -> [16,14,14]
    fused = build_fused(tiny_graphs, plan, Calibration(tiny_graphs, tiny_data.train_x[:64])).eval()
    assert isinstance(fused.blocks["class10__drop_1_3"], Adapter)
    assert fused.info.adapters == 1 and fused.info.resizes == 1
    kept = tiny_graphs["class10"].total_params - tiny_graphs["class10"].segment_params(1, 3)
    assert sum(p.numel() for p in fused.task_module("class10").parameters()) == kept + 8 * 16 + 16
    assert fused(tiny_data.val_x[:2])[0].shape == (2, 10)


def test_fused_relax_module_computes_what_the_fused_torch_model_does(tiny_graphs, tiny_data):
    from gmorph_tvm.artifact import build

    # A DAG plan: size3 (MobileNet) branches off coarse4 (ResNet) between residual blocks, coarse4
    # itself branches off class10 (VGG) through a spatial+channel adapter, and class10 drops a block.
    plan = FusionPlan(
        (Share("coarse4", 3, "class10", 2), Share("size3", 3, "coarse4", 3)), (Drop("class10", 3, 4),)
    )
    fused = build_fused(tiny_graphs, plan, Calibration(tiny_graphs, tiny_data.train_x[:64])).eval()
    x = tiny_data.val_x[:1]
    multi = to_multimodel(fused, x)
    assert multi.task_names == ["class10", "coarse4", "size3"]
    # Stitching left one weight per fused-model parameter tensor: shared layers exist once.
    n_tensors = len(list(fused.parameters())) + len(list(fused.buffers()))
    assert len(multi.params) <= n_tensors
    script = multi.mod["main"].script()
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in fused.modules())
    assert script.count("R.nn.conv2d(") == convs
    artifact = build(multi, "llvm")
    outs = artifact.run(x.numpy())
    with torch.no_grad():
        ref = fused(x)
    for task, r in zip(fused.task_names, ref):
        np.testing.assert_allclose(outs[task], r.numpy(), atol=1e-5, rtol=1e-5)
