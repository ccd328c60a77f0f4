"""Guard against the apache-tvm-ffi release that segfaults on IR serialisation.

apache-tvm-ffi 0.1.15.post2 (what pip picks for apache-tvm 0.27.0.post1, which only asks for
``>=0.1.14.post0``) crashes the process in ``tvm::ffi::ToJSONGraph`` on any IR JSON: ``save_json``,
pickling a Relax var, MetaSchedule's mutators and its JSON database. gmorph-tvm pins
``apache-tvm-ffi==0.1.14.post1``. If another version is installed anyway, :func:`ensure_ir_json_works`
probes serialisation in a throw-away subprocess and turns a crash into a :class:`TuningError`
instead of letting tuning kill the user's process.
"""

from __future__ import annotations

import functools
import subprocess
import sys

from gmorph_tvm.errors import TuningError

PINNED_TVM_FFI_VERSION = "0.1.14.post1"

# Run in a fresh interpreter: a crash there is an exit code here, not a dead process.
IR_JSON_PROBE = """
import pickle, tvm
from tvm import relax
tvm.ir.save_json(tvm.ir.PrimType("float32"))
v = relax.Var("x", relax.TensorType((1, 3), "float32"))
assert pickle.loads(pickle.dumps(v)).name == "x"
print("ok")
"""


def installed_tvm_ffi_version() -> str:
    import tvm_ffi

    return str(tvm_ffi.__version__)


def probe_ir_json(timeout_s: float = 120.0) -> tuple[bool, str]:
    """Run :data:`IR_JSON_PROBE` in a subprocess: (worked, description of what happened)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", IR_JSON_PROBE], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return False, f"IR serialisation probe hung for {timeout_s:.0f} s"
    if proc.returncode == 0 and proc.stdout.strip().endswith("ok"):
        return True, "ok"
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    return False, f"IR serialisation probe died ({how}) {tail}".strip()


@functools.lru_cache(maxsize=1)
def ensure_ir_json_works() -> None:
    """Raise TuningError if IR JSON serialisation would crash this installation.

    Free for the pinned version; otherwise costs one subprocess (a few seconds), once per process.
    """
    version = installed_tvm_ffi_version()
    if version == PINNED_TVM_FFI_VERSION:
        return
    worked, what = probe_ir_json()
    if not worked:
        raise TuningError(
            f"apache-tvm-ffi {version} crashes on IR serialisation ({what}), which MetaSchedule "
            f"needs; install apache-tvm-ffi=={PINNED_TVM_FFI_VERSION}"
        )
