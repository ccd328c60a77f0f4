"""Task models for the fusion search from files, without running code those files carry.

Three forms, by what the user gives:

* ``FILE.pt2`` (``torch.export.save``): checked first, then deserialised and rebuilt as a trainable
  ``torch.fx.GraphModule`` (:func:`load_pt2`). ``torch.export.load`` alone is not safe on a file
  from elsewhere: it unpickles weights marked ``use_pickle`` (``weights_only=False``) and
  ``pickle.loads`` opaque constants, falls back to ``weights_only=False`` for sample inputs that the
  safe loader refuses, loads AOTInductor shared libraries, ``sympify``s (``eval``) symbolic shape
  strings, calls whatever ``torch.*`` attribute a node names, and ``ExportedProgram.module()``
  ``exec``s the file's guard code. So the archive is read once into memory and refused unless every
  entry is one ``torch.export.save`` writes for a plain program (tensor payloads, JSON, sample
  inputs that load with ``weights_only=True``), every node calls an ATen operator (not one that
  reads or writes files) or a Python operator from a short list, and every symbolic expression is
  arithmetic on shape symbols. Only then is that same in-memory copy deserialised, and the trainable
  module is built from the graph and state dict directly (no ``module()``, no guard code).
* a state dict (``torch.save(model.state_dict())`` or ``.safetensors``) plus the architecture the
  user names as ``module:callable`` (:func:`load_state_dict_model`); the state dict is read with
  ``weights_only=True``, the callable is code the user chose, not the file.
* a whole pickled module (``torch.save(model)``): only with ``trust_pickle=True``, since unpickling
  runs whatever the file names before anything can be checked. Without it the file is probed with
  ``weights_only=True`` (which runs nothing) only to say what it holds.

Every refusal is a :class:`~gmorph_tvm.errors.SearchError` naming the model and the file.
"""

from __future__ import annotations

import importlib
import io
import operator
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import SearchError, one_line
from ..frontend.pt2_file import read_checked_pt2


def load_model_file(name: str, path: str | Path, *, arch: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """Task ``name``'s model from ``path``: a ``.pt2``, a state dict with ``arch`` (``module:callable``),
    or -- only with ``trust_pickle`` -- a whole pickled module. See the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"model {name!r}: file {str(path)!r} does not exist")
    if arch is not None:
        return load_state_dict_model(name, path, arch)
    if path.suffix == ".pt2":
        return load_pt2(name, path)
    if trust_pickle:
        return _load_pickled_module(name, path)
    raise SearchError(f"model {name!r}: {str(path)!r} {_describe_pickle(path)}")


# ---- whole pickled modules ------------------------------------------------------------------------------


def _describe_pickle(path: Path) -> str:
    """Why a non-.pt2 file without an architecture is refused, from a probe that runs no code."""
    advice = ("give a torch.export program (.pt2), or its state dict with --arch NAME=module:callable, or "
              "--trust-pickle if you made the file yourself (unpickling a whole module runs code named in the file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        return f"is not a state dict or tensors ({one_line(err, 160, first=True)}); {advice}"
    if _tensor_mapping(obj) is not None:
        return "holds a state dict: name its architecture with --arch NAME=module:callable"
    return f"holds a {type(obj).__name__}, not a model; {advice}"


def _load_pickled_module(name: str, path: Path) -> nn.Module:
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)  # trusted by the caller's explicit flag
    except Exception as err:
        raise SearchError(f"model {name!r}: {str(path)!r} is not a torch.save'd module ({one_line(err, 200)})") from err
    if not isinstance(model, nn.Module):
        raise SearchError(f"model {name!r}: {str(path)!r} holds a {type(model).__name__}, not a torch.nn.Module")
    return model


# ---- state dict + named architecture --------------------------------------------------------------------


def _tensor_mapping(obj: Any) -> dict[str, torch.Tensor] | None:
    """``obj`` as a flat name -> tensor dict (a ``{"state_dict": ...}`` checkpoint unwrapped), else None."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    return None


def resolve_arch(name: str, spec: str) -> Callable[[], nn.Module]:
    """The callable ``spec`` (``package.module:function`` or ``module:Class``) names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SearchError(f"model {name!r}: --arch expects NAME=module:callable, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:
        raise SearchError(f"model {name!r}: cannot import {module_name!r} for --arch ({one_line(err, 200)})") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SearchError(f"model {name!r}: {module_name!r} has no {attr!r} (--arch {spec})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SearchError(f"model {name!r}: --arch {spec} is a {type(obj).__name__}, not a callable")
    return obj


def load_state_dict_model(name: str, path: Path, arch: str) -> nn.Module:
    """``arch()`` (no arguments) with the state dict in ``path`` loaded strictly."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise SearchError(f"model {name!r}: reading {str(path)!r} needs the safetensors package") from err
        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as err:
            raise SearchError(f"model {name!r}: {str(path)!r} is not a safetensors file ({one_line(err, 200)})") from err
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise SearchError(f"model {name!r}: {str(path)!r} is not a state dict readable with weights_only=True "
                              f"({one_line(err, 200, first=True)})") from err
    state = _tensor_mapping(obj)
    if state is None:
        raise SearchError(f"model {name!r}: {str(path)!r} holds a {type(obj).__name__}, not a state dict of tensors")
    factory = resolve_arch(name, arch)
    try:
        model = factory()
    except Exception as err:
        raise SearchError(f"model {name!r}: --arch {arch}() failed ({one_line(err, 200)})") from err
    if not isinstance(model, nn.Module):
        raise SearchError(f"model {name!r}: --arch {arch}() returned a {type(model).__name__}, not a torch.nn.Module")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SearchError(f"model {name!r}: {str(path)!r} does not fit --arch {arch} ({one_line(err, 300, first=True)} "
                          f"{one_line(err, 200)})") from err
    return model.eval()


# ---- torch.export programs ------------------------------------------------------------------------------


def load_pt2(name: str, path: Path) -> nn.Module:
    """A checked ``.pt2`` as a trainable GraphModule (conv / linear / norm / activation calls become
    ``nn.Module`` layers, so the search sees layers, cut points and MACs as in the original model)."""
    data = read_checked_pt2(name, path, SearchError)
    try:
        ep = torch.export.load(io.BytesIO(data))
    except Exception as err:
        raise SearchError(f"model {name!r}: {str(path)!r} is not a valid torch.export (.pt2) file "
                          f"({one_line(err, 200, first=True)})") from err
    return program_to_module(name, ep)


# ---- ExportedProgram -> trainable GraphModule -------------------------------------------------------------

_ATEN = torch.ops.aten


def program_to_module(name: str, ep: Any) -> fx.GraphModule:
    """A trainable GraphModule computing ``ep``'s graph, with its parameters and buffers as leaves.

    Built from ``ep.graph_module`` and ``ep.graph_signature`` directly (``ep.module()`` would
    ``exec`` the program's guard code). ``aten.conv2d`` / ``linear`` / ``batch_norm`` (eval) /
    ``layer_norm`` and activations become ``nn.Conv2d`` / ``nn.Linear`` / ... modules owning the
    program's parameters; everything else stays an ATen call.
    """
    from torch.export.graph_signature import InputKind, OutputKind

    sig = ep.graph_signature
    state = dict(ep.state_dict)
    state.update(getattr(ep, "constants", {}) or {})
    lifted: dict[str, tuple[str, bool]] = {}  # placeholder -> (fqn, is_parameter)
    user_inputs = []
    for spec in sig.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            user_inputs.append(spec.arg.name)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            lifted[spec.arg.name] = (spec.target, spec.kind == InputKind.PARAMETER)
        else:
            raise SearchError(f"model {name!r}: the exported program has a {spec.kind.name} input; export the plain "
                              "model (torch.export.export(model.eval(), (x,)))")
    outputs = [spec for spec in sig.output_specs if spec.kind == OutputKind.USER_OUTPUT]
    if len(user_inputs) != 1 or len(outputs) != 1 or len(outputs) != len(sig.output_specs):
        raise SearchError(f"model {name!r}: the fusion search needs a program with one tensor input and one output "
                          f"that changes no buffer (export the model in eval mode); this one has {len(user_inputs)} "
                          f"input(s), {len(sig.output_specs)} output(s)")

    root = nn.Module()
    tensors: dict[str, torch.Tensor] = {}  # fqn -> the one Parameter / buffer object every user shares

    def tensor(fqn: str, is_param: bool) -> torch.Tensor:
        if fqn not in tensors:
            if fqn not in state:
                raise SearchError(f"model {name!r}: the program reads {fqn!r}, which its state dict lacks")
            value = state[fqn].detach().clone()
            tensors[fqn] = nn.Parameter(value) if is_param and value.is_floating_point() else value
        return tensors[fqn]

    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    attrs: dict[str, fx.Node] = {}
    src_nodes = list(ep.graph_module.graph.nodes)

    def as_tensor_arg(arg: Any) -> torch.Tensor | None:
        if isinstance(arg, fx.Node) and arg.op == "placeholder" and arg.name in lifted:
            return tensor(*lifted[arg.name])
        return None

    def attr(node: fx.Node) -> fx.Node:
        fqn, is_param = lifted[node.name]
        if fqn not in attrs:
            attr_name = "c_" + re.sub(r"\W", "_", fqn)
            value = tensor(fqn, is_param)
            if isinstance(value, nn.Parameter):
                root.register_parameter(attr_name, value)
            else:
                root.register_buffer(attr_name, value)
            attrs[fqn] = graph.get_attr(attr_name)
        return attrs[fqn]

    def lookup(arg: fx.Node) -> Any:
        if arg not in env:
            env[arg] = attr(arg)
        return env[arg]

    tuple_norms: set[fx.Node] = set()  # converted eval batch norms whose (out, mean, invstd) tuple was indexed
    for node in src_nodes:
        if node.op == "placeholder":
            if node.name in user_inputs:
                env[node] = graph.placeholder("x")
                env[node].meta = dict(node.meta)
            continue
        if node.op == "output":
            results = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            graph.output(lookup(results[0]))
            continue
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in tuple_norms:
            if node.args[1] != 0:
                raise SearchError(f"model {name!r}: the program reads a batch norm's saved statistics ({node.name})")
            env[node] = env[node.args[0]]
            continue
        module = _as_module(node, as_tensor_arg) if node.op == "call_function" else None
        if module is None:
            env[node] = graph.node_copy(node, lookup)
            continue
        module_name = f"m_{node.name}"
        root.add_module(module_name, module)
        env[node] = graph.call_module(module_name, (lookup(node.args[0]),))
        if node.target is _ATEN._native_batch_norm_legit_no_training.default:
            tuple_norms.add(node)
    gm = fx.GraphModule(root, graph, class_name="ExportedModel")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm.eval()


def _ints(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value) if len(value) == n else tuple(int(value[0]) for _ in range(n))


def _as_module(node: fx.Node, tensor_of: Callable[[Any], torch.Tensor | None]) -> nn.Module | None:
    """The nn.Module equivalent of an ATen call whose weights are the program's own tensors, else None."""
    target, args, kwargs = node.target, list(node.args), dict(node.kwargs)
    if kwargs:
        return None

    def arg(i: int, default: Any = None) -> Any:
        return args[i] if len(args) > i else default

    activations: dict[Any, Callable[[], nn.Module]] = {
        _ATEN.relu.default: nn.ReLU, _ATEN.relu_.default: nn.ReLU, _ATEN.silu.default: nn.SiLU,
        _ATEN.silu_.default: nn.SiLU, _ATEN.sigmoid.default: nn.Sigmoid, _ATEN.tanh.default: nn.Tanh,
        _ATEN.hardswish.default: nn.Hardswish, _ATEN.hardswish_.default: nn.Hardswish,
        _ATEN.hardsigmoid.default: nn.Hardsigmoid,
    }  # fmt: skip
    if target in activations and len(args) == 1:
        return activations[target]()
    if target in (_ATEN.hardtanh.default, _ATEN.hardtanh_.default) and arg(1, -1.0) == 0.0 and arg(2, 1.0) == 6.0:
        return nn.ReLU6()
    if target is _ATEN.gelu.default and len(args) <= 2:
        return nn.GELU(approximate=arg(1, "none"))
    if target is _ATEN.dropout.default and len(args) == 3:
        return nn.Dropout(float(args[1]))
    if target is _ATEN.conv2d.default:
        weight, bias = tensor_of(arg(1)), tensor_of(arg(2))
        if weight is None or weight.dim() != 4 or (arg(2) is not None and bias is None) or isinstance(arg(4), str):
            return None
        groups = int(arg(6, 1))
        conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), _ints(arg(3, 1), 2),
                         _ints(arg(4, 0), 2), _ints(arg(5, 1), 2), groups, bias=bias is not None)
        conv.weight = weight  # type: ignore[assignment]
        if bias is not None:
            conv.bias = bias  # type: ignore[assignment]
        return conv
    if target is _ATEN.linear.default:
        weight, bias = tensor_of(arg(1)), tensor_of(arg(2))
        if weight is None or weight.dim() != 2 or (arg(2) is not None and bias is None):
            return None
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.weight = weight  # type: ignore[assignment]
        if bias is not None:
            linear.bias = bias  # type: ignore[assignment]
        return linear
    if target in (_ATEN.batch_norm.default, _ATEN._native_batch_norm_legit_no_training.default):
        plain = target is _ATEN.batch_norm.default
        if plain and (len(args) != 9 or args[5]):
            return None  # training-mode batch norm updates buffers: not a plain eval program
        weight, bias, mean, var = (tensor_of(arg(i)) for i in (1, 2, 3, 4))
        momentum, eps = (arg(6), arg(7)) if plain else (arg(5), arg(6))
        val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if mean is None or var is None or val is None or val.dim() not in (2, 3, 4) \
                or (arg(1) is not None and weight is None) or (arg(2) is not None and bias is None):
            return None
        norm_cls = nn.BatchNorm2d if val.dim() == 4 else nn.BatchNorm1d
        norm = norm_cls(mean.shape[0], eps=float(eps), momentum=float(momentum), affine=weight is not None)
        if weight is not None:
            norm.weight = weight  # type: ignore[assignment]
            norm.bias = bias if bias is not None else nn.Parameter(torch.zeros_like(weight))  # type: ignore[assignment]
        norm.running_mean, norm.running_var = mean, var
        return norm.eval()
    if target is _ATEN.layer_norm.default:
        weight, bias = tensor_of(arg(2)), tensor_of(arg(3))
        if (arg(2) is not None and weight is None) or (arg(3) is not None and bias is None):
            return None
        layer_norm = nn.LayerNorm(list(arg(1)), eps=float(arg(4, 1e-5)), elementwise_affine=weight is not None,
                                  bias=bias is not None)
        if weight is not None:
            layer_norm.weight = weight  # type: ignore[assignment]
        if bias is not None:
            layer_norm.bias = bias  # type: ignore[assignment]
        return layer_norm
    return None
