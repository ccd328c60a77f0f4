"""Candidates evaluated in parallel as Ray tasks (``SearchConfig(workers=K)`` / ``--workers K``).

The driver (this process) keeps everything that decides what to try: the sampler, the predictive
filter, the rule filter and the checkpoint. What costs time -- compiling and timing a plan, then
fine-tuning it -- runs as Ray tasks, up to ``workers`` at once:

* proposals are made ``workers`` at a time, then one more whenever a candidate finishes (batched,
  asynchronous annealing: the sampler proposes with up to ``workers - 1`` outcomes still unknown;
  plans in flight count as seen, so none is proposed twice);
* each proposal is screened on the driver (rule filter, plan applied for its features, predicted
  accuracy and latency); only plans that pass are sent out;
* the filter and the sampler learn from a candidate only once it has finished (``observe``), in
  the order candidates finish; that is also the order of ``candidates.jsonl``;
* each task needs 1 CPU (torch and TVM pinned to one thread in it) and, where the cluster has GPUs,
  1 GPU for the fine-tune. With ``ray_timing_resource`` the compile + timing step is a separate
  task that needs one unit of that resource (advertised by the nodes that hold the target device,
  ``ray start --resources '{"jetson-orin": 1}'``), so candidates are timed on the target, one at a
  time per device; ``latency_fn`` (e.g. timing over a TVM RPC tracker) still replaces timing;
* resuming (same ``work_dir``) first replays the checkpointed candidates in file order (seen, and
  observed by the sampler and the filter), then goes on proposing; candidates in flight when the
  driver died are lost and may be proposed again.

Workers rebuild the search state (traced graphs, teacher logits, calibration) from the models and
data once per process, so every candidate is built exactly as the driver would build it. A local
Ray (``ray.init(num_cpus=workers)``) is started unless Ray is already initialised or ``ray_address``
names a cluster.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SearchError, one_line
from .driver import Candidate, Searcher, _progress
from .mutate import build_fused, to_multimodel
from .plan import FusionPlan

if TYPE_CHECKING:
    from .data import MultiTaskData


def import_ray():
    """The ``ray`` module, or a SearchError saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise SearchError("parallel search (workers > 1 or ray_address) needs Ray: pip install 'gmorph-tvm[ray]' "
                          "(or pip install ray)") from err
    return ray


@dataclass
class _Context:
    """What a worker needs to rebuild the search state (sent once, through the object store)."""

    models: dict[str, torch.nn.Module]
    data: MultiTaskData
    config: Any  # SearchConfig for the worker: no work dir, no log, serial


_WORKERS: dict[str, Searcher] = {}  # per worker process: context id -> its search state


def _worker_searcher(box: list) -> Searcher:
    """The search state of context ``box[0]`` (an ObjectRef, boxed so Ray does not fetch it each call)."""
    import ray

    key = box[0].hex()
    searcher = _WORKERS.get(key)
    if searcher is None:
        torch.set_num_threads(1)
        ctx: _Context = ray.get(box[0])
        _WORKERS.clear()
        searcher = _WORKERS[key] = Searcher(ctx.models, ctx.data, ctx.config)
    return searcher


def _time_task(box: list, plan_json: dict) -> float:
    """Compile and time a plan on this node (scheduled by the timing resource)."""
    searcher = _worker_searcher(box)
    plan = FusionPlan.from_json(plan_json)
    fused = build_fused(searcher.graphs, plan, searcher.calibration)
    return float(searcher.measure(to_multimodel(fused, searcher.example)))


def _evaluate_task(box: list, index: int, plan_json: dict, best_latency: float, timing_resource: str | None) -> dict:
    """Steps 3-4 of one screened candidate on a worker; the fine-tuned weights if it passed."""
    import ray

    t0 = time.perf_counter()
    searcher = _worker_searcher(box)
    plan = FusionPlan.from_json(plan_json)
    fused = build_fused(searcher.graphs, plan, searcher.calibration)
    cand = Candidate(index, plan, "error")
    measure = None
    if timing_resource is not None:
        timer = ray.remote(_time_task).options(num_cpus=0, resources={timing_resource: 1}, max_retries=0)

        def measure(p: FusionPlan, multi: Any) -> float:
            return float(ray.get(timer.remote(box, p.to_json())))

    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else None
    searcher.measure_and_fine_tune(cand, fused, best_latency, measure, device)
    return {
        "status": cand.status, "latency_ms": cand.latency_ms, "distill": cand.distill, "error": cand.error,
        "state": fused.state_dict() if cand.status == "passed" else None,
        "worker": f"{socket.gethostname()}:{os.getpid()}", "device": device or "cpu",
        "started": time.time() - (time.perf_counter() - t0), "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def _init_ray(ray, config) -> bool:
    """Connect to (or start) Ray; True when this call started it (and so should shut it down)."""
    if ray.is_initialized():
        return False
    env = {"TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    try:
        if config.ray_address is not None:
            ray.init(address=config.ray_address, runtime_env={"env_vars": env}, log_to_driver=False)
        else:
            ray.init(num_cpus=config.workers, include_dashboard=False, runtime_env={"env_vars": env},
                     log_to_driver=False)
    except Exception as err:
        where = config.ray_address or "a local Ray"
        raise SearchError(f"cannot start or reach {where}: {one_line(err, 300)}") from err
    return True


def run_parallel(searcher: Searcher) -> None:
    """The candidate loop of :meth:`Searcher.run` with candidates as Ray tasks (module docstring)."""
    ray = import_ray()
    config = searcher.config
    started_ray = _init_ray(ray, config)
    try:
        _loop(ray, searcher)
    finally:
        if started_ray:
            ray.shutdown()


def _loop(ray, searcher: Searcher) -> None:
    config, store = searcher.config, searcher.store
    worker_config = replace(config, work_dir=None, resume=False, log=None, progress=False, workers=1,
                            ray_address=None, plans=())
    box = [ray.put(_Context(dict(searcher.models), searcher.data, worker_config))]
    resources = ray.cluster_resources()
    gpus = 1 if resources.get("GPU", 0) >= 1 else 0
    if config.ray_timing_resource is not None and resources.get(config.ray_timing_resource, 0) <= 0:
        raise SearchError(f"no Ray node advertises the timing resource {config.ray_timing_resource!r} (have: "
                          f"{', '.join(sorted(resources))}); start the target's node with ray start --resources "
                          f"'{{\"{config.ray_timing_resource}\": 1}}'")
    task = ray.remote(_evaluate_task).options(num_cpus=1, num_gpus=gpus, max_retries=0)
    searcher.say(f"parallel search: {config.workers} worker(s) on Ray ({'1 GPU' if gpus else 'CPU'} per fine-tune)")

    # Resume: the checkpointed candidates, in the order they finished.
    done = 0
    for cand in list(store.records.values()):
        if cand.status == "baseline" or cand.key in searcher.seen or done >= config.budget:
            continue
        searcher.seen.add(cand.key)
        searcher.observe(cand)
        done += 1
    next_index = 1 + max((c.index for c in searcher.candidates), default=0)
    bar = _progress(config.budget, config.progress)
    bar.update(done)
    pending: dict[Any, Candidate] = {}
    busy, submitted = 0.0, 0
    loop_started = time.perf_counter()
    in_flight_area, last_change = 0.0, loop_started  # integral of (tasks in flight) dt

    def mark() -> None:
        nonlocal in_flight_area, last_change
        now = time.perf_counter()
        in_flight_area += len(pending) * (now - last_change)
        last_change = now

    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < config.workers and done + len(pending) < config.budget:
                if config.time_budget_s is not None and time.perf_counter() - searcher.started > config.time_budget_s:
                    searcher.say(f"time budget of {config.time_budget_s:.0f} s reached")
                    exhausted = True
                    break
                plan = searcher.next_plan()
                if plan is None:
                    searcher.say("no new plan could be proposed: the plan space is exhausted")
                    exhausted = True
                    break
                searcher.seen.add(plan.key())
                t0 = time.perf_counter()
                cand, fused = searcher.screen(next_index, plan)
                next_index += 1
                if fused is None:  # decided on the driver (a filter skip or an error)
                    cand.seconds = time.perf_counter() - t0
                    store.add(cand)
                    searcher.observe(cand)
                    done += 1
                    bar.update(1)
                    continue
                ref = task.remote(box, cand.index, plan.to_json(), searcher.best_latency, config.ray_timing_resource)
                cand.seconds = time.perf_counter() - t0
                mark()
                pending[ref] = cand
                submitted += 1
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            mark()
            for ref in ready:
                cand = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except Exception as err:  # a worker died or raised: the candidate is an error, the search goes on
                    cand.status, cand.error = "error", f"ray task failed: {one_line(err, 300)}"
                else:
                    cand.status, cand.latency_ms, cand.distill, cand.error = (
                        out["status"], out["latency_ms"], out["distill"], out["error"])
                    cand.seconds += out["seconds"]
                    busy += out["seconds"]
                    if out["state"] is not None:
                        cand.weights = store.keep_state(cand.plan, out["state"])
                store.add(cand)
                searcher.observe(cand)
                done += 1
                bar.update(1)
                bar.set_postfix_str(f"best {searcher.best_latency:.3f} ms, in flight {len(pending)}")
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)
    mark()
    loop_seconds = time.perf_counter() - loop_started
    searcher.parallel_stats = {
        "mean_in_flight": in_flight_area / loop_seconds if loop_seconds > 0 else None,
        "tasks": submitted,
        "workers": config.workers, "ray_address": config.ray_address, "gpus_per_fine_tune": gpus,
        "timing_resource": config.ray_timing_resource, "loop_seconds": loop_seconds, "task_seconds": busy,
        "utilization": busy / (config.workers * loop_seconds) if loop_seconds > 0 else None,
    }  # fmt: skip
