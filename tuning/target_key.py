"""Tuning records are kept per target: a short directory key per target, and a stamp per database.

MetaSchedule's JSON database matches records by workload, not by target, so records measured on
an x86 CPU applied to an aarch64 build (or the other way round) would silently pick schedules
tuned for the wrong machine. ``tune`` therefore stamps its work dir with the target it tunes for
(``target.json``) and refuses to add records for another target there; the CLI's default
database directory is keyed by :func:`target_key` (``<output>.tuning/<key>``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import tvm

from gmorph_tvm.core.targets import target_dict
from gmorph_tvm.errors import TuningError

STAMP_FILE = "target.json"


def _plain(target: tvm.target.Target) -> dict[str, Any]:
    return target_dict(target)


def target_key(target: tvm.target.Target) -> str:
    """A readable, stable directory name for ``target``: e.g. ``cuda-sm_87-aarch64-3f2a9c1b``."""
    spec = _plain(target)
    host = spec.get("host") if isinstance(spec.get("host"), dict) else spec
    parts = [str(spec.get("kind", "target"))]
    if spec.get("arch"):
        parts.append(str(spec["arch"]))
    triple = str(host.get("mtriple", "")) if isinstance(host, dict) else ""
    if triple:
        parts.append(triple.split("-")[0])
    if isinstance(host, dict) and host.get("mcpu"):
        parts.append(str(host["mcpu"]))
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts)) + "-" + digest


def claim_work_dir(work_dir: Path, target: tvm.target.Target) -> None:
    """Stamp ``work_dir`` with ``target``, or raise TuningError if it holds records of another target."""
    stamp = Path(work_dir) / STAMP_FILE
    spec = _plain(target)
    if stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            recorded = None
        if recorded is not None and recorded != spec:
            raise TuningError(
                f"tuning database {work_dir} holds records for target {json.dumps(recorded)}, not "
                f"{json.dumps(spec)}; keep one directory per target (e.g. {Path(work_dir) / target_key(target)})"
            )
        if recorded == spec:
            return
    stamp.write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n", encoding="utf-8")
