"""Exception types of gmorph-tvm.

Every error a user can cause (bad model, bad input, bad target) is raised as one of these, with a
message that names the model, node, input or file involved. ``GmorphError`` is the common base, so
callers (and the CLI) can catch everything of ours in one place.
"""

from __future__ import annotations


class GmorphError(Exception):
    """Base class of all gmorph-tvm errors."""


class ModelImportError(GmorphError):
    """A model could not be imported (export failure, unsupported operator, corrupt file)."""


class InputSpecError(GmorphError):
    """Model inputs disagree with each other or with what the user supplied."""


class FusionError(GmorphError):
    """A fusion pass was given something it cannot fuse, or bad options."""


class BuildError(GmorphError):
    """Compiling or exporting an artifact failed."""


class TargetError(BuildError):
    """An unknown or malformed target."""


class ArtifactError(GmorphError):
    """An artifact or its manifest is missing, corrupt or incompatible."""


class RuntimeInputError(InputSpecError):
    """Inputs given at run time do not match the artifact's manifest."""


class TuningError(GmorphError):
    """Auto-tuning failed in a way that cannot fall back to default schedules."""


class SearchError(GmorphError):
    """The accuracy-aware fusion search was given bad data or options."""


def one_line(err: BaseException, limit: int = 400, *, first: bool = False) -> str:
    """The informative line of an error (TVM's: its message without C++/Python trace lines).

    The one helper that turns a cause into the single line our errors and the CLI print. By default
    the line TVM puts its failed check on, else the last line; ``first=True`` takes the first
    line instead (torch.export and the ONNX checker state the problem first, then context).
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("File ", "Traceback", "at ", "0x", "^", "~"))]
    if not lines:
        text = type(err).__name__
    elif first:
        text = lines[0]
    else:
        text = lines[-1]
        for line in lines:  # TVM puts the check that failed on a line of its own; prefer it
            if "Check failed" in line or "Error:" in line or "error:" in line:
                text = line
                break
    return text if len(text) <= limit else text[: limit - 3] + "..."
