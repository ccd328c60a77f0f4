"""Layer graph of a PyTorch model: a torch.fx DAG with its residual-safe cut points.

GMorph flattens a model into the chain of its ``children()``, which only works for chain-shaped
models. Here each model is traced with ``torch.fx.symbolic_trace`` and its *cut points* are found
on the DAG itself: a node is a cut point when, in topological order, it is the only value computed
so far that is still needed later (a single-tensor frontier; it dominates everything after it).
Inside a residual block two tensors are live (the block input and the branch), so a block is never
split; between blocks there is exactly one. Cut points are further restricted to layer boundaries:
a node whose only consumer is a normalisation or an activation (conv -> *BN* -> *ReLU*) is not a cut,
so "sharing a conv but not its BN" is never proposed.

A :class:`LayerGraph` can cut out the sub-network between two cut points as a ``GraphModule`` that
references (not copies) the original sub-modules, which is how fusion plans are applied.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import SearchError

# Modules / functions that finish a layer rather than start one: no cut right before them.
_POST_OPS_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.Dropout,
)
_POST_OPS_FUNCTIONS: set[Callable] = {
    torch.relu,
    torch.nn.functional.relu,
    torch.nn.functional.relu6,
    torch.nn.functional.gelu,
    torch.nn.functional.silu,
    torch.nn.functional.hardswish,
    torch.nn.functional.hardsigmoid,
    torch.sigmoid,
    torch.tanh,
    torch.nn.functional.batch_norm,
    torch.nn.functional.layer_norm,
    torch.nn.functional.dropout,
}
_POST_OPS_METHODS = {"relu", "relu_", "sigmoid", "tanh"}


@dataclass(frozen=True)
class CutPoint:
    """A place where a model can be cut: the activation of one fx node.

    ``index`` 0 is the model input. ``params_before`` / ``macs_before`` count the parameters and
    multiply-accumulates of the layers that compute this activation (what sharing it saves).
    """

    index: int
    node: str
    shape: tuple[int, ...]  # without the batch dimension
    params_before: int
    macs_before: int

    @property
    def rank(self) -> int:
        return len(self.shape)


class LayerGraph:
    """One task model as an fx DAG plus its ordered cut points.

    Build it with :meth:`trace`. The graph keeps references to the traced model's sub-modules;
    :meth:`segment` returns sub-networks sharing those modules (and so their parameters).
    """

    def __init__(self, name: str, gm: fx.GraphModule, cuts: list[CutPoint], output_shape: tuple[int, ...],
                 total_params: int, total_macs: int) -> None:
        self.name = name
        self.gm = gm
        self.cuts = cuts
        self.output_shape = output_shape
        self.total_params = total_params
        self.total_macs = total_macs
        self._nodes = list(gm.graph.nodes)
        self._position = {n.name: i for i, n in enumerate(self._nodes)}

    # ---- construction ------------------------------------------------------------------------
    @staticmethod
    def trace(name: str, model: nn.Module, example_input: torch.Tensor) -> LayerGraph:
        """Trace ``model`` (one tensor in, one tensor out) and find its cut points.

        ``example_input`` fixes the shapes (batch dimension included, any batch size).
        """
        try:
            gm = fx.symbolic_trace(model)
        except Exception as err:  # fx raises many types for data-dependent control flow
            raise SearchError(f"model {name!r}: torch.fx cannot trace it ({type(err).__name__}: {err})") from err
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise SearchError(f"model {name!r}: fusion search needs models with one input, this one has {len(placeholders)}")
        was_training = gm.training
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
        gm.train(was_training)
        nodes = list(gm.graph.nodes)
        output_node = nodes[-1]
        result = output_node.args[0]
        if not isinstance(result, fx.Node) or not hasattr(result.meta.get("tensor_meta"), "shape"):
            raise SearchError(f"model {name!r}: fusion search needs models that return one tensor")
        out_shape = tuple(int(d) for d in result.meta["tensor_meta"].shape[1:])

        position = {n: i for i, n in enumerate(nodes)}
        last_use = {}
        for n in nodes:
            if n.op == "get_attr":
                continue  # constants are re-read wherever needed, never "live" activations
            last_use[n] = max((position[u] for u in n.users), default=position[n])
        params_seen: set[int] = set()
        params_before = macs_before = 0
        cuts: list[CutPoint] = []
        live: set[fx.Node] = set()
        for i, n in enumerate(nodes):
            if n.op == "output":
                break
            params_before += _new_params(gm, n, params_seen)
            macs_before += _macs(gm, n)
            if n.op != "get_attr":
                live.add(n)
            live = {v for v in live if last_use[v] > i}
            if n is result or n.op == "get_attr" or live != {n}:
                continue
            meta = n.meta.get("tensor_meta")
            if meta is None or not hasattr(meta, "shape") or len(meta.shape) not in (2, 4):
                continue  # adapters exist for [N, C, H, W] and [N, F] activations only
            if n.op != "placeholder" and _only_user_is_post_op(gm, n):
                continue
            shape = tuple(int(d) for d in meta.shape[1:])
            cuts.append(CutPoint(len(cuts), n.name, shape, params_before, macs_before))
        total_params = params_before + sum(_new_params(gm, n, params_seen) for n in nodes[position[output_node]:])
        total_macs = sum(_macs(gm, n) for n in nodes)
        return LayerGraph(name, gm, cuts, out_shape, total_params, total_macs)

    def copy(self) -> LayerGraph:
        """An independent copy (fresh parameters with the same values, same cut points)."""
        return LayerGraph(self.name, copy.deepcopy(self.gm), self.cuts, self.output_shape, self.total_params, self.total_macs)

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_cuts(self) -> int:
        return len(self.cuts)

    def cut(self, index: int) -> CutPoint:
        if not 0 <= index < len(self.cuts):
            raise SearchError(f"model {self.name!r} has cut points 0..{len(self.cuts) - 1}, not {index}")
        return self.cuts[index]

    def segment(self, start: int, end: int | None) -> fx.GraphModule:
        """The sub-network from cut ``start``'s activation to cut ``end``'s (``None``: the output).

        The result references the traced model's modules, so training it trains them.
        """
        first = self._position[self.cut(start).node]
        last_node = self._nodes[-1].args[0] if end is None else self._nodes[self._position[self.cut(end).node]]
        last = self._position[last_node.name]
        if last <= first:
            raise SearchError(f"model {self.name!r}: empty segment between cut points {start} and {end}")
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        inp = graph.placeholder("x")
        env[self._nodes[first]] = inp

        def lookup(arg: fx.Node) -> fx.Node:
            if arg not in env:
                if arg.op != "get_attr":  # the frontier property guarantees this never happens
                    raise SearchError(f"model {self.name!r}: node {arg.name} crosses cut point {start}")
                env[arg] = graph.node_copy(arg)
            return env[arg]

        for node in self._nodes[first + 1 : last + 1]:
            if node.op == "get_attr":
                continue
            env[node] = graph.node_copy(node, lookup)
        graph.output(env[last_node])
        gm = fx.GraphModule(self.gm, graph, class_name=f"{self.name}_seg_{start}_{'out' if end is None else end}")
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm

    def segment_params(self, start: int, end: int | None) -> int:
        """Parameters used between two cut points."""
        end_params = self.total_params if end is None else self.cut(end).params_before
        return end_params - self.cut(start).params_before

    def segment_macs(self, start: int, end: int | None) -> int:
        end_macs = self.total_macs if end is None else self.cut(end).macs_before
        return end_macs - self.cut(start).macs_before

    def activations(self, x: torch.Tensor, indices: Sequence[int]) -> dict[int, torch.Tensor]:
        """Activations of the original model at the given cut points for input ``x`` (no grad)."""
        wanted = {self.cut(i).node: i for i in indices}
        found: dict[int, torch.Tensor] = {}
        if 0 in indices:
            found[0] = x.detach()
        with torch.no_grad():
            _Recorder(self.gm, wanted, found).run(x)
        return found

    def describe(self) -> str:
        lines = [f"{self.name}: {self.total_params} params, {self.total_macs / 1e6:.2f} MMAC, {len(self.cuts)} cut points"]
        for c in self.cuts:
            lines.append(f"  [{c.index}] {c.node} {list(c.shape)} params_before={c.params_before}")
        return "\n".join(lines)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: dict[str, int], found: dict[int, torch.Tensor]) -> None:
        super().__init__(gm)
        self.wanted, self.found = wanted, found

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name in self.wanted:
            self.found[self.wanted[n.name]] = value.detach()
        return value


def _module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def _new_params(gm: fx.GraphModule, node: fx.Node, seen: set[int]) -> int:
    """Parameters first used by ``node`` (a module called twice counts once)."""
    tensors: list[torch.Tensor] = []
    if node.op == "call_module":
        tensors = list(_module_of(gm, node).parameters())
    elif node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        if isinstance(obj, nn.Parameter):
            tensors = [obj]
    count = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            count += t.numel()
    return count


def _macs(gm: fx.GraphModule, node: fx.Node) -> int:
    """Multiply-accumulates of conv / linear layers (what dominates these models' cost)."""
    module = _module_of(gm, node)
    meta = node.meta.get("tensor_meta")
    if module is None or meta is None or not hasattr(meta, "shape"):
        return 0
    out = 1
    for d in meta.shape[1:]:
        out *= int(d)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return out * module.in_features
    return 0


def _only_user_is_post_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    users = list(node.users)
    if len(users) != 1:
        return False
    user = users[0]
    if user.op == "call_module":
        return isinstance(gm.get_submodule(user.target), _POST_OPS_MODULES)
    if user.op == "call_function":
        return user.target in _POST_OPS_FUNCTIONS
    if user.op == "call_method":
        return user.target in _POST_OPS_METHODS
    return False
