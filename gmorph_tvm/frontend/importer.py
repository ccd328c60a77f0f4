"""Import PyTorch and ONNX models into one Relax IRModule (`import_models`).

Each model is imported on its own through TVM's frontend (``torch.export`` +
``from_exported_program``, or ``from_onnx``) with weights kept as function parameters; every
weight is renamed ``<task>.<original parameter name>`` so its provenance survives merging. The
per-model functions are then called from one ``main`` that takes the distinct inputs (tasks that
read an input of the same name, shape and dtype share one Relax var) and returns every task's
outputs, and are inlined so later passes see one dataflow graph. TIR functions a frontend emits
beside ``main`` (``emit_te``, e.g. a reflect Pad) are kept, renamed ``<task>_<name>``.

ONNX graphs are first folded at the given static shapes (``onnx_fold``: onnxslim) and converted with
gmorph-tvm's extra converters (``onnx_convert``, ``onnx_ops``: LSTM, GRU). An exported program whose
inputs have dynamic dims is re-exported at the given static shapes. ``input_map`` says which task
inputs read the same tensor under different names; a warning points out inputs that look alike.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import os
import re
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import tvm
from tvm import relax

from ..core.ir import dtype_str
from ..core.provenance import PROVENANCE_ATTR, encode_provenance
from ..core.tvm_log import quiet_tvm_warnings
from ..errors import InputSpecError, ModelImportError, one_line
from . import onnx_convert, onnx_fold
from .multimodel import MultiModel, TaskInfo, TensorSpec, with_weight_params
from .pt2_file import read_checked_pt2

ModelLike = Union["torch.nn.Module", str, os.PathLike, "onnx.ModelProto"]  # noqa: F821
ExampleInputs = Any | Sequence[Any] | Mapping[str, Any]


@dataclass
class _ImportedTask:
    """One model imported on its own, before merging."""

    name: str
    func: relax.Function  # params: inputs, then weights named "<task>.<orig>"
    inputs: list[TensorSpec]
    weights: list[tuple[str, str, tvm.runtime.Tensor]]  # (new name, original name, value)
    source: str
    source_hash: str
    functions: dict[tvm.ir.GlobalVar, tvm.ir.BaseFunc]  # other functions of the frontend's module


class SimilarInputsWarning(UserWarning):
    """Two models have inputs of identical shape and dtype under different names."""


def import_models(
    models: Mapping[str, ModelLike],
    example_inputs: ExampleInputs | None = None,
    *,
    input_shapes: Mapping[str, Any] | None = None,
    input_dtypes: Mapping[str, str] | None = None,
    input_map: Mapping[str, str] | None = None,
) -> MultiModel:
    """Import several task models into one :class:`MultiModel`.

    Parameters
    ----------
    models:
        task name -> model: a ``torch.nn.Module``, an ONNX file path, or an ``onnx.ModelProto``.
        Task order is kept: ``main`` returns the tasks' outputs in this order.
    example_inputs:
        Example inputs for the PyTorch models (needed by ``torch.export``): one tensor or a tuple
        of tensors shared by every model, or a mapping task name -> tensor / tuple of tensors.
    input_shapes:
        Static shapes for inputs whose shape is symbolic (ONNX inputs, dynamic dims of an exported
        program / ``.pt2``): input name -> shape, or task name -> {input name -> shape}. An input
        renamed by ``input_map`` may also be given under its shared name.
    input_dtypes:
        dtypes for ONNX inputs (input name -> dtype); default is what the file declares.
    input_map:
        ``"task.input" -> "shared"``: task ``task``'s input ``input`` is the shared input
        ``shared`` (e.g. ``{"ocr_cls.input.1": "x"}`` when a model kept torch's default name).
        Inputs of the same name, shape and dtype are shared without it.
    """
    if not isinstance(models, Mapping):
        raise ModelImportError(
            f"import_models takes a mapping task name -> model, not a {type(models).__name__} "
            "(e.g. import_models({'age': 'age.onnx', 'gender': 'gender.onnx'}))"
        )
    if not models:
        raise ModelImportError("import_models needs at least one model")
    seen: dict[str, str] = {}
    for task in models:
        if not isinstance(task, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", task):
            raise ModelImportError(
                f"task name {task!r} is not valid: use letters, digits, '_' or '-', starting with a letter"
            )
        key = task.replace("-", "_")  # the task's function name in the merged module
        if key in seen:
            raise ModelImportError(f"task names {seen[key]!r} and {task!r} collide; give every task a distinct name")
        seen[key] = task
    shapes = _check_input_shapes(input_shapes, list(models))
    used: set[str] = set()
    imported = []
    for task, model in models.items():
        imported.append(_import_one(task, model, _examples_for(task, example_inputs),
                                    _task_shapes(task, shapes, input_map), input_dtypes, used))
    _check_shapes_used(shapes, used, list(models), input_map)
    return _merge(imported, _check_input_map(imported, input_map))


def _task_shapes(task: str, shapes: Mapping[str, Any] | None, input_map: Mapping[str, str] | None) -> dict:
    """Input name -> static shape for ``task``: global entries, the task's own, shared names mapped back."""
    if not shapes:
        return {}
    out = {name: dims for name, dims in shapes.items() if not isinstance(dims, Mapping)}
    for key, shared in (input_map or {}).items():
        owner, _, name = key.partition(".")
        if owner == task and shared in out and name not in out:
            out[name] = out[shared]
    own = shapes.get(task)
    if isinstance(own, Mapping):
        out.update(own)
    return out


def _check_input_map(tasks: list[_ImportedTask], input_map: Mapping[str, str] | None) -> dict[tuple[str, str], str]:
    """``input_map`` as (task, input) -> shared name, every key checked against the models."""
    out: dict[tuple[str, str], str] = {}
    by_name = {t.name: t for t in tasks}
    for key, shared in (input_map or {}).items():
        task, sep, name = str(key).partition(".")
        if not sep or not name or not shared:
            raise InputSpecError(f"input_map key {key!r} must be TASK.INPUT (mapped to a shared name, got {shared!r})")
        if task not in by_name:
            raise InputSpecError(f"input_map key {key!r}: no model named {task!r}; models are {', '.join(by_name)}")
        names = [spec.name for spec in by_name[task].inputs]
        if name not in names:
            raise InputSpecError(
                f"input_map key {key!r}: model {task!r} has no input {name!r}; its inputs are {', '.join(map(repr, names))}"
            )
        out[(task, name)] = str(shared)
    return out


def _check_input_shapes(shapes: Mapping[str, Any] | None, tasks: list[str]) -> dict[str, Any]:
    """``input_shapes`` validated: every shape a non-empty list of positive ints."""
    if shapes is None:
        return {}
    if not isinstance(shapes, Mapping):
        raise InputSpecError(f"input_shapes must map input names to shapes, not a {type(shapes).__name__}")

    def check(name: str, shape: Any, where: str) -> list[int]:
        if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
            raise InputSpecError(f"{where}{name!r} must be a list of dimensions, not {shape!r}")
        dims = list(shape)
        if not dims:
            raise InputSpecError(f"{where}{name!r} is an empty shape; give every dimension (e.g. [1, 3, 32, 32])")
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims):
            raise InputSpecError(f"{where}{name!r} = {dims!r}: dimensions must be integers")
        if any(d <= 0 for d in dims):
            raise InputSpecError(f"{where}{name!r} = {[int(d) for d in dims]}: dimensions must be positive")
        return [int(d) for d in dims]

    out: dict[str, Any] = {}
    for key, value in shapes.items():
        if isinstance(value, Mapping):
            if key not in tasks:
                raise InputSpecError(f"input_shapes names task {key!r}, but the tasks are {', '.join(tasks)}")
            out[key] = {name: check(name, shape, f"input_shapes[{key!r}]") for name, shape in value.items()}
        else:
            out[key] = check(key, value, "input_shapes ")
    return out


def _check_shapes_used(
    shapes: Mapping[str, Any], used: set[str], tasks: list[str], input_map: Mapping[str, str] | None = None
) -> None:
    for key, shared in (input_map or {}).items():  # a shape given under a shared name counts as used
        if str(key).replace(".", "/", 1) in used or str(key).partition(".")[2] in used:
            used.add(str(shared))
    for key, value in shapes.items():
        names = [f"{key}/{n}" for n in value] if isinstance(value, Mapping) else [key]
        for name in names:
            if name not in used:
                raise InputSpecError(
                    f"input_shapes gives a shape for {name.replace('/', ' input ')!r}, but no model has an "
                    "input of that name"
                )


# ---- per-frontend import -------------------------------------------------------------------


def _examples_for(task: str, example_inputs: ExampleInputs | None) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Mapping):
        if task not in example_inputs:
            return None
        ex = example_inputs[task]
    else:
        ex = example_inputs
    return tuple(ex) if isinstance(ex, (tuple, list)) else (ex,)


def _import_one(task: str, model: Any, examples: tuple | None, shapes: dict, dtypes, used: set[str]) -> _ImportedTask:
    try:
        import torch

        if isinstance(model, torch.nn.Module):
            return _import_torch(task, model, examples, shapes, used)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(model, (str, os.PathLike)) and str(model).endswith(".pt2"):
        return _import_torch(task, _load_exported_program(task, Path(model)), examples, shapes, used)
    if type(model).__name__ == "ExportedProgram":
        return _import_torch(task, model, examples, shapes, used)
    if isinstance(model, (str, os.PathLike)) or type(model).__name__ == "ModelProto":
        return _import_onnx(task, model, examples, shapes, dtypes, used)
    raise ModelImportError(
        f"model {task!r}: unsupported model type {type(model).__name__}; "
        "expected a torch.nn.Module, an ONNX file path or an onnx.ModelProto"
    )


def _short(err: BaseException) -> str:
    """The informative last line of an error, without TVM's C++ backtrace or check condition."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if not line.startswith(("File ", "at ", "^", "~")) and "Traceback" not in line:
            # "Check failed: (cond) is false: message" -> "message" (the condition is TVM-internal)
            line = re.sub(r"^.*?Check failed: .*? is false:\s*", "", line) or line
            return line[:500]
    return type(err).__name__


def _torch_export_reason(err: BaseException) -> str:
    """First line of a torch.export error plus where in the user's code it was raised."""
    text = str(err).strip()
    first = one_line(err, 400, first=True)
    where = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text)
    if where:
        path, line, func = where[-1]
        first += f" (at {Path(path).name}:{line} in {func})"
    return f"{type(err).__name__}: {first}"


@contextlib.contextmanager
def _quiet_torch_logs():
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _frontend_call():
    """A TVM frontend call: its warnings and the converter's own prints (``Error converting
    operator ...``) kept off the user's terminal; the error itself says what failed."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _release_frames(err: BaseException) -> None:
    """Free the failed frontend's frames now (its BlockBuilder with unfinished blocks among them),
    with TVM's follow-on ``BlockBuilder destroyed with remaining blocks!`` warning filtered, so a
    failed import leaves nothing behind and the next import starts clean."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in chain:  # the frontend's own error may be wrapped
        chain.append(cause)
        cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
    with quiet_tvm_warnings():
        for link in chain:
            traceback.clear_frames(link.__traceback__)
        gc.collect()
    while relax.BlockBuilder._stack:  # noqa: SLF001 - a scope the frontend left open
        relax.BlockBuilder._stack.pop()  # noqa: SLF001


def _unsupported_ops(err: BaseException) -> str | None:
    text = str(err)
    match = re.search(r"Unsupported function types? \[?([^\]\n]+)\]?", text)
    if match:
        return match.group(1).strip()
    match = re.search(r"operators are not supported[^:]*:\s*([^\n]+)", text)
    if match:
        return match.group(1).strip()
    return None


def _load_exported_program(task: str, path: Path):
    import torch

    if not path.is_file():
        raise ModelImportError(f"model {task!r}: file {str(path)!r} does not exist")
    data = read_checked_pt2(task, path, ModelImportError)  # torch.export.load alone runs code a file carries
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(io.BytesIO(data))
    except Exception as err:
        raise ModelImportError(
            f"model {task!r}: {str(path)!r} is not a valid torch.export (.pt2) file ({one_line(err, 200, first=True)})"
        ) from err


def _import_torch(task: str, model, examples: tuple | None, shapes: Mapping[str, Any] | None = None,
                  used: set[str] | None = None) -> _ImportedTask:
    """Import an ``nn.Module`` (exported here with ``examples``) or an ``ExportedProgram``.

    Every input named in ``shapes`` is recorded in ``used``; its shape must be the one the
    (specialised) program reads.
    """
    import torch

    shapes = shapes or {}
    if isinstance(model, torch.export.ExportedProgram):
        source_hash = _hash_arrays((k, v.detach().cpu().numpy()) for k, v in model.state_dict.items())
        exported = _specialise(task, model, examples, shapes)
        _check_torch_shapes(task, exported, shapes, used)
        return _import_exported(task, exported, source_hash)
    if examples is None:
        raise ModelImportError(f"model {task!r}: a PyTorch model needs example_inputs for torch.export")
    examples = tuple(torch.as_tensor(e) if isinstance(e, np.ndarray) else e for e in examples)
    model = model.eval()
    try:
        # torch.export prints graphs and warnings on failure; the error itself says enough.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            exported = torch.export.export(model, examples)
    except Exception as err:
        raise ModelImportError(f"model {task!r}: torch.export failed: {_torch_export_reason(err)}") from err
    _check_torch_shapes(task, exported, shapes, used)
    state = model.state_dict()
    return _import_exported(task, exported, _hash_arrays((k, v.detach().cpu().numpy()) for k, v in state.items()))


def _check_torch_shapes(task: str, exported, shapes: Mapping[str, Any], used: set[str] | None) -> None:
    """Each user input of ``exported`` named in ``shapes`` has that static shape; record it as used."""
    for name, _, have in _user_inputs(exported):
        if name not in shapes:
            continue
        if have is not None and None in have:
            have = None  # a dim left symbolic: the import itself reports it
        if have is not None and have != [int(d) for d in shapes[name]]:
            raise InputSpecError(
                f"model {task!r}: input_shapes gives input {name!r} the shape {list(shapes[name])}, but the "
                f"program reads {have} (the example input's shape); give matching example inputs and shapes"
            )
        if used is not None:
            used.update((f"{task}/{name}", name))


def _user_inputs(exported) -> list[tuple[str, Any, list[int | None] | None]]:
    """(name, example tensor, dims with None where symbolic) of each user input of ``exported``;
    tensor and dims are None for an input that is not a tensor."""
    import torch

    nodes = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    out = []
    for name in exported.graph_signature.user_inputs:
        meta = nodes[name].meta.get("val") if name in nodes else None
        dims = [d if isinstance(d, int) else None for d in meta.shape] if isinstance(meta, torch.Tensor) else None
        out.append((name, meta, dims))
    return out


def _specialise(task: str, exported, examples: tuple | None, shapes: Mapping[str, Any]):
    """``exported`` re-exported at static shapes when its user inputs have dynamic dims.

    Shapes come from ``shapes`` (by input name), else from ``examples`` (by position). A static
    program is returned as it is.
    """
    import torch

    inputs = _user_inputs(exported)
    names = [name for name, _, _ in inputs]
    if all(dims is None or None not in dims for _, _, dims in inputs):
        return exported
    args = []
    for pos, (name, meta, dims) in enumerate(inputs):
        if name in shapes:
            args.append(torch.zeros([int(d) for d in shapes[name]], dtype=meta.dtype))
        elif examples is not None and pos < len(examples):
            args.append(torch.as_tensor(examples[pos]))
        elif dims is not None and None not in dims:
            args.append(torch.zeros(dims, dtype=meta.dtype))
        else:
            shown = ",".join("?" if d is None else str(d) for d in (dims or []))
            raise InputSpecError(
                f"model {task!r}: input {name!r} of the exported program has dynamic dims [{shown}]; "
                f"give a static shape: input_shapes={{'{name}': [...]}} (CLI: --input-shape {name}=D1,D2,...)"
            )
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            return torch.export.export(exported.module(), tuple(args))
    except Exception as err:
        shapes_text = ", ".join(f"{n}={list(a.shape)}" for n, a in zip(names, args))
        raise ModelImportError(
            f"model {task!r}: re-exporting the program at static shapes {shapes_text} failed: "
            f"{_torch_export_reason(err)}; try other --input-shape values"
        ) from err


def _import_exported(task: str, exported, source_hash: str) -> _ImportedTask:
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    try:
        with _frontend_call():
            mod = from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    except Exception as err:
        ops = _unsupported_ops(err)
        _release_frames(err)
        if ops:
            raise ModelImportError(
                f"model {task!r}: torch op(s) not supported by TVM's PyTorch frontend: {ops}; "
                "try exporting to ONNX (torch.onnx.export) and importing the .onnx file"
            ) from err
        raise ModelImportError(
            f"model {task!r}: TVM could not import the exported program: {_short(err)}; "
            "try static shapes (--input-shape NAME=D1,D2,...) or an ONNX export of the model"
        ) from err

    # Original names of the parameters (p_conv1_weight -> conv1.weight) and buffers.
    sig = exported.graph_signature
    kinds = torch.export.graph_signature.InputKind
    param_targets = [s.target for s in sig.input_specs if s.kind == kinds.PARAMETER]
    named_buffers = {
        s.target: _tensor_of(exported, s.target)
        for s in sig.input_specs
        if s.kind in (kinds.BUFFER, kinds.CONSTANT_TENSOR) and s.target is not None
    }
    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    inputs = [_spec_of(p) for p in list(func.params)[:num_input]]
    weights = list(zip(param_targets, func.attrs["params"]))
    return _finish(task, mod, num_input, inputs, weights, named_buffers, "torch", source_hash)


def _tensor_of(exported, target: str):
    value = exported.state_dict.get(target)
    if value is None:
        value = exported.constants.get(target)
    return None if value is None else value.detach().cpu().numpy()


ONNX_LIMIT = 2**31 - 1  # protobuf's limit on one message: one .onnx file, or a model with its weights loaded


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def _external_files(task: str, path: Path, proto) -> dict[str, tuple[Path, int]]:
    """Every external-data file of ``proto`` (by ``location``) as (resolved path, bytes used), each
    checked before any byte of it is read: a relative location with no ``..``, resolving (symlinks
    followed) to a plain file inside the model's folder, and every tensor's ``offset``/``length``
    inside that file and equal to what its dtype and shape need. ModelImportError (one line) else."""
    from onnx import external_data_helper, helper

    folder = os.path.realpath(path.parent)
    files: dict[str, tuple[Path, int]] = {}
    for tensor in external_data_helper._get_all_tensors(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        where = f"model {task!r}: {str(path)!r}: initializer {tensor.name!r}"
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        parts = location.replace("\\", "/").split("/")
        if not location or os.path.isabs(location) or location.startswith(("/", "\\")) or ".." in parts or "\0" in location:
            raise ModelImportError(f"{where} keeps its data in {location!r}, which is not a file name inside the "
                                   "model's folder (absolute or '..' paths are refused)")
        resolved = os.path.realpath(os.path.join(folder, location))
        if os.path.commonpath([folder, resolved]) != folder:
            raise ModelImportError(f"{where} keeps its data in {location!r}, which resolves outside the model's "
                                   f"folder (to {resolved!r}, through a symbolic link)")
        if not os.path.isfile(resolved):
            raise ModelImportError(f"model {task!r}: {str(path)!r} keeps its weights in {location!r}, which is not "
                                   "beside it")
        size = os.stat(resolved).st_size
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (ValueError, TypeError, KeyError) as err:
            raise ModelImportError(f"{where}: malformed external data entry ({_short(err)})") from err
        need = itemsize
        for dim in tensor.dims:
            if dim < 0:
                raise ModelImportError(f"{where} has a negative dimension {list(tensor.dims)}")
            need *= dim
        if length is None:
            length = need
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelImportError(f"{where} claims {length} bytes at offset {offset} of {location!r}, which holds "
                                   f"{size} bytes")
        if length != need:
            raise ModelImportError(f"{where} claims {length} bytes in {location!r}; its dtype and shape "
                                   f"{list(tensor.dims)} need {need}")
        previous = files.get(location, (Path(resolved), 0))
        files[location] = (previous[0], previous[1] + length)
    return files


def _read_onnx(task: str, path: Path):
    """The ModelProto of ``path`` with external data loaded, and the sha256 of all its bytes.

    Refuses, in one line and before reading it, a file over protobuf's 2 GiB limit and a model
    whose weights (external data included) would exceed it; external data is checked inside the
    model's folder (:func:`_external_files`) before any of it is read, then hashed in chunks."""
    import onnx
    from onnx import external_data_helper

    if not path.is_file():
        raise ModelImportError(f"model {task!r}: ONNX file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size > ONNX_LIMIT:
        raise ModelImportError(
            f"model {task!r}: {str(path)!r} is {_gib(size)}, over protobuf's 2 GiB limit on one ONNX file; "
            "save it with its weights as external data (onnx.save(model, path, save_as_external_data=True))"
        )
    raw = path.read_bytes()
    digest = hashlib.sha256(raw)
    try:
        proto = onnx.load_from_string(raw)
    except Exception as err:
        raise ModelImportError(f"model {task!r}: {str(path)!r} is not a valid ONNX file ({_short(err)})") from err
    del raw
    files = _external_files(task, path, proto)
    total = size + sum(used for _, used in files.values())
    if total > ONNX_LIMIT:
        raise ModelImportError(
            f"model {task!r}: {str(path)!r} holds {_gib(total)} with its external data, over the 2 GiB limit "
            "of one protobuf message (the ONNX checker and TVM's ONNX importer need the whole model as one)"
        )
    if files:
        for location in sorted(files):
            with open(files[location][0], "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        external_data_helper.load_external_data_for_model(proto, os.path.realpath(path.parent))
    return proto, digest.hexdigest()


def _import_onnx(
    task: str, model, examples: tuple | None, task_shapes: Mapping[str, Any], dtypes, used: set[str]
) -> _ImportedTask:
    import onnx

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        proto, source_hash = _read_onnx(task, path)
        where = repr(str(path))
    else:
        proto, where = model, "the ONNX model"
        source_hash = hashlib.sha256(model.SerializeToString()).hexdigest()
    try:
        onnx.checker.check_model(proto)
    except Exception as err:
        # The checker states the problem first and the node it is in last ("==> Context: ..."): keep both.
        problem, context = one_line(err, 250, first=True), one_line(err, 200)
        detail = problem if context == problem else f"{problem} ({context.removeprefix('==> Context: ')})"
        raise ModelImportError(f"model {task!r}: {where} is not a valid ONNX model: {detail}") from err

    initializers = {init.name for init in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in initializers]
    shape_dict, dtype_dict = {}, {}
    for pos, inp in enumerate(graph_inputs):
        tensor_type = inp.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        # dim_value 0: an empty dimension (refused below); negative (PaddleOCR writes -1) or absent: symbolic
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tensor_type.shape.dim]
        if inp.name in task_shapes:
            used.update((f"{task}/{inp.name}", inp.name))
            dims = _override_shape(task, inp.name, dims, task_shapes[inp.name], tensor_type.HasField("shape"))
        elif examples is not None and pos < len(examples) and None in dims:
            dims = list(np.shape(examples[pos]))
        shown = ",".join("?" if d is None else str(d) for d in dims)
        if None not in dims and any(d <= 0 for d in dims):
            raise InputSpecError(
                f"model {task!r}: ONNX input {inp.name!r} has an empty dimension in its shape [{shown}]; gmorph-tvm "
                f"compiles non-empty inputs: give the shape with input_shapes={{'{inp.name}': [...]}} "
                f"(CLI: --input-shape {inp.name}=D1,D2,...)"
            )
        if None in dims:
            raise InputSpecError(
                f"model {task!r}: ONNX input {inp.name!r} has a symbolic shape [{shown}]; "
                f"give it with input_shapes={{'{inp.name}': [...]}} (CLI: --input-shape {inp.name}=D1,D2,...)"
                + _unknown_hint(task_shapes, graph_inputs)
            )
        shape_dict[inp.name] = dims
        dtype_dict[inp.name] = (dtypes or {}).get(inp.name, dtype)
    folded = onnx_fold.prepare(proto, shape_dict, f"model {task!r}")
    shapes_flag = " ".join(f"--input-shape {n}={','.join(map(str, d))}" for n, d in shape_dict.items())
    try:
        with _frontend_call():
            mod = onnx_convert.convert(folded, shape_dict, dtype_dict)
    except onnx_convert.UnsupportedOps as err:
        _release_frames(err)
        raise ModelImportError(
            f"model {task!r}: operator(s) not supported by TVM's ONNX frontend: {err} (nor by gmorph-tvm's "
            "converters); try re-exporting with another opset or without these ops"
        ) from err
    except onnx_convert.NodeConversionError as err:
        _release_frames(err)
        raise ModelImportError(
            f"model {task!r}: TVM cannot convert ONNX node {err.node!r} ({err.op_type}) of {where}: "
            f"{_short(err.cause)}; check the static input shapes ({shapes_flag}) or re-export with another opset"
        ) from err
    except Exception as err:
        _release_frames(err)
        raise ModelImportError(
            f"model {task!r}: TVM could not import {where}: {_short(err)}; check the static input shapes ({shapes_flag})"
        ) from err

    func = mod["main"]
    num_input = int(func.attrs["num_input"]) if "num_input" in func.attrs else len(graph_inputs)
    # Input vars carry sanitized names; report the ONNX names, which users pass at run time.
    inputs = [
        TensorSpec(inp.name, _spec_of(p).shape, _spec_of(p).dtype)
        for inp, p in zip(graph_inputs, list(func.params)[:num_input])
    ]
    weight_params = list(func.params)[num_input:]
    weight_values = list(func.attrs["params"]) if "params" in func.attrs else []
    names = _onnx_weight_names([p.name for p in weight_params], folded)
    # Initialisers a converter consumed as constants (Clip bounds, ...) are no weights of the model.
    used = set(relax.analysis.free_vars(func.body))
    keep = [i for i, p in enumerate(weight_params[:len(weight_values)]) if p in used]
    if len(weight_values) == len(weight_params) and len(keep) < len(weight_params):
        mod["main"] = relax.Function(
            list(func.params)[:num_input] + [weight_params[i] for i in keep], func.body, func.ret_ty, func.is_pure,
            func.attrs,
        ).with_attr("params", [weight_values[i] for i in keep])
    weights = [(names[i], weight_values[i]) for i in keep]
    return _finish(task, mod, num_input, inputs, weights, {}, "onnx", source_hash,
                   input_names=[inp.name for inp in graph_inputs])


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name).lstrip("_") or name


def _onnx_weight_names(param_names: list[str], proto) -> list[str]:
    """The ONNX initializer name of each weight parameter, distinct and independent of hashing.

    TVM names a parameter after its initializer (possibly sanitised); names that sanitise alike
    (``w.1``/``w_1``, ``_w``/``w``) are resolved by exact match first, then in file order, and any
    clash left over gets a numeric suffix, so the same file always gives the same names.
    """
    initializers = [init.name for init in proto.graph.initializer]
    exact = set(initializers)
    by_sanitized: dict[str, list[str]] = {}
    for name in initializers:
        by_sanitized.setdefault(_sanitize(name), []).append(name)
    taken = {n for n in param_names if n in exact}
    out: list[str] = []
    used: set[str] = set()
    for name in param_names:
        if name in exact and name not in used:
            choice = name
        else:
            free = [n for n in by_sanitized.get(_sanitize(name), []) if n not in taken and n not in used]
            choice = free[0] if free else name
        base, k = choice, 1
        while choice in used:
            k += 1
            choice = f"{base}_{k}"
        used.add(choice)
        out.append(choice)
    return out


def _unknown_hint(task_shapes: Mapping[str, Any], graph_inputs) -> str:
    names = {i.name for i in graph_inputs}
    unknown = [n for n in task_shapes if n not in names]
    if not unknown:
        return ""
    return (f" (input_shapes names {unknown[0]!r}, which is not an input of this model; its inputs are "
            f"{', '.join(sorted(names))})")


def _override_shape(task: str, name: str, declared: list, given: list[int], has_shape: bool) -> list[int]:
    """``given`` checked against the ONNX declaration: same rank, and static dims kept.

    Overriding a static dimension is an error, not a warning: the exporter bakes static sizes into
    the graph (Reshape targets, Slice ends, weight shapes), so another size silently breaks it.
    """
    if has_shape and len(given) != len(declared):
        raise InputSpecError(
            f"model {task!r}: input {name!r} has rank {len(declared)} ({_dims_text(declared)}) but "
            f"input_shapes gives {len(given)} dimensions {given}"
        )
    for axis, (want, got) in enumerate(zip(declared, given)):
        if want is not None and want != got:
            raise InputSpecError(
                f"model {task!r}: input {name!r} has the static shape {_dims_text(declared)} in the ONNX file; "
                f"input_shapes cannot change dimension {axis} from {want} to {got} (only symbolic dimensions "
                "can be set; re-export the model for another shape)"
            )
    return list(given)


def _dims_text(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _spec_of(var: relax.Var) -> TensorSpec:
    ty = var.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise InputSpecError(f"input {var.name!r} is not a tensor of static shape")
    try:
        shape = tuple(int(d) for d in ty.shape.values)
    except (TypeError, AttributeError) as err:
        raise InputSpecError(f"input {var.name!r} has a symbolic shape {ty.shape}; give a static one") from err
    return TensorSpec(var.name, shape, dtype_str(ty))


def _hash_arrays(items) -> str:
    digest = hashlib.sha256()
    for name, arr in items:
        digest.update(name.encode())
        digest.update(str(arr.dtype).encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def _finish(
    task: str,
    mod: tvm.IRModule,
    num_input: int,
    inputs: list[TensorSpec],
    weights: list[tuple[str, tvm.runtime.Tensor]],
    named_buffers: Mapping[str, np.ndarray | None],
    source: str,
    source_hash: str,
    input_names: list[str] | None = None,
) -> _ImportedTask:
    """Rename weight params to ``<task>.<orig>``, lift embedded constants to named params.

    Functions of ``mod`` other than ``main`` (TIR the frontend emitted) are kept with the task.
    """
    func = mod["main"]
    functions = {gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"}
    params = list(func.params)
    new_params = []
    for i, p in enumerate(params[:num_input]):
        name = input_names[i] if input_names else p.name
        new_params.append(relax.Var(name, p.ty))
    renamed: list[tuple[str, str, tvm.runtime.Tensor]] = []
    for p, (orig, value) in zip(params[num_input:], weights):
        renamed.append((f"{task}.{orig}", orig, value))
        new_params.append(relax.Var(f"{task}.{orig}", p.ty))
    body_func = func.bind_params(dict(zip(params, new_params))) if params else func
    body_func = relax.Function(new_params, body_func.body, body_func.ret_ty, body_func.is_pure, body_func.attrs)
    lifted_func, lifted = _lift_constants(task, body_func, named_buffers, {n for n, _, _ in renamed})
    renamed.extend(lifted)
    weight_values = [v for _, _, v in renamed]
    lifted_func = with_weight_params(lifted_func.without_attr("global_symbol"), num_input, weight_values)
    return _ImportedTask(task, lifted_func, inputs, renamed, source, source_hash, functions)


def _lift_constants(
    task: str, func: relax.Function, named_buffers: Mapping[str, np.ndarray | None], taken: set[str]
) -> tuple[relax.Function, list[tuple[str, str, tvm.runtime.Tensor]]]:
    """Turn float tensor constants (e.g. batch-norm statistics) into named weight parameters.

    torch's frontend embeds buffers as anonymous constants; named params keep their provenance
    and let stitching compare them like any weight. Buffer names are recovered by content.
    """
    consts: list[tvm.ir.GenericConst] = []
    seen: set[int] = set()

    def collect(expr):
        if isinstance(expr, tvm.ir.GenericConst) and id(expr) not in seen:
            value = expr.value
            if len(value.shape) >= 1 and str(value.dtype).startswith(("float", "bfloat")):
                seen.add(id(expr))
                consts.append(expr)

    relax.analysis.post_order_visit(func.body, collect)
    if not consts:
        return func, []
    buffers = [(name, arr) for name, arr in named_buffers.items() if arr is not None]
    lifted, mapping = [], {}
    for index, const in enumerate(consts):
        arr = const.value.numpy()
        orig = next(
            (name for name, buf in buffers if buf.shape == arr.shape and buf.dtype == arr.dtype and np.array_equal(buf, arr)),
            f"const{index}",
        )
        new_name = f"{task}.{orig}"
        suffix = 1
        while new_name in taken:
            new_name, suffix = f"{task}.{orig}_{suffix}", suffix + 1
        taken.add(new_name)
        var = relax.Var(new_name, relax.TensorType(const.value.shape, str(const.value.dtype)))
        mapping[const] = var
        lifted.append((new_name, orig, const.value))

    @relax.expr_functor.mutator
    class _Lift(relax.PyExprMutator):
        def visit_generic_const_(self, const):
            return mapping.get(const, const)

    body = _Lift().visit_expr(func.body)
    new_func = relax.Function(list(func.params) + [mapping[c] for c in consts], body, func.ret_ty, func.is_pure, func.attrs)
    return new_func, lifted


# ---- merging ------------------------------------------------------------------------------


def _output_specs(task: str, func: relax.Function) -> list[TensorSpec]:
    ret = func.ret_ty
    leaves = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    specs = []
    for i, ty in enumerate(leaves):
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            raise ModelImportError(f"model {task!r}: output {i} is not a tensor of static shape ({ty})")
        name = task if len(leaves) == 1 else f"{task}:{i}"
        specs.append(TensorSpec(name, tuple(int(d) for d in ty.shape.values), dtype_str(ty)))
    return specs


def _merge(tasks: list[_ImportedTask], input_map: Mapping[tuple[str, str], str] | None = None) -> MultiModel:
    input_map = input_map or {}
    # Inputs under their shared names (input_map applied): what main takes and the manifest lists.
    for t in tasks:
        t.inputs = [TensorSpec(input_map.get((t.name, spec.name), spec.name), spec.shape, spec.dtype) for spec in t.inputs]
    shared: dict[str, tuple[TensorSpec, str, relax.Var]] = {}
    for t in tasks:
        for spec, param in zip(t.inputs, t.func.params):
            if spec.name in shared:
                first, owner, _ = shared[spec.name]
                if (first.shape, first.dtype) != (spec.shape, spec.dtype):
                    raise InputSpecError(
                        f"input {spec.name!r} is {first.dtype}{list(first.shape)} in model {owner!r} "
                        f"but {spec.dtype}{list(spec.shape)} in model {t.name!r}; rename one of them"
                    )
            else:
                shared[spec.name] = (spec, t.name, relax.Var(spec.name, param.ty))
    _warn_similar_inputs(shared)

    weight_vars = []
    bb = relax.BlockBuilder()
    gvars = [bb.add_func(_with_own_functions(bb, t), f"task_{t.name.replace('-', '_')}") for t in tasks]
    input_vars = [var for _, _, var in shared.values()]
    per_task_weights = []
    for t in tasks:
        num_input = len(t.inputs)
        ws = [relax.Var(p.name, p.ty) for p in list(t.func.params)[num_input:]]
        per_task_weights.append(ws)
        weight_vars.extend(ws)
    with bb.function("main", input_vars + weight_vars):
        with bb.dataflow():
            flat = []
            for t, gv, ws in zip(tasks, gvars, per_task_weights):
                args = [shared[spec.name][2] for spec in t.inputs] + ws
                out = bb.emit(relax.Call(gv, args))
                if isinstance(t.func.ret_ty, relax.TupleType):
                    flat.extend(bb.emit(relax.TupleGetItem(out, i)) for i in range(len(t.func.ret_ty.fields)))
                else:
                    flat.append(out)
            result = bb.emit_output(relax.Tuple(flat))
        bb.emit_func_output(result)
    mod = bb.get()
    weights = [(name, orig, value, t.name) for t in tasks for name, orig, value in t.weights]
    main = with_weight_params(mod["main"], len(input_vars), [w[2] for w in weights])
    # Provenance travels with the IR so that any pass (or user Sequential) can keep it current.
    main = main.with_attr(PROVENANCE_ATTR, encode_provenance({name: [(task, orig)] for name, orig, _, task in weights}))
    mod["main"] = main
    mod = relax.transform.InlinePrivateFunctions()(mod)
    mod = relax.transform.CanonicalizeBindings()(mod)
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    try:
        relax.analysis.well_formed(mod)  # raises on the first violation
    except Exception as err:
        names = ", ".join(t.name for t in tasks)
        raise ModelImportError(
            f"merging models {names} produced an invalid module (a gmorph-tvm bug; import each model alone to "
            f"find the one that fails, and report it): {_short(err)}"
        ) from err
    infos = [
        TaskInfo(t.name, tuple(t.inputs), tuple(_output_specs(t.name, t.func)), t.source, t.source_hash) for t in tasks
    ]
    params = {name: value for name, _, value, _ in weights}
    provenance = {name: [(task, orig)] for name, orig, _, task in weights}
    return MultiModel(mod, params, [spec for spec, _, _ in shared.values()], infos, provenance)


def _warn_similar_inputs(shared: Mapping[str, tuple[TensorSpec, str, relax.Var]]) -> None:
    """Warn when inputs of different models have identical shape and dtype but different names."""
    seen: dict[tuple, tuple[str, str]] = {}
    for name, (spec, owner, _) in shared.items():
        key = (spec.shape, spec.dtype)
        if key in seen and seen[key][1] != owner:
            first, first_owner = seen[key]
            warnings.warn(
                f"models {first_owner!r} and {owner!r} read inputs {first!r} and {name!r} of identical shape "
                f"{spec.dtype}{list(spec.shape)} under different names, so they are separate inputs; if they are "
                f"the same tensor pass input_map={{'{owner}.{name}': '{first}'}} (CLI: --input-map {owner}.{name}={first})",
                SimilarInputsWarning,
                stacklevel=4,
            )
        seen.setdefault(key, (name, owner))


def _with_own_functions(bb: relax.BlockBuilder, task: _ImportedTask) -> relax.Function:
    """Add the task's other functions (TIR) to ``bb`` as ``<task>_<name>``; its function, calling them."""
    if not task.functions:
        return task.func
    prefix = re.sub(r"[^A-Za-z0-9_]", "_", task.name)
    mapping = {}
    for gv, func in task.functions.items():
        new_gv = bb.add_func(func, f"{prefix}_{gv.name_hint}")
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and "global_symbol" in func.attrs:
            bb.update_func(new_gv, func.with_attr("global_symbol", new_gv.name_hint))
        mapping[gv] = new_gv

    @relax.expr_functor.mutator
    class _Rename(relax.PyExprMutator):
        def visit_global_var_(self, op):
            return mapping.get(op, op)

    return _Rename().visit_expr(task.func)
