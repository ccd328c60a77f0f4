"""The GPU check's dry run (issue 15): ``bench/gpu_prepare.sh --device cpu`` builds the cases,
``bench/gpu_check.sh DIR --device cpu`` runs them with PyTorch and the runtime bundle only (TVM,
tvm_ffi and gmorph_tvm cannot be imported there), checks every output and writes the table."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake and a C++ compiler")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "dry"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_prepare.sh"), "-o", str(out), "--device", "cpu",
                           "--sets", "C", "--batches", "2", "--models", "2"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _no_tvm(tmp_path: Path) -> dict:
    """An environment where ``import tvm`` / ``tvm_ffi`` / ``gmorph_tvm`` fail, as on the GPU machine."""
    blocker = tmp_path / "blocker"
    for name in ("tvm", "tvm_ffi", "gmorph_tvm"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('no {name} on the GPU machine')\n")
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(blocker)}


def _check(folder: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    python_dir = str(Path(sys.executable).parent)
    env = _no_tvm(tmp_path)
    env["PATH"] = f"{python_dir}:{env['PATH']}"
    return subprocess.run(["bash", str(folder / "gpu_check.sh"), str(folder), "--device", "cpu", "--repeat", "3",
                           "--warmup", "1", "--no-compile", *extra],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)


def test_prepared_folder_holds_every_case_under_64_mib(prepared):
    meta = json.loads((prepared / "cases.json").read_text())
    assert [c["name"] for c in meta["cases"]] == ["C_b2", "plan_b2"]
    assert meta["device"] == "cpu" and meta["arch"] is None
    for case in meta["cases"]:
        assert len(case["separate"]) == (2 if case["name"] == "C_b2" else 3)
        for art in [*case["separate"], case["fused"]]:
            assert (prepared / art["library"]).is_file()
            assert (prepared / (art["library"].removesuffix(".so") + ".weights.safetensors")).is_file()
            assert set(art["expected"]) == set(art["tasks"])
    plan = meta["cases"][1]
    assert plan["plan"] == "coarse4@6<class10@8" and plan["fused"]["tasks"] == ["class10", "coarse4", "size3"]
    assert (prepared / "runtime" / "gmorph-run").is_file()
    prepare = _script("gpu_prepare")
    assert prepare.check_size(prepared, 64) < 64 << 20
    with pytest.raises(SystemExit, match=r"over --max-mib 1 \(largest cases: "):
        prepare.check_size(prepared, 1)


def test_dry_run_checks_every_artifact_without_tvm(prepared, tmp_path):
    proc = _check(prepared, tmp_path, "--out", str(tmp_path / "table.md"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| C_b2 ") or line.startswith("| plan_b2 ")]
    assert len(rows) == 2, table
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(float(cells[i]) > 0 for i in (2, 3, 4)), row  # TVM separate, fused, PyTorch eager ms
        sep_err, fused_err = (float(v) for v in cells[9].split(" / "))
        assert sep_err <= 1e-4 and fused_err <= 1e-4
    assert "All outputs match PyTorch" in table


def test_a_wrong_output_fails_the_check_naming_case_and_task(prepared, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    meta = json.loads((broken / "cases.json").read_text())
    expected = broken / meta["cases"][1]["fused"]["expected"]["size3"]
    np.save(expected, np.load(expected) + 1.0)  # what PyTorch computed at prepare time, changed
    proc = _check(broken, tmp_path, "--cases", "plan_b2")
    assert proc.returncode == 1
    assert "1 MISMATCHES" in proc.stdout and "plan_b2 art/plan_b2/fused.so task size3" in proc.stdout


def test_plan_keys_are_parsed():
    prepare = _script("gpu_prepare")
    plan = prepare.parse_plan("coarse4@6<class10@8")
    assert plan.key() == "coarse4@6<class10@8"
    with pytest.raises(SystemExit, match="cannot read plan part 'coarse4'"):
        prepare.parse_plan("coarse4")
