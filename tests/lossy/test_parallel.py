"""Candidates evaluated in parallel as Ray tasks: a local Ray with 2 workers, a fixed seed, a driver
killed (SIGKILL) mid-run and resumed; and the search without Ray unchanged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from gmorph_tvm.errors import SearchError
from gmorph_tvm.lossy import DistillConfig, FusionPlan, search
from gmorph_tvm.lossy.graph import LayerGraph

BUDGET, MAX_DROP = 5, 5.0

DRIVER = textwrap.dedent(f"""
    import json, sys
    import torch
    from gmorph_tvm.lossy import DistillConfig, MultiTaskData, search
    from gmorph_tvm.lossy.modelfile import load_model_file

    torch.set_num_threads(1)
    folder = sys.argv[1]
    models = {{t: load_model_file(t, f"{{folder}}/{{t}}.pt2") for t in ("class10", "coarse4", "size3")}}
    d = torch.load(f"{{folder}}/data.pt", weights_only=True)
    data = MultiTaskData(*(d[k] for k in ("train_x", "val_x", "test_x", "train_y", "val_y", "test_y")))
    # Latency = weight bytes of the stitched module (shared layers counted once): deterministic and cheap.
    result = search(models, data, max_accuracy_drop={MAX_DROP}, budget={BUDGET}, seed=3, workers=2,
                    work_dir=f"{{folder}}/wd", distill_config=DistillConfig(max_epochs=0.5, train_samples=150),
                    latency_fn=lambda multi: multi.weight_bytes / 1e3, progress=False)
    json.dump({{"plan": result.plan.to_json(), "test_drops": result.test_drops, "counts": result.report["counts"],
               "parallel": result.report["parallel"], "candidates": result.report["candidates"]}},
              open(f"{{folder}}/result.json", "w"))
""")


def _run_driver(folder, log, kill_after_candidates: int | None = None) -> int | None:
    """Run the driver in its own session; with ``kill_after_candidates``, SIGKILL it once the checkpoint
    holds that many candidates besides the baseline. Returns the exit code (None when killed)."""
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, str(folder / "driver.py"), str(folder)], stdout=out, stderr=out,
                                start_new_session=True)
    lines = folder / "wd" / "candidates.jsonl"
    try:
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            if kill_after_candidates is None or not lines.is_file():
                continue
            if len(lines.read_text().splitlines()) >= 1 + kill_after_candidates:
                assert not (folder / "wd" / "report.json").exists()
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return None
        return proc.wait(timeout=1)
    finally:
        try:  # what the driver started (a local Ray: GCS, raylet, workers) goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ray_search_two_workers_resumes_after_sigkill(tmp_path, tiny_models, tiny_data):
    pytest.importorskip("ray")
    for task, model in tiny_models.items():
        ep = torch.export.export(model.eval(), (tiny_data.val_x[:2],), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        torch.export.save(ep, str(tmp_path / f"{task}.pt2"))
    torch.save({k: getattr(tiny_data, k) for k in ("train_x", "val_x", "test_x", "train_y", "val_y", "test_y")},
               tmp_path / "data.pt")
    (tmp_path / "driver.py").write_text(DRIVER)
    log = tmp_path / "driver.log"

    assert _run_driver(tmp_path, log, kill_after_candidates=1) is None, log.read_text()[-3000:]
    first = [json.loads(line) for line in (tmp_path / "wd" / "candidates.jsonl").read_text().splitlines()]
    assert 2 <= len(first) < 1 + BUDGET and first[0]["status"] == "baseline"

    assert _run_driver(tmp_path, log) == 0, log.read_text()[-3000:]
    assert "resuming:" in log.read_text() and "parallel search: 2 worker(s)" in log.read_text()
    result = json.loads((tmp_path / "result.json").read_text())
    by_key = {c["key"]: c for c in result["candidates"]}
    for old in first[1:]:  # what finished before the kill is re-used as it was, not evaluated again
        assert by_key[old["key"]]["status"] == old["status"] and by_key[old["key"]]["seconds"] == old["seconds"]
    assert result["counts"]["proposed"] == BUDGET and len(by_key) == len(result["candidates"])
    assert result["parallel"]["workers"] == 2 and result["parallel"]["task_seconds"] > 0
    plan = FusionPlan.from_json(result["plan"])
    graphs = {t: LayerGraph.trace(t, m, tiny_data.val_x[:2]) for t, m in tiny_models.items()}
    plan.validate(graphs)
    assert max(result["test_drops"].values()) <= MAX_DROP  # never a plan above the target


def test_parallel_without_ray_is_one_clear_error(tiny_models, tiny_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(SearchError, match=r"needs Ray: pip install 'gmorph-tvm\[ray\]'"):
        search(tiny_models, tiny_data, budget=1, workers=2, latency_fn=lambda m: 1.0, progress=False, log=None)
    with pytest.raises(SearchError, match="workers must be a positive number"):
        search(tiny_models, tiny_data, budget=1, workers=0, progress=False, log=None)


def _latency_if_timed_on_the_device(multi) -> float:
    """Weight kB when run holding the ``device`` resource (where the timing task must run), else 1e9."""
    import ray

    try:
        held = ray.get_runtime_context().get_assigned_resources()
    except AssertionError:  # the driver (the baseline and the final pick are timed there)
        held = {}
    return multi.weight_bytes / 1e3 if held.get("device", 0) > 0 else 1e9


def test_timing_runs_where_the_timing_resource_is(tiny_models, tiny_data):
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the latency function travels by value
    ray.init(num_cpus=2, resources={"device": 1}, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(SearchError, match="no Ray node advertises the timing resource 'jetson'"):
            search(tiny_models, tiny_data, budget=1, workers=2, ray_timing_resource="jetson",
                   latency_fn=_latency_if_timed_on_the_device, progress=False, log=None)
        result = search(tiny_models, tiny_data, budget=2, workers=2, seed=1, max_accuracy_drop=5.0,
                        ray_timing_resource="device", latency_fn=_latency_if_timed_on_the_device, predictor=None,
                        distill_config=DistillConfig(max_epochs=0.25, train_samples=150), progress=False, log=None)
    finally:
        ray.shutdown()
    measured = [c for c in result.candidates[1:] if c.latency_ms is not None]
    assert measured and all(c.latency_ms < 1e9 for c in measured), [c.to_json() for c in result.candidates]
    assert result.report["parallel"]["timing_resource"] == "device"
