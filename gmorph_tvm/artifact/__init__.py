"""Build stage: MultiModel -> compiled :class:`Artifact` (library + manifest) for CPU, CUDA, Jetson."""

from ..core.device_code import describe_device_code
from ..core.manifest import manifest_path_for, read_manifest
from ..core.targets import is_cuda, preset_names, resolve_target, target_dict
from .builder import Artifact, build

__all__ = [
    "Artifact",
    "build",
    "describe_device_code",
    "is_cuda",
    "manifest_path_for",
    "preset_names",
    "read_manifest",
    "resolve_target",
    "target_dict",
]
