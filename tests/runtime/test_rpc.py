"""Remote benchmarking over TVM RPC: a direct server and a tracker, both on 127.0.0.1."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch
from torch import nn

import gmorph_tvm
from gmorph_tvm.artifact import build
from gmorph_tvm.errors import GmorphError
from gmorph_tvm.runtime import load
from gmorph_tvm.runtime.rpc import artifact_table, parse_address, remote_benchmark, remote_run

pytest.importorskip("tornado")  # the tracker needs it

KEY = "gmorph-test"


class Small(nn.Module):
    def __init__(self, out: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, out)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A two-task artifact and a one-task one (different programs to compare)."""
    x = torch.randn(1, 2, 8, 8)
    directory = tmp_path_factory.mktemp("rpc")
    both = gmorph_tvm.import_models({"p": Small(3, 0).eval(), "q": Small(2, 1).eval()}, example_inputs=x)
    single = gmorph_tvm.import_models({"p": Small(3, 0).eval()}, example_inputs=x)
    return build(both, "llvm").export(directory / "both.so"), build(single, "llvm").export(directory / "single.so")


@pytest.fixture(scope="module")
def servers():
    """A plain RPC server, and a tracker with a second server registered under KEY.

    (A server registered with a tracker only accepts the sessions the tracker hands out.)
    """
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    base = random.Random().randrange(20000, 40000, 300)
    started = []
    try:
        plain = rpc.Server(host="127.0.0.1", port=base, port_end=base + 100, silent=True)
        started.append(plain)
        tracker = Tracker(host="127.0.0.1", port=base + 100, port_end=base + 200, silent=True)
        started.append(tracker)
        keyed = rpc.Server(host="127.0.0.1", port=base + 200, port_end=base + 300, key=KEY,
                           tracker_addr=("127.0.0.1", tracker.port), silent=True)
        started.append(keyed)
        _wait_registered(tracker.port)
        yield {"rpc": ("127.0.0.1", plain.port), "tracker": ("127.0.0.1", tracker.port)}
    finally:
        for proc in reversed(started):
            proc.terminate()


def _wait_registered(tracker_port: int, timeout: float = 120.0) -> None:
    from tvm import rpc

    deadline = time.time() + timeout
    while time.time() < deadline:
        summary = rpc.connect_tracker("127.0.0.1", tracker_port).summary()
        if any(KEY in str(info.get("key", "")) for info in summary.get("server_info", [])):
            return
        time.sleep(0.5)
    raise TimeoutError("the RPC server did not register with the tracker")


def test_direct_rpc_outputs_match_local(servers, artifacts):
    both, _ = artifacts
    x = np.random.default_rng(0).standard_normal((1, 2, 8, 8)).astype("float32")
    remote = remote_run(both, {"x": x}, rpc=servers["rpc"])
    local = load(both)(x)
    assert list(remote) == ["p", "q"]
    for task in local:
        np.testing.assert_allclose(remote[task], local[task], rtol=1e-6, atol=1e-7)


def test_direct_rpc_benchmark(servers, artifacts):
    both, _ = artifacts
    rows = remote_benchmark(both, rpc=servers["rpc"], number=2, repeat=3)
    assert len(rows) == 1
    row = rows[0]
    assert row["artifact"] == "both.so" and row["device"] == "cpu" and row["repeat"] == 3
    assert 0 < row["min_ms"] <= row["median_ms"]
    assert row["speedup"] == pytest.approx(1.0) and row["max_abs_diff"] == 0.0


def test_tracker_benchmark_with_comparison(servers, artifacts):
    both, single = artifacts
    rows = remote_benchmark(both, tracker=servers["tracker"], key=KEY, number=2, repeat=2, compare=[single, both])
    assert [r["artifact"] for r in rows] == ["both.so", "single.so", "both.so"]
    assert rows[1]["max_abs_diff"] is None  # different tasks: not comparable
    assert rows[2]["max_abs_diff"] == 0.0  # the same program gives the same outputs remotely
    assert all(r["remote"].endswith(f"/{KEY}") for r in rows)
    table = artifact_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| artifact |") and len(lines) == 2 + len(rows)
    assert "single.so" in table and "cpu@127.0.0.1" in table


def test_connection_errors(artifacts):
    both, _ = artifacts
    with pytest.raises(GmorphError, match="exactly one of"):
        remote_benchmark(both)
    with pytest.raises(GmorphError, match="needs the device key"):
        remote_benchmark(both, tracker=("127.0.0.1", 1))
    with pytest.raises(GmorphError, match=r"cannot connect to RPC server 127\.0\.0\.1:1"):
        remote_benchmark(both, rpc=("127.0.0.1", 1))


def test_parse_address():
    assert parse_address("jetson.local:9091") == ("jetson.local", 9091)
    with pytest.raises(GmorphError, match="HOST:PORT"):
        parse_address("jetson.local")


def test_local_benchmark_rows(artifacts):
    from gmorph_tvm.runtime.rpc import local_benchmark

    both, single = artifacts
    rows = local_benchmark(both, number=2, repeat=2, compare=[single])
    assert [(r["artifact"], r["remote"]) for r in rows] == [("both.so", "local"), ("single.so", "local")]
    assert rows[0]["max_abs_diff"] == 0.0 and rows[1]["max_abs_diff"] is None
    assert "cpu@local" in artifact_table(rows)
