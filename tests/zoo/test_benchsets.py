"""The benchmark sets (gmorph_tvm.zoo.benchsets), here set E: three tasks fine-tuned from the released
ImageNet EfficientNet-Lite0, on real photographs; and the benchmark recipe built on them
(gmorph_tvm.recipe: sets, variants, import routes, peer systems)."""

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


# ---- the benchmark recipe (gmorph_tvm.recipe): sets, variants, routes, peers, defined once ----------

def test_recipe_names_every_set_variant_route_and_peer_and_refuses_others():
    from gmorph_tvm import recipe

    assert recipe.SETS == ("A", "B", "C", "E", "demo")
    assert recipe.VARIANTS == ("separate", "stitch", "stitch+merge", "grouped")
    assert recipe.ROUTES == ("torch", "onnx", "onnx-dynamo")
    assert {"torch-1", "torch", "ort", "ort-nospin", "openvino"} <= set(recipe.PEERS)
    assert recipe.variant_label("separate") == "TVM, models compiled separately"
    assert recipe.parse_label("B8") == ("B", 8) and recipe.parse_label("demo") == ("demo", 1)
    for bad, call in [("set 'F'", lambda: recipe.load_set("F")), ("route 'tflite'", lambda: recipe.import_set(
            recipe.load_set("B", 1, 1), "tflite")), ("variants fused", lambda: recipe.check_variants(["fused"])),
            ("peer 'tensorrt'", lambda: recipe.peers(["tensorrt"])), ("set 'B0'", lambda: recipe.parse_label("B0"))]:
        with pytest.raises(recipe.RecipeError, match=bad):
            call()


def test_demo_set_is_set_b_first_four_tasks():
    from gmorph_tvm import recipe

    demo = recipe.load_set("demo")
    models, (x,), names = benchsets.load_set("B", None, 1)
    assert list(demo.models) == list(models)[:4] and demo.names == names == ["x"] and demo.label == "demo"
    np.testing.assert_array_equal(demo.feed["x"], x.numpy())


def test_variants_and_the_modules_tuned_for_them():
    from gmorph_tvm import recipe

    imported = recipe.import_set(recipe.load_set("B", 1, 4))
    labels = [label for label, _ in recipe.tuning_modules(imported, ["separate", "stitch+merge", "grouped"])]
    assert labels == ["separate", "stitch+merge", "grouped0", "grouped1"]
    assert len(recipe.builds(imported, "separate")) == 4 and len(recipe.builds(imported, "grouped")) == 2
    stitched, merged = recipe.builds(imported, "stitch")[0], recipe.builds(imported, "stitch+merge")[0]
    assert merged.weight_bytes <= stitched.weight_bytes < imported.mm.weight_bytes


@pytest.mark.parametrize("route", ["onnx", "onnx-dynamo"])
def test_onnx_routes_import_what_torch_imports(route, tmp_path):
    """Issue 26 compares the import routes on set E; here on two set B tasks (fast): the ONNX files of
    either exporter import to a model of the same tasks and inputs, computing PyTorch's outputs."""
    from gmorph_tvm import build, recipe

    bench_set = recipe.load_set("B", 2, 2)
    torch_route = recipe.import_set(bench_set)
    imported = recipe.import_set(bench_set, route, tmp_path)
    assert imported.mm.task_names == torch_route.mm.task_names
    assert imported.mm.inputs == torch_route.mm.inputs
    assert all(str(p).endswith(".dynamo.onnx" if route == "onnx-dynamo" else f"{t}.onnx")
               for t, p in imported.sources.items())
    (fused,) = recipe.builds(imported, "stitch+merge")
    path = build(fused, "llvm").export(tmp_path / "fused.so")
    assert recipe.max_relative_error(recipe.run_artifacts([str(path)], bench_set.feed), bench_set.reference()) < 1e-4


def test_a_peer_is_one_registry_entry(monkeypatch, tmp_path):
    from gmorph_tvm import recipe

    bench_set = recipe.load_set("demo", 1, 1)
    inputs = recipe.PeerInputs(bench_set, bench_set.export_onnx(tmp_path))
    calls = []
    extra = recipe.Peer("mine", "My runtime", None, lambda i: lambda: calls.append(i) or 0.001, lambda i: 7)
    monkeypatch.setitem(recipe.PEERS, "mine", extra)
    assert recipe.peers(["mine"]) == [extra]
    assert recipe.peer_samplers([extra], inputs)["My runtime"]() == 0.001 and calls == [inputs]
    missing = recipe.Peer("gone", "Gone", "no_such_module_xyz", extra.sampler, extra.weight_bytes)
    monkeypatch.setitem(recipe.PEERS, "gone", missing)
    assert recipe.peers(["gone"]) == []
    with pytest.raises(recipe.RecipeError, match="needs the no_such_module_xyz package"):
        recipe.peers(["gone"], skip_missing=False)
    for peer in recipe.peers(["ort", "openvino"]):  # the installed ONNX peers run the exported files
        assert peer.sampler(inputs)() > 0 and peer.weight_bytes(inputs) == inputs.onnx_bytes()
