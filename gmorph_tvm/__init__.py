"""gmorph-tvm: fuse several DNNs that read the same input into one fast multi-task TVM program.

The front door is six verbs, each accepting what the one before returns::

    mm = gmorph_tvm.import_models({"age": age_net, "gender": "gender.onnx"}, x)   # MultiModel
    fused = gmorph_tvm.fuse(mm)                       # lossless: canonicalise, stitch, merge
    gmorph_tvm.tune(fused, "llvm", trials=200, work_dir="db")                      # TuningReport
    artifact = gmorph_tvm.build(fused, "llvm", tuning_db="db")                     # Artifact
    artifact.export("faces.so"); runner = gmorph_tvm.load("faces.so")              # Runner
    result = gmorph_tvm.search(models, data, max_accuracy_drop=1.0)                # lossy (GMorph)

Subpackages are nouns (``frontend``, ``passes``, ``tuning``, ``artifact``, ``runtime``, ``lossy``,
``core``); none shadows a verb. The verbs are resolved on first use (PEP 562), so
``import gmorph_tvm`` and the CLI's ``info``/``--version`` stay light (no torch, no compiler work).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core.threads import ensure_tvm_threads
from .core.version import __version__
from .errors import GmorphError

# Before TVM sizes its thread pool: one thread per physical core (see core.threads).
ensure_tvm_threads()

if TYPE_CHECKING:  # the names below, for type checkers and IDEs
    from .artifact import Artifact, build
    from .frontend import MultiModel, TaskInfo, TensorSpec, import_models
    from .lossy import SearchConfig, SearchResult, search
    from .pipeline import fuse
    from .runtime import Runner, load
    from .tuning import TuningReport, tune

# public name -> module that defines it (data flow order)
_EXPORTS = {
    "import_models": ".frontend",
    "MultiModel": ".frontend",
    "TaskInfo": ".frontend",
    "TensorSpec": ".frontend",
    "fuse": ".pipeline",
    "tune": ".tuning",
    "TuningReport": ".tuning",
    "TuneConfig": ".tuning",
    "build": ".artifact",
    "Artifact": ".artifact",
    "load": ".runtime",
    "Runner": ".runtime",
    "search": ".lossy",
    "SearchConfig": ".lossy",
    "SearchResult": ".lossy",
}

__all__ = ["__version__", "GmorphError", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gmorph_tvm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
