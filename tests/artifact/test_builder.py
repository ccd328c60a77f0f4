"""build() -> Artifact -> export -> load, on the CPU (llvm)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinyCNN
from torch import nn

import gmorph_tvm
from gmorph_tvm.artifact import Artifact, build, manifest_path_for, resolve_target
from gmorph_tvm.core.manifest import encode_signature
from gmorph_tvm.errors import BuildError, TargetError
from gmorph_tvm.tuning.shipped import lookup as lookup_shipped


@pytest.fixture(scope="module")
def artifact(multimodel) -> Artifact:
    return build(multimodel, "llvm")


@pytest.fixture(scope="module")
def exported(artifact, tmp_path_factory) -> Path:
    return artifact.export(tmp_path_factory.mktemp("llvm") / "two_cnns.so")


def _torch_outputs(models, x):
    with torch.no_grad():
        return {name: m(x).numpy() for name, m in models.items()}


def test_artifact_runs_in_process(artifact, models, x):
    out = artifact.run({"x": x.numpy()})
    ref = _torch_outputs(models, x)
    assert list(out) == ["shape", "color"]
    for task in ref:
        np.testing.assert_allclose(out[task], ref[task], rtol=1e-5, atol=1e-5)


def test_exported_library_matches_torch_in_fresh_process(exported, models, x, tmp_path):
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent(
        f"""
        import numpy as np
        from gmorph_tvm.runtime import load
        runner = load({str(exported)!r})
        out = runner({{"x": np.load({str(tmp_path / 'x.npy')!r})}})
        np.savez({str(tmp_path / 'out.npz')!r}, **out)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Scope Loaded" not in proc.stderr  # TVM's debug noise is filtered
    out = np.load(tmp_path / "out.npz")
    ref = _torch_outputs(models, x)
    assert sorted(out.files) == sorted(ref)
    for task in ref:
        np.testing.assert_allclose(out[task], ref[task], rtol=1e-5, atol=1e-5)


def test_manifest_content(exported, multimodel):
    manifest_file = manifest_path_for(exported)
    assert manifest_file == exported.with_name("two_cnns.manifest.json")
    manifest = json.loads(manifest_file.read_text())
    assert manifest["format"] == "gmorph-tvm-artifact"
    assert manifest["format_version"] == 2
    assert manifest["library_sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest()
    assert manifest["package_version"] == gmorph_tvm.__version__
    assert manifest["library"] == "two_cnns.so"
    assert manifest["device"] == "cpu"
    assert manifest["target"]["kind"] == "llvm"
    assert manifest["host_triple"].split("-")[0] == os.uname().machine
    assert manifest["inputs"] == [s.to_json() for s in multimodel.inputs]
    assert manifest["tasks"] == [t.to_json() for t in multimodel.tasks]
    assert [o["shape"] for t in manifest["tasks"] for o in t["outputs"]] == [[1, 4], [1, 3]]
    assert "cuda" not in manifest
    assert re.match(r"\d{4}-\d\d-\d\dT", manifest["created"])
    # Two CNNs of 4 parameters each, nothing shared: 8 tensors holding every weight byte, in the
    # weights file beside the library (the default), named after the weights they hold.
    weights = manifest["weights"]
    assert (weights["count"], weights["bytes"], weights["storage"]) == (8, multimodel.weight_bytes, "external")
    assert weights["file"] == "two_cnns.weights.safetensors" and weights["format"] == "safetensors"
    assert weights["size"] == exported.with_name(weights["file"]).stat().st_size
    # Each named after its weight (linear ones transposed), or, once a schedule (a tuned record or
    # the default Conv2D rule) re-laid it out for its kernel, after that kernel's argument.
    names = {t["name"].removesuffix(".T").removesuffix(".OHWI") for t in weights["tensors"]}
    repacked = {n for n in names if re.fullmatch(r"fused_\w+_prepacked\.arg\d+(\.\d+)?", n)}
    assert names - repacked <= set(multimodel.params) and len(names) == 8
    assert {n for n in multimodel.params if n.endswith("conv.weight")} == set(multimodel.params) - names
    assert manifest["entries"][0]["function"] == "main"
    assert sorted(manifest["entries"][0]["weights"]) == sorted(t["name"] for t in weights["tensors"])
    # Which tuning records were applied: none of the user's, the shipped ones for this host's class.
    shipped_key = lookup_shipped(resolve_target("llvm")).key
    assert {k: manifest["tuning"][k] for k in ("database", "shipped")} == {"database": None, "shipped": shipped_key}


def test_weight_count_matches_vm_constant_pool(multimodel):
    artifact = build(multimodel, "llvm", weights="embedded")
    assert artifact.manifest["weights"]["storage"] == "embedded"
    stats = str(artifact.executable.mod["stats"]())
    pool = re.search(r"Constant pool \(# \d+\): \[(.*)\]\n", stats).group(1)
    pool = re.sub(r'"[^"]*"', "", pool)  # drop string constants (error messages)
    tensors = re.findall(r"(?<!shapetuple)\[[\d, ]+\]", pool)
    signature = f"[{len(encode_signature(artifact.manifest))}]"  # the embedded signature, not a weight
    assert signature in tensors
    tensors.remove(signature)
    assert len(tensors) == artifact.manifest["weights"]["count"]


def _two_matmuls(shared_object: bool):
    import tvm
    from tvm import relax

    w = np.arange(12, dtype="float32").reshape(3, 4)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    c1 = relax.const(w)
    c2 = c1 if shared_object else relax.const(w.copy())
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.matmul(x, c1))
            b = bb.emit(relax.op.nn.relu(relax.op.matmul(x, c2)))
            out = bb.emit_output(relax.Tuple([a, b]))
        bb.emit_func_output(out)
    mod = bb.get()
    assert isinstance(mod, tvm.IRModule)
    return mod, w


@pytest.mark.parametrize("weights", ["external", "embedded"])
@pytest.mark.parametrize("shared_object", [True, False])
def test_bare_irmodule_and_equal_weights_stored_once(shared_object, weights):
    mod, w = _two_matmuls(shared_object)
    art = build(mod, "llvm", name="mm", weights=weights)
    manifest = art.manifest
    assert manifest["name"] == "mm"
    assert [t["name"] for t in manifest["tasks"]] == ["out0", "out1"]
    assert manifest["inputs"] == [{"name": "x", "shape": [2, 3], "dtype": "float32"}]
    # One copy of equal weights, whether or not they are one object (the VM constant pool
    # deduplicates embedded ones; LiftWeights compares external ones by content).
    assert (manifest["weights"]["count"], manifest["weights"]["bytes"]) == (1, w.nbytes)
    x = np.linspace(-1, 1, 6, dtype="float32").reshape(2, 3)
    out = art.run(x)
    np.testing.assert_allclose(out["out0"], x @ w, rtol=1e-6)
    np.testing.assert_allclose(out["out1"], np.maximum(x @ w, 0), rtol=1e-6)


def test_tar_export_loads(artifact, models, x, tmp_path):
    from gmorph_tvm.runtime import load

    path = artifact.export(tmp_path / "cnns.tar")
    assert path.is_file() and (tmp_path / "cnns.manifest.json").is_file()
    out = load(path)(x.numpy())
    ref = _torch_outputs(models, x)
    for task in ref:
        np.testing.assert_allclose(out[task], ref[task], rtol=1e-5, atol=1e-5)


def test_multi_output_task(tmp_path):
    from gmorph_tvm.runtime import load

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.a, self.b = nn.Linear(6, 2), nn.Linear(6, 5)

        def forward(self, v):
            return self.a(v), torch.tanh(self.b(v))

    model = TwoHeads().eval()
    v = torch.randn(3, 6)
    mm = gmorph_tvm.import_models({"heads": model}, example_inputs=v)
    path = build(mm, "llvm").export(tmp_path / "heads.so")
    out = load(path)(v.numpy())["heads"]
    ref = model(v)
    assert isinstance(out, list) and len(out) == 2
    for got, want in zip(out, ref):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-6)


# ---- errors ------------------------------------------------------------------------------


def test_bad_inputs_to_build():
    with pytest.raises(BuildError, match="MultiModel or a tvm.IRModule"):
        build("model.onnx", "llvm")
    with pytest.raises(TargetError, match="unknown target preset"):
        build(_two_matmuls(True)[0], "tpu")


@pytest.mark.parametrize("triple", ["x86_64-linux-gnu", "aarch64-linux-gnu", "armv7a-linux-gnueabihf", "i686-linux-gnu",
                                    "riscv64-unknown-linux-gnu"])
def test_targets_llvm_knows_are_accepted(triple):
    from gmorph_tvm.core.targets import resolve_target

    assert str(resolve_target({"kind": "llvm", "mtriple": triple}).attrs["mtriple"]) == triple


def test_compile_failure_is_a_clean_build_error():
    """An unknown triple: LLVM only warns, and code generation of a vectorised kernel crashed the
    process (SIGSEGV) once default schedules vectorised every kernel; now refused up front."""
    with pytest.raises(BuildError) as info:
        build(_two_matmuls(True)[0], {"kind": "llvm", "mtriple": "nonsense-foo-bar"})
    message = str(info.value)
    assert "nonsense-foo-bar" in message and "\n" not in message
    assert "Traceback" not in message


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.fc = nn.Linear(3 * 16 * 16, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_errors_name_the_op_or_kernel_and_its_task(monkeypatch, x):
    """A failure inside TVM is reported with the op/kernel it mentions and the tasks using it."""
    import tvm

    mm = gmorph_tvm.import_models({"shape": TinyCNN(4, 0).eval(), "flat": Flat().eval()}, example_inputs=x)
    import gmorph_tvm.tuning as tuning
    from gmorph_tvm.tuning.pipeline import Pipeline

    real_lower, real_run_entries = tuning.lower, Pipeline.run_entries

    def failing_lower(self, entries):
        raise tvm.error.InternalError("Check failed: (ok) is false: cannot legalize relax.nn.conv2d\n  File \"x.cc\"")

    monkeypatch.setattr(Pipeline, "run_entries", failing_lower)
    with pytest.raises(BuildError) as info:
        build(mm, "llvm")
    assert str(info.value) == (
        "lowering for llvm failed in op relax.nn.conv2d (task 'shape'): "
        "Check failed: (ok) is false: cannot legalize relax.nn.conv2d"
    )

    monkeypatch.setattr(Pipeline, "run_entries", real_run_entries)
    target = tvm.target.Target({"kind": "llvm"})
    kernels = [gv.name_hint for gv in real_lower(mm.bound_module(), target).get_global_vars()]
    conv_kernel = next(k for k in kernels if "conv2d" in k)

    def failing_compile(mod, target=None, **kwargs):
        raise RuntimeError(f"LLVM codegen failed for {conv_kernel}: out of registers")

    monkeypatch.setattr(tvm, "compile", failing_compile)
    with pytest.raises(BuildError, match=rf"compiling for llvm failed in kernel '{conv_kernel}' \(task 'shape'\)"):
        build(mm, "llvm")


def test_export_with_failing_linker_leaves_nothing(artifact, tmp_path):
    def broken_linker(output, objects, **kwargs):
        Path(output).write_bytes(b"half a library")  # a partial file, then the failure
        raise RuntimeError("linker exploded")

    with pytest.raises(BuildError, match="linker exploded"):
        artifact.export(tmp_path / "m.so", fcompile=broken_linker)
    assert list(tmp_path.iterdir()) == []


def test_export_failure_keeps_previous_artifact(artifact, exported, tmp_path):
    target = tmp_path / "keep.so"
    artifact.export(target)
    before = (target.read_bytes(), manifest_path_for(target).read_text())

    def broken_linker(output, objects, **kwargs):
        raise RuntimeError("no space left")

    with pytest.raises(BuildError):
        artifact.export(target, fcompile=broken_linker)
    assert (target.read_bytes(), manifest_path_for(target).read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.manifest.json", "keep.so", "keep.weights.safetensors"]


def test_export_to_missing_directory_or_bad_suffix(artifact, tmp_path):
    with pytest.raises(BuildError, match="does not exist"):
        artifact.export(tmp_path / "nope" / "m.so")
    with pytest.raises(BuildError, match=r"\.so or \.tar"):
        artifact.export(tmp_path / "m.dll")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_export_to_read_only_directory(artifact, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(BuildError, match="not writable"):
            artifact.export(ro / "m.so")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_run_refuses_artifact_for_another_host(multimodel, x):
    import platform

    from gmorph_tvm.errors import ArtifactError

    other = "x86_64" if platform.machine() == "aarch64" else "aarch64"
    art = build(multimodel, {"kind": "llvm", "mtriple": f"{other}-linux-gnu"})
    assert art.manifest["host_triple"] == f"{other}-linux-gnu"
    with pytest.raises(ArtifactError, match=f"built for a {other} host"):
        art.run(x.numpy())
