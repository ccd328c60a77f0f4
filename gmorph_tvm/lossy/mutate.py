"""Applying a :class:`~gmorph_tvm.lossy.plan.FusionPlan` to PyTorch models and to a Relax module.

:func:`build_fused` turns the task models plus a plan into one :class:`FusedModel` (an
``nn.Module`` returning every task's output) made of the models' own sub-networks, cut at the
plan's cut points, plus adapters. Each kept layer exists once, so the layers a task reuses from its
host are literally the same parameters: fine-tuning keeps them identical by construction.

Adapters are initialised by least squares on a calibration batch so that, before any fine-tuning,
they already map the host's activation to the best linear approximation of the activation the
task's own (deleted) layers produced. This makes fine-tuning start close to the original models.

:func:`to_multimodel` applies the plan to the Relax side: every task's view of the fused model is
imported as its own model (so the MultiModel keeps one task per original model), then the lossless
pipeline (weight stitching + common-subexpression elimination) merges the layers tasks share, so
they are computed once in the compiled graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SearchError
from ..frontend import import_models
from ..passes import stitch
from .graph import LayerGraph
from .plan import FusionPlan

INPUT_KEY = "input"


class Adapter(nn.Module):
    """Maps an activation of shape ``in_shape`` to ``out_shape`` (batch dimension excluded).

    ``[C, H, W]``: bilinear interpolation to the target size when H, W differ, then a 1x1 conv for
    the channels. ``[F]``: a linear layer.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        super().__init__()
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        if len(in_shape) != len(out_shape) or len(in_shape) not in (1, 3):
            raise SearchError(f"no adapter from activation shape {list(in_shape)} to {list(out_shape)}")
        self.in_shape, self.out_shape = in_shape, out_shape
        if len(in_shape) == 3:
            self.size = tuple(out_shape[1:]) if in_shape[1:] != out_shape[1:] else None
            self.proj: nn.Module = nn.Conv2d(in_shape[0], out_shape[0], 1)
        else:
            self.size = None
            self.proj = nn.Linear(in_shape[0], out_shape[0])

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is None:
            return x
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.resize(x))

    @torch.no_grad()
    def fit(self, source: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> float:
        """Least-squares init from ``source`` activations to ``target`` ones; returns the fit's R^2."""
        x = self.resize(source)
        if x.dim() == 4:
            rows_x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            rows_y = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
        else:
            rows_x, rows_y = x, target
        rows_x = rows_x.double()
        rows_y = rows_y.double()
        design = torch.cat([rows_x, torch.ones(rows_x.shape[0], 1, dtype=rows_x.dtype)], dim=1)
        gram = design.T @ design
        # Ridge scaled to the data so the fit is well posed even with fewer samples than features.
        scale = float(torch.diagonal(gram)[:-1].mean()) if gram.shape[0] > 1 else 1.0
        gram += torch.eye(gram.shape[0], dtype=gram.dtype) * (ridge * scale + 1e-8)
        solution = torch.linalg.solve(gram, design.T @ rows_y)  # [in + 1, out]
        weight, bias = solution[:-1].T, solution[-1]
        if isinstance(self.proj, nn.Conv2d):
            self.proj.weight.copy_(weight.reshape(self.proj.weight.shape).float())
        else:
            self.proj.weight.copy_(weight.float())
        self.proj.bias.copy_(bias.float())
        residual = ((design @ solution - rows_y) ** 2).sum()
        total = ((rows_y - rows_y.mean(0)) ** 2).sum().clamp_min(1e-12)
        return float(1.0 - residual / total)


@dataclass(frozen=True)
class _Step:
    """``env[dst] = blocks[block](env[src])``."""

    src: str
    block: str
    dst: str


@dataclass
class FuseInfo:
    """What building a fused model found out: adapter fits and sizes (plan features use them)."""

    adapter_r2: dict[str, float] = field(default_factory=dict)  # block name -> R^2 of its LS fit
    adapters: int = 0
    resizes: int = 0


class FusedModel(nn.Module):
    """Every task's model in one module; layers a plan shares exist (and run) once.

    ``forward(x)`` returns a tuple with one tensor per task, in ``task_names`` order.
    """

    def __init__(self, task_names: Sequence[str], plan: FusionPlan, blocks: Mapping[str, nn.Module],
                 steps: Sequence[_Step], outputs: Mapping[str, str], info: FuseInfo | None = None) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.plan = plan
        self.blocks = nn.ModuleDict(dict(blocks))
        self._steps = list(steps)
        self._outputs = dict(outputs)
        self.info = info or FuseInfo()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = {INPUT_KEY: x}
        for step in self._steps:
            env[step.dst] = self.blocks[step.block](env[step.src])
        return tuple(env[self._outputs[t]] for t in self.task_names)

    def task_module(self, task: str) -> nn.Module:
        """A module computing only ``task``'s output, sharing this model's parameters."""
        if task not in self._outputs:
            raise SearchError(f"fused model has no task {task!r}; tasks are {', '.join(self.task_names)}")
        needed: list[_Step] = []
        wanted = {self._outputs[task]}
        for step in reversed(self._steps):
            if step.dst in wanted:
                needed.append(step)
                wanted.add(step.src)
        needed.reverse()
        return _TaskView({s.block: self.blocks[s.block] for s in needed}, needed, self._outputs[task])

    def blocks_of(self, tasks: Sequence[str]) -> list[str]:
        """Names of the blocks that ``tasks``' outputs depend on."""
        names: set[str] = set()
        for task in tasks:
            wanted = {self._outputs[task]}
            for step in reversed(self._steps):
                if step.dst in wanted:
                    names.add(step.block)
                    wanted.add(step.src)
        return sorted(names)

    def modified_tasks(self) -> list[str]:
        """Tasks whose computation the plan changed (they share from a host or drop layers)."""
        changed = {s.task for s in self.plan.shares} | {d.task for d in self.plan.drops}
        return [t for t in self.task_names if t in changed]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _TaskView(nn.Module):
    def __init__(self, blocks: Mapping[str, nn.Module], steps: Sequence[_Step], output: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict(dict(blocks))
        self._steps = list(steps)
        self._output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {INPUT_KEY: x}
        for step in self._steps:
            env[step.dst] = self.blocks[step.block](env[step.src])
        return env[self._output]


class Calibration:
    """Activations of the ORIGINAL models at their cut points on a fixed batch (computed lazily)."""

    def __init__(self, graphs: Mapping[str, LayerGraph], x: torch.Tensor) -> None:
        self.graphs = graphs
        self.x = x
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def act(self, task: str, cut: int) -> torch.Tensor:
        key = (task, cut)
        if key not in self._cache:
            graph = self.graphs[task]
            missing = [c.index for c in graph.cuts if (task, c.index) not in self._cache]
            for index, value in graph.activations(self.x, missing).items():
                self._cache[(task, index)] = value
        return self._cache[key]


def _block_name(task: str, kind: str) -> str:
    # ModuleDict keys cannot contain '.'; task names are identifiers (may contain '-').
    return f"{task}__{kind}".replace(".", "_")


def build_fused(graphs: Mapping[str, LayerGraph], plan: FusionPlan, calibration: Calibration | None = None) -> FusedModel:
    """Apply ``plan`` to fresh copies of the task models (``graphs``, in task order).

    With ``calibration``, adapters are initialised by least squares on the original activations;
    without it they keep PyTorch's random init.
    """
    plan.validate(graphs)
    tasks = list(graphs)
    blocks: dict[str, nn.Module] = {}
    steps: list[_Step] = []
    outputs: dict[str, str] = {}
    info = FuseInfo()
    for task in plan.task_order(tasks):
        graph = graphs[task].copy()
        start = plan.own_start(task)
        share = plan.share_of(task)
        current = INPUT_KEY
        if share is not None:
            host_shape = graphs[share.host].cut(share.host_cut).shape
            adapter = Adapter(host_shape, graph.cut(start).shape)
            name = _block_name(task, f"share_from_{share.host}_{share.host_cut}_{start}")
            if calibration is not None:
                info.adapter_r2[name] = adapter.fit(calibration.act(share.host, share.host_cut), calibration.act(task, start))
            info.adapters += 1
            info.resizes += adapter.size is not None
            blocks[name] = adapter
            current = f"{task}@{start}"
            steps.append(_Step(f"{share.host}@{share.host_cut}", name, current))
        drops = {(d.start, d.end) for d in plan.drops_of(task)}
        bounds = sorted({start, *plan.exports(task), *(p for d in drops for p in d)})
        for p, q in zip(bounds, bounds[1:] + [None]):
            dst = f"{task}@{'out' if q is None else q}"
            if (p, q) in drops:
                in_shape, out_shape = graph.cut(p).shape, graph.cut(q).shape
                if in_shape == out_shape:
                    module: nn.Module = nn.Identity()
                else:
                    module = Adapter(in_shape, out_shape)
                    info.adapters += 1
                    info.resizes += module.size is not None
                name = _block_name(task, f"drop_{p}_{q}")
                if calibration is not None and isinstance(module, Adapter):
                    info.adapter_r2[name] = module.fit(calibration.act(task, p), calibration.act(task, q))
            else:
                module = graph.segment(p, q)
                name = _block_name(task, f"seg_{p}_{'out' if q is None else q}")
            blocks[name] = module
            steps.append(_Step(current, name, dst))
            current = dst
        outputs[task] = current
    return FusedModel(tasks, plan, blocks, steps, outputs, info)


# ---- Relax ----------------------------------------------------------------------------------------------


def to_multimodel(fused: FusedModel, example_input: torch.Tensor):
    """The fused model as a :class:`~gmorph_tvm.frontend.MultiModel` with one task per original model.

    Each task's view is imported separately (shared layers appear once per task, with identical
    weights), then stitched: duplicate weights become one parameter and common sub-expressions are
    eliminated, so the shared trunk is computed once.
    """
    was_training = fused.training
    fused.eval()
    try:
        views = {task: fused.task_module(task).eval() for task in fused.task_names}
        multi = import_models(views, example_input)
    finally:
        fused.train(was_training)
    return _stitch(multi)


def _stitch(multi):
    """The lossless pipeline: identical weights become one, identical ops are computed once."""
    return stitch(multi)
