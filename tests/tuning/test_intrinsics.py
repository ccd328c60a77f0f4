"""Selective tensor-intrinsic registration (the full package import costs 35-90 s here)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import tvm

from gmorph_tvm.tuning.intrinsics import intrinsic_families


@pytest.mark.parametrize(
    "target, families",
    [
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}, ["x86"]),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae"}, ["arm_cpu"]),
        ({"kind": "cuda", "arch": "sm_87"}, ["cuda"]),
    ],
)
def test_families_per_target(target, families):
    assert intrinsic_families(tvm.target.Target(target)) == families


def test_x86_registration_skips_the_other_families():
    script = textwrap.dedent(
        """
        import json, sys, tvm
        from gmorph_tvm.tuning.intrinsics import register_for_target
        register_for_target(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}))
        tvm.s_tir.TensorIntrin.get("dot_16x4_vnni")  # raises if not registered
        loaded = sorted(m.rsplit(".", 1)[1] for m in sys.modules if m.startswith("tvm.s_tir.tensor_intrin."))
        print(json.dumps(loaded))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "x86" in loaded and "cuda" not in loaded and "arm_cpu" not in loaded
