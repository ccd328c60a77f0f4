"""Helpers shared by tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def run_relax(mod, inputs, target=None):
    """Compile ``mod`` (weights bound) with TVM's default CPU pipeline and run ``main``.

    A reference runner independent of gmorph_tvm.build, so frontend and pass tests do not depend
    on later stages. Returns a list of numpy arrays (main's tuple flattened).
    """
    import tvm
    from tvm import relax

    target = tvm.target.Target(target or {"kind": "llvm"})
    with target:
        lowered = relax.get_pipeline("zero")(mod)
    vm = relax.VirtualMachine(tvm.compile(lowered, target=target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs])
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [o.numpy() for o in out]


class TinyCNN(nn.Module):
    """Conv + global mean + linear: the smallest model that exercises a real build."""

    def __init__(self, classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))
