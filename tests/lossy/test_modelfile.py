"""Model files for ``gmorph-tvm search`` that cannot run code: .pt2 programs (checked, rebuilt as
trainable modules), state dicts with a named architecture, and whole pickles only with --trust-pickle."""

from __future__ import annotations

import argparse
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from gmorph_tvm.cli import main
from gmorph_tvm.errors import SearchError
from gmorph_tvm.lossy.cli import TRUST_PICKLE_HELP, _load_models, add_search_arguments, run_search_cli
from gmorph_tvm.lossy.graph import LayerGraph
from gmorph_tvm.lossy.modelfile import load_model_file

X = torch.randn(2, 1, 28, 28)


def export_pt2(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """``model`` saved with torch.export.save, eval mode, dynamic batch (what the CLI asks users for)."""
    ep = torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(ep, str(path))
    return path


class Payload:
    """Unpickling it creates ``marker`` (a harmless stand-in for any code a pickle can run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_pickle(path: Path, marker: Path, *, zip_format: bool = True) -> Path:
    """A model file whose unpickling writes ``marker``: torch.save's zip format, or a bare pickle."""
    if zip_format:
        torch.save(Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
    return path


def rewrite_pt2(src: Path, dst: Path, edit) -> Path:
    """Copy a .pt2 archive, passing each (relative name, bytes) through ``edit`` (returns bytes, or a
    list of (relative name, bytes) to write instead)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            out = edit(rel, zin.read(info))
            for name, data in out if isinstance(out, list) else [(rel, out)]:
                zout.writestr(f"{root}/{name}", data)
    return dst


def edit_program(edit):
    """An ``edit`` for :func:`rewrite_pt2` applying ``edit(program_dict)`` to models/*.json."""

    def apply(rel: str, data: bytes):
        if rel.startswith("models/") and rel.endswith(".json"):
            program = json.loads(data)
            edit(program)
            return json.dumps(program).encode()
        return data

    return apply


def _lossy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_search_arguments(p)
    return p


@pytest.mark.parametrize("zip_format", [True, False])
def test_crafted_pickle_does_not_run_without_trust_pickle(tmp_path, capsys, zip_format):
    marker = tmp_path / "ran"
    evil = crafted_pickle(tmp_path / "evil.pt", marker, zip_format=zip_format)
    data = tmp_path / "data.pt"
    torch.save({"train_x": torch.zeros(1)}, data)
    assert main(["search", "--model", f"a={evil}", "--data", str(data)]) == 1
    err = capsys.readouterr().err.strip()
    assert not marker.exists(), "the pickle's payload ran"
    assert len(err.splitlines()) == 1 and "model 'a'" in err and "--trust-pickle" in err and str(evil) in err


def test_trust_pickle_is_explicit_and_documented(tmp_path):
    marker = tmp_path / "ran"
    evil = crafted_pickle(tmp_path / "evil.pt", marker)
    with pytest.raises(SearchError, match="not a torch.nn.Module"):
        _load_models([f"a={evil}"], [], trust_pickle=True)
    assert marker.exists()  # the flag does what it says: the file is unpickled, code and all
    helptext = " ".join(_lossy_parser().format_help().split())
    assert "--trust-pickle" in helptext and " ".join(TRUST_PICKLE_HELP.split()[:8]) in helptext


def test_state_dict_is_named_as_such(tmp_path, tiny_models):
    path = tmp_path / "sd.pt"
    torch.save(tiny_models["class10"].state_dict(), path)
    with pytest.raises(SearchError, match="holds a state dict: name its architecture with --arch"):
        load_model_file("class10", path)


def test_pt2_becomes_the_same_trainable_model(tmp_path, tiny_models):
    for task, model in tiny_models.items():
        loaded = load_model_file(task, export_pt2(model, X, tmp_path / f"{task}.pt2"))
        x5 = torch.randn(5, 1, 28, 28)  # another batch size than exported with
        with torch.no_grad():
            torch.testing.assert_close(loaded(x5), model.eval()(x5), rtol=0, atol=0)
        ours, theirs = LayerGraph.trace(task, loaded, X), LayerGraph.trace(task, model, X)
        assert [c.shape for c in ours.cuts] == [c.shape for c in theirs.cuts]
        assert (ours.total_params, ours.total_macs) == (theirs.total_params, theirs.total_macs)
        params = list(loaded.parameters())
        assert params and all(p.requires_grad for p in params)
        loaded.train()
        loaded(x5).sum().backward()
        assert all(p.grad is not None for p in params)


def _crafted_pt2_cases(tmp_path, marker):
    """(case name, edit for rewrite_pt2); each makes torch.export.load/module() able to run code or
    call something that is not a tensor operator."""
    evil_bytes = tmp_path / "payload.pt"
    torch.save(Payload(marker), evil_bytes)
    evil = evil_bytes.read_bytes()

    def pickled_weight(rel, data):
        if rel.endswith("_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if rel == "data/weights/weight_0":
            return evil
        return data

    def pickled_sample_inputs(rel, data):
        return evil if rel.startswith("data/sample_inputs/") else data

    def opaque_constant(rel, data):
        if rel.endswith("_constants_config.json"):
            return json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "use_pickle": True}}}).encode()
        return data

    def aoti(rel, data):
        return [(rel, data), ("data/aotinductor/model/model.so", b"\x7fELF")] if rel == "archive_version" else data

    def first_node(program, key, value):
        program["graph_module"]["graph"]["nodes"][0][key] = value

    return [
        ("pickled_weight", pickled_weight),
        ("pickled_sample_inputs", pickled_sample_inputs),
        ("opaque_constant", opaque_constant),
        ("aotinductor_library", aoti),
        ("node_calls_torch_save", edit_program(lambda p: first_node(p, "target", "torch.save"))),
        ("node_calls_from_file", edit_program(lambda p: first_node(p, "target", "torch.ops.aten.from_file.default"))),
        ("sympy_expression", edit_program(lambda p: p["range_constraints"].update(
            {"Integer(1).__class__.__init__.__globals__": {"min_val": 0, "max_val": None}}))),
        ("custom_object_argument", edit_program(lambda p: p["graph_module"]["graph"]["nodes"][0]["inputs"][0].update(
            {"arg": {"as_custom_obj": {"name": "obj0", "class_fqn": "os.system"}}}))),
    ]


def test_crafted_pt2_is_refused_before_any_code_runs(tmp_path, tiny_models):
    marker = tmp_path / "ran"
    good = export_pt2(tiny_models["coarse4"], X, tmp_path / "good.pt2")
    # The hole being closed: torch.export.load alone unpickles a weight marked use_pickle.
    torch_load_victim = rewrite_pt2(good, tmp_path / "victim.pt2", _crafted_pt2_cases(tmp_path, marker)[0][1])
    try:
        torch.export.load(str(torch_load_victim))
    except Exception:
        pass
    assert marker.exists(), "precondition: torch.export.load runs a pickled weight's payload"
    marker.unlink()
    for case, edit in _crafted_pt2_cases(tmp_path, marker):
        crafted = rewrite_pt2(good, tmp_path / f"{case}.pt2", edit)
        with pytest.raises(SearchError) as info:
            load_model_file("coarse4", crafted)
        message = str(info.value)
        assert "\n" not in message and "model 'coarse4'" in message and "refused" in message, (case, message)
        assert not marker.exists(), f"{case}: the payload ran"


def test_pt2_guard_code_is_never_executed(tmp_path, tiny_models):
    marker = tmp_path / "ran"
    good = export_pt2(tiny_models["size3"], X, tmp_path / "good.pt2")
    crafted = rewrite_pt2(good, tmp_path / "guards.pt2", edit_program(
        lambda p: p.update({"guards_code": [f"open({str(marker)!r}, 'w') is None"]})))
    loaded = load_model_file("size3", crafted)
    with torch.no_grad():
        loaded(X)
    assert not marker.exists()
    with pytest.raises(AssertionError):  # what ExportedProgram.module() would have done with it
        torch.export.load(str(crafted)).module()(X)
    assert marker.exists()


def test_state_dict_with_arch(tmp_path, tiny_models, monkeypatch):
    (tmp_path / "my_archs.py").write_text(
        "from gmorph_tvm import zoo\n"
        "def coarse4():\n"
        "    return zoo.make('resnet', in_channels=1, image_size=28, num_classes=4, width=4, blocks_per_stage=(1, 1))\n"
        "def wrong():\n"
        "    return zoo.make('resnet', in_channels=1, image_size=28, num_classes=5, width=4, blocks_per_stage=(1, 1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = tiny_models["coarse4"].eval()
    path = tmp_path / "coarse4.pt"
    torch.save(model.state_dict(), path)
    loaded = _load_models([f"c={path}"], ["c=my_archs:coarse4"])["c"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=0)
    for arch, message in [("my_archs:wrong", "does not fit --arch my_archs:wrong"),
                          ("my_archs:missing", "has no 'missing'"), ("no_such_module_xyz:f", "cannot import"),
                          ("my_archs", "expects NAME=module:callable")]:
        with pytest.raises(SearchError, match=message):
            _load_models([f"c={path}"], [f"c={arch}"])
    with pytest.raises(SearchError, match="--arch names 'd', which no --model names"):
        _load_models([f"c={path}"], ["d=my_archs:coarse4"])
    marker = tmp_path / "ran"  # a crafted pickle given as a state dict is read with weights_only=True
    with pytest.raises(SearchError, match="not a state dict readable with weights_only=True"):
        _load_models([f"c={crafted_pickle(tmp_path / 'evil.pt', marker)}"], ["c=my_archs:coarse4"])
    assert not marker.exists()


def test_search_runs_on_state_dicts_with_arch(tmp_path, tiny_models, tiny_data, monkeypatch, capsys):
    (tmp_path / "tiny_archs.py").write_text(  # the architectures of conftest.TINY
        "from gmorph_tvm import zoo\n"
        "def class10():\n"
        "    return zoo.make('vgg', in_channels=1, image_size=28, num_classes=10, widths=(8, 16), pool_after=(0, 1))\n"
        "def coarse4():\n"
        "    return zoo.make('resnet', in_channels=1, image_size=28, num_classes=4, width=4, blocks_per_stage=(1, 1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = []
    for task in ("class10", "coarse4"):
        torch.save(tiny_models[task].state_dict(), tmp_path / f"{task}.pt")
        specs += ["--model", f"{task}={tmp_path / f'{task}.pt'}", "--arch", f"{task}=tiny_archs:{task}"]
    data = tmp_path / "data.pt"
    torch.save({"train_x": tiny_data.train_x, "val_x": tiny_data.val_x, "test_x": tiny_data.test_x,
                "train_y": {t: tiny_data.train_y[t] for t in ("class10", "coarse4")},
                "val_y": {t: tiny_data.val_y[t] for t in ("class10", "coarse4")},
                "test_y": {t: tiny_data.test_y[t] for t in ("class10", "coarse4")}}, data)
    args = _lossy_parser().parse_args([*specs, "--data", str(data), "--budget", "1", "--predictor", "none",
                                       "--epochs", "0.3", "--train-samples", "200", "--max-drop", "5",
                                       "--clock", "cpu", "--work-dir", str(tmp_path / "wd"), "--quiet"])
    assert run_search_cli(args) == 0
    report = json.loads((tmp_path / "wd" / "report.json").read_text())
    assert report["counts"]["proposed"] == 1 and max(report["chosen"]["test_drops"].values()) <= 5
    assert "plan:" in capsys.readouterr().out


def test_build_route_refuses_crafted_pt2_before_any_code_runs(tmp_path, tiny_models):
    """``gmorph-tvm build x.pt2`` / ``import_models({"m": "x.pt2"})`` used ``torch.export.load``
    directly: the pickled weight's payload ran. It now goes through the same checked read."""
    from gmorph_tvm import import_models
    from gmorph_tvm.errors import ModelImportError

    marker = tmp_path / "ran"
    good = export_pt2(tiny_models["coarse4"], X, tmp_path / "good.pt2")
    mm = import_models({"coarse4": str(good)}, input_shapes={"x": [2, 1, 28, 28]})  # a plain program imports
    assert mm.task_names == ["coarse4"]
    for case, edit in _crafted_pt2_cases(tmp_path, marker):
        crafted = rewrite_pt2(good, tmp_path / f"{case}.pt2", edit)
        with pytest.raises(ModelImportError) as info:
            import_models({"coarse4": str(crafted)}, input_shapes={"x": [2, 1, 28, 28]})
        message = str(info.value)
        assert "\n" not in message and "model 'coarse4'" in message and "refused" in message, (case, message)
        assert not marker.exists(), f"{case}: the payload ran"
