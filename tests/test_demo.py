"""The README's main job (``gmorph-tvm demo``) on a reduced budget: real weights, real data."""

from __future__ import annotations

from gmorph_tvm.benchmark import Row, format_table
from gmorph_tvm.demo import run_demo


def test_demo_builds_checks_and_prints_table(tmp_path, capsys):
    assert run_demo(out_dir=tmp_path, tune_trials=0, batch=2, num_tasks=2) == 0
    out = capsys.readouterr().out
    assert "| gmorph-tvm fused |" in out and "| TVM, models compiled separately |" in out
    assert (tmp_path / "fused.so").is_file() and (tmp_path / "fused.manifest.json").is_file()


def test_format_table_speedups_are_relative_to_baseline():
    table = format_table([Row("slow", 4.0, 2_000_000), Row("fast", 1.0, 1_000_000)], baseline="slow")
    assert "| fast | 1.000 | 4.00x | 1.00 |" in table
    assert "peak MB" not in table
