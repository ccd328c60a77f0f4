"""Several entry points in one artifact: batch buckets and the groups of a grouped build, all
reading one copy of the weights (issue 13 item 4, issue 14 item 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN
from torch import nn

import gmorph_tvm
from gmorph_tvm.artifact import build
from gmorph_tvm.errors import BuildError, RuntimeInputError
from gmorph_tvm.pipeline import fuse_grouped
from gmorph_tvm.runtime import load

BUCKETS = (1, 4, 8)


def _pair():
    """Two tasks sharing a trunk (the second is the first with another head)."""
    first = TinyCNN(4, 0).eval()
    second = TinyCNN(3, 1).eval()
    second.conv.load_state_dict(first.conv.state_dict())
    return {"shape": first, "color": second}


@pytest.fixture(scope="module")
def models():
    return _pair()


@pytest.fixture(scope="module")
def bucketed(models, tmp_path_factory):
    per_batch = {b: gmorph_tvm.fuse(gmorph_tvm.import_models(models, torch.zeros(b, 3, 16, 16))) for b in BUCKETS}
    single = build(per_batch[1], "llvm")
    library = build(per_batch, "llvm").export(tmp_path_factory.mktemp("buckets") / "buckets.so")
    return library, single


def _torch(models, x):
    with torch.no_grad():
        return {t: m(torch.from_numpy(x)).numpy() for t, m in models.items()}


def test_manifest_lists_buckets_and_their_shapes(bucketed):
    library, _ = bucketed
    manifest = load(library).manifest
    assert manifest["batch_buckets"] == list(BUCKETS) and manifest["batch_padding"] == "edge"
    assert [e["function"] for e in manifest["entries"]] == [f"main_b{b}" for b in BUCKETS]
    assert [e["inputs"][0]["shape"] for e in manifest["entries"]] == [[b, 3, 16, 16] for b in BUCKETS]
    assert [e["outputs"][0]["shape"] for e in manifest["entries"]] == [[b, 4] for b in BUCKETS]


def test_buckets_share_one_copy_of_the_weights(bucketed):
    library, single = bucketed
    manifest = load(library).manifest
    # Untuned kernels read every weight in the same layout: one file entry per weight, as many
    # bytes as the single-batch build, and every bucket reads the same tensors.
    assert manifest["weights"]["bytes"] == single.manifest["weights"]["bytes"]
    assert manifest["weights"]["count"] == single.manifest["weights"]["count"]
    assert all(sorted(e["weights"]) == sorted(t["name"] for t in manifest["weights"]["tensors"])
               for e in manifest["entries"])


@pytest.mark.parametrize("batch", [1, 3, 4, 6, 8])
def test_each_bucket_matches_pytorch(bucketed, models, batch):
    library, _ = bucketed
    x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype("float32")
    out = load(library)({"x": x})
    for task, ref in _torch(models, x).items():
        assert out[task].shape == ref.shape  # padded up to the next bucket, cut back
        np.testing.assert_allclose(out[task], ref, rtol=1e-5, atol=1e-5)


def test_batch_above_the_largest_bucket_is_refused(bucketed):
    library, _ = bucketed
    runner = load(library)
    with pytest.raises(RuntimeInputError, match=r"batch 9 is larger than the largest batch bucket 8 "
                                                r"\(built for batch sizes 1, 4, 8\)"):
        runner(np.zeros((9, 3, 16, 16), "float32"))
    with pytest.raises(RuntimeInputError, match=r"'x': expected shape \[2, 3, 16, 16\], given \[2, 3, 8, 8\]"):
        runner(np.zeros((2, 3, 8, 8), "float32"))
    assert runner.benchmark(np.zeros((2, 3, 16, 16), "float32"), number=1, repeat=1)["median_ms"] > 0


def test_buckets_must_batch_every_input_and_output(models):
    class Summary(nn.Module):  # reduces the batch away: no batch axis to pad or cut
        def forward(self, x):
            return x.mean(dim=0)

    per_batch = {b: gmorph_tvm.import_models({"s": Summary()}, torch.zeros(b, 3, 4, 4)) for b in (1, 2)}
    with pytest.raises(BuildError, match=r"batch bucket 1: .* must have the batch size 1 as its first dimension"):
        build(per_batch, "llvm")
    with pytest.raises(BuildError, match="batch sizes"):
        build({0: per_batch[1]}, "llvm")


def test_groups_in_one_artifact_read_one_copy(models, tmp_path):
    x = np.random.default_rng(7).standard_normal((1, 3, 16, 16)).astype("float32")
    mm = gmorph_tvm.import_models(models, torch.from_numpy(x))
    groups = fuse_grouped(mm, groups=[["shape"], ["color"]])
    separate = sum(build(g, "llvm").manifest["weights"]["bytes"] for g in groups)
    library = build(groups, "llvm").export(tmp_path / "groups.so")
    runner = load(library)
    manifest = runner.manifest
    assert [e["function"] for e in manifest["entries"]] == ["main_g0", "main_g1"]
    assert [e["tasks"] for e in manifest["entries"]] == [["shape"], ["color"]]
    # The shared trunk is stored once for both groups.
    trunk = sum(p.numel() * 4 for p in models["shape"].conv.parameters())
    assert manifest["weights"]["bytes"] == separate - trunk
    out = runner({"x": x})
    assert list(out) == ["shape", "color"]
    for task, ref in _torch(models, x).items():
        np.testing.assert_allclose(out[task], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(BuildError, match="groups must not share tasks"):
        build([groups[0], groups[0]], "llvm")
