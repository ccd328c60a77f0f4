"""gmorph_tvm.pipeline: the composed lossless fusion, checked against PyTorch on real weights."""

from __future__ import annotations

import numpy as np
import torch
import tvm
from helpers import run_relax

from gmorph_tvm import import_models
from gmorph_tvm.data import fashion_mnist
from gmorph_tvm.passes._util import count_ops
from gmorph_tvm.pipeline import fuse_grouped, fuse_lossless, lossless_passes
from gmorph_tvm.zoo import pretrained


def _setup(n=3, batch=2):
    models = pretrained.fmnist_backbone_set(n)
    x = fashion_mnist.load_split("test", limit=batch).images
    return models, x, import_models(models, x)


def test_fuse_lossless_matches_pytorch_and_shares_the_frozen_backbone():
    models, x, mm = _setup()
    fused = fuse_lossless(mm)
    with torch.no_grad():
        expected = [m(x).numpy() for m in models.values()]
    for got, want in zip(run_relax(fused.bound_module(), [x.numpy()]), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The frozen prefix (3 convs) runs once instead of once per task.
    before = count_ops(mm.mod)["relax.nn.conv2d"]
    after = count_ops(fused.mod)["relax.nn.conv2d"]
    assert before == 4 * len(models) and after <= before - (len(models) - 1) * 3
    assert fused.weight_bytes < mm.weight_bytes
    # A stored weight of the backbone stands for the same parameter of every task.
    shared = [name for name, prov in fused.provenance.items() if len({t for t, _ in prov}) == len(models)]
    assert shared, "no weight is recorded as shared by all tasks"


def test_lossless_passes_is_a_plain_tvm_pass():
    _, x, mm = _setup(n=2)
    seq = lossless_passes(merge="never")
    assert isinstance(seq, tvm.transform.Pass)
    out = tvm.transform.Sequential([seq])(mm.mod)
    assert count_ops(out)["relax.nn.conv2d"] < count_ops(mm.mod)["relax.nn.conv2d"]


def test_fuse_grouped_respects_explicit_groups():
    models, x, mm = _setup(n=3)
    names = list(models)
    parts = fuse_grouped(mm, groups=[[names[0]], names[1:]])
    assert [p.task_names for p in parts] == [[names[0]], names[1:]]
    with torch.no_grad():
        for part in parts:
            outs = run_relax(part.bound_module(), [x.numpy()])
            for task, got in zip(part.task_names, outs):
                np.testing.assert_allclose(got, models[task](x).numpy(), rtol=1e-5, atol=1e-5)
