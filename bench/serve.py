"""Serving one loaded artifact from several client threads: throughput and latency percentiles.

    python bench/serve.py [--artifact out.so] [--calls 400] [--clients 1,2,4]

Without ``--artifact`` it builds two zoo CNNs (resnet, mobilenet; the zoo's example input) fused into one artifact in a
temp dir. Each TVM thread-pool size (1 and every core) runs in a fresh process, because TVM reads
``TVM_NUM_THREADS`` once when a thread first starts its pool; each calling thread gets its own
pool of that size. In that process one :class:`~gmorph_tvm.runtime.Runner` is shared by 1, 2 and 4
client threads, which split ``--calls`` calls between them (inputs prepared up front, outputs
checked against a single-thread run). Latency is per call as a client sees it (``runner(x)``,
including the copy of inputs in and outputs out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _build_default(directory: Path) -> Path:
    import torch

    import gmorph_tvm
    from gmorph_tvm import zoo

    x = zoo.example_input("resnet", 1)
    models = {"resnet": zoo.make("resnet", seed=0), "mobilenet": zoo.make("mobilenet", seed=1)}
    with torch.no_grad():
        mm = gmorph_tvm.import_models(models, example_inputs=x)
    return gmorph_tvm.build(gmorph_tvm.fuse(mm)).export(directory / "serve.so")


def _worker(artifact: str, calls: int, clients: list[int]) -> list[dict]:
    from gmorph_tvm.runtime import load
    from gmorph_tvm.runtime.loader import random_inputs

    runner = load(artifact)
    inputs = [random_inputs(runner.manifest, seed=i) for i in range(16)]
    expected = [runner(x) for x in inputs]
    for _ in range(20):  # warm up this thread's VM and pool
        runner(inputs[0])
    rows = []
    for n in clients:
        latencies: list[list[float]] = [[] for _ in range(n)]
        wrong = [0] * n
        per_client = max(1, calls // n)
        barrier = threading.Barrier(n + 1)

        def client(k: int, latencies=latencies, wrong=wrong, per_client=per_client, barrier=barrier) -> None:
            runner(inputs[k % len(inputs)])  # this thread's VM, created before timing
            barrier.wait()
            for i in range(per_client):
                j = (k + i) % len(inputs)
                t0 = time.perf_counter()
                out = runner(inputs[j])
                latencies[k].append(time.perf_counter() - t0)
                if any(not np.array_equal(out[t], expected[j][t]) for t in out):
                    wrong[k] += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        all_ms = np.concatenate([np.array(lat) for lat in latencies]) * 1e3
        rows.append({"clients": n, "calls": int(all_ms.size), "throughput": all_ms.size / elapsed,
                     "p50_ms": float(np.percentile(all_ms, 50)), "p99_ms": float(np.percentile(all_ms, 99)),
                     "wrong": int(sum(wrong))})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", help="artifact to serve (default: build two zoo CNNs)")
    parser.add_argument("--calls", type=int, default=400, help="calls per row, split between the clients")
    parser.add_argument("--clients", default="1,2,4", help="client thread counts")
    parser.add_argument("--pools", default=None, help="TVM thread-pool sizes (default: 1 and all cores)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    if args.worker:
        print(json.dumps(_worker(args.artifact, args.calls, clients)))
        return 0

    cores = os.cpu_count() or 1
    pools = [int(p) for p in args.pools.split(",")] if args.pools else sorted({1, cores})
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or str(_build_default(Path(tmp)))
        print(f"artifact {Path(artifact).name}, {args.calls} calls per row, {cores} cores\n")
        print("| TVM threads | clients | calls | calls/s | p50 ms | p99 ms | wrong |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for pool in pools:
            env = {**os.environ, "TVM_NUM_THREADS": str(pool)}
            proc = subprocess.run([sys.executable, __file__, "--worker", "--artifact", artifact, "--calls",
                                   str(args.calls), "--clients", args.clients], env=env, capture_output=True,
                                  text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            for row in json.loads(proc.stdout.strip().splitlines()[-1]):
                print(f"| {pool} | {row['clients']} | {row['calls']} | {row['throughput']:.1f} | {row['p50_ms']:.3f} | "
                      f"{row['p99_ms']:.3f} | {row['wrong']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
