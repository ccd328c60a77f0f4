"""TVM's private library-blob layout, which export rewrites to embed compiled CUDA code: these tests
fail loudly when a TVM release changes it (no nvcc or GPU needed: TVM's codegen alone makes the blob)."""

from __future__ import annotations

import re

import pytest
import tvm
from helpers import matmul_relu_module
from tvm import relax

from gmorph_tvm.core import cuda as cuda_code
from gmorph_tvm.errors import BuildError


@pytest.fixture(scope="module")
def cuda_executable():
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}})
    with target:
        mod = relax.backend.cuda.pipeline.get_default_pipeline(target)(matmul_relu_module())
    return tvm.compile(mod, target=target)


def _blob(executable) -> bytes:
    return bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(executable.mod).numpy().tobytes())


def _cuda_modules(root):
    stack, found = [root], []
    while stack:
        module = stack.pop()
        stack.extend(module.imports)
        if module.kind == "cuda":
            found.append(module)
    return found


def test_real_blob_round_trips_byte_identically(cuda_executable):
    blob = _blob(cuda_executable)
    indptr, children, modules = cuda_code.parse_library_blob(blob)
    assert cuda_code.serialize_library_blob(indptr, children, modules) == blob
    kinds = [m.kind for m in modules]
    assert kinds.count("cuda") == 1 and "_lib" in kinds and "relax.VMExecutable" in kinds
    # The CUDA module's fields are where we think: its code is the source TVM itself reports.
    [payload] = [m.payload for m in modules if m.kind == "cuda"]
    fmt, fmap, code = cuda_code.split_cuda_module(payload)
    assert fmt == "cuda"
    assert code.decode() == str(_cuda_modules(cuda_executable.mod)[0].inspect_source("cuda"))
    assert cuda_code.join_cuda_module(fmt, fmap, code) == payload
    kernel = next(iter(_kernel_names(code.decode())))
    assert kernel.encode() in fmap  # the function table names the kernels


def _kernel_names(source: str) -> list[str]:
    return re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", source)


def test_patch_embeds_compiled_code_in_place_of_source(cuda_executable):
    blob = _blob(cuda_executable)
    [source] = [str(m.inspect_source("cuda")) for m in _cuda_modules(cuda_executable.mod)]
    cubin = b"\x7fELF" + bytes(60)  # any bytes: the layout is what is tested
    patched, count = cuda_code.patch_library_blob(blob, {cuda_code.source_key(source): cubin})
    assert count == 1
    _, _, modules = cuda_code.parse_library_blob(patched)
    [payload] = [m.payload for m in modules if m.kind == "cuda"]
    fmt, _, code = cuda_code.split_cuda_module(payload)
    assert (fmt, code) == ("cubin", cubin)
    # The host side and the VM executable are untouched.
    _, _, before = cuda_code.parse_library_blob(blob)
    assert [m for m in modules if m.kind != "cuda"] == [m for m in before if m.kind != "cuda"]


def test_an_altered_layout_is_refused_not_rewritten(cuda_executable):
    blob = _blob(cuda_executable)
    with pytest.raises(BuildError, match="layout"):
        cuda_code.patch_library_blob(blob + b"\0" * 8, {})  # size header no longer matches
    with pytest.raises(BuildError, match="layout"):
        cuda_code.patch_library_blob(blob[:8] + b"\xff" * 16 + blob[24:], {})


def test_version_gate():
    cuda_code.check_library_blob_format()  # the installed, pinned release passes
    cuda_code.check_library_blob_format("0.27.1", "0.1.20")
    for versions in [("0.28.0", "0.1.14.post1"), ("0.27.0.post1", "0.2.0"), ("1.0.0", "1.0.0")]:
        with pytest.raises(BuildError) as info:
            cuda_code.check_library_blob_format(*versions)
        message = str(info.value)
        assert "\n" not in message and f"apache-tvm {versions[0]}" in message and "apache-tvm==0.27.0.post1" in message
