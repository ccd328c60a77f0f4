"""The gmorph-tvm command line: build / run / info, exit codes and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from gmorph_tvm import zoo


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gmorph_tvm.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    x = zoo.example_input("mlp", 2)
    paths = []
    for seed, name in ((0, "age"), (1, "gender")):
        model = zoo.make("mlp", seed=seed)
        path = tmp / f"{name}.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
        paths.append((name, model, str(path)))
    np.save(tmp / "x.npy", x.numpy())
    return tmp, x, paths


def test_build_info_run_roundtrip(onnx_pair):
    tmp, x, models = onnx_pair
    out = tmp / "faces.so"
    proc = _cli("build", *(p for _, _, p in models), "--names", "age,gender", "--target", "llvm", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and (tmp / "faces.manifest.json").is_file()

    info = _cli("info", str(out))
    assert info.returncode == 0, info.stderr
    assert "task      age (onnx" in info.stdout and "input     x: float32[2, 1, 28, 28]" in info.stdout

    saved = tmp / "outputs"
    run = _cli("run", str(out), "--input", f"x={tmp / 'x.npy'}", "--save-outputs", str(saved))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("age: float32[2, 10]")
    with torch.no_grad():
        for name, model, _ in models:
            np.testing.assert_allclose(np.load(saved / f"{name}.npy"), model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_wrong_input_at_run_time_is_one_clear_line(onnx_pair):
    tmp, x, models = onnx_pair
    out = tmp / "single.so"
    assert _cli("build", models[0][2], "-o", str(out)).returncode == 0
    bad = tmp / "bad.npy"
    np.save(bad, np.zeros((3, 1, 28, 28), dtype=np.float32))
    proc = _cli("run", str(out), "--input", f"x={bad}")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "input 'x': expected shape [2, 1, 28, 28], given [3, 1, 28, 28]" in lines[0]
    proc = _cli("run", str(out), "--input", f"x={tmp / 'missing.npy'}")
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_model_file_fails_cleanly_and_writes_nothing(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"definitely not protobuf")
    out = tmp_path / "never.so"
    proc = _cli("build", str(bad), "-o", str(out))
    assert proc.returncode == 1
    assert "model 'broken'" in proc.stderr and "not a valid ONNX" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "never.manifest.json").exists()


def test_usage_errors_and_help():
    assert _cli("--help").returncode == 0
    assert _cli().returncode == 2
    proc = _cli("build", "a.onnx")  # no -o
    assert proc.returncode == 2 and "-o/--output" in proc.stderr
    proc = _cli("build", "a.onnx", "-o", "x.so", "--target", "nonsense")
    assert proc.returncode == 1 and "unknown target preset 'nonsense'" in proc.stderr


def test_build_weights_and_batch_buckets_flags(onnx_pair):
    tmp, x, models = onnx_pair
    one = tmp / "one.so"
    proc = _cli("build", models[0][2], "--weights", "embedded", "-o", str(one))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp / "one.weights.safetensors").exists()
    assert "embedded" in _cli("info", str(one)).stdout

    out = tmp / "buckets.so"
    dynamic = []  # buckets re-shape the batch: the ONNX files need a symbolic batch dimension
    for name, model, _ in models:
        dynamic.append(str(tmp / f"{name}_dyn.onnx"))
        torch.onnx.export(model, (x,), dynamic[-1], dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    proc = _cli("build", *dynamic, "--names", "age,gender", "--batch-buckets", "1,4",
                "--input-shape", "x=2,1,28,28", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    info = _cli("info", str(out)).stdout
    assert "batches:  1, 4" in info and "external, in buckets.weights.safetensors" in info
    x3 = np.concatenate([x.numpy(), x.numpy()[:1]])
    np.save(tmp / "x3.npy", x3)
    saved = tmp / "bucket_outputs"
    run = _cli("run", str(out), "--input", f"x={tmp / 'x3.npy'}", "--save-outputs", str(saved))
    assert run.returncode == 0, run.stderr
    with torch.no_grad():
        for name, model, _ in models:
            np.testing.assert_allclose(np.load(saved / f"{name}.npy"), model(torch.from_numpy(x3)).numpy(),
                                       rtol=1e-5, atol=1e-5)
    proc = _cli("build", models[0][2], "--batch-buckets", "1,8", "-o", str(tmp / "never.so"))
    assert proc.returncode == 1 and "--batch-buckets needs --input-shape" in proc.stderr


def test_build_with_a_new_tuning_db_and_no_trials_builds_untuned_and_dumps_the_ir(onnx_pair):
    """``--tune-trials 0 --tuning-db NEWDIR`` used to fail ("no tuning database in NEWDIR")."""
    tmp, _, models = onnx_pair
    new_db, dump = tmp / "new-db", tmp / "ir"
    out = tmp / "untuned.so"
    proc = _cli("build", models[0][2], "--tune-trials", "0", "--tuning-db", str(new_db), "--dump-ir", str(dump),
                "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and new_db.is_dir()
    assert f"no tuning records in {new_db} yet" in proc.stderr
    phases = sorted(p.name.split("-", 1)[1] for p in dump.iterdir())
    assert phases == sorted(["import_cleanup.py", "lossless_fusion.py", "target_lowering.py", "apply_tuning.py",
                             "weights_and_signature.py", "finalize.py"])


def test_search_help_names_the_safe_model_files_and_the_trust_flag():
    """``gmorph-tvm search`` declared its own --model help ("torch.save(model, FILE)"): a pickle."""
    proc = _cli("search", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "--trust-pickle" in text and "--arch" in text and "--workers" in text and ".pt2" in text
