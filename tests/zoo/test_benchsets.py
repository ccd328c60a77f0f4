"""The benchmark sets of bench/ (gmorph_tvm.zoo.benchsets), here set E: three tasks fine-tuned from
the released ImageNet EfficientNet-Lite0, on real photographs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmorph_tvm import import_models
from gmorph_tvm.pipeline import fuse_lossless
from gmorph_tvm.zoo import benchsets, real
from gmorph_tvm.zoo._common import ZooError


@pytest.fixture(scope="module")
def set_e():
    return benchsets.load_set("E", None, 2)


def test_set_e_shares_the_stem_and_twelve_blocks_and_differs_after(set_e):
    models, (x,), names = set_e
    assert list(models) == list(real.EFFNET_HEADS) and names == ["inputs"]  # forward's parameter name
    first, *others = models.values()
    for other in others:
        for (key, a), b in zip(first.state_dict().items(), other.state_dict().values()):
            if key.startswith("_fc."):
                continue  # heads of different sizes
            block = int(key.split(".")[1]) if key.startswith("_blocks.") else None
            perturbed = block is not None and block >= 12 and not key.endswith(("running_mean", "running_var",
                                                                                 "num_batches_tracked"))
            assert torch.equal(a, b) != perturbed, key
    with torch.no_grad():
        outs = {task: m(x) for task, m in models.items()}
    assert [o.shape for o in outs.values()] == [(2, c) for c in real.EFFNET_HEADS.values()]
    assert all(torch.isfinite(o).all() and o.std() > 0 for o in outs.values())


def test_set_e_stitches_what_is_shared(set_e):
    models, args, names = set_e
    mm = import_models(models, args)
    assert [spec.name for spec in mm.inputs] == names  # the feed bench/lossless.py gives the artifacts
    separate = fuse_lossless(mm, stitch=False, merge="never")  # canonicalised (BN folded), not stitched
    stitched = fuse_lossless(mm, merge="never")
    first = next(iter(models.values()))
    shared = sum(p.numel() * 4 for name, p in first.named_parameters()
                 if name.startswith(("_conv_stem.", "_bn0.", "_conv_head.", "_bn1.")) or
                 (name.startswith("_blocks.") and int(name.split(".")[1]) < 12))
    # Two of the three copies of the stem and blocks 0-11 are gone (computed once), and of the head
    # conv (the same weights in all three, on different inputs: stored once, computed thrice); BN
    # scales are folded into the convs, so a little less than two copies of those parameters.
    removed = separate.weight_bytes - stitched.weight_bytes
    assert 0.85 * 2 * shared < removed <= 2 * shared


def test_sample_photos_are_real_distinct_normalised_and_deterministic():
    photos = real.sample_photos(4, 64)
    assert photos.shape == (4, 3, 64, 64) and photos.dtype == np.float32
    np.testing.assert_array_equal(photos, real.sample_photos(4, 64))
    assert len({p.tobytes() for p in photos}) == 4  # two photographs, two crops of each
    assert -2.5 < photos.mean() < 2.5 and 0.5 < photos.std() < 2.0


def test_set_e_has_at_most_three_tasks():
    with pytest.raises(ZooError, match="1 to 3 tasks, not 4"):
        real.efficientnet_task_set(4)
