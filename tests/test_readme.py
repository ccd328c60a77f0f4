"""Every ```python and ```bash block of README.md and docs/*.md runs as written, so the docs cannot rot.

Python blocks run in one namespace, README.md first and then the docs pages in name order, each
file top to bottom (later snippets use what earlier ones made, as a reader's session would), with
the names the snippets take as given bound to small real objects (see :func:`session`); shell
blocks run command by command with ``gmorph-tvm`` on PATH. Both run in one temporary directory
prepared with the files the snippets name.

Two exceptions, both stated in the README: :data:`SCALED` lowers tuning trials and the search
budget so the suite stays fast, and :data:`NOT_RUN` lists the commands that need what CI does not
have (a board, an RPC server, nvcc, the set-up's distro packages) or run for minutes (the
benchmarks), each with its reason. Both lists are checked against the files, so an entry that no
longer matches anything fails. Blocks in any other language than ``python``/``bash``/``text``
(``text`` for what is shown, not run) fail, so nothing is skipped silently.

The files are also checked for what a reader follows: every relative link points to a file that
exists (and a ``#fragment`` to a heading of it), every repository path named in code
(``bench/lossless.py``) exists, ``.ci/run`` runs exactly the README's test command, and the README
stays short (:data:`README_MAX_LINES`).
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
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the files whose snippets run, in run order
LINKED = [*DOCS, ROOT / "CHANGELOG.md", ROOT / "tuning" / "records" / "README.md"]  # whose links are checked
README_MAX_LINES = 260

# (as written in the docs, as run here): what the README's note on its snippets announces.
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
    (r"python3 -m venv ", "makes a virtual environment for the set-up, which is not run here either"),
    (r"qemu-aarch64-static ", "runs the aarch64 gmorph-run the cmake line before it builds (tests/runner/test_aarch64_qemu.py)"),
    (r"python bench/", "benchmarks run for minutes to an hour; docs/benchmarks.md has their numbers"),
    (r"gmorph-tvm demo$", "the demo at its full budget takes 1-2 min; tests/test_demo.py runs it on a reduced budget"),
]
RUN_LANGS = ("python", "bash")
SHOWN_LANGS = ("text",)  # blocks shown, not run: a file layout, an output

_FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def code_blocks(text: str) -> list[tuple[str, int, str]]:
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


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# (file, language, first line, code) of every block that runs, in run order
BLOCKS = [(_name(page), lang, line, code) for page in DOCS
          for lang, line, code in code_blocks(page.read_text(encoding="utf-8")) if lang in RUN_LANGS]


def test_the_docs_have_snippets_and_both_lists_are_current():
    assert {lang for _, lang, _, _ in BLOCKS} == set(RUN_LANGS)
    assert len(DOCS) > 1, "docs/*.md is missing"
    code = "\n".join(c for _, _, _, c in BLOCKS)
    for written, _ in SCALED:
        assert written in code, f"SCALED entry {written!r} matches no snippet of README.md or docs/: remove it"
    commands = [cmd for _, lang, _, c in BLOCKS if lang == "bash" for cmd in shell_commands(c)]
    for pattern, reason in NOT_RUN:
        assert any(re.match(pattern, cmd) for cmd in commands), f"NOT_RUN entry {pattern!r} ({reason}) is stale"
    # The README tells its readers about both exceptions.
    text = README.read_text(encoding="utf-8")
    assert "tests/test_readme.py" in text and all(w in text for w, _ in SCALED)


@pytest.mark.parametrize("page", DOCS, ids=_name)
def test_every_block_is_run_or_shown_as_text(page):
    """A block in another language (```sh, or none) would be neither run nor announced as shown."""
    for lang, line, _ in code_blocks(page.read_text(encoding="utf-8")):
        assert lang in RUN_LANGS + SHOWN_LANGS, f"{_name(page)}:{line}: block language {lang!r}: use one of " \
                                                f"{RUN_LANGS + SHOWN_LANGS}"


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_ci_runs_the_readmes_test_command():
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")]
    readme = [cmd for page, lang, _, c in BLOCKS if page == "README.md" and lang == "bash" for cmd in shell_commands(c)]
    assert ci[-1] in readme, f".ci/run runs {ci[-1]!r}, which is not a README command"


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_REPO_PATH = re.compile(r"^(?:gmorph_tvm|passes|tuning|tests|bench|scripts|runner|cmake|docs)/[\w./-]*$")


def _prose(text: str) -> str:
    """``text`` without its fenced blocks and code spans (where brackets are code, not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def heading_anchors(text: str) -> set[str]:
    """The ``#fragment`` of every heading, as GitHub makes them (lower case, punctuation dropped,
    spaces to ``-``, ``-1``, ``-2``, ... for repeats)."""
    anchors: set[str] = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def relative_links(text: str) -> list[str]:
    return [t for t in _LINK.findall(_prose(text)) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_link_checker():
    text = "# A title: `x`\n## A title: x\n```bash\n# not a heading [a](nowhere.md)\n```\n" \
           "[b](docs/p.md#sec) `[c](code.md)` [d](https://example.org) [e](#a-title-x)\n"
    assert relative_links(text) == ["docs/p.md#sec", "#a-title-x"]
    assert heading_anchors(text) == {"a-title-x", "a-title-x-1"}
    assert "2026-12-07--the-readme-split-into-docs" in heading_anchors("## 2026-12-07 — the README split into docs/")


@pytest.mark.parametrize("page", LINKED, ids=_name)
def test_relative_links_point_to_existing_files(page):
    text = page.read_text(encoding="utf-8")
    for target in relative_links(text):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.is_relative_to(ROOT) and file.exists(), f"{_name(page)}: link to {target!r}: no such file"
        if fragment and file.suffix == ".md":
            assert fragment in heading_anchors(file.read_text(encoding="utf-8")), \
                f"{_name(page)}: link to {target!r}: {_name(file)} has no heading #{fragment}"


@pytest.mark.parametrize("page", DOCS, ids=_name)
def test_repository_paths_named_in_code_exist(page):
    """``bench/lossless.py``, ``tests/tuning/test_shipped.py``, ...: a moved or deleted file fails here."""
    text = page.read_text(encoding="utf-8")
    spans = [m.group(0).strip("`") for m in _CODE_SPAN.finditer(_FENCE.sub("", text))]
    spans += [code for _, _, code in code_blocks(text)]
    for span in spans:
        for word in re.split(r"[\s=(),;:'\"]+", span):
            word = word.rstrip(".")
            if _REPO_PATH.match(word):
                assert (ROOT / word).exists(), f"{_name(page)} names {word!r}, which does not exist"


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
@pytest.mark.parametrize("page,lang,line,code", BLOCKS, ids=[f"{page}:{line}-{lang}" for page, lang, line, _ in BLOCKS])
def test_docs_block_runs(session, page, lang, line, code, monkeypatch):
    monkeypatch.chdir(session["cwd"])
    if lang == "python":
        exec(compile(scaled(code), f"{page}:{line}", "exec"), session["namespace"])  # noqa: S102
        return
    ran = 0
    for command in shell_commands(code):
        if not_run_reason(command) is not None:
            continue
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", scaled(command)], cwd=session["cwd"],
                              env=session["env"], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{page}:{line}: `{command}` failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        ran += 1
    if ran == 0:
        pytest.skip("every command of this block is in NOT_RUN: " + "; ".join(
            not_run_reason(c) or "" for c in shell_commands(code)))
