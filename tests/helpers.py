"""Helpers shared by tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np


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
