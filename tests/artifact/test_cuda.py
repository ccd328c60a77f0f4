"""CUDA and Jetson artifacts carry compiled device code (fatbin with SASS) for the requested sm_XX.

Built here without a GPU: nvcc needs none. Running them needs one (``gpu`` marker).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fake_libcuda

import gmorph_tvm
from gmorph_tvm.artifact import build, describe_device_code, manifest_path_for
from gmorph_tvm.core import cuda as cuda_code
from gmorph_tvm.errors import BuildError

needs_nvcc = pytest.mark.skipif(cuda_code.find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed")
pytestmark = needs_nvcc


@pytest.fixture(scope="module")
def cuda_artifact(multimodel):
    return build(multimodel, "cuda")


@pytest.fixture(scope="module")
def orin_artifact(multimodel):
    return build(multimodel, "jetson-orin")


def _elf_machine_and_class(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF"
    return struct.unpack_from("<H", head, 18)[0], head[4]


def test_cuda_so_holds_sm90_fatbin(cuda_artifact, tmp_path):
    path = cuda_artifact.export(tmp_path / "gpu.so")
    code = describe_device_code(path)
    assert code == {"sass": ["sm_90"], "ptx": ["compute_90"]}
    native = {"x86_64": cuda_code.EM_X86_64, "aarch64": cuda_code.EM_AARCH64}.get(platform.machine())
    if native is not None:
        assert _elf_machine_and_class(path) == (native, 2)
    manifest = cuda_artifact.manifest
    assert manifest["device"] == "cuda"
    release = cuda_code._nvcc_info(cuda_code.find_nvcc())[0]
    assert manifest["cuda"] == {"arch": "sm_90", "device_code": "fatbin", "toolkit": release,
                                "cuda_min_driver": cuda_code.min_driver_for(release)}
    assert manifest["target"]["arch"] == "sm_90"


def test_jetson_orin_so_is_aarch64_with_sm87_fatbin(orin_artifact, tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ not installed (apt install g++-aarch64-linux-gnu)")
    path = orin_artifact.export(tmp_path / "orin.so")
    assert _elf_machine_and_class(path) == (cuda_code.EM_AARCH64, 2)  # 64-bit ARM
    if shutil.which("file"):
        description = subprocess.run(["file", str(path)], capture_output=True, text=True).stdout
        assert "ARM aarch64" in description and "shared object" in description
    assert describe_device_code(path) == {"sass": ["sm_87"], "ptx": ["compute_87"]}
    manifest = orin_artifact.manifest
    assert manifest["host_triple"] == "aarch64-linux-gnu"
    assert manifest["cuda"]["arch"] == "sm_87"


def test_jetson_orin_tar_needs_no_cross_compiler(orin_artifact, tmp_path):
    path = orin_artifact.export(tmp_path / "orin.tar")
    assert describe_device_code(path)["sass"] == ["sm_87"]
    assert manifest_path_for(path).is_file()


def test_cross_export_without_cross_compiler_is_clear(orin_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("GMORPH_TVM_CROSS_CXX", "no-such-aarch64-g++")
    with pytest.raises(BuildError, match=r"no-such-aarch64-g\+\+.*\.tar"):
        orin_artifact.export(tmp_path / "orin.so")
    assert list(tmp_path.iterdir()) == []


def test_patched_blob_holds_fatbin_module(cuda_artifact):
    import tvm

    blob = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(cuda_artifact.executable.mod).numpy().tobytes())
    _, _, before = cuda_code.parse_library_blob(blob)
    [cuda_before] = [m for m in before if m.kind == "cuda"]
    fmt, _, code = cuda_code.split_cuda_module(cuda_before.payload)
    assert fmt == "cuda" and b"__global__" in code  # what TVM alone would ship: CUDA source

    patched, count = cuda_code.patch_library_blob(blob, cuda_artifact._fatbins)
    assert count == 1
    indptr, children, modules = cuda_code.parse_library_blob(patched)
    assert [m.kind for m in modules] == [m.kind for m in before]
    [cuda_after] = [m for m in modules if m.kind == "cuda"]
    fmt, fmap, code = cuda_code.split_cuda_module(cuda_after.payload)
    assert fmt == "fatbin"
    assert [img for img in cuda_code.fatbin_images(code) if img.kind == "elf"] == [cuda_code.DeviceImage("elf", 90)]
    # Re-serializing the parsed blob gives back the same bytes.
    assert cuda_code.serialize_library_blob(indptr, children, modules) == patched


def test_blob_without_fatbin_is_refused(cuda_artifact):
    import tvm

    blob = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(cuda_artifact.executable.mod).numpy().tobytes())
    with pytest.raises(BuildError, match="no compiled fatbin"):
        cuda_code.patch_library_blob(blob, {})


needs_legacy_ptxas = pytest.mark.skipif(
    cuda_code.find_legacy_ptxas() is None, reason="no ptxas for sm_53/sm_72 (pip install nvidia-cuda-nvcc-cu11)"
)


def _nvcc_drops(sm: int) -> None:
    release, supported = cuda_code._nvcc_info(cuda_code.find_nvcc())
    if sm in supported:
        pytest.skip(f"nvcc {release} still supports sm_{sm}: no PTX route needed")


@needs_legacy_ptxas
@pytest.mark.parametrize("preset,sm", [("jetson-nano", 53), ("jetson-xavier", 72)])
def test_jetson_arch_dropped_by_nvcc_gets_a_cubin(multimodel, preset, sm, tmp_path):
    _nvcc_drops(sm)
    artifact = build(multimodel, preset)
    ptxas_release = cuda_code.tool_release(cuda_code.find_legacy_ptxas())
    assert artifact.manifest["cuda"] == {"arch": f"sm_{sm}", "device_code": "cubin", "toolkit": ptxas_release,
                                         "cuda_min_driver": cuda_code.min_driver_for(ptxas_release)}
    if shutil.which("aarch64-linux-gnu-g++") is None:
        path = artifact.export(tmp_path / f"{preset}.tar")
    else:
        path = artifact.export(tmp_path / f"{preset}.so")
        assert _elf_machine_and_class(path) == (cuda_code.EM_AARCH64, 2)
    # SASS for exactly this SM, no CUDA source and no PTX left to compile on the board.
    assert describe_device_code(path) == {"sass": [f"sm_{sm}"], "ptx": []}
    assert b"__global__" not in Path(path).read_bytes()


_NANOSLEEP = 'extern "C" __global__ void k(float* a) { __nanosleep(100); a[threadIdx.x] += 1.0f; }\n'


@needs_legacy_ptxas
def test_ptx_route_refuses_instructions_the_arch_lacks():
    _nvcc_drops(53)
    # nanosleep exists from sm_70: ptxas must refuse it for sm_53 and accept it for sm_72.
    with pytest.raises(BuildError, match=r"ptxas .* failed to assemble the kernels for sm_53: .*nanosleep"):
        cuda_code.compile_kernels(_NANOSLEEP, "sm_53")
    assert cuda_code.cubin_sm(cuda_code.compile_kernels(_NANOSLEEP, "sm_72")) == 72


@pytest.mark.parametrize("preset,sm", [("jetson-nano", 53), ("jetson-xavier", 72)])
def test_arch_unsupported_by_any_toolchain_is_a_clear_error(multimodel, preset, sm, monkeypatch, tmp_path):
    _nvcc_drops(sm)
    release = cuda_code._nvcc_info(cuda_code.find_nvcc())[0]
    monkeypatch.setenv("GMORPH_TVM_PTXAS", str(tmp_path / "ptxas"))  # absent
    with pytest.raises(BuildError) as info:
        build(multimodel, preset)
    message = str(info.value)
    assert f"sm_{sm}" in message and f"nvcc {release}" in message and "12.x" in message
    assert "GMORPH_TVM_NVCC" in message and "nvidia-cuda-nvcc-cu11" in message


def test_missing_nvcc_is_a_clear_error(multimodel, monkeypatch, tmp_path):
    monkeypatch.setenv("GMORPH_TVM_NVCC", str(tmp_path / "nvcc"))
    with pytest.raises(BuildError, match="needs nvcc"):
        build(multimodel, "cuda")


def test_fatbin_and_cubin_parsers(tmp_path):
    (tmp_path / "k.cu").write_text('extern "C" __global__ void k(float* a) { a[threadIdx.x] += 1.0f; }\n')
    fatbin = cuda_code.compile_fatbin((tmp_path / "k.cu").read_text(), "sm_87")
    assert cuda_code.fatbin_images(fatbin) == [cuda_code.DeviceImage("elf", 87), cuda_code.DeviceImage("ptx", 87)]
    nvcc = cuda_code.find_nvcc()
    subprocess.run([nvcc, "--cubin", "-arch", "sm_80", "-o", str(tmp_path / "k.cubin"), str(tmp_path / "k.cu")], check=True)
    assert cuda_code.cubin_sm((tmp_path / "k.cubin").read_bytes()) == 80
    assert cuda_code.cubin_sm(b"\x7fELF" + b"\0" * 60) is None
    with pytest.raises(BuildError, match="nvcc failed"):
        cuda_code.compile_fatbin("this is not CUDA", "sm_87")


def _first_kernel_name(artifact) -> str:
    stack = [artifact.executable.mod]
    while stack:
        module = stack.pop()
        stack.extend(module.imports)
        if module.kind == "cuda":
            source = str(module.inspect_source("cuda"))
            return re.search(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", source).group(1)
    raise AssertionError("no CUDA module")


def test_tvm_cuda_runtime_loads_fatbin_without_jit(cuda_artifact, tmp_path):
    """TVM's real CUDA module loader (libtvm_runtime_cuda, run against a fake driver) accepts
    our library and finds the kernels, with the JIT compile callback made to fail."""
    import tvm

    if not (Path(tvm.libinfo.find_libtvm_runtime()).parent / "libtvm_runtime_cuda.so").is_file():
        pytest.skip("this TVM wheel has no CUDA runtime library")
    if fake_libcuda(tmp_path) is None:
        pytest.skip("no C compiler for the fake CUDA driver")
    ours = cuda_artifact.export(tmp_path / "ours.so")
    tvm_default = tmp_path / "tvm_default.so"
    cuda_artifact.executable.export_library(str(tvm_default))  # TVM's own export: CUDA source
    kernel = _first_kernel_name(cuda_artifact)
    script = textwrap.dedent(
        """
        import sys, tvm, tvm_ffi
        assert tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None
        def no_jit(code, *args):
            raise RuntimeError("JIT compile requested")
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", no_jit, override=True)
        kernel = sys.argv[1]
        for path in sys.argv[2:]:
            try:
                lib = tvm.runtime.load_module(path)
            except Exception as err:
                print(path, "LOAD FAILED:", str(err).splitlines()[-1])
                continue
            stack, found = [lib], None
            while stack:
                m = stack.pop(); stack.extend(m.imports)
                if m.kind == "cuda": found = m
            print(path, "kernel found:", found.get_function(kernel) is not None)
        """
    )
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script, kernel, str(ours), str(tvm_default)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(str(tmp_path)))
    assert lines[str(ours)] == "kernel found: True"
    # The control: TVM's own export ships CUDA source, which needs the JIT compiler on load.
    assert "JIT compile requested" in lines[str(tvm_default)]


def test_build_where_the_cuda_runtime_is_present(tmp_path):
    """With a CUDA driver present, TVM compiles kernels during codegen through
    tvm_callback_cuda_compile; build() routes that to nvcc for the target arch, and the exported
    library again holds a fatbin for it. (Simulated with the stand-in driver.)"""
    import tvm

    if not (Path(tvm.libinfo.find_libtvm_runtime()).parent / "libtvm_runtime_cuda.so").is_file():
        pytest.skip("this TVM wheel has no CUDA runtime library")
    if fake_libcuda(tmp_path) is None:
        pytest.skip("no C compiler for the fake CUDA driver")
    script = textwrap.dedent(
        """
        import sys, numpy as np, tvm
        from tvm import relax
        from gmorph_tvm.artifact import build, describe_device_code
        from gmorph_tvm.core import cuda as cc
        assert tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((4, 8), "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.nn.relu(relax.op.matmul(x, relax.const(np.ones((8, 3), "float32")))))
            bb.emit_func_output(y)
        art = build(bb.get(), "cuda:sm_80")
        assert art._fatbins == {}  # compiled during codegen, not afterwards
        blob = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(art.executable.mod).numpy().tobytes())
        [fmt] = [cc.split_cuda_module(m.payload)[0] for m in cc.parse_library_blob(blob)[2] if m.kind == "cuda"]
        print("fmt", fmt)
        print("code", describe_device_code(art.export(sys.argv[1])))
        """
    )
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.so")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "fmt cubin" in proc.stdout  # TVM tags JIT output "cubin"; its bytes are our fatbin
    assert "code {'sass': ['sm_80'], 'ptx': ['compute_80']}" in proc.stdout


@pytest.mark.gpu
def test_cuda_artifact_matches_torch_on_gpu(cuda_artifact, models, x, tmp_path):
    import tvm

    if not tvm.cuda().exist:
        pytest.skip("no CUDA GPU")
    from gmorph_tvm.runtime import load

    # Build for the GPU that is here, so the SASS matches it.
    arch = "sm_" + tvm.cuda().compute_version.replace(".", "")
    art = build(gmorph_tvm.import_models(models, example_inputs=x), f"cuda:{arch}")
    out = load(art.export(tmp_path / "gpu.so"), device="cuda")(x.numpy())
    with torch.no_grad():
        for name, model in models.items():
            np.testing.assert_allclose(out[name], model(x).numpy(), rtol=1e-4, atol=1e-4)
