"""Tuning on a fleet of boards through a TVM RPC tracker: a real tracker and two RPC servers on
127.0.0.1, an llvm target, one conv kernel, 8 trials.

Each server logs its sessions to a file of its own (``server_init_callback`` adds a handler to
TVM's ``RPCServer`` logger in the server process), so the test can tell that both boards
measured candidates, i.e. the runner ran one connection per board in parallel.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from gmorph_tvm import cli
from gmorph_tvm.core.targets import target_dict
from gmorph_tvm.errors import TuningError
from gmorph_tvm.tuning import lower, tune
from gmorph_tvm.tuning.pipeline import DATABASE_FILES
from gmorph_tvm.tuning.remote import count_servers, runner_spec
from gmorph_tvm.tuning.report import TUNED
from gmorph_tvm.tuning.target_key import claim_work_dir, target_key

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})
KEY = "gmorph-test-board"
TRIALS = 8


def _conv_module() -> tvm.IRModule:
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 12, 12), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            weight = relax.const(rng.standard_normal((8, 4, 3, 3)).astype("float32") * 0.2)
            bias = relax.const(rng.standard_normal((1, 8, 1, 1)).astype("float32"))
            h = relax.op.add(relax.op.nn.conv2d(x, weight, padding=1), bias)
            out = bb.emit_output(relax.op.nn.relu(h))
        bb.emit_func_output(out)
    return bb.get()


def _free_port_range() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_logger(path: str):
    """A server_init_callback: log the server's sessions to ``path`` (runs in the server process)."""

    def init():
        handler = logging.FileHandler(path)
        handler.setLevel(logging.INFO)
        logging.getLogger("RPCServer").addHandler(handler)

    return init


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """(tracker address, [session log of each server]) with two servers under KEY."""
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    logs = tmp_path_factory.mktemp("rpc_logs")
    base = _free_port_range()
    tracker = Tracker(host="127.0.0.1", port=base, port_end=base + 50, silent=True)
    servers, paths = [], []
    try:
        for i in range(2):
            path = logs / f"server{i}.log"
            path.touch()
            servers.append(rpc.Server(
                host="127.0.0.1", port=base + 100, port_end=base + 200, key=KEY,
                tracker_addr=("127.0.0.1", tracker.port), silent=False,
                server_init_callback=_session_logger(str(path)),
            ))
            paths.append(path)
        deadline = time.monotonic() + 120
        while count_servers("127.0.0.1", tracker.port, KEY) < 2:  # registration is asynchronous
            assert time.monotonic() < deadline, "the RPC servers did not register with the tracker"
            time.sleep(0.5)
        yield f"127.0.0.1:{tracker.port}", paths
    finally:
        for server in servers:
            server.terminate()
        tracker.terminate()


def test_tracker_with_no_board_under_the_key_is_one_clear_error(fleet):
    address, _ = fleet
    host, port = address.split(":")
    assert count_servers(host, int(port), KEY) == 2
    spec = runner_spec(address, KEY)
    assert spec["max_workers"] == 2 and spec["key"] == KEY
    with pytest.raises(TuningError, match="no RPC server is registered .* under key 'no-such-board'"):
        runner_spec(address, "no-such-board")
    with pytest.raises(TuningError, match="cannot reach the RPC tracker"):
        runner_spec(f"127.0.0.1:{_free_port_range()}", KEY)


@pytest.mark.slow  # one task, 8 trials measured over RPC: ~1-2 min on 2 busy cores
def test_tuning_measures_on_every_board_and_keeps_results(fleet, tmp_path):
    address, server_logs = fleet
    mod = _conv_module()
    work_dir = tmp_path / "db"
    report = tune(mod, TARGET, trials=TRIALS, work_dir=work_dir, op_names=["conv2d"],
                  min_trials_per_task=TRIALS, progress=False, tracker=address, key=KEY)
    tuned = [t for t in report.tasks if t.status == TUNED]
    assert len(tuned) == 1 and tuned[0].trials_run == TRIALS and tuned[0].best_us > 0, report.table()

    log = (work_dir / "logs" / "meta_schedule.log").read_text()
    assert f"RPCRunner via tracker {address} key {KEY!r}, 2 board(s)" in log
    sessions = [path.read_text().count("connected from") for path in server_logs]
    assert all(n >= 1 for n in sessions), f"sessions per board: {sessions}"
    assert sum(sessions) >= TRIALS  # every candidate was measured on a board

    # The records apply, and the tuned kernels compute what the default ones do.
    lowered = lower(mod, TARGET, database_dir=work_dir)
    assert any(f.attrs is not None and f.attrs.get("tirx.is_scheduled")
               for _, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    x = np.random.default_rng(1).standard_normal((1, 4, 12, 12)).astype("float32")

    def run(m):
        return relax.VirtualMachine(tvm.compile(m, target=TARGET), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()

    np.testing.assert_allclose(run(lowered), run(lower(mod, TARGET)), rtol=1e-5, atol=1e-5)
    # Records are kept per target: the same directory refuses another target's records.
    with pytest.raises(TuningError, match="holds records for target"):
        claim_work_dir(work_dir, tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}))


def test_cli_build_passes_tracker_and_keys_the_database_by_target(monkeypatch, tmp_path, onnx_model):
    calls = {}

    def fake_tune(mod, target, config, **kwargs):
        calls.update(kwargs, target=target, tracker=config.tracker, key=config.key, trials=config.trials)
        Path(kwargs["work_dir"]).mkdir(parents=True)
        for name in DATABASE_FILES:  # an empty database: build applies nothing
            (Path(kwargs["work_dir"]) / name).touch()

    monkeypatch.setattr("gmorph_tvm.tuning.tune", fake_tune)
    out = tmp_path / "m.so"
    code = cli.main(["build", str(onnx_model), "--target", json.dumps(target_dict(TARGET)),
                     "--tune-trials", "4", "--tracker", "127.0.0.1:9190", "--key", "orin", "-o", str(out)])
    assert code == 0 and out.is_file()
    assert calls["tracker"] == "127.0.0.1:9190" and calls["key"] == "orin" and calls["trials"] == 4
    assert calls["work_dir"] == str(tmp_path / "m.tuning" / target_key(TARGET))


def test_cli_tracker_needs_key_and_trials(capsys, onnx_model, tmp_path):
    assert cli.main(["build", str(onnx_model), "--tracker", "h:1", "--key", "k", "-o", str(tmp_path / "a.so")]) == 1
    assert "give --tune-trials N or --tune-minutes M too" in capsys.readouterr().err
    assert cli.main(["build", str(onnx_model), "--tune-trials", "2", "--tracker", "h:1", "-o", str(tmp_path / "a.so")]) == 1
    assert "--tracker needs --key" in capsys.readouterr().err


@pytest.fixture
def onnx_model(tmp_path):
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17, input_names=["x"])
    return path


def test_board_candidates_are_cross_linked_with_sass(tmp_path):
    """A tuning candidate for a Jetson is exported as the board loads it: an aarch64 .so whose CUDA
    kernels are SASS made by the ptxas of the board's CUDA release (no compiler needed there)."""
    import shutil

    from tvm import te
    from tvm.driver import build as tvm_build
    from tvm.s_tir import dlight as dl

    from gmorph_tvm.core import cuda as cuda_code
    from gmorph_tvm.core.device_code import describe_device_code
    from gmorph_tvm.core.targets import resolve_target
    from gmorph_tvm.tuning.remote import export_spec, make_export

    target = resolve_target("jetson-orin:jp6")
    if shutil.which("aarch64-linux-gnu-g++") is None or cuda_code.find_nvcc() is None:
        pytest.skip("needs aarch64-linux-gnu-g++ and nvcc")
    try:
        cuda_code.check_arch_supported("sm_87", "12.2")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"no CUDA 12 ptxas here: {err}")
    spec = export_spec(target)
    assert spec == {"cxx": "aarch64-linux-gnu-g++", "arch": "sm_87", "board_cuda": "12.2"}
    assert export_spec(TARGET) is None  # this machine's CPU: the default .tar export
    a = te.placeholder((1024,), name="a")
    b = te.compute((1024,), lambda i: a[i] * 2.0, name="b")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b])})
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    path = make_export(spec["cxx"], spec["arch"], spec["board_cuda"])(tvm_build(mod, target=target))
    assert open(path, "rb").read(20)[18] == cuda_code.EM_AARCH64
    assert describe_device_code(path) == {"sass": ["sm_87"], "ptx": []}
