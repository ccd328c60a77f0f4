"""End-to-end tuning with a tiny budget: crash fallback, database reuse, fresh-process re-apply.

One tuning session (shared by the tests below, ~2-5 min on 2 busy cores) tunes a two-conv module
with the worker made to crash (SIGSEGV) when it picks the smaller conv, after one round of the
larger one: that kernel must fall back to its default schedule with a warning naming it, while
the other is tuned with 8 trials and what the run's one cost model learned from it survives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax

from gmorph_tvm.errors import TuningError
from gmorph_tvm.tuning import TuneConfig, TuningWarning, cost_model, extract, lower, lower_tuned, prepare, shipped, tune
from gmorph_tvm.tuning._worker import CRASH_TASK_ENV
from gmorph_tvm.tuning.report import CRASHED, FAILED, REUSED, SHIPPED, TUNED

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})
TRIALS_PER_TASK = 8


def _two_conv_module(size: int = 12) -> tvm.IRModule:
    rng = np.random.default_rng(0)

    def const(*shape):
        return relax.const(rng.standard_normal(shape).astype("float32") * 0.2)

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, size, size), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = relax.op.nn.conv2d(x, const(8, 4, 3, 3), padding=1)
            h = bb.emit(relax.op.nn.relu(relax.op.add(h, const(1, 8, 1, 1))))
            h = relax.op.nn.conv2d(h, const(16, 8, 3, 3), padding=1)
            out = bb.emit_output(relax.op.nn.relu(relax.op.add(h, const(1, 16, 1, 1))))
        bb.emit_func_output(out)
    return bb.get()


def _input() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, 4, 12, 12)).astype("float32")


def _run(mod: tvm.IRModule) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(_input())).numpy()


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Tune with the worker crashing when the task scheduler first picks the smaller conv, after
    the bigger one's first round; returns (report, warnings, names, dir)."""
    mod = _two_conv_module()
    plans = sorted(extract(prepare(mod, TARGET), TARGET), key=lambda p: -p.share)
    # The two convs (the CPU lowering adds the input's and the output's NHWC transposes).
    tuned, crashing = [p.name for p in plans if "conv2d" in p.name]
    work_dir = tmp_path_factory.mktemp("tuning_db")
    os.environ[CRASH_TASK_ENV] = crashing
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = tune(
                mod, TARGET, trials_per_task=TRIALS_PER_TASK, work_dir=work_dir, op_names=["conv2d"],
                progress=False, transfer=False,
            )
    finally:
        del os.environ[CRASH_TASK_ENV]
    return report, [w for w in caught if issubclass(w.category, TuningWarning)], crashing, tuned, work_dir


@pytest.mark.slow  # shares the ~1.5 min tuning session
def test_crash_in_one_workload_falls_back_with_a_warning_naming_it(session):
    report, caught, crashing, tuned, _ = session
    status = {t.name: t for t in report.tasks}
    assert status[crashing].status == CRASHED and "SIGSEGV" in status[crashing].message
    assert report.fallbacks == [crashing]
    assert len(caught) == 1 and crashing in str(caught[0].message)
    assert "default schedule" in str(caught[0].message)
    # The other task still ran in a fresh worker, with its whole budget.
    assert status[tuned].status == TUNED
    assert status[tuned].trials_run == TRIALS_PER_TASK and status[tuned].best_us > 0
    assert crashing in report.table() and "crashed" in report.table()


@pytest.mark.slow  # shares the tuning session
def test_the_cost_model_learned_before_a_crash_is_kept(session):
    """The run's one cost model is saved after every measured batch: the crash (in the second
    kernel's first round) loses that kernel, not what the model learned from the first."""
    _, _, crashing, tuned, work_dir = session
    model = cost_model.new_model(2)
    shipped_model = cost_model.shipped_model_path()
    before = cost_model.load(cost_model.new_model(2), shipped_model) if shipped_model else 0
    # Its trials and its default schedule, measured before its first batch.
    assert cost_model.load(model, work_dir / cost_model.STATE_FILE) == before + TRIALS_PER_TASK + 1
    group = list(model.data.values())[-1]  # the newest workload group: the tuned conv's measurements
    assert len(group.costs) == TRIALS_PER_TASK + 1


def test_all_kernels_share_one_cost_model_and_one_scheduler(tmp_path, monkeypatch):
    """The worker tunes every task in ONE tune_tasks call with one cost model (each kernel had
    its own fresh XGBModel before, which predicts at random until 100 measurements)."""
    from tvm.s_tir import meta_schedule as ms

    from gmorph_tvm.tuning import _worker

    plans = [p for p in extract(prepare(_two_conv_module(), TARGET), TARGET) if "conv2d" in p.name]
    calls = []
    monkeypatch.setattr(ms.tune, "tune_tasks", lambda **kwargs: calls.append(kwargs))
    (tmp_path / "logs").mkdir()
    spec = {
        "target": TARGET.export(), "work_dir": str(tmp_path), "trials_per_round": 8,
        "tasks": [{"name": p.name, "trials": 8, "seed": 0, "workload": tvm.ir.save_json(p.workload)}
                  for p in plans],
    }
    events = []
    _worker.run(spec, lambda event, **fields: events.append((event, fields)))
    assert len(calls) == 1, "one tune_tasks call per kernel: one cost model each"
    assert len(calls[0]["tasks"]) == 2
    assert isinstance(calls[0]["cost_model"], ms.cost_model.XGBModel)
    assert calls[0]["cost_model"].num_warmup_samples < 100
    assert calls[0]["task_scheduler"] is not None and not isinstance(calls[0]["task_scheduler"], str)
    assert [e for e, _ in events].count("done") == 2


@pytest.mark.slow  # shares the ~1.5 min tuning session
def test_tuned_module_keeps_signature_and_results(session):
    _, _, crashing, tuned, work_dir = session
    mod = _two_conv_module()
    lowered, applied = lower_tuned(mod, TARGET, database_dir=work_dir, shipped_records=False)
    assert [p.name for p in lowered["main"].params] == ["x"]
    scheduled = {gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    # The tuned conv runs its record; the crashed one its default CPU schedule.
    assert any(k.startswith(tuned) for k in applied.applied), applied
    assert not any(k.startswith(crashing) for k in applied.applied), applied
    # Weight re-layout kernels were evaluated at build time, not left for every call.
    assert not any(k.endswith("_weight_prepack") for k in scheduled), scheduled
    np.testing.assert_allclose(_run(lowered), _run(lower(mod, TARGET)), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # shares the tuning session; ~1 min of feature extraction
def test_a_pretrained_cost_model_is_trained_on_records_and_loaded_by_a_run(session, tmp_path, monkeypatch):
    from gmorph_tvm.tuning import _worker, pretrain, tuner

    _, _, _, tuned, work_dir = session
    out = tmp_path / "pretrained.npz"
    counts = pretrain.train([work_dir], out, target=TARGET)
    assert counts["workloads"] == 1 and counts["records"] >= TRIALS_PER_TASK, counts
    model = cost_model.new_model(2)
    assert cost_model.load(model, out) == counts["records"] and model.booster is not None
    # A run in a fresh work dir starts from the shipped model (its own, once it has one, first).
    monkeypatch.setattr(cost_model, "SHIPPED_FILE", out)
    fresh = tmp_path / "fresh"
    assert tuner._cost_models(fresh, True) == [str(fresh / cost_model.STATE_FILE), str(out)]
    assert tuner._cost_models(fresh, False) == [str(fresh / cost_model.STATE_FILE)]
    loaded = _worker._load_cost_model({"cost_model_from": tuner._cost_models(fresh, True)}, 2)
    assert loaded.data_size == counts["records"] and loaded.booster is not None


@pytest.mark.slow  # shares the tuning session
def test_the_default_schedule_is_the_first_record_so_tuning_never_loses_to_it(session):
    """Before a kernel's first batch its default CPU schedule (what it runs untuned) is measured
    and committed: the search starts from it, and the record a build applies is never slower, as
    measured, than the default schedule it replaces (a short random search used to lose to it)."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from gmorph_tvm.tuning.default_schedules import default_rules

    report, _, _, tuned, work_dir = session
    task = next(t for t in report.tasks if t.name == tuned)
    assert task.default_us is not None and 0 < task.best_us <= task.default_us
    assert "default us" in report.table()
    database = ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")
    workload = next(p.workload for p in extract(prepare(_two_conv_module(), TARGET), TARGET) if p.name == tuned)
    with TARGET:
        expected = next(s for s in (r.apply(workload["main"], TARGET, False) for r in default_rules()) if s)
    records = [r for r in database.get_all_tuning_records() if tvm_ffi.structural_equal(r.workload.mod, workload)]
    assert len(records) == TRIALS_PER_TASK + 1

    def script(mod):  # the JSON database stores the rule's True annotations as 1
        return mod.script().replace('layout_rewrite_preproc": True', 'layout_rewrite_preproc": 1')

    def replayed(record):
        sch = s_tir.Schedule(workload)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        return sch.mod

    defaults = [r for r in records if script(replayed(r)) == script(expected.mod)]
    assert len(defaults) == 1
    measured = [sum(float(x) for x in r.run_secs) / len(r.run_secs) for r in records if r.run_secs]
    assert min(measured) * 1e6 == pytest.approx(task.best_us, rel=1e-6)


@pytest.mark.slow  # shares the tuning session; ~1 min of tuning
def test_a_transferred_seed_is_measured_beside_the_default_schedule(session, tmp_path):
    """A kernel without records starts from a transferred schedule, measured when the scheduler
    first picks it, and from its default schedule: a transferred schedule is often slower than the
    default rules (EfficientNet-Lite0 at 96x96: 5.6 vs 2.9 ms), and the build takes the fastest."""
    import shutil

    _, _, _, _, work_dir = session
    for name in ("database_workload.json", "database_tuning_record.json", "target.json"):
        shutil.copy(work_dir / name, tmp_path / name)  # the 12x12 records lend to the 20x20 kernels
    report = tune(_two_conv_module(20), TARGET, trials_per_task=TRIALS_PER_TASK, work_dir=tmp_path,
                  op_names=["conv2d"], progress=False, shipped_records=False)
    convs = [t for t in report.tasks if "conv2d" in t.name]
    assert len(convs) == 2 and all(t.transferred_from for t in convs), report.table()
    for task in convs:
        assert task.default_us is not None and 0 < task.best_us <= task.default_us, report.table()


def test_a_pretrained_cost_model_ships_and_predicts():
    """The model beside the records (python -m gmorph_tvm.tuning.pretrain on zoo models that
    bench/time_to_fast.py does not use, plus the shipped records) loads without pickle and ranks
    candidates from the first batch of a run (a fresh XGBModel predicts at random)."""
    path = cost_model.shipped_model_path()
    assert path is not None and path.stat().st_size < 2_000_000
    model = cost_model.new_model(2)
    assert cost_model.load(model, path) >= 300 and model.booster is not None
    assert len(model.data) >= 50  # workloads (kernels) it was trained on


def _lower_with(prepared: tvm.IRModule, database) -> tvm.IRModule:
    """What lower_tuned does with a database: verify, apply, pre-pack the weights."""
    from gmorph_tvm.tuning.verify import verified_database

    checked, applied = verified_database(database, prepared, TARGET)
    with TARGET, checked:
        lowered = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(prepared)
        lowered = tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(),
                                            relax.transform.FoldConstant()])(lowered)
    return lowered, applied


@pytest.mark.slow  # shares the tuning session
def test_a_record_transfers_to_a_new_shape_verified(session, monkeypatch):
    """The tuned 12x12 conv's record has no exact match at 20x20: it is replayed there with its
    tile decisions remapped to divisors of the new extents, checked against the default
    schedule, and applied; the other conv (same structure, other channels) borrows it too."""
    from tvm.s_tir import meta_schedule as ms

    from gmorph_tvm.tuning import transfer, verify
    from gmorph_tvm.tuning.pipeline import open_database

    _, _, crashing, tuned, work_dir = session
    exact = open_database(work_dir)
    prepared = prepare(_two_conv_module(20), TARGET)
    extra, report = transfer.transferred_database(prepared, TARGET, [exact])
    kinds = {name: kind for name, kind in report.kinds.items() if "conv2d" in name}
    assert sorted(kinds.values()) == [transfer.TRANSFERRED] * 2, report.kinds
    assert "0 kernel(s) ran exact records, 2 transferred ones" in report.summary()
    for record in extra.get_all_tuning_records():  # every tile factorises the NEW extents
        sch = tvm.s_tir.Schedule(record.workload.mod)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        for inst, decision in record.trace.decisions.items():
            if inst.kind.name == "SamplePerfectTile":
                assert all(int(f) >= 1 for f in decision)
    lowered, applied = _lower_with(prepared, ms.database.OrderedUnionDatabase(exact, extra))
    assert sorted(n for n in applied.applied if "conv2d" in n) == sorted(kinds), applied
    x = np.random.default_rng(1).standard_normal((1, 4, 20, 20)).astype("float32")

    def run(mod):
        return relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()

    np.testing.assert_allclose(run(lowered), run(lower(_two_conv_module(20), TARGET, shipped_records=False)),
                               rtol=1e-4, atol=1e-4)
    # A transferred schedule that computes other values is never used.
    monkeypatch.setattr(verify, "check_schedule", lambda name, *a, **k: verify.KernelCheck(name, False, 1.0, "wrong"))
    _, rejected = transfer.transferred_database(prepared, TARGET, [exact])
    assert {k for n, k in rejected.kinds.items() if "conv2d" in n} == {transfer.DEFAULT}, rejected.kinds


def test_tile_decisions_are_remapped_to_divisors_of_the_new_extent():
    from gmorph_tvm.tuning.transfer import remap_tile, structure_key

    assert remap_tile([3, 1, 2, 2], 12) == [3, 1, 2, 2]
    for old, extent in (([7, 1, 4, 4], 112), ([1, 2, 2, 3], 20), ([2, 16], 17), ([4, 2, 1, 8], 1)):
        new = remap_tile(old, extent, max_innermost=16)
        assert len(new) == len(old) and int(np.prod(new)) == extent and new[-1] <= 16, (old, extent, new)
    assert remap_tile([1, 2, 2, 16], 40, max_innermost=8)[-1] == 8
    conv = [[p for p in extract(prepare(_two_conv_module(size), TARGET), TARGET) if "conv2d" in p.name]
            for size in (12, 20)]
    assert structure_key(conv[0][0].workload) == structure_key(conv[1][0].workload)


@pytest.mark.slow  # shares the ~1.5 min tuning session
def test_database_is_reapplied_in_a_fresh_process(session, tmp_path):
    _, _, _, tuned, work_dir = session
    mod = _two_conv_module()
    (tmp_path / "mod.json").write_text(tvm.ir.save_json(mod))
    np.save(tmp_path / "x.npy", _input())
    np.save(tmp_path / "expected.npy", _run(lower(mod, TARGET)))
    script = textwrap.dedent(
        f"""
        import json, numpy as np, tvm
        from tvm import relax
        from gmorph_tvm.tuning import lower
        target = tvm.target.Target({json.dumps({"kind": "llvm", "num-cores": 2})})
        mod = tvm.ir.load_json(open({str(tmp_path / "mod.json")!r}).read())
        lowered = lower(mod, target, database_dir={str(work_dir)!r})
        scheduled = [gv.name_hint for gv, f in lowered.functions_items()
                     if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
                     and f.attrs.get("tirx.is_scheduled")]
        vm = relax.VirtualMachine(tvm.compile(lowered, target=target), tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(np.load({str(tmp_path / "x.npy")!r}))).numpy()
        err = float(np.abs(out - np.load({str(tmp_path / "expected.npy")!r})).max())
        print(json.dumps({{"scheduled": scheduled, "err": err}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(name.startswith(tuned) for name in result["scheduled"])
    assert result["err"] < 1e-4


@pytest.mark.slow  # shares the ~1.5 min tuning session
def test_rerun_with_the_same_budget_reuses_the_database(session):
    _, _, _, tuned, work_dir = session
    report = tune(
        _two_conv_module(), TARGET, trials=TRIALS_PER_TASK, work_dir=work_dir, op_names=[tuned],
        min_trials_per_task=TRIALS_PER_TASK, progress=False,
    )
    task = next(t for t in report.tasks if t.name == tuned)
    assert task.status == REUSED and task.records_reused == TRIALS_PER_TASK
    assert report.trials_run == 0


@pytest.mark.slow  # shares the ~1.5 min tuning session
def test_a_top_up_smaller_than_one_batch_is_not_run(session):
    _, _, _, tuned, work_dir = session
    report = tune(
        _two_conv_module(), TARGET, trials=TRIALS_PER_TASK + 5, work_dir=work_dir, op_names=[tuned],
        min_trials_per_task=TRIALS_PER_TASK, progress=False,
    )
    task = next(t for t in report.tasks if t.name == tuned)
    assert task.status == REUSED and task.trials_planned == TRIALS_PER_TASK + 5
    assert report.trials_run == 0


def _tiny_space_module() -> tvm.IRModule:
    """A gather (its one schedule reads out of bounds on the runner's random indices) and a
    transpose of 60 values (one schedule): both design spaces are far smaller than 32 trials."""
    bb = relax.BlockBuilder()
    ids = relax.Var("ids", relax.TensorType((1, 6), "int64"))
    x = relax.Var("x", relax.TensorType((6, 10), "float32"))
    table = relax.const(np.random.default_rng(0).standard_normal((50, 10)).astype("float32"))
    with bb.function("main", [ids, x]):
        with bb.dataflow():
            gathered = bb.emit(relax.op.take(table, ids, axis=0))
            turned = bb.emit(relax.op.permute_dims(relax.op.add(x, x)))
            out = bb.emit_output(relax.Tuple([gathered, turned]))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.slow  # ~40 s: two tiny searches and one runner crash on 2 busy cores
def test_a_used_up_design_space_is_not_searched_again(tmp_path, monkeypatch):
    mod, work = _tiny_space_module(), tmp_path / "work"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TuningWarning)  # the gather's failed measurement
        first = tune(mod, TARGET, trials_per_task=32, work_dir=work, min_flops_share=0, progress=False)
    status = {t.name: (t.status, t.trials_run) for t in first.tasks}
    take, turn = (next(n for n in status if key in n) for key in ("take", "transpose"))
    # Each kernel's default schedule is measured and stored first; the search then ran what
    # little it had (the gather's one schedule may read out of bounds on random indices).
    assert status[take][0] in (FAILED, TUNED) and status[turn][0] == TUNED, first.table()
    assert 0 < status[take][1] < 32 and 0 < status[turn][1] < 32  # both searches ended short
    assert all(t.default_us is not None for t in first.tasks), first.table()
    # More trials later, here or from the shipped records: nothing is searched again.
    again = tune(mod, TARGET, trials_per_task=64, work_dir=work, min_flops_share=0, progress=False)
    assert again.trials_run == 0, again.table()
    assert {t.name: t.status for t in again.tasks} == {take: REUSED, turn: REUSED}, again.table()
    root = tmp_path / "records"
    index = shipped.package([work], root / "x86_64-sse" / str(tvm.__version__), tuned_on={"kind": "llvm"}, sets={})
    assert len(index["exhausted"]) == 2 and len(index["workloads"]) == 2, index
    monkeypatch.setattr(shipped, "RECORDS_ROOT", root)
    fresh = tune(mod, TARGET, trials_per_task=64, work_dir=tmp_path / "fresh", min_flops_share=0, progress=False)
    assert fresh.trials_run == 0, fresh.table()
    assert {t.name: t.status for t in fresh.tasks} == {take: SHIPPED, turn: SHIPPED}, fresh.table()
    assert sorted(fresh.shipped) == sorted([take, turn])  # both left to the shipped records


def test_bad_arguments_are_tuning_errors(tmp_path):
    with pytest.raises(TuningError, match="trials must be >= 0"):
        tune(_two_conv_module(), TARGET, trials=-1, work_dir=tmp_path, progress=False)
    with pytest.raises(TuningError, match="trials_per_task must be >= 0"):
        tune(_two_conv_module(), TARGET, trials_per_task=-1, work_dir=tmp_path, progress=False)
    for both_or_neither in ({}, {"trials": 8, "trials_per_task": 8}):
        with pytest.raises(TuningError, match="either trials .* or trials_per_task"):
            tune(_two_conv_module(), TARGET, work_dir=tmp_path, progress=False, **both_or_neither)
    with pytest.raises(TuningError, match="min_flops_share"):
        tune(_two_conv_module(), TARGET, trials=8, work_dir=tmp_path, min_flops_share=2.0, progress=False)
    with pytest.raises(TuningError, match="unknown tuning option.*trails.*TuneConfig has .*trials_per_task"):
        tune(_two_conv_module(), TARGET, work_dir=tmp_path, trails=8)
    with pytest.raises(TuningError, match="config must be a gmorph_tvm.TuneConfig"):
        tune(_two_conv_module(), TARGET, {"trials": 8}, work_dir=tmp_path)


def test_tune_takes_a_config_and_keywords_override_it():
    import gmorph_tvm

    assert gmorph_tvm.TuneConfig is TuneConfig
    base = TuneConfig(trials=64, op_names="conv2d", progress=False)
    assert base.op_names == ["conv2d"]
    merged = TuneConfig.with_overrides(base, {"trials": 8, "seed": 3})
    assert (merged.trials, merged.seed, merged.op_names, base.trials) == (8, 3, ["conv2d"], 64)
    assert TuneConfig.with_overrides(None, {"minutes": 2}).minutes == 2
    with pytest.raises(TuningError, match="minutes must be a number > 0"):
        TuneConfig(minutes=0)


@pytest.mark.parametrize(
    "target, match",
    [
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae"}, "RPCRunner"),
        ({"kind": "cuda", "arch": "sm_87", "host": {"kind": "llvm"}}, "no CUDA GPU"),
    ],
)
def test_targets_this_machine_cannot_run_need_a_runner(tmp_path, target, match):
    if "cuda" in str(target) and tvm.cuda(0).exist:
        pytest.skip("this machine has a GPU")
    with pytest.raises(TuningError, match=match):
        tune(_two_conv_module(), target, trials=8, work_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # failed before creating anything


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not tvm.cuda(0).exist, reason="needs a CUDA GPU")
def test_cuda_tuning_end_to_end(tmp_path):
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_" + tvm.cuda(0).compute_version.replace(".", ""),
                                "host": {"kind": "llvm"}})
    mod = _two_conv_module()
    report = tune(mod, target, trials=TRIALS_PER_TASK, work_dir=tmp_path, op_names=["conv2d"],
                  min_trials_per_task=TRIALS_PER_TASK, progress=False)
    assert report.tuned and not report.fallbacks
    lowered = lower(mod, target, database_dir=tmp_path)
    vm = relax.VirtualMachine(tvm.compile(lowered, target=target), tvm.cuda(0))
    out = vm["main"](tvm.runtime.tensor(_input(), tvm.cuda(0))).numpy()
    np.testing.assert_allclose(out, _run(lower(mod, TARGET)), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # shares the tuning session
def test_build_runs_transferred_records_before_any_tuning_and_reports_them(session):
    """The first build at a new shape (20x20, no record of its own) runs the schedules transferred
    from the 12x12 records, verified, and the manifest counts exact / transferred / default."""
    import gmorph_tvm

    *_, work_dir = session
    artifact = gmorph_tvm.build(_two_conv_module(20), TARGET, tuning_db=work_dir, shipped_records=False,
                                transfer_records=True)
    schedules = artifact.manifest["tuning"]["schedules"]
    assert schedules["exact"] == 0 and schedules["transferred"] == 2, schedules
    assert schedules["default"] >= 1  # the layout transposes: no record to borrow
    assert not artifact.manifest["tuning"]["fell_back_to_untuned"]
    x = np.random.default_rng(1).standard_normal((1, 4, 20, 20)).astype("float32")
    untuned = gmorph_tvm.build(_two_conv_module(20), TARGET, shipped_records=False)
    np.testing.assert_allclose(artifact.run([x])["out0"], untuned.run([x])["out0"], rtol=1e-4, atol=1e-4)
