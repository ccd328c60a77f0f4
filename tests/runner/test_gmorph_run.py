"""The native runner (runner/ + CMakeLists.txt): configure, build, run, compare with Python."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import copy_artifact, fake_libcuda
from torch import nn

import gmorph_tvm
from gmorph_tvm.artifact import build, manifest_path_for
from gmorph_tvm.core.manifest import sha256_of_file
from gmorph_tvm.core.threads import THREAD_ENV, physical_cores
from gmorph_tvm.core.weights_file import weights_path_for
from gmorph_tvm.runtime import load

REPO = Path(__file__).resolve().parents[2]
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or CXX is None, reason="needs cmake and a C++ compiler")


class Net(nn.Module):
    def __init__(self, out: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, out)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def gmorph_run(tmp_path_factory) -> Path:
    build_dir = tmp_path_factory.mktemp("cmake-build")
    configure = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(build_dir), f"-DPython3_EXECUTABLE={sys.executable}",
         f"-DCMAKE_CXX_COMPILER={CXX}", "-DCMAKE_BUILD_TYPE=Release"],
        capture_output=True, text=True, timeout=300,
    )
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compile_ = subprocess.run(["cmake", "--build", str(build_dir), "-j2"], capture_output=True, text=True, timeout=600)
    assert compile_.returncode == 0, compile_.stdout[-3000:] + compile_.stderr[-3000:]
    binary = build_dir / "gmorph-run"
    assert binary.is_file()
    return binary


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((1, 3, 12, 12)).astype("float32"))
    mm = gmorph_tvm.import_models({"cls": Net(5, 0).eval(), "aux": Net(2, 1).eval()}, example_inputs=x)
    directory = tmp_path_factory.mktemp("art")
    path = build(mm, "llvm").export(directory / "nets.so")
    np.save(directory / "x.npy", x.numpy())
    return path, directory / "x.npy"


def _run(binary: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=300, env=env)


def test_native_runner_matches_python(gmorph_run, artifact, tmp_path):
    library, x_file = artifact
    no_thread_setting = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}  # as a user's shell
    proc = _run(gmorph_run, str(library), "--input", f"x={x_file}", "--repeat", "5", "--save-outputs", str(tmp_path),
                env=no_thread_setting)
    assert proc.returncode == 0, proc.stderr
    assert "Scope Loaded" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("cls: float32[1, 5] first [") and lines[1].startswith("aux: float32[1, 2] first [")
    assert lines[2].startswith("latency: median ") and "over 5 runs on cpu:0" in lines[2]
    # TVM alone would use hardware_concurrency() / 2 threads on x86: one per physical core instead.
    assert lines[2].endswith(f", {physical_cores()} CPU threads"), lines[2]
    rss = re.fullmatch(r"memory: host peak RSS (\S+) MiB", lines[3])
    assert rss and 1 < float(rss.group(1)) < 4096, lines[3]

    expected = load(library)(np.load(x_file))
    for task in ("cls", "aux"):
        native = np.load(tmp_path / f"{task}.npy")
        assert native.dtype == expected[task].dtype and native.shape == expected[task].shape
        np.testing.assert_allclose(native, expected[task], rtol=1e-5, atol=1e-5)
        printed = re.search(rf"^{task}: .* sum (\S+)$", proc.stdout, re.M).group(1)
        assert float(printed) == pytest.approx(float(expected[task].sum()), rel=1e-4, abs=1e-5)


def test_native_runner_positional_input(gmorph_run, artifact):
    library, x_file = artifact
    proc = _run(gmorph_run, str(library), "--input", str(x_file), "--repeat", "1")
    assert proc.returncode == 0, proc.stderr


def test_native_runner_rejects_bad_inputs(gmorph_run, artifact, tmp_path):
    library, x_file = artifact
    np.save(tmp_path / "small.npy", np.zeros((1, 3, 8, 8), "float32"))
    np.save(tmp_path / "f64.npy", np.zeros((1, 3, 12, 12), "float64"))
    proc = _run(gmorph_run, str(library), "--input", f"x={tmp_path / 'small.npy'}")
    assert proc.returncode == 2 and "input 'x': expected shape [1, 3, 12, 12], given [1, 3, 8, 8]" in proc.stderr
    proc = _run(gmorph_run, str(library), "--input", f"x={tmp_path / 'f64.npy'}")
    assert proc.returncode == 2 and "input 'x': expected dtype float32, given float64" in proc.stderr
    proc = _run(gmorph_run, str(library), "--input", f"y={x_file}")
    assert proc.returncode == 2 and "unknown input 'y'" in proc.stderr
    proc = _run(gmorph_run, str(library))
    assert proc.returncode == 2 and "missing input 'x'" in proc.stderr
    proc = _run(gmorph_run, str(library), "--input", f"x={x_file}", "--device", "cuda")
    assert proc.returncode == 1 and "was built for cpu" in proc.stderr


def test_native_runner_reports_manifest_problems(gmorph_run, artifact, tmp_path):
    library, x_file = artifact
    copy = tmp_path / "nets.so"
    shutil.copy(library, copy)
    proc = _run(gmorph_run, str(copy), "--input", f"x={x_file}")
    assert proc.returncode == 1 and "nets.manifest.json" in proc.stderr
    (tmp_path / "nets.manifest.json").write_text('{"format": "gmorph-tvm-artifact", ')
    proc = _run(gmorph_run, str(copy), "--input", f"x={x_file}")
    assert proc.returncode == 1 and "invalid JSON" in proc.stderr


def test_native_runner_refuses_an_edited_manifest_naming_both_files(gmorph_run, artifact, tmp_path):
    """Like load(): the library's embedded signature must be what the manifest says."""
    library, x_file = artifact
    copy = copy_artifact(library, tmp_path)
    manifest = json.loads((tmp_path / "nets.manifest.json").read_text())
    manifest["tasks"][1]["name"] = "other"
    (tmp_path / "nets.manifest.json").write_text(json.dumps(manifest))
    proc = _run(gmorph_run, str(copy), "--input", f"x={x_file}")
    assert proc.returncode == 1
    assert (f"manifest {tmp_path / 'nets.manifest.json'} does not describe library {copy}: "
            "manifest.tasks[1].name ('other' in the manifest, 'aux' in the library) differs") in proc.stderr


def test_native_runner_refuses_a_library_the_manifest_does_not_describe(gmorph_run, artifact, tmp_path):
    library, x_file = artifact
    copy = copy_artifact(library, tmp_path)
    with open(copy, "ab") as handle:  # still a loadable library, but not the one built with this manifest
        handle.write(b"\0")
    proc = _run(gmorph_run, str(copy), "--input", f"x={x_file}")
    assert proc.returncode == 1 and f"library {copy} (sha256 " in proc.stderr
    assert "is not the one manifest" in proc.stderr and "nets.manifest.json" in proc.stderr


def test_native_runner_refuses_indices_outside_the_table(gmorph_run, tmp_path):
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(10, 4).eval()
    ids = torch.tensor([[1, 2, 3]])
    library = build(gmorph_tvm.import_models({"e": embedding}, example_inputs=ids), "llvm").export(tmp_path / "e.so")
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    np.save(good, np.array([[0, 9, 4]], np.int64))
    np.save(bad, np.array([[0, 10, 4]], np.int64))
    proc = _run(gmorph_run, str(library), "--input", f"{load(library).input_names[0]}={good}", "--save-outputs", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), embedding(torch.tensor([[0, 9, 4]])).numpy())
    proc = _run(gmorph_run, str(library), "--input", f"{load(library).input_names[0]}={bad}")
    assert proc.returncode == 2
    assert "index 10 at flat position 1 is out of range; it indexes a table of 10 entries (valid" in proc.stderr


def test_native_runner_loads_cuda_fatbin_without_jit(gmorph_run, artifact, tmp_path):
    """With a stand-in CUDA driver, the pure C++ runtime loads our CUDA library (the kernels are
    a fatbin) and only fails where a GPU is needed; TVM's plain export needs a JIT compiler."""
    from gmorph_tvm.core import cuda as cuda_code

    cc = shutil.which("cc") or shutil.which("gcc")
    if cuda_code.find_nvcc() is None or cc is None:
        pytest.skip("needs nvcc and a C compiler")
    import tvm

    if not (Path(tvm.libinfo.find_libtvm_runtime()).parent / "libtvm_runtime_cuda.so").is_file():
        pytest.skip("this TVM wheel has no CUDA runtime library")
    if tvm.cuda().exist:
        pytest.skip("a real GPU is present; test_cuda.py runs the artifact instead")
    fake_libcuda(tmp_path)
    x = torch.from_numpy(np.load(artifact[1]))
    art = build(gmorph_tvm.import_models({"cls": Net(5, 0).eval()}, example_inputs=x), "cuda")
    ours = art.export(tmp_path / "gpu.so")
    plain = tmp_path / "plain.so"
    art.executable.export_library(str(plain))
    manifest = json.loads((tmp_path / "gpu.manifest.json").read_text())
    manifest["library_sha256"] = sha256_of_file(plain)  # the same program, exported TVM's way
    (tmp_path / "plain.manifest.json").write_text(json.dumps(manifest))
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)}
    run = lambda lib: subprocess.run(  # noqa: E731
        [str(gmorph_run), str(lib), "--device", "cuda", "--input", f"x={artifact[1]}"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    proc = run(ours)
    # Loaded; fails only when it allocates memory on the (absent) GPU.
    assert proc.returncode == 1 and "tvm_callback_cuda_compile" not in proc.stderr
    assert "CUDA" in proc.stderr and ("driver" in proc.stderr or "device" in proc.stderr)
    proc = run(plain)
    assert proc.returncode == 1 and "tvm_callback_cuda_compile" in proc.stderr


_FAKE_LIBCUDA = 'extern "C" int cuDriverGetVersion(int* v) { *v = VERSION; return 0; }\n'


def test_native_runner_refuses_a_cuda_driver_older_than_the_code_needs(gmorph_run, tmp_path):
    from gmorph_tvm.core import cuda as cuda_code

    if cuda_code.find_nvcc() is None or not any(
        cuda_code.tool_release(p).startswith("12.") for p in cuda_code.ptxas_candidates()
    ):
        pytest.skip("needs nvcc and a CUDA 12 ptxas (bash scripts/fetch_board_runtime.sh)")
    x = torch.zeros(1, 3, 12, 12)
    mm = gmorph_tvm.import_models({"cls": Net(5, 0).eval()}, example_inputs=x)
    library = build(mm, "jetson-orin:jp6").export(tmp_path / "orin.tar")  # cuda_min_driver 12.0
    np.save(tmp_path / "x.npy", x.numpy())
    # A JetPack 5 driver (CUDA 11.4), faked: a libcuda.so.1 that only answers cuDriverGetVersion.
    fake = tmp_path / "driver"
    fake.mkdir()
    (fake / "cuda.cc").write_text(_FAKE_LIBCUDA.replace("VERSION", "11040"))
    subprocess.run([CXX, "-shared", "-fPIC", "-o", str(fake / "libcuda.so.1"), str(fake / "cuda.cc")], check=True)
    env = dict(os.environ, LD_LIBRARY_PATH=str(fake))
    proc = subprocess.run([str(gmorph_run), str(library), "--input", f"x={tmp_path / 'x.npy'}", "--device", "cuda"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"gmorph-run: {library} needs a CUDA driver >= 12.0, but this driver is CUDA 11.4; "
                                   "rebuild for this board's JetPack (e.g. --target jetson-orin:jp5) or upgrade the driver")


# ---- external weights and batch buckets ------------------------------------------------------


def test_native_runner_embedded_and_external_agree(gmorph_run, artifact, tmp_path):
    """The default artifact maps its weights file; an embedded build gives the same outputs."""
    library, x_file = artifact
    assert weights_path_for(library).is_file()
    mm = gmorph_tvm.import_models({"cls": Net(5, 0).eval(), "aux": Net(2, 1).eval()},
                                  example_inputs=torch.from_numpy(np.load(x_file)))
    embedded = build(mm, "llvm", weights="embedded").export(tmp_path / "one.so")
    outs = {}
    for name, lib in (("external", library), ("embedded", embedded)):
        out_dir = tmp_path / name
        out_dir.mkdir()
        proc = _run(gmorph_run, str(lib), "--input", f"x={x_file}", "--repeat", "1", "--save-outputs", str(out_dir))
        assert proc.returncode == 0, proc.stderr
        outs[name] = {t: np.load(out_dir / f"{t}.npy") for t in ("cls", "aux")}
    for task in ("cls", "aux"):
        np.testing.assert_array_equal(outs["external"][task], outs["embedded"][task])


def test_native_runner_reports_weights_problems(gmorph_run, artifact, tmp_path):
    library, x_file = artifact
    copy = tmp_path / "nets.so"
    for path in (library, manifest_path_for(library), weights_path_for(library)):
        shutil.copy(path, tmp_path / path.name)
    weights = weights_path_for(copy)
    data = weights.read_bytes()
    weights.unlink()
    proc = _run(gmorph_run, str(copy), "--input", f"x={x_file}")
    assert proc.returncode == 1 and re.search(r"weights file .*nets\.weights\.safetensors not found", proc.stderr)
    weights.write_bytes(data[:-64])
    proc = _run(gmorph_run, str(copy), "--input", f"x={x_file}")
    assert proc.returncode == 1 and re.search(r"weights file .*nets\.weights\.safetensors is truncated", proc.stderr)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0x40]))
    proc = _run(gmorph_run, str(copy), "--input", f"x={x_file}")
    assert proc.returncode == 1 and re.search(r"weights file .*nets\.weights\.safetensors is corrupt: sha256", proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = _run(gmorph_run, str(copy), "--input", f"x={x_file}", "--no-verify-weights")
    assert proc.returncode == 0, proc.stderr


def test_native_runner_picks_and_pads_batch_buckets(gmorph_run, tmp_path):
    model = Net(3, 2).eval()
    buckets = {b: gmorph_tvm.import_models({"cls": model}, example_inputs=torch.zeros(b, 3, 12, 12)) for b in (1, 4)}
    library = build(buckets, "llvm").export(tmp_path / "buckets.so")
    x = np.random.default_rng(2).standard_normal((3, 3, 12, 12)).astype("float32")
    np.save(tmp_path / "x3.npy", x)
    proc = _run(gmorph_run, str(library), "--input", f"x={tmp_path / 'x3.npy'}", "--repeat", "1",
                "--save-outputs", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "cls.npy"), ref, rtol=1e-5, atol=1e-5)
    np.save(tmp_path / "x5.npy", np.zeros((5, 3, 12, 12), "float32"))
    proc = _run(gmorph_run, str(library), "--input", f"x={tmp_path / 'x5.npy'}")
    assert proc.returncode == 2 and "batch 5 is not accepted (batch buckets: 1 4" in proc.stderr


def test_native_runner_loads_the_file_it_hashed_not_one_on_the_library_path(gmorph_run, artifact, tmp_path):
    """`gmorph-run nets.so` (the README's form, run in the artifact's folder) hashed ./nets.so but
    dlopen'ed "nets.so" through the library search path: with LD_LIBRARY_PATH holding another
    nets.so, that library's constructor ran. Now the hashed bytes are what is loaded."""
    library, x_file = artifact
    folder = tmp_path / "art"
    folder.mkdir()
    copy = copy_artifact(library, folder)
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "constructor-ran"
    (evil / "evil.cc").write_text(
        '#include <cstdio>\n__attribute__((constructor)) static void ran() { '
        f'std::FILE* f = std::fopen("{marker}", "w"); if (f) std::fclose(f); }}\n')
    subprocess.run([CXX, "-shared", "-fPIC", "-o", str(evil / copy.name), str(evil / "evil.cc")], check=True)
    env = {**os.environ, "LD_LIBRARY_PATH": f"{evil}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    proc = subprocess.run([str(gmorph_run), copy.name, "--input", f"x={x_file}", "--repeat", "1"], cwd=folder,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
