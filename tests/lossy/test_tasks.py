"""The Fashion-MNIST 3-task benchmark: labels, bundled weights, training script."""

from __future__ import annotations

import pytest
import torch

from gmorph_tvm.errors import SearchError
from gmorph_tvm.lossy import tasks
from gmorph_tvm.lossy.data import accuracy, predict


def test_three_tasks_with_balanced_size_labels(tiny_data):
    assert tiny_data.tasks == ["class10", "coarse4", "size3"]
    for split in ("train", "val", "test"):
        ys = tiny_data.y(split)
        assert set(ys["class10"].unique().tolist()) <= set(range(10))
        assert set(ys["coarse4"].unique().tolist()) <= set(range(4))
        counts = torch.bincount(ys["size3"], minlength=3).float() / len(ys["size3"])
        assert counts.min() > 0.2, counts  # terciles of the training split: about a third each
    # size3 is a property of the image, not of its class: one class spans several sizes.
    y = tiny_data.train_y
    tshirts = y["size3"][y["class10"] == 0]
    assert len(tshirts.unique()) >= 2


def test_architectures_differ_per_task():
    models = tasks.build_models(seed=0)
    kinds = {type(m).__name__ for m in models.values()}
    assert kinds == {"VGG", "ResNet", "MobileNet"}


def test_bundled_weights_load_and_match_their_summary():
    models, data, summary = tasks.load_benchmark(train_if_missing=False, data=tasks.load_data(val=None, train=10, test=10))
    for task, model in models.items():
        acc = accuracy(predict(model, data.val_x)[0], data.val_y[task])
        assert abs(acc - summary["tasks"][task]["val_accuracy"]) < 1e-3
        assert acc > {"class10": 88.0, "coarse4": 97.0, "size3": 93.0}[task]


def test_training_script_learns(tiny_data):
    model = tasks.build_models(seed=1)["coarse4"]
    before = accuracy(predict(model, tiny_data.val_x)[0], tiny_data.val_y["coarse4"])
    tasks.train_model(model, tiny_data.train_x, tiny_data.train_y["coarse4"], epochs=1, batch_size=64, lr=3e-3, seed=0)
    after = accuracy(predict(model, tiny_data.val_x)[0], tiny_data.val_y["coarse4"])
    assert after > before + 15.0


def test_weights_round_trip_and_config_check(tmp_path):
    models = tasks.build_models(seed=0)
    path = tasks.weights_file(tmp_path)
    tasks.save_weights(models, {"note": "x"}, path)
    loaded, summary = tasks.load_weights(path)
    assert summary == {"note": "x"}
    for t in models:
        for a, b in zip(models[t].state_dict().values(), loaded[t].state_dict().values()):
            assert torch.equal(a, b)
    state = torch.load(path, weights_only=True)
    state["config"] = "other"
    torch.save(state, path)
    with pytest.raises(SearchError, match="another configuration"):
        tasks.load_weights(path)
