"""One loaded Runner shared by threads; rebuilds at the same path; manifest/library integrity."""

from __future__ import annotations

import gc
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from helpers import copy_artifact
from torch import nn

import gmorph_tvm
from gmorph_tvm.artifact import build, manifest_path_for
from gmorph_tvm.benchmark import tvm_sampler
from gmorph_tvm.core.manifest import FORMAT_VERSION
from gmorph_tvm.core.vm import split_outputs
from gmorph_tvm.errors import ArtifactError
from gmorph_tvm.runtime import load

X = np.random.default_rng(0).standard_normal((1, 16)).astype("float32")


def _mlp(seed: int, width: int = 64, out: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, out)).eval()


def _export(models: dict[str, nn.Module], path: Path) -> Path:
    mm = gmorph_tvm.import_models(models, example_inputs=torch.from_numpy(X))
    return build(mm, "llvm").export(path)


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory) -> Path:
    return _export({"a": _mlp(0), "b": _mlp(1, out=3)}, tmp_path_factory.mktemp("shared") / "ab.so")


@pytest.fixture(scope="module")
def same_signature(tmp_path_factory) -> Path:
    """Same tasks, names and shapes as ``two_tasks``, other weights (so another library)."""
    return _export({"a": _mlp(5), "b": _mlp(6, out=3)}, tmp_path_factory.mktemp("other") / "ab.so")


def test_one_runner_many_threads_gives_single_thread_results(two_tasks):
    runner = load(two_tasks)
    inputs = [np.random.default_rng(i).standard_normal((1, 16)).astype("float32") for i in range(8)]
    expected = [runner(x) for x in inputs]
    failures: list[str] = []

    def work(i: int) -> None:
        try:
            for _ in range(100):
                got = runner(inputs[i])
                if not all(np.array_equal(got[t], expected[i][t]) for t in ("a", "b")):
                    failures.append(f"thread {i}: wrong values")
        except Exception as err:  # noqa: BLE001 - report any failure of a thread
            failures.append(f"thread {i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


def test_threads_share_the_weights(tmp_path):
    """8 threads' VMs over one module hold one copy of a 16 MB weight, not 8."""
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(16, 4096), nn.ReLU(), nn.Linear(4096, 1024)).eval()  # ~16.5 MB
    runner = load(_export({"big": big}, tmp_path / "big.so"))
    runner(X)
    before = _rss_mb()
    results = []
    threads = [threading.Thread(target=lambda: results.append(runner(X)["big"])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    grown = _rss_mb() - before
    assert len(results) == 8 and all(np.array_equal(r, results[0]) for r in results)
    assert grown < 16, f"RSS grew {grown:.1f} MB for 8 threads: weights copied per thread?"


def test_rebuild_at_the_same_path_runs_the_new_code(tmp_path):
    path = tmp_path / "re.so"
    first = _mlp(1)
    _export({"t": first}, path)
    runner = load(path)
    with torch.no_grad():
        np.testing.assert_allclose(runner(X)["t"], first(torch.from_numpy(X)).numpy(), rtol=1e-5, atol=1e-6)
    del runner
    gc.collect()
    second = _mlp(2)
    _export({"t": second}, path)
    with torch.no_grad():
        np.testing.assert_allclose(load(path)(X)["t"], second(torch.from_numpy(X)).numpy(), rtol=1e-5, atol=1e-6)


# ---- the manifest is checked against its library ------------------------------------------


@pytest.fixture
def copy(two_tasks, tmp_path) -> Path:
    return copy_artifact(two_tasks, tmp_path)


def _edit(library: Path, change) -> None:
    path = manifest_path_for(library)
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_records_sha256_and_output_specs(two_tasks):
    manifest = json.loads(manifest_path_for(two_tasks).read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 2
    assert len(manifest["library_sha256"]) == 64
    assert [[o["shape"], o["dtype"]] for t in manifest["tasks"] for o in t["outputs"]] == [
        [[1, 4], "float32"], [[1, 3], "float32"]]


def test_library_from_another_build_is_refused(copy, same_signature):
    shutil.copy(same_signature, copy)  # same signature, other weights
    with pytest.raises(ArtifactError, match=r"library .*ab\.so \(sha256 .*\) is not the one manifest .*ab\.manifest\.json"):
        load(copy)


def _reverse_tasks(m):
    m["tasks"].reverse()


def _other_output_shape(m):
    m["tasks"][0]["outputs"][0]["shape"] = [1, 5]


def _extra_input(m):
    m["inputs"].append({"name": "y", "shape": [1, 2], "dtype": "float32"})


def _renamed_task(m):
    m["tasks"][1]["name"] = "c"


@pytest.mark.parametrize("change,pattern", [
    (_reverse_tasks, r"lists tasks \['b', 'a'\], the library computes \['a', 'b'\]"),
    (_other_output_shape, r"task 'a': the manifest lists outputs a: float32\[1, 5\], the library returns a: float32\[1, 4\]"),
    (_extra_input, r"the manifest lists inputs input: float32\[1, 16\], y: float32\[1, 2\], the library reads input"),
    (_renamed_task, r"lists tasks \['a', 'c'\]"),
])
def test_manifest_edits_are_refused_naming_both_files(copy, change, pattern):
    _edit(copy, change)
    with pytest.raises(ArtifactError, match=pattern) as info:
        load(copy)
    message = str(info.value)
    assert "ab.manifest.json" in message and "ab.so" in message and "\n" not in message


def test_version_1_manifest_is_refused_clearly(copy):
    _edit(copy, lambda m: m.update(format_version=1))
    with pytest.raises(ArtifactError, match=r"format_version 1 .*rebuild"):
        load(copy)


def test_outputs_are_checked_against_the_manifest(two_tasks):
    runner = load(two_tasks)
    result = runner.vm["main"](tvm.runtime.tensor(X), *runner.weight_args("main"))
    manifest = runner.manifest
    manifest["tasks"][1]["outputs"][0]["dtype"] = "float16"
    with pytest.raises(ArtifactError, match=r"output 'b' of task 'b' is float32\[1, 3\] but its manifest says float16\[1, 3\]"):
        split_outputs(manifest, result, "ab.so")


def test_weight_args_let_callers_drive_the_vm_and_the_benchmark(two_tasks):
    """External weights follow the inputs of ``main``; the benchmark's sampler passes them."""
    runner = load(two_tasks)
    assert len(runner.weight_args("main")) == len(runner.manifest["entries"][0]["weights"]) == 8
    direct = runner.vm["main"](tvm.runtime.tensor(X), *runner.weight_args("main"))
    np.testing.assert_array_equal(direct[0].numpy(), runner(X)["a"])
    with pytest.raises(ArtifactError, match=r"no entry point 'main_b1'"):
        runner.weight_args("main_b1")
    sample = tvm_sampler([runner], {"input": X}, min_time_s=0.001)
    assert 0 < sample() < 1.0
