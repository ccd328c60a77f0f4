"""Peak memory of a loaded artifact with >= 50 MB of weights (issue 14's bound), in fresh processes.

Peak = VmHWM after loading and three calls, minus the resident size after importing the runtime
(what the artifact adds). External weights must stay within 1.2 x the weight bytes + 40 MB; the
embedded build, which holds the library image and TVM's deserialised constants, must not (so the
probe can tell the two apart).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import gmorph_tvm
from gmorph_tvm.artifact import build

PROBE = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from gmorph_tvm.runtime import load

    def status(key):
        text = open("/proc/self/status").read()
        return int(text.split(key + ":")[1].split()[0]) * 1024

    base = status("VmRSS")
    start = time.perf_counter()
    runner = load(sys.argv[1])
    load_s = time.perf_counter() - start
    x = np.load(sys.argv[2])
    for _ in range(3):
        out = runner({"x": x})
    np.save(sys.argv[3], out["big"])
    print(json.dumps({"peak": status("VmHWM") - base, "load_s": load_s}))
    """
)


class BigMLP(nn.Module):
    def __init__(self, width: int = 2048, depth: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    model = BigMLP().eval()
    x = torch.randn(1, 2048)
    mm = gmorph_tvm.import_models({"big": model}, x)
    assert mm.weight_bytes >= 50e6
    with torch.no_grad():
        ref = model(x).numpy()
    return mm, x.numpy(), ref, tmp_path_factory.mktemp("big")


def _probe(library, x, tmp_path) -> dict:
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(library), str(tmp_path / "x.npy"), str(tmp_path / "o.npy")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["out"] = np.load(tmp_path / "o.npy")
    return result


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["external", "embedded"])
def test_peak_memory_bound(big, weights):
    mm, x, ref, tmp = big
    library = build(mm, "llvm", weights=weights).export(tmp / f"big_{weights}.so")
    result = _probe(library, x, tmp)
    np.testing.assert_allclose(result["out"], ref, rtol=1e-4, atol=1e-5)
    bound = 1.2 * mm.weight_bytes + 40e6
    if weights == "external":
        assert result["peak"] <= bound, f"peak {result['peak'] / 1e6:.1f} MB > bound {bound / 1e6:.1f} MB"
    else:
        assert result["peak"] > bound  # the library image + constant pool: the probe sees the copies
