"""Issue 11: tuned kernels with a zero pad as epilogue left the pad border unwritten.

``data/pad_epilogue_trace.json`` is the best MetaSchedule record (256-trial tuning of the issue's
three fine-tuned EfficientNet-Lite0 models) for the kernel ``conv 1x1 16->96 + bias + relu6 +
ZeroPad2d((0, 1, 0, 1))`` at 112x112: ``reverse_compute_at`` puts the pad block under the conv's
tiles, which cover 112x112 only, so row and column 112 are never stored (a TVM bug in apache-tvm
0.27, same class as apache/tvm#15911). The tuned EfficientNet computed garbage borders: relative
errors 0.26, 0.18, 0.43.

Fix and guard tested here: ``prepare`` folds such pads into the next conv (no kernel gets a pad
epilogue), and where a pad epilogue remains (its consumer is no conv) the record is caught by
the per-kernel check and dropped with a warning naming the kernel. The record is for the NCHW
kernel: on CPUs ``prepare`` now makes convs channels-last, so the tests that apply it lower with
``channels_last=False``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from gmorph_tvm import build, import_models
from gmorph_tvm.tuning import TuningWarning, lower_tuned, prepare, verify
from gmorph_tvm.tuning.pipeline import DATABASE_FILES

LLVM = tvm.target.Target({"kind": "llvm", "num-cores": 2})
TRACE = Path(__file__).parent / "data" / "pad_epilogue_trace.json"


def _expand_relu6_pad(consumer: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(16, 96, 1), nn.ReLU6(), nn.ZeroPad2d((0, 1, 0, 1))]
    if consumer:  # EfficientNet's stride-2 depthwise conv with TF "same" padding
        layers.append(nn.Conv2d(96, 96, 3, stride=2, groups=96))
    return nn.Sequential(*layers).eval()


def _pad_kernel(prepared: tvm.IRModule) -> str | None:
    names = [gv.name_hint for gv, f in prepared.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return next((n for n in names if "conv2d" in n and "pad" in n), None)


def _trace() -> list:
    """The saved trace, for the kernel as ``prepare`` now writes it.

    The record was tuned when relu6 lowered to topi's clip, a block named ``compute``;
    LegalizeNaNSafe (issue 12) now writes the NaN-propagating clip as a block named ``clip``. The
    schedule itself is unchanged (the clip is inlined either way).
    """
    return json.loads(TRACE.read_text().replace('["compute","main"]', '["clip","main"]'))


def _record_database(directory: Path, workload: tvm.IRModule) -> None:
    """A JSON database holding the saved trace for ``workload``."""
    sch = tvm.s_tir.Schedule(workload)
    tvm.s_tir.Trace.apply_json_to_schedule(_trace(), sch)
    directory.mkdir(parents=True, exist_ok=True)
    for name in DATABASE_FILES:
        (directory / name).touch()
    database = ms.database.JSONDatabase(work_dir=str(directory), module_equality="structural")
    database.commit_tuning_record(
        ms.database.TuningRecord(
            sch.trace, database.commit_workload(workload), [6.8e-4], LLVM,
            ms.arg_info.ArgInfo.from_prim_func(workload["main"]),
        )
    )


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(1, 16, 112, 112, generator=torch.Generator().manual_seed(1))


def test_saved_record_leaves_the_pad_border_unwritten(x):
    """The TVM bug itself, at the TIR level: the border keeps what the output memory held."""
    mm = import_models({"t": _expand_relu6_pad(consumer=False)}, (x,))
    prepared = prepare(mm.bound_module(), LLVM, channels_last=False)
    name = _pad_kernel(prepared)
    assert name is not None
    workload = verify.normalize_workload(prepared[name])
    sch = tvm.s_tir.Schedule(workload)
    tvm.s_tir.Trace.apply_json_to_schedule(_trace(), sch)
    rng = np.random.default_rng(0)
    buffers = [rng.uniform(-1, 1, [int(d) for d in p.shape]).astype("float32") for p in workload["main"].params]
    buffers[-1][:] = np.nan  # the output: NaN where the kernel does not write

    def run(mod):
        tensors = [tvm.runtime.tensor(b.copy()) for b in buffers]
        tvm.compile(mod, target=LLVM)["main"](*tensors)
        return tensors[-1].numpy()

    default, tuned = run(workload), run(sch.mod)
    assert not np.isnan(default).any()
    unwritten = np.isnan(tuned)
    assert unwritten[:, :, 112, :].all() and unwritten[:, :, :, 112].all()  # the whole border
    np.testing.assert_allclose(tuned[:, :, :112, :112], default[:, :, :112, :112], rtol=1e-5, atol=1e-6)
    check = verify.check_schedule(name, workload, sch.mod, verify.check_target(LLVM))
    assert not check.ok and "different values" in check.message


def test_pads_before_a_conv_are_folded_so_no_kernel_has_a_pad_epilogue(x):
    mm = import_models({"t": _expand_relu6_pad(consumer=True)}, (x,))
    prepared = prepare(mm.bound_module(), LLVM)
    assert _pad_kernel(prepared) is None, [gv.name_hint for gv in prepared.get_global_vars()]
    with torch.no_grad():
        want = _expand_relu6_pad(consumer=True)(x).numpy()
    got = np.asarray(build(mm, LLVM).run(x.numpy())["t"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_saved_record_is_dropped_with_a_warning_and_the_build_stays_right(tmp_path, x):
    """A pad epilogue that cannot be folded (the model's output): the guard catches the record."""
    model = _expand_relu6_pad(consumer=False)
    mm = import_models({"t": model}, (x,))
    prepared = prepare(mm.bound_module(), LLVM, channels_last=False)
    name = _pad_kernel(prepared)
    _record_database(tmp_path / "db", verify.normalize_workload(prepared[name]))
    with pytest.warns(TuningWarning, match=rf"kernel '{name}' dropped: the tuned schedule computes different values"):
        lowered, applied = lower_tuned(mm.bound_module(), LLVM, database_dir=tmp_path / "db",
                                       shipped_records=False, channels_last=False)
    assert name in applied.dropped and name not in applied.applied
    with torch.no_grad():
        want = model(x).numpy()
    vm = relax.VirtualMachine(tvm.compile(lowered, target=LLVM), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
