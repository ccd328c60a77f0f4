"""lower(): default schedules without a database, CUDA codegen, and clear errors for bad databases."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from gmorph_tvm.errors import TuningError
from gmorph_tvm.tuning import lower, prepare

LLVM = tvm.target.Target({"kind": "llvm", "num-cores": 2})


def _cnn() -> tvm.IRModule:
    """conv-relu -> conv(stride 2)-relu -> global mean -> dense, weights as constants."""
    rng = np.random.default_rng(0)

    def const(*shape):
        return relax.const(rng.standard_normal(shape).astype("float32") * 0.2)

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 16, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, const(8, 3, 3, 3), padding=1)))
            h = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(h, const(16, 8, 3, 3), strides=2, padding=1)))
            h = bb.emit(relax.op.mean(h, axis=[2, 3]))
            out = bb.emit_output(relax.op.add(relax.op.matmul(h, const(16, 4)), const(4)))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target=LLVM), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_lower_without_database_keeps_signature_and_results(relax_runner):
    mod = _cnn()
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype("float32")
    lowered = lower(mod, LLVM)
    assert [p.name for p in lowered["main"].params] == ["x"]
    np.testing.assert_allclose(_run(lowered, x), relax_runner(mod, [x])[0], rtol=1e-5, atol=1e-5)


def test_prepare_marks_weights_layout_free_on_cpu_only():
    cpu = prepare(_cnn(), LLVM)
    convs = [f for gv, f in cpu.functions_items() if "conv2d" in gv.name_hint]
    assert len(convs) == 2
    # conv kernels read (activation, weight constant): only the weight may change layout.
    assert all(list(f.attrs["layout_free_buffers"]) == [1] for f in convs)
    gpu = prepare(_cnn(), tvm.target.Target({"kind": "cuda", "arch": "sm_87"}))
    assert not any(
        f.attrs is not None and "layout_free_buffers" in f.attrs
        for _, f in gpu.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc)
    )


@pytest.mark.parametrize(
    "target",
    [
        {"kind": "cuda", "arch": "sm_87", "host": {"kind": "llvm"}},
        {"kind": "cuda", "arch": "sm_87", "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae"}},
    ],
)
def test_lower_for_cuda_compiles_with_default_gpu_schedules(target):
    target = tvm.target.Target(target)
    lowered = lower(_cnn(), target)
    kernels = [f for _, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels and all(f.attrs is not None and f.attrs.get("tirx.is_scheduled") for f in kernels)
    executable = tvm.compile(lowered, target=target)
    assert executable is not None


def test_missing_database_is_a_tuning_error(tmp_path):
    with pytest.raises(TuningError, match="no tuning database in"):
        lower(_cnn(), LLVM, database_dir=tmp_path / "nowhere")


def test_corrupt_database_is_a_tuning_error(tmp_path):
    (tmp_path / "database_workload.json").write_text('["not a workload"\n')
    (tmp_path / "database_tuning_record.json").write_text("{garbage\n")
    with pytest.raises(TuningError, match="unreadable"):
        lower(_cnn(), LLVM, database_dir=tmp_path)


def _relu6_mobile_block():
    """conv 1x1 + relu6 -> depthwise 3x3 stride 2 + relu6 -> conv 1x1 (an EfficientNet-Lite block)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(8, 24, 1), torch.nn.ReLU6(),
        torch.nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24), torch.nn.ReLU6(),
        torch.nn.Conv2d(24, 16, 1),
    ).eval()


def _prim_names(mod: tvm.IRModule) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


def test_cpu_lowering_is_channels_last_and_keeps_results_and_nan():
    """On CPUs prepare() computes convs NHWC (the ONNX Runtime gap of issue 17); the only
    transposes left are the input's and the output's, relu6 included; results and NaN as PyTorch."""
    import torch

    from gmorph_tvm import build, import_models

    model = _relu6_mobile_block()
    x = torch.randn(1, 8, 12, 12, generator=torch.Generator().manual_seed(1))
    x[0, 3, 5, 7] = float("nan")
    mm = import_models({"t": model}, (x,))
    cpu = prepare(mm.bound_module(), LLVM)
    convs = [cpu[n] for n in _prim_names(cpu) if "conv2d" in n]
    assert len(convs) == 3
    assert all('conv2d_nhwc")' in f.script() for f in convs), _prim_names(cpu)  # group_conv2d_nhwc too
    assert len([n for n in _prim_names(cpu) if "transpose" in n]) == 2, _prim_names(cpu)
    nchw = prepare(mm.bound_module(), LLVM, channels_last=False)
    assert not any("transpose" in n for n in _prim_names(nchw))
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_87"})
    gpu = prepare(mm.bound_module(), cuda)
    assert not any("transpose" in n for n in _prim_names(gpu))
    with pytest.raises(TuningError, match="channels_last applies to CPU targets only"):
        prepare(mm.bound_module(), cuda, channels_last=True)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.isnan(want).any() and not np.isnan(want).all()
    for channels_last in (None, False):
        artifact = build(mm, LLVM, shipped_records=False, channels_last=channels_last)
        assert artifact.manifest["tuning"]["conv_layout"] == ("NCHW" if channels_last is False else "NHWC")
        got = np.asarray(artifact.run(x.numpy())["t"])
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)



def _stamped_database(folder, target: tvm.target.Target):
    """An (empty) tuning database stamped for ``target``, as tune() leaves its work dir."""
    import json

    from gmorph_tvm.core.targets import target_dict
    from gmorph_tvm.tuning.pipeline import DATABASE_FILES
    from gmorph_tvm.tuning.target_key import STAMP_FILE

    folder.mkdir()
    for name in DATABASE_FILES:
        (folder / name).write_text("")
    (folder / STAMP_FILE).write_text(json.dumps(target_dict(target)))
    return folder


@pytest.mark.parametrize("tuned_for", [{"kind": "llvm", "mcpu": "haswell"},
                                       {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78"}])
def test_a_database_tuned_for_another_machine_class_is_refused_at_build(tmp_path, tuned_for):
    """It used to be applied silently (the stamp was checked when tuning only)."""
    db = _stamped_database(tmp_path / "db", tvm.target.Target(tuned_for))
    build_for = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    with pytest.raises(TuningError, match=r"was tuned for (x86_64-avx2|aarch64-\w+) .* not for this build's x86_64-avx512"):
        lower(_cnn(), build_for, database_dir=db, shipped_records=False)


def test_a_database_tuned_on_another_cpu_of_the_same_class_applies(tmp_path):
    db = _stamped_database(tmp_path / "db", tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
    lowered = lower(_cnn(), tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}), database_dir=db, shipped_records=False)
    assert "main" in [gv.name_hint for gv in lowered.get_global_vars()]


def test_a_new_empty_database_folder_builds_with_default_schedules(tmp_path):
    (tmp_path / "new").mkdir()
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype("float32")
    want = _run(lower(_cnn(), LLVM, shipped_records=False), x)
    np.testing.assert_array_equal(_run(lower(_cnn(), LLVM, database_dir=tmp_path / "new", shipped_records=False), x), want)
