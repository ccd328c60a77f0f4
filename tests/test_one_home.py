"""Every helper has one home (issue 25): the shapes that were restated come back as a failure here.

An AST scan of gmorph_tvm/, passes/, tuning/, bench/ and scripts/ for
* functions named like a homed helper (``one_line``, ``_nbytes``, ``format_table``, ``random_inputs``,
  ``time_main`` ...; leading underscores ignored) outside their home;
* random test inputs made again: a loop over tensor specs drawing random values (or zeros);
* timing loops made again: ``for _ in range(n): fn()`` between two reads of a clock, or a clock read
  at the start of each iteration and subtracted at its end; a ``time_evaluator`` call outside the
  one reader of it;
* ``MergeMode = ...`` outside passes/horizontal_merge/transform.py;
* ``sys.path.insert`` / ``sys.path.append`` in bench/ or scripts/ (they import the installed package).

Class methods are not scanned (``WeightsEntry.nbytes`` is an attribute of a file entry, not a helper).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("gmorph_tvm", "passes", "tuning", "bench", "scripts")

# helper name (without leading underscores) -> its one home
HOMES = {
    "one_line": "gmorph_tvm/errors.py",
    "nbytes": "gmorph_tvm/core/ir.py",
    "tensor_nbytes": "gmorph_tvm/core/ir.py",
    "op_name": "gmorph_tvm/core/ir.py",
    "dtype_str": "gmorph_tvm/core/ir.py",
    "random_inputs": "gmorph_tvm/core/inputs.py",
    "random_array": "gmorph_tvm/core/inputs.py",
    "seconds_per_call": "gmorph_tvm/core/timing.py",
    "calls_to_last": "gmorph_tvm/core/timing.py",
    "time_main": "gmorph_tvm/core/timing.py",
    "markdown_table": "gmorph_tvm/core/table.py",
    "format_table": "gmorph_tvm/benchmark.py",
    "loop_sampler": "gmorph_tvm/benchmark.py",
}
MERGE_MODE_HOME = "passes/horizontal_merge/transform.py"
CLOCKS = {"perf_counter", "process_time", "monotonic", "time", "perf_counter_ns", "monotonic_ns"}
TIMING_HOME = "gmorph_tvm/core/timing.py"
INPUTS_HOME = "gmorph_tvm/core/inputs.py"

# Not helpers: bench/gpu_check.py runs on the board without gmorph-tvm installed (gpu_prepare copies
# it there beside the standalone runtime), so it keeps its own timing loop.
EXEMPT = {("bench/gpu_check.py", "timing loop"), ("bench/gpu_check.py", "def time_fn")}

# Restated helpers in files other sessions own, each with the patch reported to them (issue 25). An
# entry that no longer occurs fails too: delete it here when its patch lands.
PENDING: set[tuple[str, str]] = set()


def _files() -> Iterator[tuple[str, ast.Module]]:
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            yield rel, ast.parse(path.read_text(encoding="utf-8"), rel)


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Module-level and nested functions; not methods of classes."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
            yield from _functions(node)
        elif not isinstance(node, ast.ClassDef):
            yield from _functions(node)


def _called(node: ast.AST) -> str | None:
    """The attribute or function name a call calls (``time.perf_counter()`` -> ``perf_counter``)."""
    if isinstance(node, ast.Call):
        return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
    return None


def _reads_clock(node: ast.AST) -> bool:
    return any(_called(n) in CLOCKS and _is_time_call(n) for n in ast.walk(node))


def _is_time_call(call: ast.AST) -> bool:
    func = call.func if isinstance(call, ast.Call) else None
    if isinstance(func, ast.Attribute):
        return isinstance(func.value, ast.Name) and func.value.id == "time"
    return isinstance(func, ast.Name) and func.id in CLOCKS - {"time"}


def _timing_loops(tree: ast.AST) -> Iterator[int]:
    """Line numbers of loops timed by a host clock (around the loop, or inside each iteration)."""
    for node in ast.walk(tree):
        for body in (getattr(node, f, None) for f in ("body", "orelse", "finalbody")):
            if not isinstance(body, list):
                continue
            for i, stmt in enumerate(body):
                if not isinstance(stmt, (ast.For, ast.While)):
                    continue
                inside = stmt.body
                # ``for _ in range(number): fn()`` between two clock reads (a phase timed as a whole,
                # such as a tuning loop or joining threads, is not a timing loop)
                repeats_one_call = (isinstance(stmt, ast.For) and _called(stmt.iter) == "range" and len(inside) == 1
                                    and isinstance(inside[0], ast.Expr) and isinstance(inside[0].value, ast.Call))
                around = (repeats_one_call and 0 < i < len(body) - 1 and _reads_clock(body[i - 1])
                          and _reads_clock(body[i + 1]))
                # each iteration: start = clock(); ...; samples.append(clock() - start)
                per_iteration = len(inside) >= 2 and _reads_clock(inside[0]) and any(
                    isinstance(n, ast.BinOp) and isinstance(n.op, ast.Sub) and _reads_clock(n.left)
                    for n in ast.walk(inside[-1]))
                if around or per_iteration:
                    yield stmt.lineno


def _spec_loops_drawing_values(tree: ast.AST) -> Iterator[int]:
    """Loops over tensor specs that draw random values or zeros: random test inputs made again."""
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and "spec" in ast.unparse(node.target) + ast.unparse(node.iter):
            draws = {_called(n) for n in ast.walk(node)} & {"standard_normal", "integers", "zeros", "uniform", "normal"}
            if draws:
                yield node.lineno


def _findings() -> set[tuple[str, str, int]]:
    found = set()
    for rel, tree in _files():
        for func in _functions(tree):
            name = func.name.lstrip("_")
            if name in HOMES and HOMES[name] != rel:
                found.add((rel, f"def {func.name}", func.lineno))
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == "MergeMode" for t in targets) and rel != MERGE_MODE_HOME:
                found.add((rel, "MergeMode =", node.lineno))
            call = ast.unparse(node.func) if isinstance(node, ast.Call) else ""
            if call in ("sys.path.insert", "sys.path.append") and rel.startswith(("bench/", "scripts/")):
                found.add((rel, "sys.path.insert", node.lineno))
            if call.endswith(".time_evaluator") and rel != TIMING_HOME:
                found.add((rel, "time_evaluator", node.lineno))
        if rel != TIMING_HOME:
            found |= {(rel, "timing loop", line) for line in _timing_loops(tree)}
        if rel != INPUTS_HOME:
            found |= {(rel, "random inputs", line) for line in _spec_loops_drawing_values(tree)}
    return {f for f in found if (f[0], f[1]) not in EXEMPT}


def test_no_helper_is_restated_outside_its_home():
    found = _findings()
    new = sorted(f"{rel}:{line}: {what}" for rel, what, line in found if (rel, what) not in PENDING)
    assert not new, "restated outside their one home (import the home instead):\n" + "\n".join(new)


def test_pending_entries_still_occur():
    """A pending entry whose patch has landed must leave the list, so the list never hides a new one."""
    present = {(rel, what) for rel, what, _ in _findings()}
    assert not PENDING - present, f"fixed, delete from PENDING: {sorted(PENDING - present)}"


def test_the_scan_catches_each_shape(tmp_path):
    """The detectors find the shapes as they stood before issue 25 (so the test above can fail)."""
    restated = '''
import sys, time
import numpy as np
sys.path.insert(0, "..")
MergeMode = None
def _one_line(err):
    return str(err)
def latency(mm, fn, number):
    rng = np.random.default_rng(0)
    for spec in mm.inputs:
        arr = np.zeros(spec.shape, dtype=spec.dtype)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number
def per_run(fn, runs):
    totals = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        totals.append(time.perf_counter() - start)
def evaluator(vm, dev):
    return vm.time_evaluator("main", dev, number=1)
'''
    tree = ast.parse(restated)
    assert [f.name for f in _functions(tree)] == ["_one_line", "latency", "per_run", "evaluator"]
    assert len(list(_timing_loops(tree))) == 2
    assert len(list(_spec_loops_drawing_values(tree))) == 1
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert {"sys.path.insert", "vm.time_evaluator"} <= calls
    # ...and the homes themselves hold what the scan looks for.
    homes = {rel: tree for rel, tree in _files() if rel in set(HOMES.values())}
    for name, home in HOMES.items():
        assert any(f.name == name for f in _functions(homes[home])), f"{name} is not in {home}"
