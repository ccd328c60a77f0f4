"""Device code per JetPack: ``jetson-orin:jp6`` & co. pick the ptxas whose SASS the board's driver
loads, the manifest says which CUDA driver the code needs, and the loader refuses an older one.

Tool selection is tested with fake ``ptxas`` scripts (they only answer ``--version``); the real
builds use the CUDA 12.2 ptxas the set-up unpacks into the cache and the CUDA 11.8 one of the
``jetson`` extra, and are skipped (with the reason) where those are missing. No GPU is needed:
the driver version is injected.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from gmorph_tvm import cli
from gmorph_tvm.artifact import build, describe_device_code, resolve_target
from gmorph_tvm.core import cuda as cuda_code
from gmorph_tvm.core.targets import JETPACK_CUDA, jetpack_of, preset_names
from gmorph_tvm.errors import ArtifactError, BuildError, TargetError
from gmorph_tvm.runtime import cuda_driver, load
from gmorph_tvm.runtime.cuda_driver import check_cuda_driver, format_driver_version

needs_nvcc = pytest.mark.skipif(cuda_code.find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed")


def _fake_ptxas(directory: Path, release: str) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ptxas"
    path.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.0'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def _ptxas_of_major(major: int) -> str | None:
    for path in cuda_code.ptxas_candidates():
        if cuda_code.version_tuple(cuda_code.tool_release(path))[0] == major:
            return path
    return None


def test_jetpack_presets_carry_the_choice_through_the_target():
    assert {"jetson-orin:jp6", "jetson-orin:jp5", "jetson-xavier:jp5", "jetson-nano:jp4"} <= set(preset_names())
    target = resolve_target("jetson-orin:jp6")
    assert str(target.attrs["arch"]) == "sm_87" and jetpack_of(target) == "jp6"
    assert jetpack_of(resolve_target(target.export())) == "jp6"  # survives a round trip (tuning, manifest)
    assert jetpack_of(resolve_target("jetson-orin")) is None
    assert JETPACK_CUDA == {"jp4": "10.2", "jp5": "11.4", "jp6": "12.2"}
    with pytest.raises(TargetError, match="jetson-xavier runs JetPack jp5, not 'jp6'"):
        resolve_target("jetson-xavier:jp6")


@pytest.mark.parametrize(
    "release,min_driver,accepted,refused",
    [
        ("13.0", "13.0", ["13.0", "13.1"], ["12.9"]),
        ("12.2", "12.0", ["12.0", "12.6", "13.0"], ["11.8"]),  # minor version compatibility (CUDA 11+)
        ("11.8", "11.0", ["11.4", "12.2"], ["10.2"]),           # JetPack 5's 11.4 loads 11.8 SASS
        ("10.2", "10.2", ["10.2", "11.4"], ["10.0"]),           # before CUDA 11: the release or newer
    ],
)
def test_cuda_compatibility_rules(release, min_driver, accepted, refused):
    assert cuda_code.min_driver_for(release) == min_driver
    assert all(cuda_code.driver_accepts(d, release) for d in accepted)
    assert not any(cuda_code.driver_accepts(d, release) for d in refused)


@needs_nvcc
def test_board_toolchain_is_the_ptxas_of_its_cuda_major(tmp_path, monkeypatch):
    monkeypatch.setenv("GMORPH_TVM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GMORPH_TVM_PTXAS", raising=False)
    twelve_two = _fake_ptxas(tmp_path / "cache/nvcc-cu12/nvidia/cuda_nvcc/bin", "12.2")
    _fake_ptxas(tmp_path / "cache/nvcc-cu12b/nvidia/cuda_nvcc/bin", "12.9")
    eleven = _ptxas_of_major(11)
    nvcc_major = cuda_code.version_tuple(cuda_code._nvcc_info(cuda_code.find_nvcc())[0])[0]
    if nvcc_major != 12:  # nvcc of another major: a JetPack 6 board gets the newest 12.x not above 12.2
        assert cuda_code._device_toolchain("sm_87", "12.2")[1] == twelve_two
        assert cuda_code.device_code_info("sm_87", "12.2") == {
            "device_code": "cubin", "toolkit": "12.2", "cuda_min_driver": "12.0"}
    if eleven is not None and nvcc_major != 11:  # JetPack 5: only newer 11.x exist on pip (11.7, 11.8)
        assert cuda_code._device_toolchain("sm_72", "11.4")[1] == eleven
    # JetPack 4 (CUDA 10.2): no wheel has a 10.x ptxas; one clear line says what to install ...
    with pytest.raises(BuildError, match=r"CUDA 10.2 driver needs sm_53 SASS from a CUDA 10.x ptxas .*GMORPH_TVM_PTXAS"):
        cuda_code._device_toolchain("sm_53", "10.2")
    # ... and a CUDA 10.2 ptxas given by hand is used, with the stricter pre-11 rule.
    monkeypatch.setenv("GMORPH_TVM_PTXAS", _fake_ptxas(tmp_path / "cuda-10.2/bin", "10.2"))
    assert cuda_code.device_code_info("sm_53", "10.2")["cuda_min_driver"] == "10.2"


def test_driver_version_decoding_and_check():
    assert format_driver_version(12020) == "12.2" and format_driver_version(11040) == "11.4"
    assert format_driver_version(10020) == "10.2"
    manifest = {"cuda": {"arch": "sm_87", "toolkit": "12.2", "cuda_min_driver": "12.0"}}
    check_cuda_driver(manifest, "12.2", "m.so")
    check_cuda_driver(manifest, None, "m.so")  # no driver here: the GPU check reports it
    check_cuda_driver({"cuda": {"arch": "sm_87"}}, "10.2", "old.so")  # manifests before the field
    with pytest.raises(ArtifactError) as info:
        check_cuda_driver(manifest, "11.4", "m.so")
    message = str(info.value)
    assert "\n" not in message
    assert "m.so needs a CUDA driver >= 12.0" in message and "CUDA 12.2" in message and "CUDA 11.4" in message


def _real_board_build(multimodel, preset: str, major: int):
    if cuda_code.find_nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) not installed")
    if _ptxas_of_major(major) is None:
        pytest.skip(f"no CUDA {major}.x ptxas here (bash scripts/setup.sh installs it)")
    return build(multimodel, preset)


@pytest.mark.parametrize("preset,sm,major", [("jetson-orin:jp6", 87, 12), ("jetson-xavier:jp5", 72, 11)])
def test_jetpack_build_has_sass_its_driver_loads(multimodel, preset, sm, major, tmp_path, capsys):
    artifact = _real_board_build(multimodel, preset, major)
    cuda = artifact.manifest["cuda"]
    jetpack = preset.split(":")[1]
    assert cuda["jetpack"] == jetpack and cuda["board_cuda"] == JETPACK_CUDA[jetpack]
    assert cuda_code.version_tuple(cuda["toolkit"])[0] == major and cuda["device_code"] == "cubin"
    assert cuda_code.driver_accepts(JETPACK_CUDA[jetpack], cuda["toolkit"])
    path = artifact.export(tmp_path / ("board.so" if shutil.which("aarch64-linux-gnu-g++") else "board.tar"))
    assert describe_device_code(path) == {"sass": [f"sm_{sm}"], "ptx": []}
    assert cli.main(["info", str(path)]) == 0
    assert (f"cuda:     sm_{sm} cubin made by CUDA {cuda['toolkit']}, needs a driver >= {cuda['cuda_min_driver']}, "
            f"for {jetpack} (CUDA {JETPACK_CUDA[jetpack]})") in capsys.readouterr().out


def test_loader_refuses_a_driver_older_than_the_code_needs(multimodel, tmp_path, monkeypatch):
    artifact = _real_board_build(multimodel, "jetson-orin:jp6", 12)
    path = artifact.export(tmp_path / "orin.tar")
    monkeypatch.setattr(cuda_driver, "cuda_driver_version", lambda: "11.4")  # a JetPack 5 board
    monkeypatch.setattr("gmorph_tvm.runtime.loader.cuda_driver_version", lambda: "11.4")
    with pytest.raises(ArtifactError, match=r"needs a CUDA driver >= 12.0 .* this driver is CUDA 11.4"):
        load(path, device="cuda")
    assert os.path.exists(path)
