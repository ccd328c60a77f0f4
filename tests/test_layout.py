"""The architecture, checked: dependencies between gmorph-tvm's layers point one way (no import
cycle, no import from a later stage, none hidden inside a function), every test file is collected,
and the public verbs are reachable from ``import gmorph_tvm`` alone."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gmorph_tvm

ROOT = Path(__file__).resolve().parents[1]
# Where each subpackage's sources live (passes/ and tuning/ sit beside gmorph_tvm/, see pyproject).
SOURCES = {"gmorph_tvm": ROOT / "gmorph_tvm", "gmorph_tvm.passes": ROOT / "passes", "gmorph_tvm.tuning": ROOT / "tuning"}

# The data flow, earliest first: a subpackage (or top-level module) may import only earlier ones.
LAYERS = [
    "errors", "core",  # neutral: exceptions; specs, targets, manifest format, provenance, TVM logs
    "data", "zoo",  # bundled data sets and model definitions
    # import -> passes -> the pipeline object and tuning (gmorph_tvm.tuning.pipeline) -> the fusion verbs
    # and the "gmorph" registration made of it (gmorph_tvm.pipeline) -> build -> run
    "frontend", "passes", "tuning", "pipeline", "artifact", "runtime",
    "grouping", "benchmark", "recipe", "lossy", "demo", "cli",  # on top (recipe: the benchmark sets/variants/peers)
]
RANK = {name: i for i, name in enumerate(LAYERS)}
# The CLI is the top of the graph (nothing imports it); it imports each command's stage when that
# command runs, so `gmorph-tvm info` / `--version` load neither torch nor the compiler stack.
LAZY_OK = {"cli"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _subpackage(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported gmorph_tvm module, imported inside a function?) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out = []

    def visit(node: ast.AST, in_func: bool, in_type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            func = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = in_type_checking or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            )
            if isinstance(child, ast.ImportFrom) and not in_type_checking:
                if child.level:
                    target = base[: len(base) - child.level + 1]
                    name = ".".join(target + ([child.module] if child.module else []))
                else:
                    name = child.module or ""
                if name.startswith("gmorph_tvm"):
                    if child.module is None or name == "gmorph_tvm":  # from . import x
                        out.extend((f"{name}.{a.name}", in_func) for a in child.names)
                    else:
                        out.append((name, in_func))
            elif isinstance(child, ast.Import) and not in_type_checking:
                out.extend((a.name, in_func) for a in child.names if a.name.startswith("gmorph_tvm"))
            visit(child, func, tc)

    visit(tree, False, False)
    return out


def test_every_module_belongs_to_a_layer():
    subpackages = {_subpackage(m) for m in _modules()} - {""}
    assert subpackages <= set(RANK), f"put these in LAYERS: {sorted(subpackages - set(RANK))}"


def test_dependencies_point_one_way():
    backwards, hidden = [], []
    for module, path in _modules().items():
        here = _subpackage(module)
        if not here:
            continue
        for target, in_func in _imports(module, path):
            there = _subpackage(target)
            if not there or there == here or there not in RANK:
                continue
            if RANK[there] > RANK[here]:
                backwards.append(f"{module} -> {target}")
            if in_func and here not in LAZY_OK:
                hidden.append(f"{module} -> {target}")
    assert not backwards, "imports against the data flow: " + "; ".join(sorted(backwards))
    assert not hidden, "imports inside functions (move them to the top): " + "; ".join(sorted(hidden))


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for module, path in _modules().items():
        here = _subpackage(module)
        for target, _ in _imports(module, path):
            there = _subpackage(target)
            if here and there and there != here and there in RANK:
                graph.setdefault(here, set()).add(there)
    state: dict[str, int] = {}

    def dfs(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                dfs(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [])


def test_errors_keep_their_cause():
    """No ``raise ... from None``: a wrapped error keeps what caused it (``raise ... from err``)."""
    dropped = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.cause, ast.Constant) and node.cause.value is None:
                dropped.append(f"{module}:{node.lineno}")
    assert not dropped, "raise ... from None (use `from err`): " + ", ".join(sorted(dropped))


def test_pytest_collects_every_test_file():
    present = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py"))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    collected = sorted({line.split("::")[0] for line in out.stdout.splitlines() if "::" in line})
    assert collected == present, f"never collected: {sorted(set(present) - set(collected))}"


def test_public_verbs_after_plain_import():
    code = (
        "import gmorph_tvm, sys\n"
        "assert 'torch' not in sys.modules, 'import gmorph_tvm loaded torch'\n"
        "for verb in ('import_models', 'fuse', 'tune', 'build', 'load', 'search'):\n"
        "    assert callable(getattr(gmorph_tvm, verb)), verb\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert set(gmorph_tvm.__all__) >= {"import_models", "fuse", "tune", "build", "load", "search"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gmorph_tvm.nope  # noqa: B018


def test_mapped_subpackages_come_from_the_top_level_folders():
    import gmorph_tvm.passes
    import gmorph_tvm.tuning

    assert Path(gmorph_tvm.passes.__file__).parent == ROOT / "passes"
    assert Path(gmorph_tvm.tuning.__file__).parent == ROOT / "tuning"


@pytest.mark.slow
def test_wheel_ships_the_top_level_folders_as_subpackages(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheel_dir), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheel_dir.glob("gmorph_tvm-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("gmorph_tvm/passes/__init__.py", "gmorph_tvm/passes/canonicalize_ops.py",
                     "gmorph_tvm/passes/horizontal_merge/__init__.py", "gmorph_tvm/passes/horizontal_merge/rules.py",
                     "gmorph_tvm/tuning/__init__.py", "gmorph_tvm/tuning/records/README.md",
                     "gmorph_tvm/core/manifest.py", "gmorph_tvm/lossy/driver.py"):
        assert expected in names, expected
    assert not any(n.startswith(("passes/", "tuning/", "tests/")) for n in names)
    assert any(n.startswith("gmorph_tvm/zoo/weights/") for n in names)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = ("import gmorph_tvm, gmorph_tvm.passes, gmorph_tvm.tuning, gmorph_tvm.lossy\n"
            "print(gmorph_tvm.passes.__file__); print(gmorph_tvm.tuning.__file__); print(gmorph_tvm.fuse.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[0].startswith(str(target)) and lines[1].startswith(str(target)), lines


@pytest.mark.parametrize("folder", ["passes", "tuning"])
def test_top_level_folders_import_absolutely(folder):
    """passes/ and tuning/ live beside gmorph_tvm/ on disk; a relative import there (``from
    ..core import x``) names a folder that does not exist next to them, so a reader cannot follow
    it. They spell every gmorph-tvm import ``from gmorph_tvm.... import``."""
    relative = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                relative.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {'.' * node.level}{node.module or ''}")
    assert not relative, "relative imports in " + folder + "/:\n" + "\n".join(relative)
