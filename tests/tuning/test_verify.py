"""The tuning guard: tuned kernels and tuned builds are checked against default schedules.

Records are written by hand (no tuning run): a plain valid schedule, and a corrupted one that
computes the conv's accumulator in float16 (``unsafe_set_dtype``, a real trace instruction).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from gmorph_tvm import build
from gmorph_tvm.tuning import TuningWarning, lower_tuned, prepare, verify
from gmorph_tvm.tuning.pipeline import DATABASE_FILES

LLVM = tvm.target.Target({"kind": "llvm", "num-cores": 2})


def _residual_block() -> tvm.IRModule:
    """Three 1x1 conv + bias + residual branches on one input (EfficientNet's last stage, small)."""
    rng = np.random.default_rng(0)

    def const(*shape):
        return relax.const(rng.standard_normal(shape).astype("float32") * 0.1)

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 64, 7, 7), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = []
            for _ in range(3):
                h = relax.op.add(relax.op.nn.conv2d(x, const(32, 64, 1, 1)), const(1, 32, 1, 1))
                h = bb.emit(relax.op.add(h, relax.op.nn.relu(relax.op.strided_slice(x, [1], [0], [32]))))
                outs.append(h)
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def _conv_kernel(mod: tvm.IRModule) -> tuple[str, tvm.IRModule]:
    prepared = prepare(mod, LLVM)
    names = [gv.name_hint for gv, f in prepared.functions_items() if "conv2d" in gv.name_hint]
    assert len(names) == 1, names  # one kernel shared by the three branches
    return names[0], verify.normalize_workload(prepared[names[0]])


def _write_database(directory, workload: tvm.IRModule, sch: tvm.s_tir.Schedule) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in DATABASE_FILES:
        (directory / name).touch()
    database = ms.database.JSONDatabase(work_dir=str(directory), module_equality="structural")
    database.commit_tuning_record(
        ms.database.TuningRecord(
            sch.trace,
            database.commit_workload(workload),
            [1e-6],
            LLVM,
            ms.arg_info.ArgInfo.from_prim_func(workload["main"]),
        )
    )


def _valid_schedule(workload: tvm.IRModule) -> tvm.s_tir.Schedule:
    sch = tvm.s_tir.Schedule(workload)
    block = sch.get_sblock("conv2d_nhwc")  # prepare makes CPU convs channels-last
    _, y, _, f, _, _, rc = sch.get_loops(block)
    f_outer, f_inner = sch.split(f, [None, 8])
    sch.reorder(f_outer, y, rc, f_inner)
    sch.parallel(f_outer)
    return sch


def _float16_accumulator(workload: tvm.IRModule) -> tvm.s_tir.Schedule:
    sch = tvm.s_tir.Schedule(workload)
    sch.unsafe_set_dtype(sch.get_sblock("conv2d_nhwc"), 0, "float16")
    return sch


def _outputs(artifact, x):
    return [np.asarray(v) for v in artifact.run(x).values()]


def _tuning_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, TuningWarning)]


def test_check_schedule_accepts_a_valid_schedule_and_rejects_a_wrong_one():
    name, workload = _conv_kernel(_residual_block())
    target = verify.check_target(LLVM)
    good = verify.check_schedule(name, workload, _valid_schedule(workload).mod, target)
    assert good.ok and good.verified and good.error is not None and good.error <= verify.FLOAT32_RTOL
    bad = verify.check_schedule(name, workload, _float16_accumulator(workload).mod, target)
    assert not bad.ok and bad.error > verify.FLOAT32_RTOL and "different values" in bad.message


def test_valid_record_is_applied_and_recorded_in_the_manifest(tmp_path):
    mod = _residual_block()
    name, workload = _conv_kernel(mod)
    _write_database(tmp_path / "db", workload, _valid_schedule(workload))
    lowered, applied = lower_tuned(mod, LLVM, database_dir=tmp_path / "db")
    assert applied.applied == [name] and not applied.dropped
    assert lowered[name].attrs["tirx.is_scheduled"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tuned = build(mod, LLVM, tuning_db=tmp_path / "db")
    assert not _tuning_warnings(record)
    assert tuned.manifest["tuning"]["applied"] == [name]
    assert tuned.manifest["tuning"]["max_rel_error_vs_untuned"] <= 1e-5
    x = np.random.default_rng(1).standard_normal((1, 64, 7, 7)).astype("float32")
    for got, want in zip(_outputs(tuned, x), _outputs(build(mod, LLVM), x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_corrupted_record_is_dropped_with_a_warning_naming_the_kernel(tmp_path):
    mod = _residual_block()
    name, workload = _conv_kernel(mod)
    _write_database(tmp_path / "db", workload, _float16_accumulator(workload))
    with pytest.warns(TuningWarning, match=rf"kernel '{name}' dropped: the tuned schedule computes different values"):
        tuned = build(mod, LLVM, tuning_db=tmp_path / "db")
    assert list(tuned.manifest["tuning"]["dropped"]) == [name] and tuned.manifest["tuning"]["applied"] == []
    x = np.random.default_rng(1).standard_normal((1, 64, 7, 7)).astype("float32")
    for got, want in zip(_outputs(tuned, x), _outputs(build(mod, LLVM), x)):
        np.testing.assert_array_equal(got, want)  # the default schedule: same code as untuned


def test_module_check_catches_a_record_the_kernel_check_missed(tmp_path, monkeypatch):
    """A fault outside the kernel (or a kernel check blind to it) is caught on the whole module."""
    mod = _residual_block()
    name, workload = _conv_kernel(mod)
    _write_database(tmp_path / "db", workload, _float16_accumulator(workload))
    monkeypatch.setattr(verify, "check_schedule", lambda n, *a, **k: verify.KernelCheck(n, True, 0.0))
    with pytest.warns(TuningWarning, match=rf"kernel '{name}' dropped: the tuned build computed different results"):
        tuned = build(mod, LLVM, tuning_db=tmp_path / "db")
    check = tuned.manifest["tuning"]
    assert check["applied"] == [] and name in check["dropped"] and not check["fell_back_to_untuned"]
    x = np.random.default_rng(1).standard_normal((1, 64, 7, 7)).astype("float32")
    for got, want in zip(_outputs(tuned, x), _outputs(build(mod, LLVM), x)):
        np.testing.assert_array_equal(got, want)


def test_tune_commit_callback_rejects_a_wrong_schedule_and_keeps_a_right_one(tmp_path):
    """The measure callback tune()'s worker uses instead of MetaSchedule's AddToDatabase."""
    name, workload = _conv_kernel(_residual_block())
    for file in DATABASE_FILES:
        (tmp_path / file).touch()
    database = ms.database.JSONDatabase(work_dir=str(tmp_path), module_equality="structural")
    rejected: list = []
    stats: dict = {}
    callback = verify.verifying_add_to_database(database, workload, LLVM, name, rejected.append, stats=stats)
    args_info = ms.arg_info.ArgInfo.from_prim_func(workload["main"])
    candidates = [ms.MeasureCandidate(s(workload), args_info) for s in (_valid_schedule, _float16_accumulator)]
    results = [ms.runner.RunnerResult([1e-4], None), ms.runner.RunnerResult([1e-5], None)]
    scheduler = ms.task_scheduler.TaskScheduler.create("round-robin")
    callback.apply(scheduler, 0, candidates, [ms.builder.BuilderResult("", None)] * 2, results)
    assert [c.name for c in rejected] == [name] and not rejected[0].ok
    records = database.get_all_tuning_records()
    assert len(records) == 1 and float(records[0].run_secs[0]) == pytest.approx(1e-4)
    assert stats["check_seconds"] > 0
