"""Export is atomic across library + manifest; SIGTERM and Ctrl-C leave nothing behind / one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gmorph_tvm
from gmorph_tvm.artifact import build, manifest_path_for
from gmorph_tvm.errors import ArtifactError, BuildError
from gmorph_tvm.runtime import load

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


# ---- across processes: racing exporters, SIGKILL mid-commit, stale private copies (issue 28) ----

# A child that builds the Linear model of seed argv[2] and exports it to argv[1]. Every rename
# into the output folder is reported ("renamed NAME") and, from the PAUSE-th on, followed by a
# sleep, so the parent can kill it right there (monkeypatched os.replace: no hook in the code).
_CHILD = textwrap.dedent("""
    import os, sys, time
    out = os.path.dirname(os.path.abspath(sys.argv[1]))
    pause, nap, rounds = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    real_replace, count = os.replace, [0]
    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if os.path.dirname(os.path.abspath(dst)) == out and not os.path.basename(dst).startswith("."):
            count[0] += 1
            print("renamed", os.path.basename(dst), flush=True)
            if count[0] == pause:
                time.sleep(3600)
            time.sleep(nap)
    os.replace = replace
    import numpy as np, torch
    from torch import nn
    import gmorph_tvm
    from gmorph_tvm.artifact import build
    from gmorph_tvm.runtime import load
    torch.manual_seed(int(sys.argv[2]))
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    art = build(gmorph_tvm.import_models({"t": model}, example_inputs=torch.zeros(1, 8)), "llvm")
    x = np.ones((1, 8), np.float32)
    sync = os.environ.get("GMORPH_TEST_BARRIER")
    for round_ in range(rounds):
        if sync:  # both exporters start each round together
            open(os.path.join(sync, f"{round_}-{sys.argv[2]}"), "w").close()
            while len([f for f in os.listdir(sync) if f.startswith(f"{round_}-")]) < 2:
                time.sleep(0.05)
        art.export(sys.argv[1])
        try:
            got = load(sys.argv[1])(x)["t"]
            print("loaded", float(got.sum()), flush=True)
        except Exception as err:
            print("FAILED", type(err).__name__, str(err).splitlines()[0], flush=True)
""")


def _expected_sum(seed: int) -> float:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    with torch.no_grad():
        return float(model(torch.ones(1, 8)).sum())


def _child(script: Path, path: Path, seed: int, pause: int = 0, nap: float = 0.0, rounds: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), str(path), str(seed), str(pause), str(nap), str(rounds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def test_two_exporters_racing_to_one_path_never_mix_builds(tmp_path):
    """Two processes export different builds to one path at the same moments (a barrier before
    each round), every rename slowed down, while this process loads the artifact in a loop:
    every load gets one build or the other, never the library of one with the manifest or weights
    of the other (before the per-folder lock: 'is not the one manifest ... describes'), and every
    export's own load afterwards works."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "GMORPH_TEST_BARRIER": str(tmp_path / "sync")}
    (tmp_path / "sync").mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), str(out / "m.so"), str(seed), "0", "0.4", "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
             for seed in (1, 2)]
    sums, mixed, loads = {_expected_sum(1), _expected_sum(2)}, [], 0
    x = np.ones((1, 8), np.float32)
    while any(p.poll() is None for p in procs):
        try:
            got = float(load(out / "m.so")(x)["t"].sum())
        except ArtifactError as err:
            if "not found" not in str(err):
                mixed.append(str(err))
            continue
        loads += 1
        if not any(abs(got - s) < 1e-4 for s in sums):
            mixed.append(f"output sum {got}")
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr[-3000:]
        loaded = [line for line in stdout.splitlines() if line.startswith(("loaded", "FAILED"))]
        assert len(loaded) == 3 and all(line.startswith("loaded") for line in loaded), stdout
    assert loads > 0 and not mixed, mixed[:3]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".m.export-")]


@pytest.mark.parametrize("killed_after", [1, 2, 3])
def test_sigkill_mid_commit_leaves_the_old_or_the_new_artifact(tmp_path, killed_after):
    """SIGKILL after the library's (1), the weights' (2) or the manifest's (3) rename into place:
    the next load gets the new build (the commit is journalled and finished by load), and no
    staging folder is left (before: the new library with the old manifest, refused by load)."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    out = tmp_path / "out"
    out.mkdir()
    first = _child(script, out / "m.so", 1)
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    proc = _child(script, out / "m.so", 2, pause=killed_after)
    for _ in range(killed_after):
        line = proc.stdout.readline()
        assert line.startswith("renamed"), line + proc.stderr.read()[-3000:]
    proc.kill()
    proc.wait(timeout=60)
    got = float(load(out / "m.so")(np.ones((1, 8), np.float32))["t"].sum())
    assert got == pytest.approx(_expected_sum(2), abs=1e-4)
    assert sorted(p.name for p in out.iterdir()) == ["m.manifest.json", "m.so", "m.weights.safetensors"]


def test_sigkill_before_the_commit_keeps_the_old_artifact_and_no_debris(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_EXPORT)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "child.py").write_text(_CHILD)
    child = _child(tmp_path / "child.py", out / "m.so", 1)
    assert child.wait(timeout=600) == 0, child.stderr.read()[-3000:]
    proc = subprocess.Popen([sys.executable, str(script), str(out / "m.so")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "linking"
    proc.kill()
    proc.wait(timeout=60)
    assert [p.name for p in out.iterdir() if p.name.startswith(".m.export-")]  # the dead exporter's folder
    got = float(load(out / "m.so")(np.ones((1, 8), np.float32))["t"].sum())
    assert got == pytest.approx(_expected_sum(1), abs=1e-4)
    assert sorted(p.name for p in out.iterdir()) == ["m.manifest.json", "m.so", "m.weights.safetensors"]


_LOAD_AND_WAIT = textwrap.dedent("""
    import sys, time
    from gmorph_tvm.runtime import load, loader
    load(sys.argv[1])
    print(loader._COPY_DIR[0], flush=True)
    time.sleep(3600)
""")


def test_private_copies_of_a_killed_process_are_removed_at_the_next_load(tmp_path, artifact):
    """load() copies the library into a per-process temp folder removed at exit; a process killed
    by SIGKILL left it behind for good. The next load (in any process) removes folders whose
    owner is gone, and keeps those of live processes."""
    library = artifact.export(tmp_path / "m.so")
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    alive = subprocess.Popen([sys.executable, "-c", _LOAD_AND_WAIT, str(library)], stdout=subprocess.PIPE, text=True, env=env)
    killed = subprocess.Popen([sys.executable, "-c", _LOAD_AND_WAIT, str(library)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        alive_dir, killed_dir = Path(alive.stdout.readline().strip()), Path(killed.stdout.readline().strip())
        assert alive_dir.is_dir() and killed_dir.is_dir()
        killed.kill()
        killed.wait(timeout=60)
        assert killed_dir.is_dir()  # no atexit after SIGKILL
        subprocess.run([sys.executable, "-c", f"from gmorph_tvm.runtime import load; load({str(library)!r})"],
                       check=True, env=env, timeout=300)
        assert not killed_dir.exists()
        assert alive_dir.is_dir()
    finally:
        alive.kill()
        killed.kill()
