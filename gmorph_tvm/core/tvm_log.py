"""Filter TVM's leftover debug warnings out of stderr.

TVM 0.27 logs ``Warning: Scope Saving:`` / ``Scope Loaded:`` from C++ once per memory scope
whenever a VM executable is saved or loaded. They say nothing to a user, so while exporting or
loading we point file descriptor 2 at a temp file and replay every other line afterwards. The
same goes for ``BlockBuilder destroyed with remaining blocks!``, which follows any failed import
or pass (the builder of the failed conversion being freed) and says nothing the error did not.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

_NOISE = re.compile(r"executable\.cc:\d+: Warning: Scope (Saving|Loaded):"
                    r"|block_builder\.cc:\d+: Warning: BlockBuilder destroyed with remaining blocks!")


@contextlib.contextmanager
def quiet_tvm_warnings() -> Iterator[None]:
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. some embedded interpreters): do nothing
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not _NOISE.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
