"""Shipped tuning records: target classes, lookup by class and TVM version, packaging, and their
application by lower()/tune() after the user's own database.

One tiny tuning session (one conv kernel, 8 trials, ~1 min on 2 busy cores) provides the records
that are packaged into a temporary records root standing in for the package's tuning/records/.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from gmorph_tvm import import_models
from gmorph_tvm.core.targets import target_dict
from gmorph_tvm.data import fashion_mnist
from gmorph_tvm.pipeline import fuse_lossless
from gmorph_tvm.tuning import allocate, extract, lower, lower_tuned, prepare, shipped, tune
from gmorph_tvm.tuning.pipeline import ShippedRecordsNote
from gmorph_tvm.tuning.report import SHIPPED
from gmorph_tvm.zoo import benchsets, pretrained

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})  # generic x86-64: class x86_64-sse
VERSION = str(tvm.__version__)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"kind": "llvm", "mcpu": "znver5"}, "x86_64-avx512"),
        ({"kind": "llvm", "mcpu": "emeraldrapids"}, "x86_64-avx512"),
        ({"kind": "llvm", "mcpu": "rocketlake"}, "x86_64-avx512"),
        ({"kind": "llvm", "mcpu": "haswell"}, "x86_64-avx2"),
        ({"kind": "llvm", "mcpu": "znver3"}, "x86_64-avx2"),
        ({"kind": "llvm", "mcpu": "haswell", "mattr": ["+avx512f", "+avx512bw", "+avx512vl", "+avx512dq"]},
         "x86_64-avx512"),
        ({"kind": "llvm"}, "x86_64-sse"),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae"}, "aarch64-dotprod"),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a57"}, "aarch64-neon"),
        ({"kind": "cuda", "arch": "sm_87"}, "cuda-sm_87"),
        # A triple LLVM does not know is not asked about (LLVM would crash): its arch is the class.
        ({"kind": "llvm", "mtriple": "nonsense-foo-bar"}, "nonsense"),
    ],
)
def test_target_class_follows_the_vector_isa_of_mcpu_and_mattr(spec, expected):
    assert shipped.target_class(tvm.target.Target(spec)) == expected


def test_class_mcpus_belong_to_their_class():
    for cls, mcpu in shipped.CLASS_MCPU.items():
        assert shipped.target_class(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})) == cls


def _conv_module() -> tvm.IRModule:
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 12, 12), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = relax.const(rng.standard_normal((8, 4, 3, 3)).astype("float32") * 0.2)
            h = bb.emit(relax.op.nn.conv2d(x, w, padding=1))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(h)))
        bb.emit_func_output(out)
    return bb.get()


def _conv_workload() -> tvm.IRModule:
    plans = extract(prepare(_conv_module(), TARGET), TARGET)
    return next(p for p in plans if "conv2d" in p.name).workload


def _conv_kernel(lowered: tvm.IRModule) -> tvm.tirx.PrimFunc:
    return next(f for gv, f in lowered.functions_items() if "conv2d" in gv.name_hint and isinstance(f, tvm.tirx.PrimFunc))


def _scheduled(func: tvm.tirx.PrimFunc) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled"))


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """(records root with x86_64-sse/<tvm>/ packaged from one 8-trial session, its work dir)."""
    work = tmp_path_factory.mktemp("tuned")
    report = tune(_conv_module(), TARGET, trials=8, work_dir=work, op_names=["conv2d"],
                  min_trials_per_task=8, progress=False, shipped_records=False)
    assert report.tuned, report.table()
    root = tmp_path_factory.mktemp("records")
    index = shipped.package([work], root / "x86_64-sse" / VERSION, tuned_on=target_dict(TARGET),
                            sets={"conv": {"trials_per_task": 8}})
    assert index["class"] == "x86_64-sse" and len(index["workloads"]) == 1
    return root, work


@pytest.fixture
def shipped_root(records, monkeypatch):
    root, _ = records
    monkeypatch.setattr(shipped, "RECORDS_ROOT", root)
    return root


@pytest.mark.slow  # shares the ~1 min tuning session
def test_packaging_keeps_the_best_record_and_the_trial_count(records):
    root, work = records
    db = ms.database.JSONDatabase(work_dir=str(root / "x86_64-sse" / VERSION), module_equality="structural")
    kept = db.get_all_tuning_records()
    tuned = [r for r in ms.database.JSONDatabase(work_dir=str(work)).get_all_tuning_records() if r.run_secs]
    assert len(kept) == 1
    best = min(float(np.mean([float(s) for s in r.run_secs])) for r in tuned)
    assert float(np.mean([float(s) for s in kept[0].run_secs])) == pytest.approx(best)
    found = shipped.lookup(TARGET, root)
    assert found.key == f"x86_64-sse/{VERSION}"
    assert found.trials(_conv_workload()) == len(tuned) >= 1


@pytest.mark.slow
def test_lower_applies_shipped_records_unless_told_not_to(shipped_root):
    x = np.random.default_rng(1).standard_normal((1, 4, 12, 12)).astype("float32")
    with_records, applied = lower_tuned(_conv_module(), TARGET)
    without, none = lower_tuned(_conv_module(), TARGET, shipped_records=False)
    # Every kernel is scheduled either way (default CPU schedules); only the first ran a record.
    assert _scheduled(_conv_kernel(with_records)) and _scheduled(_conv_kernel(without))
    conv = next(gv.name_hint for gv, f in prepare(_conv_module(), TARGET).functions_items() if "conv2d" in gv.name_hint)
    assert applied is not None and applied.applied == [conv] and none is None
    np.testing.assert_allclose(_run(with_records, x), _run(without, x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_tune_leaves_kernels_with_shipped_records_alone(shipped_root, tmp_path):
    report = tune(_conv_module(), TARGET, trials=8, work_dir=tmp_path, op_names=["conv2d"],
                  min_trials_per_task=8, progress=False)
    (conv,) = [t for t in report.tasks if "conv2d" in t.name]
    assert conv.status == SHIPPED and conv.trials_run == 0
    assert report.shipped == [conv.name] and f"x86_64-sse/{VERSION}" in report.shipped_note


@pytest.mark.slow
def test_user_records_take_precedence_over_shipped_ones(records, shipped_root, tmp_path):
    _, work = records
    source = ms.database.JSONDatabase(work_dir=str(work), module_equality="structural")
    valid = [r for r in source.get_all_tuning_records() if r.run_secs]
    worst = max(valid, key=lambda r: float(np.mean([float(s) for s in r.run_secs])))
    user = ms.database.JSONDatabase(work_dir=str(tmp_path), module_equality="structural")
    workload = user.commit_workload(worst.workload.mod)
    user.commit_tuning_record(ms.database.TuningRecord(worst.trace, workload, worst.run_secs, worst.target,
                                                       worst.args_info))
    mine = _conv_kernel(lower(_conv_module(), TARGET, database_dir=tmp_path))
    only_mine = _conv_kernel(lower(_conv_module(), TARGET, database_dir=tmp_path, shipped_records=False))
    theirs = _conv_kernel(lower(_conv_module(), TARGET))
    assert tvm_ffi.structural_equal(mine, only_mine)
    if len(valid) > 1:
        assert not tvm_ffi.structural_equal(mine, theirs)


@pytest.mark.slow
def test_records_for_another_tvm_version_are_ignored_with_a_note(records, tmp_path, monkeypatch):
    root, _ = records
    shutil.copytree(root / "x86_64-sse" / VERSION, tmp_path / "x86_64-sse" / "0.0.1")
    monkeypatch.setattr(shipped, "RECORDS_ROOT", tmp_path)
    found = shipped.lookup(TARGET)
    assert found.directory is None and "TVM 0.0.1" in found.note and VERSION in found.note
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, applied = lower_tuned(_conv_module(), TARGET)
    assert applied is None  # no record applied: the kernels run default schedules
    assert [str(w.message) for w in caught if w.category is ShippedRecordsNote] == [found.note]


def test_records_for_another_class_are_ignored_with_a_note(tmp_path, monkeypatch):
    (tmp_path / "x86_64-avx512" / VERSION).mkdir(parents=True)
    found = shipped.lookup(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}), tmp_path)
    assert found.directory is None
    assert found.note == "no shipped tuning records for target class x86_64-avx2 (shipped: x86_64-avx512)"


def _demo_modules():
    x = fashion_mnist.load_split("test", limit=1).images[:1].contiguous()
    mm = import_models(pretrained.fmnist_backbone_set(4), x)
    return {"separate": fuse_lossless(mm, stitch=False, merge="never"), "fused": fuse_lossless(mm)}


@pytest.mark.parametrize("cls, mcpu", [("x86_64-avx512", "rocketlake"), ("x86_64-avx2", "haswell")])
def test_shipped_records_cover_every_kernel_the_demo_tunes(cls, mcpu):
    """Records go stale when a pass changes the kernels (issue 17: the NaN-safe legalisation and
    the pad fold left 1 of 12 demo kernels covered): what the demo's tune(trials=64) would tune
    must all be in the records shipped for each class."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    found = shipped.lookup(target)
    assert found.directory is not None, found.note
    db = ms.database.JSONDatabase(work_dir=str(found.directory), module_equality="structural")
    for label, module in _demo_modules().items():
        selected = allocate(extract(prepare(module.bound_module(), target), target), 64)
        missing = [p.name for p in selected if not db.has_workload(p.workload)]
        assert selected and not missing, f"{label}: no shipped record for {missing}"


def _bench_modules(set_name: str, batch: int):
    """The builds ``bench/lossless.py`` times (stitch, stitch+merge, separate) of a benchmark set."""
    models, args, _ = benchsets.load_set(set_name, None, batch)
    mm = import_models(models, args)
    return {"stitch": fuse_lossless(mm, merge="never"), "stitch+merge": fuse_lossless(mm, merge="auto"),
            "separate": fuse_lossless(mm, stitch=False, merge="never")}


@pytest.mark.parametrize("mcpu, set_name, batch", [
    *(("rocketlake", s, b) for s, b in [("A", 1), ("A", 8), ("B", 1), ("C", 1), ("B", 8), ("C", 8), ("E", 1)]),
    *(("haswell", s, b) for s, b in [("A", 1), ("A", 8), ("B", 1), ("B", 8), ("C", 1)]),
])
def test_shipped_records_cover_the_benchmark_sets(mcpu, set_name, batch):
    """Issue 17: the 8-model benchmark sets A, B and C (batch 1 and 8) and the 3-task
    EfficientNet-Lite0 set E (batch 1) run on shipped records too: every kernel a per-task budget
    would tune has an x86_64-avx512 record (x86_64-avx2: sets A and B, C at batch 1), or its whole design space
    was searched (MiniLM's embedding gather has no schedule that runs on random indices)."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    found = shipped.lookup(target)
    assert found.directory is not None, found.note
    for label, module in _bench_modules(set_name, batch).items():
        selected = allocate(extract(prepare(module.bound_module(), target), target), 0, trials_per_task=64)
        missing = [p.name for p in selected if not found.covers(p.workload, 1)]
        assert selected and not missing, f"set {set_name}{batch} {label}: no shipped record for {missing}"
