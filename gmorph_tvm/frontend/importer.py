"""Import PyTorch and ONNX models into one Relax IRModule (`import_models`).

Each model is imported on its own through TVM's frontend (``torch.export`` +
``from_exported_program``, or ``from_onnx``) with weights kept as function parameters; every
weight is renamed ``<task>.<original parameter name>`` so its provenance survives merging. The
per-model functions are then called from one ``main`` that takes the distinct inputs (tasks that
read an input of the same name, shape and dtype share one Relax var) and returns every task's
outputs, and are inlined so later passes see one dataflow graph.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
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
from ..errors import InputSpecError, ModelImportError, one_line
from .multimodel import MultiModel, TaskInfo, TensorSpec, with_weight_params

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


def import_models(
    models: Mapping[str, ModelLike],
    example_inputs: ExampleInputs | None = None,
    *,
    input_shapes: Mapping[str, Any] | None = None,
    input_dtypes: Mapping[str, str] | None = None,
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
        Static shapes for ONNX inputs whose shape is symbolic: input name -> shape, or task name
        -> {input name -> shape}.
    input_dtypes:
        dtypes for ONNX inputs (input name -> dtype); default is what the file declares.
    """
    if not models:
        raise ModelImportError("import_models needs at least one model")
    imported = []
    for task, model in models.items():
        if not isinstance(task, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", task):
            raise ModelImportError(
                f"task name {task!r} is not valid: use letters, digits, '_' or '-', starting with a letter"
            )
        imported.append(_import_one(task, model, _examples_for(task, example_inputs), input_shapes, input_dtypes))
    return _merge(imported)


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


def _import_one(task: str, model: Any, examples: tuple | None, shapes, dtypes) -> _ImportedTask:
    try:
        import torch

        if isinstance(model, torch.nn.Module):
            return _import_torch(task, model, examples)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(model, (str, os.PathLike)) and str(model).endswith(".pt2"):
        return _import_torch(task, _load_exported_program(task, Path(model)), examples)
    if type(model).__name__ == "ExportedProgram":
        return _import_torch(task, model, examples)
    if isinstance(model, (str, os.PathLike)) or type(model).__name__ == "ModelProto":
        return _import_onnx(task, model, examples, shapes, dtypes)
    raise ModelImportError(
        f"model {task!r}: unsupported model type {type(model).__name__}; "
        "expected a torch.nn.Module, an ONNX file path or an onnx.ModelProto"
    )


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(str(path))
    except Exception as err:
        raise ModelImportError(
            f"model {task!r}: {str(path)!r} is not a valid torch.export (.pt2) file ({one_line(err, 200, first=True)})"
        ) from err


def _import_torch(task: str, model, examples: tuple | None) -> _ImportedTask:
    """Import an ``nn.Module`` (exported here with ``examples``) or an ``ExportedProgram``."""
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        return _import_exported(task, model, _hash_arrays((k, v.detach().cpu().numpy()) for k, v in model.state_dict.items()))
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
    state = model.state_dict()
    return _import_exported(task, exported, _hash_arrays((k, v.detach().cpu().numpy()) for k, v in state.items()))


def _import_exported(task: str, exported, source_hash: str) -> _ImportedTask:
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    except Exception as err:
        ops = _unsupported_ops(err)
        if ops:
            raise ModelImportError(f"model {task!r}: operator(s) not supported by TVM's PyTorch frontend: {ops}") from err
        raise ModelImportError(f"model {task!r}: TVM could not import the exported program: {one_line(err, 500)}") from err

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
    return _finish(task, func, num_input, inputs, weights, named_buffers, "torch", source_hash)


def _tensor_of(exported, target: str):
    value = exported.state_dict.get(target)
    if value is None:
        value = exported.constants.get(target)
    return None if value is None else value.detach().cpu().numpy()


def _import_onnx(task: str, model, examples: tuple | None, shapes, dtypes) -> _ImportedTask:
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelImportError(f"model {task!r}: ONNX file {str(path)!r} does not exist")
        raw = path.read_bytes()
        try:
            proto = onnx.load_from_string(raw)
        except Exception as err:
            raise ModelImportError(f"model {task!r}: {str(path)!r} is not a valid ONNX file ({one_line(err, 500)})") from err
        where = repr(str(path))
    else:
        proto, raw, where = model, model.SerializeToString(), "the ONNX model"
    try:
        onnx.checker.check_model(proto)
    except Exception as err:
        raise ModelImportError(f"model {task!r}: {where} is not a valid ONNX model: {one_line(err, 300, first=True)}") from err

    initializers = {init.name for init in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in initializers]
    task_shapes = shapes.get(task, shapes) if isinstance(shapes, Mapping) else {}
    if isinstance(task_shapes, Mapping) and any(isinstance(v, Mapping) for v in task_shapes.values()):
        task_shapes = {}  # a per-task mapping that does not name this task
    shape_dict, dtype_dict = {}, {}
    for pos, inp in enumerate(graph_inputs):
        tensor_type = inp.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if inp.name in task_shapes:
            dims = [int(d) for d in task_shapes[inp.name]]
        elif examples is not None and pos < len(examples) and None in dims:
            dims = list(np.shape(examples[pos]))
        if None in dims or any(d <= 0 for d in dims):
            raise InputSpecError(
                f"model {task!r}: ONNX input {inp.name!r} has a symbolic shape {dims}; "
                f"give it with input_shapes={{'{inp.name}': [...]}}"
            )
        shape_dict[inp.name] = dims
        dtype_dict[inp.name] = (dtypes or {}).get(inp.name, dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = from_onnx(proto, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=True)
    except Exception as err:
        ops = _unsupported_ops(err)
        if ops:
            raise ModelImportError(f"model {task!r}: operator(s) not supported by TVM's ONNX frontend: {ops}") from err
        raise ModelImportError(f"model {task!r}: TVM could not import {where}: {one_line(err, 500)}") from err

    func = mod["main"]
    num_input = int(func.attrs["num_input"]) if "num_input" in func.attrs else len(graph_inputs)
    # Input vars carry sanitized names; report the ONNX names, which users pass at run time.
    inputs = [
        TensorSpec(inp.name, _spec_of(p).shape, _spec_of(p).dtype)
        for inp, p in zip(graph_inputs, list(func.params)[:num_input])
    ]
    sanitized = {_sanitize(name): name for name in initializers}
    weight_params = list(func.params)[num_input:]
    weight_values = list(func.attrs["params"]) if "params" in func.attrs else []
    weights = [(sanitized.get(p.name, p.name), v) for p, v in zip(weight_params, weight_values)]
    return _finish(task, func, num_input, inputs, weights, {}, "onnx", hashlib.sha256(raw).hexdigest(),
                   input_names=[inp.name for inp in graph_inputs])


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name).lstrip("_") or name


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
    func: relax.Function,
    num_input: int,
    inputs: list[TensorSpec],
    weights: list[tuple[str, tvm.runtime.Tensor]],
    named_buffers: Mapping[str, np.ndarray | None],
    source: str,
    source_hash: str,
    input_names: list[str] | None = None,
) -> _ImportedTask:
    """Rename weight params to ``<task>.<orig>``, lift embedded constants to named params."""
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
    return _ImportedTask(task, lifted_func, inputs, renamed, source, source_hash)


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


def _merge(tasks: list[_ImportedTask]) -> MultiModel:
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

    weight_vars = []
    bb = relax.BlockBuilder()
    gvars = [bb.add_func(t.func, f"task_{t.name.replace('-', '_')}") for t in tasks]
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
        raise ModelImportError(f"merging models {names} produced an invalid module: {one_line(err, 500)}") from err
    infos = [
        TaskInfo(t.name, tuple(t.inputs), tuple(_output_specs(t.name, t.func)), t.source, t.source_hash) for t in tasks
    ]
    params = {name: value for name, _, value, _ in weights}
    provenance = {name: [(task, orig)] for name, orig, _, task in weights}
    return MultiModel(mod, params, [spec for spec, _, _ in shared.values()], infos, provenance)
