"""Every ```python and ```bash block of README.md runs as written, so the README cannot rot.

Python blocks run in README order in one namespace (later snippets use what earlier ones made,
as a reader's session would), with the names the snippets take as given bound to small real
objects (see :func:`_session`); shell blocks run command by command with ``gmorph-tvm`` on PATH.
Both run in one temporary directory prepared with the files the snippets name.

Two exceptions, both stated in the README: :data:`SCALED` lowers tuning trials and the search
budget so the suite stays fast, and :data:`NOT_RUN` lists the commands that need what CI does not
have (a board, an RPC server, nvcc, the set-up's distro packages), each with its reason. Both
lists are checked against the README, so an entry that no longer matches anything fails.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gmorph_tvm import zoo
from gmorph_tvm.lossy import tasks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# (as written in the README, as run here): what the README's note on its snippets announces.
SCALED = [
    ("trials=200", "trials=1"),  # one trial of the largest kernel: the whole tuning path, seconds
    ("--tune-trials 200", "--tune-trials 1"),
    ("budget=16", "budget=1"),
]

# Shell commands not run here: (regex matched at the start of the command, reason).
NOT_RUN = [
    (r"bash scripts/setup\.sh", "the set-up installs distro packages and the package; CI ran it already"),
    (r"gmorph-tvm bench \S+ --(rpc|tracker) ", "needs a board running a TVM RPC server or tracker"),
    (r"python -m tvm\.exec\.(rpc_server|rpc_tracker|query_rpc_tracker)", "starts or queries RPC servers"),
    (r"gmorph-tvm build .* --target jetson-", "Jetson targets need nvcc (and a cross compiler or CUDA 11.8 ptxas)"),
    (r"cmake ", "builds the native C++ runner (tests/runner builds and tests it)"),
    (r"build/runner/gmorph-run ", "needs the native runner that cmake builds"),
    (r"gmorph-tvm bundle-runtime ", "builds gmorph-run with CMake (tests/runtime/test_bundle.py builds and runs a bundle)"),
    (r"bash bench/gpu_(prepare|check)\.sh ", "minutes of builds, then a GPU (tests/runtime/test_gpu_check.py runs a scaled "
                                             "dry run of both)"),
]

_FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def readme_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, first line number, code)`` of every fenced block."""
    return [(m.group(1), text.count("\n", 0, m.start()) + 2, m.group(2)) for m in _FENCE.finditer(text)]


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    commands, pending = [], ""
    for raw in code.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if not line or line.startswith("#"):
            continue
        commands.append(re.sub(r"\s+#\s.*$", "", line))
    return commands


def scaled(code: str) -> str:
    for written, run in SCALED:
        code = code.replace(written, run)
    return code


def not_run_reason(command: str) -> str | None:
    return next((reason for pattern, reason in NOT_RUN if re.match(pattern, command)), None)


BLOCKS = [b for b in readme_blocks(README.read_text(encoding="utf-8")) if b[0] in ("python", "bash")]


def test_the_readme_has_snippets_and_both_lists_are_current():
    text = README.read_text(encoding="utf-8")
    assert {lang for lang, _, _ in BLOCKS} == {"python", "bash"}
    code = "\n".join(c for _, _, c in BLOCKS)
    for written, _ in SCALED:
        assert written in code, f"SCALED entry {written!r} matches no README snippet: remove it"
    commands = [cmd for lang, _, c in BLOCKS if lang == "bash" for cmd in shell_commands(c)]
    for pattern, reason in NOT_RUN:
        assert any(re.match(pattern, cmd) for cmd in commands), f"NOT_RUN entry {pattern!r} ({reason}) is stale"
    # The README tells its readers about both exceptions.
    assert "tests/test_readme.py" in text and all(w in text for w, _ in SCALED)


def test_shell_command_splitting():
    code = "# set-up\ngmorph-tvm build a.onnx \\\n  -o a.so   # comment\n\ngmorph-tvm info a.so\n"
    assert shell_commands(code) == ["gmorph-tvm build a.onnx    -o a.so", "gmorph-tvm info a.so"]
    assert not_run_reason("gmorph-tvm bench x.so --rpc 1.2.3.4:9090") is not None
    assert not_run_reason("gmorph-tvm bench x.so") is None


def _conv_net(seed: int) -> torch.nn.Module:
    return zoo.make("vgg", in_channels=3, image_size=64, num_classes=4, widths=(4, 8), pool_after=(0, 1), seed=seed)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The working directory and the namespace the snippets start from."""
    cwd = tmp_path_factory.mktemp("readme")
    x = torch.randn(1, 3, 64, 64)
    age_net, gender_net = _conv_net(0), _conv_net(1)
    # The files the snippets and commands name: gender.onnx, age.onnx, gender.pt2, x.npy.
    for name, net in (("gender", gender_net), ("age", age_net)):
        torch.onnx.export(net, (x,), str(cwd / f"{name}.onnx"), dynamo=False, opset_version=17, input_names=["x"])
    torch.export.save(torch.export.export(gender_net, (x,)), str(cwd / "gender.pt2"))
    np.save(cwd / "x.npy", x.numpy())
    # search(models, data): the bundled Fashion-MNIST tasks, tiny models trained for one epoch.
    data = tasks.load_data(train=400, val=150, test=150)
    models = {
        "class10": zoo.make("vgg", in_channels=1, image_size=28, num_classes=10, widths=(8, 16), pool_after=(0, 1)),
        "coarse4": zoo.make("resnet", in_channels=1, image_size=28, num_classes=4, width=4, blocks_per_stage=(1, 1),
                            seed=1),
        "size3": zoo.make("mobilenet", in_channels=1, image_size=28, num_classes=3, width=4,
                          channel_multipliers=(1, 2), strides=(1, 2), expansion=2, seed=2),
    }
    for task, model in models.items():
        tasks.train_model(model, data.train_x, data.train_y[task], epochs=1, batch_size=64, lr=3e-3, seed=0)
    bin_dir = cwd / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "gmorph-tvm"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m gmorph_tvm.cli \"$@\"\n")
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return {"cwd": cwd, "env": env, "namespace": {"age_net": age_net, "models": models, "data": data}}


@pytest.mark.slow
@pytest.mark.parametrize("lang,line,code", BLOCKS, ids=[f"README.md:{line}-{lang}" for lang, line, _ in BLOCKS])
def test_readme_block_runs(session, lang, line, code, monkeypatch):
    monkeypatch.chdir(session["cwd"])
    if lang == "python":
        exec(compile(scaled(code), f"README.md:{line}", "exec"), session["namespace"])  # noqa: S102
        return
    ran = 0
    for command in shell_commands(code):
        if not_run_reason(command) is not None:
            continue
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", scaled(command)], cwd=session["cwd"],
                              env=session["env"], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"README.md:{line}: `{command}` failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        ran += 1
    if ran == 0:
        pytest.skip("every command of this block is in NOT_RUN: " + "; ".join(
            not_run_reason(c) or "" for c in shell_commands(code)))
