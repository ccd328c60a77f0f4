"""Export is atomic across library + manifest; SIGTERM and Ctrl-C leave nothing behind / one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import gmorph_tvm
from gmorph_tvm.artifact import build, manifest_path_for
from gmorph_tvm.errors import BuildError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def artifact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU()).eval()
    mm = gmorph_tvm.import_models({"t": model}, example_inputs=torch.zeros(1, 8))
    return build(mm, "llvm")


def test_unwritable_manifest_leaves_no_new_library(artifact, tmp_path):
    path = tmp_path / "m.so"
    (manifest_path_for(path) / "blocker").mkdir(parents=True)  # the manifest path is a directory
    with pytest.raises(BuildError, match=r"cannot write manifest .*m\.manifest\.json.*new library was removed"):
        artifact.export(path)
    assert not path.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.export-")]


def test_unwritable_manifest_restores_the_previous_library(artifact, tmp_path):
    path = tmp_path / "m.so"
    path.write_bytes(b"previous library")
    (manifest_path_for(path) / "blocker").mkdir(parents=True)
    with pytest.raises(BuildError, match=r"cannot write manifest .*previous library was put back"):
        artifact.export(path)
    assert path.read_bytes() == b"previous library"


_SLOW_EXPORT = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    import gmorph_tvm
    from gmorph_tvm.artifact import build
    from tvm.support import cc
    torch.manual_seed(0)
    mm = gmorph_tvm.import_models({"t": nn.Sequential(nn.Linear(8, 4)).eval()}, example_inputs=torch.zeros(1, 8))
    art = build(mm, "llvm")
    def slow(output, objects, options=None):
        print("linking", flush=True)
        time.sleep(60)
        cc.create_shared(output, objects, options)
    slow.output_format = "so"
    art.export(sys.argv[1], fcompile=slow)
""")


def test_sigterm_during_export_leaves_no_hidden_folder(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_EXPORT)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(out / "m.so")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "linking"
    assert [p.name for p in out.iterdir() if p.name.startswith(".m.export-")]  # the staging folder exists now
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(out.iterdir()) == []


def test_ctrl_c_early_prints_one_line(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "import sys, gmorph_tvm.cli as c; print('ready', flush=True); "
                             f"sys.exit(c.main(['build', {str(model)!r}, '-o', {str(tmp_path / 'o.so')!r}]))"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # inside main: importing torch / TVM for the parser and the build
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["gmorph-tvm: interrupted"] or err.strip() == "gmorph-tvm build: interrupted", err
