"""``gmorph-tvm search`` end to end on saved models and data, and its error messages."""

from __future__ import annotations

import json

import torch

from gmorph_tvm.cli import main


def _save_inputs(tmp_path, tiny_models, tiny_data):
    specs = []
    for task, model in tiny_models.items():  # torch.export programs (.pt2): checked, never unpickled
        path = tmp_path / f"{task}.pt2"
        ep = torch.export.export(model.eval(), (tiny_data.val_x[:2],),
                                 dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        torch.export.save(ep, str(path))
        specs += ["--model", f"{task}={path}"]
    data = tmp_path / "data.pt"
    torch.save({"train_x": tiny_data.train_x, "val_x": tiny_data.val_x, "test_x": tiny_data.test_x,
                "train_y": tiny_data.train_y, "val_y": tiny_data.val_y, "test_y": tiny_data.test_y}, data)
    return specs, data


def test_search_command_writes_report_and_artifact(tmp_path, tiny_models, tiny_data, capsys):
    specs, data = _save_inputs(tmp_path, tiny_models, tiny_data)
    out = tmp_path / "fused.so"
    code = main(["search", *specs, "--data", str(data), "--budget", "0", "--predictor", "none", "--epochs", "0.5",
                 "--train-samples", "300", "--max-drop", "5", "--clock", "cpu", "--work-dir", str(tmp_path / "wd"),
                 "-o", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "plan:" in printed and "test accuracy:" in printed
    report = json.loads((tmp_path / "wd" / "report.json").read_text())
    assert report["counts"]["proposed"] == 0 and report["chosen"]["key"] == "identity"
    assert out.is_file() and (tmp_path / "fused.manifest.json").is_file()


def test_search_command_errors_are_one_line(tmp_path, capsys):
    assert main(["search", "--model", f"a={tmp_path / 'missing.pt'}", "--data", "x.pt"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["search", "--model", "a=b.pt"]) == 1
    assert "--model needs --data" in capsys.readouterr().err
    (tmp_path / "notmodel.pt").write_bytes(b"junk")
    assert main(["search", "--model", f"a={tmp_path / 'notmodel.pt'}", "--data", str(tmp_path / "notmodel.pt")]) == 1
    assert "is not a state dict or tensors" in capsys.readouterr().err
    assert main(["search", "--model", f"a={tmp_path / 'notmodel.pt'}", "--data", "x.pt", "--model", "a=y.pt"]) == 1
    assert "--model names task 'a' twice" in capsys.readouterr().err
