"""Import stage: PyTorch / ONNX models -> one Relax IRModule (:class:`MultiModel`)."""

from .importer import SimilarInputsWarning, import_models
from .multimodel import MultiModel, TaskInfo, TensorSpec, bind_weights, check_inputs, params_of

__all__ = ["SimilarInputsWarning", "import_models", "MultiModel", "TaskInfo", "TensorSpec", "bind_weights", "check_inputs", "params_of"]
