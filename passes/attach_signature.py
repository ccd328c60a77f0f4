"""``AttachSignature``: adds the VM function ``gmorph_signature() -> uint8[n]`` to a module.

Rewrites: nothing existing; adds one Relax function returning the JSON signature of the artifact
(inputs, task names, output specs, entry points, index bounds; encoded by
:func:`gmorph_tvm.core.manifest.encode_signature`) as a ``uint8`` constant. The loaders compare it
with the manifest, so a library and a manifest that do not belong together are refused before
``main`` runs. Preserves: every other function, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tvm
from tvm import relax

from gmorph_tvm.core.manifest import SIGNATURE_FUNCTION, encode_signature


@tvm.transform.module_pass(opt_level=0, name="AttachSignature")
class AttachSignature:
    """Add ``gmorph_signature`` returning ``signature`` (a manifest-like mapping) as JSON bytes."""

    def __init__(self, signature: Mapping[str, Any]) -> None:
        self.signature = dict(signature)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        data = np.frombuffer(encode_signature(self.signature), dtype="uint8").copy()
        const = relax.const(data, "uint8")
        func = relax.Function([], const, const.ty, is_pure=True).with_attr("global_symbol", SIGNATURE_FUNCTION)
        out = mod.clone()
        out[SIGNATURE_FUNCTION] = func
        return out
