"""The lint and type gate CI runs (through this test, since CI runs only pytest): ruff on the whole
tree, mypy on passes/, artifact/, runtime/ and core/ (settings in pyproject.toml); and the CLI's
``--version`` / ``info`` stay light: they never import torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import matmul_relu_module

import gmorph_tvm

ROOT = Path(__file__).resolve().parents[1]
TYPED = ["gmorph_tvm.passes", "gmorph_tvm.artifact", "gmorph_tvm.runtime", "gmorph_tvm.core"]


def test_ruff_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_mypy_is_clean(tmp_path):
    # passes/ and tuning/ import as gmorph_tvm.passes / gmorph_tvm.tuning (pyproject's package-dir),
    # which mypy cannot map: check them through a tree of links that has the installed layout.
    tree = tmp_path / "tree" / "gmorph_tvm"
    tree.mkdir(parents=True)
    for entry in (ROOT / "gmorph_tvm").iterdir():
        if entry.name != "__pycache__":
            (tree / entry.name).symlink_to(entry)
    (tree / "passes").symlink_to(ROOT / "passes")
    (tree / "tuning").symlink_to(ROOT / "tuning")
    args = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
            "--cache-dir", str(tmp_path / "cache")]
    for package in TYPED:
        args += ["-p", package]
    proc = subprocess.run(args, cwd=tree.parent, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


_PROBE = (
    "import sys\n"
    "from gmorph_tvm.cli import main\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "except SystemExit as exit:\n"
    "    code = exit.code\n"
    "print('torch loaded' if 'torch' in sys.modules else 'no torch', code)\n"
)


def _cli_modules(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""}, cwd="/")


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    return gmorph_tvm.build(matmul_relu_module(1, 4, 2), "llvm").export(tmp_path_factory.mktemp("lint") / "tiny.so")


def test_version_and_info_do_not_import_torch(tiny_artifact):
    proc = _cli_modules("--version")
    assert proc.stdout.startswith(f"gmorph-tvm {gmorph_tvm.__version__}"), proc.stderr
    assert proc.stdout.splitlines()[-1] == "no torch 0", proc.stdout
    proc = _cli_modules("info", str(tiny_artifact))
    assert "input     x: float32[1, 4]" in proc.stdout, proc.stderr
    assert proc.stdout.splitlines()[-1] == "no torch 0", proc.stdout
    # The control: a command that does need the frontend is seen loading torch.
    proc = _cli_modules("build", "/nonexistent/model.onnx", "-o", "/nonexistent/out.so")
    assert proc.stdout.splitlines()[-1] == "torch loaded 1", proc.stdout + proc.stderr[-2000:]
