"""Random multi-model generator for pass property tests (hypothesis).

Reusable API (``from random_models import ...``: pytest puts tests/ on ``sys.path``)
---------------------------------------------------------------------------------------------
``multi_model_cases(min_models=2, max_models=4, max_inputs=2, families=("cnn", "mlp"),
patterns=PATTERNS)`` -> hypothesis strategy of :class:`Case`:

* ``case.models``: ``dict[task, nn.Module]`` — K eval-mode float32 torch models ``m0..m{K-1}``;
  every model's ``forward`` takes all of ``case.inputs`` (1-2 tensors, ``x0``/``x1``, same shape)
  and returns one tensor or a tuple of two (two heads).
* ``case.inputs``: example inputs (CNN: ``(1, C, S, S)`` with C <= 4, S in 8..16; MLP: ``(1, F)``).
* ``case.pattern``: how weights are shared with model ``m0``:
  ``"prefix"`` (each model copies a random number of leading blocks of ``m0`` bit-identically, then
  continues with its own random blocks), ``"identical"`` (exact copies of ``m0``),
  ``"same_arch"`` (``m0``'s architecture, fresh weights: nothing may be shared), ``"swapped_inputs"``
  (exact copies of ``m0`` fed ``(x1, x0)``: equal weights, different inputs, nothing may be shared),
  ``"mixed"`` (a random one of those per model).
* ``case.shared_blocks[task]``: leading blocks (stem first) computed on the same input with the same
  weights as ``m0``'s; ``case.shares_head[task]``: whether the head is shared too.
* ``case.expected_weighted_ops()``: ``Counter`` of ``relax.nn.conv2d`` / ``relax.matmul`` calls a
  complete, exact stitch must leave (each distinct weighted layer once).
* ``case.unique_weight_bytes()`` / ``case.total_weight_bytes()``: bytes of the distinct (by content)
  / all float tensors of the models' state dicts — the weight parameters of the merged module.
* ``case.torch_outputs()``: reference outputs, flattened in task order (``main``'s output order).

Also: :func:`assert_close` (the 1e-5 relative tolerance of the issue), :func:`run_module` (build
for llvm and run) and :func:`bind_constants` (weights bound, no ``FoldConstant``).

Architectures are DAGs: a stem per input merged by ``add`` or ``concat``; blocks that are plain
conv/linear (+BN, +ReLU), residual (``add``), two-branch (``concat``) or conv+pool; a head that
pools/flattens then 1-2 linears. Sizes are tiny (<= 8 channels) so an example builds in ~1-2 s.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from helpers import randomize_batch_norm
from hypothesis import strategies as st
from torch import nn

PATTERNS = ("prefix", "identical", "same_arch", "swapped_inputs", "mixed")


# ---- building blocks ----------------------------------------------------------------------------


def _init(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Deterministic weights from ``gen`` (torch's default init draws from the global RNG)."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (nn.Conv2d, nn.Linear)):
                fan_in = sub.weight[0].numel()
                bound = 1.0 / np.sqrt(fan_in)
                sub.weight.copy_((torch.rand(sub.weight.shape, generator=gen) * 2 - 1) * bound)
                if sub.bias is not None:
                    sub.bias.copy_((torch.rand(sub.bias.shape, generator=gen) * 2 - 1) * bound)
            elif isinstance(sub, (nn.BatchNorm2d, nn.BatchNorm1d)):
                randomize_batch_norm(sub, gen)
    return module.eval()


class Stem(nn.Module):
    """First layer: one conv/linear per input, merged by add or concat, optional BN, ReLU."""

    def __init__(self, family: str, n_inputs: int, in_features: int, width: int, merge: str, bn: bool) -> None:
        super().__init__()
        make = (lambda: nn.Conv2d(in_features, width, 3, padding=1)) if family == "cnn" else (
            lambda: nn.Linear(in_features, width)
        )
        self.layers = nn.ModuleList([make() for _ in range(n_inputs)])
        self.merge = merge if n_inputs > 1 else "add"
        self.out_features = width * (n_inputs if self.merge == "concat" else 1)
        norm = nn.BatchNorm2d if family == "cnn" else nn.BatchNorm1d
        self.bn = norm(self.out_features) if bn else nn.Identity()

    def forward(self, *xs):
        ys = [layer(x) for layer, x in zip(self.layers, xs)]
        y = torch.cat(ys, 1) if self.merge == "concat" else sum(ys[1:], ys[0])
        return torch.relu(self.bn(y))


class Plain(nn.Module):
    def __init__(self, family: str, cin: int, cout: int, kernel: int, bn: bool, act: bool) -> None:
        super().__init__()
        if family == "cnn":
            self.layer = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=not bn)
            self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        else:
            self.layer = nn.Linear(cin, cout)
            self.bn = nn.Identity()
        self.act = act
        self.out_features = cout

    def forward(self, x):
        y = self.bn(self.layer(x))
        return torch.relu(y) if self.act else y


class Residual(nn.Module):
    def __init__(self, family: str, c: int, bn: bool) -> None:
        super().__init__()
        self.a = Plain(family, c, c, 3, bn, True)
        self.b = Plain(family, c, c, 3, bn, False)
        self.out_features = c

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + x)


class Branch(nn.Module):
    def __init__(self, family: str, cin: int, c1: int, c2: int, bn: bool) -> None:
        super().__init__()
        self.a = Plain(family, cin, c1, 1, bn, True)
        self.b = Plain(family, cin, c2, 3, bn, True)
        self.out_features = c1 + c2

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class Pooled(nn.Module):
    def __init__(self, cin: int, cout: int, kind: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.pool = nn.MaxPool2d(2) if kind == "max" else nn.AvgPool2d(2)
        self.out_features = cout

    def forward(self, x):
        return torch.relu(self.pool(self.conv(x)))


class Head(nn.Module):
    def __init__(self, family: str, cin: int, spatial: int, hidden: int, outs: tuple[int, ...], flatten: bool) -> None:
        super().__init__()
        self.family, self.flatten = family, flatten
        features = cin * spatial * spatial if (family == "cnn" and flatten) else cin
        self.hidden = nn.Linear(features, hidden) if hidden else None
        width = hidden or features
        self.outs = nn.ModuleList([nn.Linear(width, n) for n in outs])

    def forward(self, x):
        if self.family == "cnn":
            x = torch.flatten(x, 1) if self.flatten else x.mean((-1, -2))
        if self.hidden is not None:
            x = torch.relu(self.hidden(x))
        ys = tuple(layer(x) for layer in self.outs)
        return ys[0] if len(ys) == 1 else ys


class RandomNet(nn.Module):
    """``blocks[0]`` is the stem (takes every input); ``input_order`` permutes the inputs."""

    def __init__(self, blocks: list[nn.Module], head: nn.Module, input_order: tuple[int, ...]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.input_order = input_order

    def forward(self, *inputs):
        h = self.blocks[0](*[inputs[i] for i in self.input_order])
        for block in self.blocks[1:]:
            h = block(h)
        return self.head(h)


def _weighted_layers(module: nn.Module) -> Counter:
    counts: Counter = Counter()
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            counts["relax.nn.conv2d"] += 1
        elif isinstance(sub, nn.Linear):
            counts["relax.matmul"] += 1
    return counts


# ---- the case ------------------------------------------------------------------------------------


@dataclass
class Case:
    family: str
    pattern: str
    models: dict[str, nn.Module]
    inputs: tuple[torch.Tensor, ...]
    shared_blocks: dict[str, int] = field(default_factory=dict)
    shares_head: dict[str, bool] = field(default_factory=dict)

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return f"Case({self.describe()})"

    def describe(self) -> str:
        parts = [f"{self.family}/{self.pattern}, inputs {[tuple(x.shape) for x in self.inputs]}"]
        for task, model in self.models.items():
            kinds = [type(b).__name__ for b in model.blocks]
            parts.append(f"{task}: {kinds} shared={self.shared_blocks[task]} head={self.shares_head[task]}")
        return "; ".join(parts)

    def expected_weighted_ops(self) -> Counter:
        total: Counter = Counter()
        for task, model in self.models.items():
            for block in list(model.blocks)[self.shared_blocks[task]:]:
                total.update(_weighted_layers(block))
            if not self.shares_head[task]:
                total.update(_weighted_layers(model.head))
        return total

    def _float_tensors(self) -> list[np.ndarray]:
        arrays = []
        for model in self.models.values():
            for value in model.state_dict().values():
                if value.is_floating_point():
                    arrays.append(value.detach().cpu().numpy())
        return arrays

    def unique_weight_bytes(self) -> int:
        seen = {}
        for arr in self._float_tensors():
            key = (str(arr.dtype), arr.shape, hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest())
            seen[key] = arr.nbytes
        return sum(seen.values())

    def total_weight_bytes(self) -> int:
        return sum(arr.nbytes for arr in self._float_tensors())

    def torch_outputs(self) -> list[np.ndarray]:
        outs = []
        with torch.no_grad():
            for model in self.models.values():
                y = model(*self.inputs)
                outs.extend(t.numpy() for t in (y if isinstance(y, tuple) else (y,)))
        return outs


# ---- strategies --------------------------------------------------------------------------------


def _random_blocks(draw, family: str, gen: torch.Generator, cin: int, spatial: int, count: int) -> tuple[list, int, int]:
    """``count`` random blocks starting from ``cin`` features at ``spatial`` size."""
    blocks = []
    for _ in range(count):
        kinds = ["plain", "residual", "branch"] + (["pooled"] if family == "cnn" and spatial >= 8 else [])
        kind = draw(st.sampled_from(kinds))
        bn = family == "cnn" and draw(st.booleans())
        if kind == "plain":
            kernel = draw(st.sampled_from([1, 3])) if family == "cnn" else 1
            block = Plain(family, cin, draw(st.integers(2, 8)), kernel, bn, draw(st.booleans()))
        elif kind == "residual":
            block = Residual(family, cin, bn)
        elif kind == "branch":
            block = Branch(family, cin, draw(st.integers(1, 4)), draw(st.integers(1, 4)), bn)
        else:
            block = Pooled(cin, draw(st.integers(2, 8)), draw(st.sampled_from(["max", "avg"])))
            spatial //= 2
        blocks.append(_init(block, gen))
        cin = block.out_features
    return blocks, cin, spatial


def _random_head(draw, family: str, gen: torch.Generator, cin: int, spatial: int) -> Head:
    hidden = draw(st.sampled_from([0, 0, 6]))
    outs = tuple(draw(st.lists(st.integers(2, 6), min_size=1, max_size=2)))
    flatten = family == "cnn" and spatial <= 8 and draw(st.booleans())
    return _init(Head(family, cin, spatial, hidden, outs, flatten), gen)


@st.composite
def multi_model_cases(
    draw,
    min_models: int = 2,
    max_models: int = 4,
    max_inputs: int = 2,
    families: tuple[str, ...] = ("cnn", "mlp"),
    patterns: tuple[str, ...] = PATTERNS,
) -> Case:
    family = draw(st.sampled_from(families))
    pattern = draw(st.sampled_from(patterns))
    n_inputs = 2 if pattern == "swapped_inputs" else draw(st.integers(1, max_inputs))
    n_models = draw(st.integers(min_models, max_models))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if family == "cnn":
        channels, spatial = draw(st.integers(1, 4)), draw(st.sampled_from([8, 12, 16]))
        shape = (1, channels, spatial, spatial)
    else:
        channels, spatial = draw(st.integers(2, 12)), 1
        shape = (1, channels)
    inputs = tuple(torch.rand(shape, generator=gen) * 2 - 1 for _ in range(n_inputs))

    def fresh_stem():
        merge = draw(st.sampled_from(["add", "concat"]))
        return _init(Stem(family, n_inputs, channels, draw(st.integers(2, 8)), merge, family == "cnn" and draw(st.booleans())), gen)

    depth = draw(st.integers(1, 3))
    stem = fresh_stem()
    rest, cout, out_spatial = _random_blocks(draw, family, gen, stem.out_features, spatial, depth)
    base = RandomNet([stem] + rest, _random_head(draw, family, gen, cout, out_spatial), tuple(range(n_inputs)))

    models = {"m0": base}
    case = Case(family, pattern, models, inputs, {"m0": 0}, {"m0": False})
    swapped_done = False
    for index in range(1, n_models):
        task = f"m{index}"
        kind = draw(st.sampled_from(["prefix", "identical", "same_arch", "swapped_inputs"])) if pattern == "mixed" else pattern
        if kind == "swapped_inputs" and (n_inputs < 2 or swapped_done):
            # A second swapped copy would share everything with the first: keep expectations simple.
            kind = "identical" if n_inputs < 2 else "same_arch"
        swapped_done = swapped_done or kind == "swapped_inputs"
        if kind in ("identical", "swapped_inputs"):
            model = copy.deepcopy(base)
            if kind == "swapped_inputs":
                model.input_order = tuple(reversed(base.input_order))
                shared, head = 0, False
            else:
                shared, head = len(base.blocks), True
        elif kind == "same_arch":
            model = _init(copy.deepcopy(base), gen)  # same modules, every weight redrawn
            shared, head = 0, False
        else:  # prefix: copy 1..all leading blocks of m0, then new blocks and a new head
            shared = draw(st.integers(1, len(base.blocks)))
            blocks = [copy.deepcopy(b) for b in base.blocks[:shared]]
            spatial_now = spatial
            for b in blocks:
                if isinstance(b, Pooled):
                    spatial_now //= 2
            extra, cout2, spatial2 = _random_blocks(
                draw, family, gen, blocks[-1].out_features, spatial_now, draw(st.integers(0, 2))
            )
            model = RandomNet(blocks + extra, _random_head(draw, family, gen, cout2, spatial2), base.input_order)
            head = False
        models[task] = model.eval()
        case.shared_blocks[task] = shared
        case.shares_head[task] = head
    return case


# ---- running and comparing ----------------------------------------------------------------------


def assert_close(actual, expected, rtol: float = 1e-5) -> None:
    """Equal within ``rtol`` relative to each output's scale (max |expected|, at least 1e-3)."""
    assert len(actual) == len(expected), f"{len(actual)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"output {i}: shape {a.shape}, expected {e.shape}"
        scale = max(float(np.abs(e).max()) if e.size else 0.0, 1e-3)
        err = float(np.abs(a - e).max()) if e.size else 0.0
        assert err <= rtol * scale, f"output {i}: max error {err:.3g} > {rtol:g} x scale {scale:.3g}"


def bind_constants(mod):
    """``mod`` with its weight parameters bound as constants, without ``FoldConstant``.

    (``MultiModel.bound_module`` also folds constants, which builds a kernel per folded op: about
    1 s per module here; ``tvm.compile`` folds what matters anyway.)
    """
    from tvm import relax

    func = mod["main"]
    if func.attrs is None or "params" not in func.attrs:
        return mod
    num_input = int(func.attrs["num_input"])
    binding = {p: relax.const(v) for p, v in zip(list(func.params)[num_input:], func.attrs["params"])}
    out = mod.clone()
    out["main"] = func.bind_params(binding).without_attr("params")
    return out


def run_module(mod, inputs) -> list[np.ndarray]:
    """Compile ``mod`` (weights bound as constants) for llvm and run ``main`` on ``inputs``."""
    import tvm
    from tvm import relax

    target = tvm.target.Target({"kind": "llvm"})
    ex = tvm.compile(bind_constants(mod), target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    arrays = [np.ascontiguousarray(x.numpy() if hasattr(x, "numpy") else x) for x in inputs]
    out = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [o.numpy() for o in out]
