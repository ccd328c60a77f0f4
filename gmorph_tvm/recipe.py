"""The benchmark recipe, defined once: the model sets, the builds of them that are compared
(variants), how a set reaches the importer (routes), and the systems users run instead (peers).

``gmorph-tvm demo``, every script in ``bench/`` and ``scripts/make_records.py`` (which makes the
shipped tuning records) take all four from here, so a table, a tuning record and the demo always
mean the same builds.

* **Sets** (:data:`SETS`): ``A``, ``B``, ``C``, ``E`` (:mod:`gmorph_tvm.zoo.benchsets`: real weights,
  real inputs) and ``demo`` (what ``gmorph-tvm demo`` builds: set B's first four tasks).
* **Variants** (:data:`VARIANTS`): ``separate`` (each model compiled on its own, fused as ``gmorph-tvm
  build`` fuses one model: the baseline every fused build is measured against), ``stitch``,
  ``stitch+merge`` (the default fusion) and ``grouped`` (the tasks in groups of half the set, each
  group fused on its own, one artifact with an entry point per group).
* **Routes** (:data:`ROUTES`): ``torch`` (the modules, through ``torch.export``), ``onnx`` (files
  written by ``torch.onnx.export(dynamo=False)``, the TorchScript exporter) and ``onnx-dynamo``
  (``dynamo=True``, torch's default exporter).
* **Peers** (:data:`PEERS`): PyTorch eager on 1 thread and on every core, ONNX Runtime (default
  sessions; ``session.intra_op.allow_spinning=0``), OpenVINO (when installed: ``pip install
  gmorph-tvm[bench]``). A peer is one :class:`Peer` entry: a label, the module it needs, a sampler
  and its weight bytes. Peers that read ONNX read the ``onnx`` route's files.

Every sampler comes from :mod:`gmorph_tvm.benchmark`, which times all systems interleaved.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm
from torch import nn

from .artifact import build
from .benchmark import (
    Row,
    Sampler,
    onnxruntime_sampler,
    openvino_sampler,
    torch_sampler,
    torch_weight_bytes,
)
from .errors import GmorphError
from .frontend import MultiModel, import_models
from .pipeline import fuse_grouped, fuse_lossless, fuse_separately
from .runtime import load
from .tuning import tune
from .zoo import benchsets

# ---- sets -----------------------------------------------------------------------------------------

DEMO = "demo"
DEMO_BASE, DEMO_MODELS = "B", 4  # the demo set: set B's first four tasks
SETS = (*benchsets.SETS, DEMO)


class RecipeError(GmorphError):
    """An unknown set, variant, route or peer."""


@dataclass
class BenchSet:
    """One set at one batch size: models by task, their inputs (a tuple, one per input name)."""

    name: str
    batch: int
    models: dict[str, nn.Module]
    args: tuple[torch.Tensor, ...]
    names: list[str]
    _onnx: dict[tuple[str, bool], dict[str, str]] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        """``"B8"``: the set and batch, as work dirs and shipped records name them (``"demo"`` at batch 1)."""
        return self.name if self.name == DEMO and self.batch == 1 else f"{self.name}{self.batch}"

    @property
    def feed(self) -> dict[str, np.ndarray]:
        """Input name -> array: what every artifact and ONNX session of the set is fed."""
        return {name: arg.numpy() for name, arg in zip(self.names, self.args)}

    def reference(self) -> dict[str, np.ndarray]:
        """PyTorch's output of every task (eager, inference mode)."""
        with torch.inference_mode():
            return {task: model(*self.args).numpy() for task, model in self.models.items()}

    def export_onnx(self, directory: str | Path, *, dynamo: bool = False) -> dict[str, str]:
        """One ONNX file per task in ``directory`` (``<task>.onnx``, or ``<task>.dynamo.onnx``), exported
        by ``torch.onnx.export`` as its users call it; written once per set, directory and exporter."""
        key = (str(Path(directory).resolve()), dynamo)
        if key not in self._onnx:
            paths = {}
            for task, model in self.models.items():
                path = Path(directory) / f"{task}{'.dynamo' if dynamo else ''}.onnx"
                if dynamo:
                    torch.onnx.export(model, self.args, str(path), dynamo=True, input_names=self.names,
                                      external_data=False, verbose=False)
                else:
                    torch.onnx.export(model, self.args, str(path), dynamo=False, opset_version=17,
                                      input_names=self.names)
                paths[task] = str(path)
            self._onnx[key] = paths
        return dict(self._onnx[key])


def load_set(name: str, batch: int = 1, n: int | None = None) -> BenchSet:
    """Set ``name`` (one of :data:`SETS`) at ``batch`` with ``n`` models (default: the set's)."""
    if name not in SETS:
        raise RecipeError(f"benchmark set {name!r} is not one of {', '.join(SETS)}")
    base, count = (DEMO_BASE, DEMO_MODELS if n is None else n) if name == DEMO else (name, n)
    models, args, names = benchsets.load_set(base, count, batch)
    return BenchSet(name, batch, models, args, names)


def parse_label(label: str) -> tuple[str, int]:
    """``"B8"`` -> ``("B", 8)``; ``"demo"`` -> ``("demo", 1)`` (the names of shipped record sets)."""
    if label == DEMO:
        return DEMO, 1
    name, batch = label[:1], label[1:]
    if name not in benchsets.SETS or not batch.isdigit() or int(batch) < 1:
        raise RecipeError(f"set {label!r} is not 'demo' or a set ({', '.join(benchsets.SETS)}) and a batch, e.g. B8")
    return name, int(batch)


# ---- routes ---------------------------------------------------------------------------------------

ROUTES = ("torch", "onnx", "onnx-dynamo")


@dataclass
class Imported:
    """A set imported by one route: the sources each task was imported from and the MultiModel."""

    set: BenchSet
    route: str
    sources: Mapping[str, Any]  # task -> torch module or ONNX path
    example_inputs: Any  # the torch route's example inputs; None for ONNX files
    mm: MultiModel


def import_set(bench_set: BenchSet, route: str = "torch", directory: str | Path | None = None) -> Imported:
    """``bench_set`` imported by ``route`` (ONNX routes export into ``directory`` first)."""
    if route not in ROUTES:
        raise RecipeError(f"import route {route!r} is not one of {', '.join(ROUTES)}")
    if route == "torch":
        sources: Mapping[str, Any] = bench_set.models
        example = bench_set.args
    else:
        if directory is None:
            raise RecipeError(f"route {route!r} exports ONNX files: give a directory")
        sources, example = bench_set.export_onnx(directory, dynamo=route == "onnx-dynamo"), None
    return Imported(bench_set, route, sources, example, import_models(sources, example))


# ---- variants -------------------------------------------------------------------------------------

VARIANTS = ("separate", "stitch", "stitch+merge", "grouped")
FUSED = VARIANTS[1:]
DEMO_VARIANTS = ("separate", "stitch+merge")  # what gmorph-tvm demo builds (and the shipped demo records cover)
SEPARATE_LABEL = "TVM, models compiled separately"


def variant_label(variant: str) -> str:
    """The row name of a variant in every table."""
    check_variants([variant])
    return SEPARATE_LABEL if variant == "separate" else f"gmorph-tvm fused: {variant}"


def check_variants(variants: Iterable[str]) -> list[str]:
    """``variants`` as a list, refused with one line if any is not one of :data:`VARIANTS`."""
    variants = list(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise RecipeError(f"variants {', '.join(unknown)} not among {', '.join(VARIANTS)}")
    return variants


def grouped(mm: MultiModel) -> list[MultiModel]:
    """The ``grouped`` variant: tasks in groups of half the set (GroupModels keeps weight-sharing tasks
    together), each group fused on its own; empty when that gives a single group."""
    parts = fuse_grouped(mm, max_group_size=max(1, len(mm.tasks) // 2))
    return parts if len(parts) > 1 else []


def builds(imported: Imported, variant: str) -> list[MultiModel]:
    """What is compiled for ``variant``: one MultiModel per separate model, the fused one, or the groups
    (compiled together into one artifact)."""
    check_variants([variant])
    mm = imported.mm
    if variant == "separate":
        return list(fuse_separately(imported.sources, imported.example_inputs).values())
    if variant == "grouped":
        return grouped(mm)
    return [fuse_lossless(mm, merge="never" if variant == "stitch" else "auto")]


def tuning_modules(imported: Imported, variants: Sequence[str]) -> list[tuple[str, tvm.IRModule]]:
    """The weight-bound modules that ``tune`` gets for ``variants`` (in that order), labelled. The
    separate models' kernels come as one module of every model canonicalised as its own build is,
    with nothing shared: the kernels of the separate builds, tuned in one go."""
    mods: list[tuple[str, tvm.IRModule]] = []
    for variant in check_variants(variants):
        if variant == "separate":
            mods.append((variant, fuse_lossless(imported.mm, stitch=False, merge="never").bound_module()))
        elif variant == "grouped":
            mods += [(f"grouped{i}", part.bound_module()) for i, part in enumerate(grouped(imported.mm))]
        else:
            mods += [(variant, part.bound_module()) for part in builds(imported, variant)]
    return mods


def tune_variants(imported: Imported, variants: Sequence[str], target, work_dir: str | Path,
                  **tune_options) -> list:
    """``tune`` every module of :func:`tuning_modules` into ``work_dir``; the tuning reports."""
    return [tune(mod, target, work_dir=work_dir, **tune_options) for _, mod in tuning_modules(imported, variants)]


def build_variant(imported: Imported, variant: str, target, directory: str | Path, *, tuning_db=None,
                  suffix: str = "", **build_options) -> list[str]:
    """The artifact files of ``variant`` in ``directory``: one per separate model, one otherwise
    (the groups of ``grouped`` are entry points of one artifact); empty when ``grouped`` has a single
    group."""
    parts = builds(imported, variant)
    stem = variant.replace("+", "_") + suffix
    if variant == "separate":
        return [str(build(part, target, tuning_db=tuning_db, **build_options)
                    .export(Path(directory) / f"separate_{part.task_names[0]}{suffix}.so")) for part in parts]
    if not parts:
        return []
    model = parts if variant == "grouped" else parts[0]
    return [str(build(model, target, tuning_db=tuning_db, **build_options).export(Path(directory) / f"{stem}.so"))]


def run_artifacts(paths: Sequence[str], feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every task's output of the artifacts at ``paths``, each fed the inputs it takes."""
    outputs: dict[str, Any] = {}
    for runner in map(load, paths):
        names = {s["name"] for s in runner.manifest["inputs"]}
        outputs.update(runner({k: v for k, v in feed.items() if k in names}))
    return outputs


def max_relative_error(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """max |out - ref| / max |ref| over the tasks of ``reference``."""
    return max(float(np.max(np.abs(outputs[t] - ref)) / (np.abs(ref).max() + 1e-12)) for t, ref in reference.items())


# ---- peers ----------------------------------------------------------------------------------------

CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class PeerInputs:
    """What a peer is timed on: the set, and (for peers that read ONNX) the ``onnx`` route's files."""

    set: BenchSet
    onnx_paths: Mapping[str, str]

    @property
    def feeds(self) -> dict[str, dict[str, np.ndarray]]:
        return {task: self.set.feed for task in self.set.models}

    @property
    def torch_inputs(self) -> dict[str, tuple[torch.Tensor, ...]]:
        return {task: self.set.args for task in self.set.models}

    def onnx_bytes(self) -> int:
        return sum(Path(p).stat().st_size for p in self.onnx_paths.values())


@dataclass(frozen=True)
class Peer:
    """A system users run instead of gmorph-tvm: its row name, the module it needs (None: always
    there), its sampler and the bytes of weights it holds."""

    key: str
    label: str
    needs: str | None
    sampler: Callable[[PeerInputs], Sampler]
    weight_bytes: Callable[[PeerInputs], int]
    reads_onnx: bool = False

    @property
    def available(self) -> bool:
        return self.needs is None or importlib.util.find_spec(self.needs) is not None


def _torch_bytes(inputs: PeerInputs) -> int:
    return torch_weight_bytes(inputs.set.models)


def _onnx_bytes(inputs: PeerInputs) -> int:
    return inputs.onnx_bytes()


PEERS: dict[str, Peer] = {peer.key: peer for peer in [
    Peer("torch-1", "PyTorch eager, 1 thread", None,
         lambda i: torch_sampler(i.set.models, i.torch_inputs, threads=1), _torch_bytes),
    Peer("torch", f"PyTorch eager, {CORES} threads", None,
         lambda i: torch_sampler(i.set.models, i.torch_inputs, threads=CORES), _torch_bytes),
    Peer("ort", "ONNX Runtime, default sessions", "onnxruntime",
         lambda i: onnxruntime_sampler(i.onnx_paths, i.feeds), _onnx_bytes, reads_onnx=True),
    Peer("ort-nospin", "ONNX Runtime, allow_spinning=0", "onnxruntime",
         lambda i: onnxruntime_sampler(i.onnx_paths, i.feeds, spinning=False), _onnx_bytes, reads_onnx=True),
    Peer("openvino", "OpenVINO", "openvino",
         lambda i: openvino_sampler(i.onnx_paths, i.feeds), _onnx_bytes, reads_onnx=True),
]}
DEFAULT_PEERS = tuple(PEERS)
ONNX_RUNTIME = "ONNX Runtime"  # the label prefix of the ONNX Runtime peers


def peers(keys: Iterable[str] = DEFAULT_PEERS, *, skip_missing: bool = True) -> list[Peer]:
    """The peers named by ``keys``; one whose module is not installed is left out (``skip_missing``)
    or refused."""
    chosen = []
    for key in keys:
        if key not in PEERS:
            raise RecipeError(f"peer {key!r} is not one of {', '.join(PEERS)}")
        peer = PEERS[key]
        if not peer.available:
            if skip_missing:
                continue
            raise RecipeError(f"peer {key!r} needs the {peer.needs} package (pip install gmorph-tvm[bench])")
        chosen.append(peer)
    return chosen


def peer_samplers(chosen: Sequence[Peer], inputs: PeerInputs) -> dict[str, Sampler]:
    """Label -> sampler of every peer in ``chosen``."""
    return {peer.label: peer.sampler(inputs) for peer in chosen}


def weight_bytes_of(runners: Sequence[Any]) -> int:
    """Bytes of the weights loaded artifacts hold (from their manifests)."""
    return sum(int(r.manifest["weights"]["bytes"]) for r in runners)


def best(rows: Sequence[Row], prefix: str = ONNX_RUNTIME) -> Row | None:
    """The fastest row whose system starts with ``prefix`` (e.g. ONNX Runtime's best session kind)."""
    found = [r for r in rows if r.system.startswith(prefix)]
    return min(found, key=lambda r: r.median_ms) if found else None
