"""The runtime bundle runs a CPU artifact with no TVM installed and matches the installed path."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
import torch

import gmorph_tvm
from gmorph_tvm.artifact import build
from gmorph_tvm.cli import main as cli_main
from gmorph_tvm.errors import BuildError
from gmorph_tvm.runtime import load
from gmorph_tvm.runtime.bundle import CUDART, MAX_BYTES, bundle_runtime, find_cudart

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyCNN, fake_libcuda

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake and a C++ compiler")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return bundle_runtime("llvm", tmp_path_factory.mktemp("bundle") / "rt")


def test_bundle_layout_and_size(bundle):
    info = json.loads((bundle / "BUNDLE.json").read_text())
    assert set(info["files"]) == {"lib/libtvm_ffi.so", "lib/libtvm_runtime.so", "bin/gmorph-run", "gmorph-run"}
    assert info["total_bytes"] <= MAX_BYTES
    assert not (bundle / ".build").exists()
    if shutil.which("ldd"):  # the wrapper's LD_LIBRARY_PATH beats the binary's RUNPATH to the wheel
        env = {**os.environ, "LD_LIBRARY_PATH": str(bundle / "lib")}
        linked = subprocess.run(["ldd", str(bundle / "bin" / "gmorph-run")], check=False, capture_output=True, text=True, env=env).stdout
        for name in ("libtvm_ffi.so", "libtvm_runtime.so"):
            assert f"{name} => {bundle / 'lib' / name}" in linked, linked


@pytest.mark.slow
def test_artifact_runs_from_bundle_in_venv_without_tvm(bundle, tmp_path):
    x = np.random.default_rng(3).standard_normal((1, 3, 12, 12)).astype("float32")
    mm = gmorph_tvm.import_models({"a": TinyCNN(4, 0).eval(), "b": TinyCNN(3, 1).eval()}, example_inputs=torch.from_numpy(x))
    library = build(mm, "llvm").export(tmp_path / "m.so")
    np.save(tmp_path / "x.npy", x)
    expected = load(library)(x)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=False, with_pip=False)
    python = env_dir / "bin" / "python"
    check = subprocess.run([str(python), "-c", "import tvm"], check=False, capture_output=True, text=True)
    assert check.returncode != 0  # really no TVM in there
    # Run from the venv, with a PATH and environment that know nothing of the wheel.
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    outputs = tmp_path / "out"
    outputs.mkdir()
    proc = subprocess.run(
        [str(python), "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))",
         str(bundle / "gmorph-run"), str(library), "--input", f"x={tmp_path / 'x.npy'}", "--save-outputs", str(outputs)],
        check=False, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for task in ("a", "b"):
        np.testing.assert_allclose(np.load(outputs / f"{task}.npy"), expected[task], rtol=1e-6, atol=1e-6)


def test_unknown_target_is_a_build_error(tmp_path):
    with pytest.raises(BuildError, match="unknown target 'rocm'"):
        bundle_runtime("rocm", tmp_path)


def test_cli_bundle_runtime_with_a_prebuilt_runner(bundle, tmp_path, capsys):
    out = tmp_path / "cli-bundle"
    assert cli_main(["bundle-runtime", "--target", "cuda", "-o", str(out), "--runner", str(bundle / "bin" / "gmorph-run")]) == 0
    assert "runtime bundle for cuda" in capsys.readouterr().out
    files = json.loads((out / "BUNDLE.json").read_text())["files"]
    assert "lib/libtvm_runtime_cuda.so" in files and sum(files.values()) <= MAX_BYTES
    if find_cudart() is not None:  # the CUDA runtime the TVM CUDA runtime links travels with it
        assert f"lib/{CUDART}" in files


def test_cuda_bundle_loads_its_own_cuda_runtime(bundle, tmp_path):
    """On a GPU box the wheel's path (compiled into gmorph-run) does not exist: the bundle's
    gmorph-run must load lib/libtvm_runtime_cuda.so (and its libcudart) from the bundle."""
    if fake_libcuda(tmp_path) is None or find_cudart() is None:
        pytest.skip("needs a C compiler and libcudart.so.13")
    out = bundle_runtime("cuda", tmp_path / "rt", runner=bundle / "bin" / "gmorph-run")
    x = np.random.default_rng(3).standard_normal((1, 3, 12, 12)).astype("float32")
    mm = gmorph_tvm.import_models({"a": TinyCNN(4, 0).eval()}, example_inputs=torch.from_numpy(x))
    library = build(mm, "cuda").export(tmp_path / "gpu.so")
    np.save(tmp_path / "x.npy", x)
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(tmp_path), "LD_DEBUG": "libs"}
    proc = subprocess.run([str(out / "gmorph-run"), str(library), "--device", "cuda", "--input", f"x={tmp_path / 'x.npy'}"],
                          capture_output=True, text=True, env=env, timeout=300)
    loaded = re.findall(r"calling init: (\S+)", proc.stderr)
    assert str(out / "lib" / "libtvm_runtime_cuda.so") in loaded, proc.stderr[-2000:]
    assert str(out / "lib" / CUDART) in loaded
    assert not any("site-packages" in path for path in loaded)  # nothing of the wheel
    assert proc.returncode == 1 and "CUDA" in proc.stderr  # then fails where a GPU is needed
