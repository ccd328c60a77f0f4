"""gmorph-tvm: fuse several DNNs that read the same input into one fast multi-task TVM program."""

__version__ = "0.1.0"

from .errors import GmorphError  # noqa: E402
from .frontend import MultiModel, TaskInfo, TensorSpec, import_models  # noqa: E402

__all__ = ["__version__", "GmorphError", "MultiModel", "TaskInfo", "TensorSpec", "import_models"]
