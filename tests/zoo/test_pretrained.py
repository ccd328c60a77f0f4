"""Bundled Fashion-MNIST weights (gmorph_tvm/zoo/pretrained.py): set B shares a bit-identical frozen
prefix, set C is one architecture with all-different weights, and every model still reaches the
accuracy bench/train_zoo.py recorded."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import torch

from gmorph_tvm.data import fashion_mnist as fm
from gmorph_tvm.zoo import ZooError
from gmorph_tvm.zoo import pretrained as pt

needs_data = pytest.mark.skipif(
    not (fm.DEFAULT_ROOT / "t10k-labels-idx1-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed"
)


@pytest.fixture(scope="module")
def set_b():
    return pt.fmnist_backbone_set(8, include_base=True)


@pytest.fixture(scope="module")
def set_c():
    return pt.fmnist_netfuse_set(8)


def _prefix_keys(model):
    return [k for k in model.state_dict() if pt._is_prefix_key(k)]


def test_metadata_matches_bundled_files():
    meta = pt.metadata()
    for name, info in meta["files"].items():
        data = (pt.WEIGHTS_DIR / name).read_bytes()
        assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"]
    assert sum(info["bytes"] for info in meta["files"].values()) < 8_000_000


def test_set_b_prefix_is_bit_identical_and_suffixes_differ(set_b):
    assert list(set_b) == ["class10", *pt.BACKBONE_TASKS]
    base = set_b["class10"].state_dict()
    keys = _prefix_keys(set_b["class10"])
    assert any(k.startswith(f"features.{pt.FROZEN_PREFIX - 3}.") for k in keys)  # conv2 is frozen too
    for name, model in set_b.items():
        state = model.state_dict()
        assert all(torch.equal(state[k], base[k]) for k in keys), name
        assert not model.training
    for (a, ma), (b, mb) in itertools.combinations(set_b.items(), 2):
        # the fine-tuned conv3 differs between every two tasks
        assert not torch.equal(ma.features[11].weight, mb.features[11].weight), (a, b)


def test_tasks_own_their_prefix_tensors():
    fresh = pt.fmnist_backbone_set(2)
    first, second = fresh.values()
    before = second.features[0].weight.clone()
    with torch.no_grad():
        first.features[0].weight.add_(1.0)
    assert torch.equal(second.features[0].weight, before)


def test_set_b_output_sizes(set_b):
    x = torch.zeros(2, 1, 28, 28)
    with torch.no_grad():
        for name, model in set_b.items():
            assert model(x).shape == (2, pt.task_num_classes(name))


def test_set_c_same_architecture_all_weights_different(set_c):
    assert list(set_c) == list(pt.NETFUSE_TASKS)
    states = [m.state_dict() for m in set_c.values()]
    shapes = {k: v.shape for k, v in states[0].items()}
    for state in states[1:]:
        assert {k: v.shape for k, v in state.items()} == shapes
    float_keys = [k for k, v in states[0].items() if v.is_floating_point()]
    for sa, sb in itertools.combinations(states, 2):
        assert all(not torch.equal(sa[k], sb[k]) for k in float_keys)


def test_bundled_pair_shares_prefix():
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    pair = pt.bundled_pair()
    assert torch.equal(torch.rand(2), expected)  # loading leaves the caller's RNG alone
    assert all(t.device.type == "cpu" for m in pair.values() for t in m.state_dict().values())
    assert list(pair) == ["class10", "coarse4"]
    a, b = (m.state_dict() for m in pair.values())
    assert all(torch.equal(a[k], b[k]) for k in _prefix_keys(pair["class10"]))


def test_bad_n_is_rejected():
    with pytest.raises(ZooError, match="n must be an int in 1..8"):
        pt.fmnist_backbone_set(0)
    with pytest.raises(ZooError, match="n must be an int in 1..8"):
        pt.fmnist_netfuse_set(9)


def test_first_n_models_are_a_prefix_of_the_set():
    assert list(pt.fmnist_backbone_set(3)) == list(pt.BACKBONE_TASKS[:3])


@needs_data
def test_accuracy_on_500_test_samples_matches_report(set_b, set_c):
    images, labels10 = fm.load_split("test", limit=500)
    reported = pt.metadata()["models"]
    with torch.no_grad():
        for name, model in {**set_b, **set_c}.items():
            task = fm.task(pt.label_task_of(name))
            labels, pred = task(labels10), model(images).argmax(1)
            recalls = [(pred[labels == c] == c).float().mean().item() for c in range(task.num_classes)]
            balanced = sum(recalls) / len(recalls)
            # balanced accuracy: a constant or random predictor gets ~1/k, far below 0.85
            assert balanced >= 0.85, (name, balanced)
            assert balanced >= reported[name]["test500_balanced_accuracy"] - 0.01, (name, balanced)
