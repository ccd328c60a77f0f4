"""Fuzzing the runner and the CLI (hypothesis): random inputs, damaged files, manifest edits and
concurrent calls give a correct result or one GmorphError line (CLI: exit 1 or 2), never a crash
and never a wrong result. Example counts are bounded so the whole file takes about a minute."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmorph_tvm.artifact import manifest_path_for
from gmorph_tvm.cli import main
from gmorph_tvm.errors import GmorphError
from gmorph_tvm.runtime import load

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))

DTYPES = ["float32", "float64", "float16", "int64", "int32", "uint8", "bool"]
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@pytest.fixture(scope="module")
def runner(tiny_artifact):
    return load(tiny_artifact)


def _array(draw, shape, dtype) -> np.ndarray:
    if dtype == "bool":
        return np.asarray(draw(st.lists(st.booleans(), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
                          ).reshape(shape)
    if dtype.startswith("float"):
        values = st.floats(allow_nan=True, allow_infinity=True, width=16 if dtype == "float16" else 32)
    else:
        info = np.iinfo(dtype)
        values = st.integers(max(int(info.min), -(2**40)), min(int(info.max), 2**40))
    size = int(np.prod(shape))
    return np.asarray(draw(st.lists(values, min_size=size, max_size=size)), dtype=dtype).reshape(shape)


@st.composite
def inputs(draw):
    """Valid inputs (most of the time) or inputs wrong in name, shape, dtype, value or container."""
    valid = draw(st.booleans())
    x_shape = (2, 3) if valid or draw(st.booleans()) else draw(shapes)
    ids_shape = (2,) if valid or draw(st.booleans()) else draw(shapes)
    x_dtype = "float32" if valid or draw(st.booleans()) else draw(st.sampled_from(DTYPES))
    ids_dtype = "int64" if valid or draw(st.booleans()) else draw(st.sampled_from(DTYPES))
    x = _array(draw, x_shape, x_dtype)
    ids = (np.asarray(draw(st.lists(st.integers(-7, 6), min_size=2, max_size=2)), np.int64) if valid
           else _array(draw, ids_shape, ids_dtype))
    form = draw(st.sampled_from(["dict", "list", "renamed", "missing", "extra", "single"]))
    if form == "dict":
        return {"x": x, "ids": ids}
    if form == "list":
        return [x, ids]
    if form == "renamed":
        return {draw(st.text(min_size=1, max_size=5)): x, "ids": ids}
    if form == "missing":
        return {"x": x}
    if form == "extra":
        return {"x": x, "ids": ids, "z": x}
    return x


def _check(runner, reference, given_inputs) -> None:
    try:
        out = runner(given_inputs)
    except GmorphError as err:
        assert "\n" not in str(err) and str(err)
        return
    x, ids = (given_inputs["x"], given_inputs["ids"]) if isinstance(given_inputs, dict) else given_inputs
    assert x.dtype == np.float32 and x.shape == (2, 3) and ids.dtype == np.int64 and ids.shape == (2,)
    assert ids.min() >= -5 and ids.max() < 5, "an out-of-range index was accepted"
    want = reference(x, ids)
    np.testing.assert_array_equal(out["relu"], want["relu"])
    np.testing.assert_array_equal(out["rows"], want["rows"])


@FUZZ
@given(case=inputs())
def test_runner_inputs(runner, tiny_reference, case):
    _check(runner, tiny_reference, case)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases=st.lists(inputs(), min_size=2, max_size=6))
def test_concurrent_calls(runner, tiny_reference, cases):
    failures: list[BaseException] = []

    def call(case) -> None:
        try:
            for _ in range(5):
                _check(runner, tiny_reference, case)
        except BaseException as err:  # noqa: BLE001 - reported below
            failures.append(err)

    threads = [threading.Thread(target=call, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]


# ---- damaged artifacts ---------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 2**40) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=6)


def _paths(manifest: dict) -> list[tuple]:
    """Every key path into the manifest (dict keys and list indices)."""
    out = []

    def walk(node, prefix):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, value in items:
            out.append(prefix + (key,))
            walk(value, prefix + (key,))

    walk(manifest, ())
    return out


@st.composite
def manifest_edits(draw, manifest: dict):
    edited = json.loads(json.dumps(manifest))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(edited)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = edited
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "reverse"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "reverse" and isinstance(parent[path[-1]], list):
            parent[path[-1]].reverse()
        else:
            parent[path[-1]] = draw(json_values)
    return edited


@pytest.fixture(scope="module")
def pristine(tiny_artifact):
    return json.loads(manifest_path_for(tiny_artifact).read_text())


def _same_meaning(a: dict, b: dict) -> bool:
    ignore = ("created", "package_version", "weights", "name", "target", "host_triple")
    strip = lambda m: {k: v for k, v in m.items() if k not in ignore}  # noqa: E731
    return strip(a) == strip(b)


@FUZZ
@given(data=st.data())
def test_manifest_edits(tiny_artifact, tiny_reference, pristine, tmp_path_factory, data):
    edited = data.draw(manifest_edits(pristine))
    directory = tmp_path_factory.mktemp("edit")
    library = directory / tiny_artifact.name
    shutil.copy(tiny_artifact, library)
    manifest_path_for(library).write_text(json.dumps(edited))
    try:
        runner = load(library)
    except GmorphError as err:
        assert "\n" not in str(err)
        return
    # Loaded: the edit must not have changed what the artifact computes or how it is called.
    assert _same_meaning(edited, pristine), f"an edited manifest was accepted: {edited}"
    _check(runner, tiny_reference, {"x": np.ones((2, 3), np.float32), "ids": np.array([0, 4], np.int64)})


@FUZZ
@given(data=st.data())
def test_truncated_or_corrupted_files(tiny_artifact, tmp_path_factory, data):
    directory = tmp_path_factory.mktemp("damage")
    library = directory / tiny_artifact.name
    shutil.copy(tiny_artifact, library)
    shutil.copy(manifest_path_for(tiny_artifact), manifest_path_for(library))
    target = data.draw(st.sampled_from([library, manifest_path_for(library)]))
    blob = bytearray(target.read_bytes())
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = (blob[i] + data.draw(st.integers(1, 255))) % 256
    target.write_bytes(bytes(blob))
    try:
        runner = load(library)
    except GmorphError as err:
        assert "\n" not in str(err)
        return
    # Only a manifest change without meaning (e.g. in "created") may still load; results stay exact.
    assert target != library, "a damaged library was loaded"
    out = runner({"x": np.ones((2, 3), np.float32), "ids": np.array([0, 4], np.int64)})
    assert out["relu"].tolist() == [[1.0] * 3] * 2


# ---- the command line ------------------------------------------------------------------------

def _argv(draw, files: dict[str, Path]) -> list[str]:
    path = lambda: str(draw(st.sampled_from(list(files.values()))))  # noqa: E731
    text = st.text(alphabet="xidsa=,.-0123456789/", max_size=12)
    command = draw(st.sampled_from(["run", "info", "bench", "build"]))
    argv = [command]
    if command == "run":
        argv.append(path())
        for _ in range(draw(st.integers(0, 3))):
            argv += ["--input", draw(st.sampled_from([f"x={files['x']}", f"ids={files['ids']}", f"ids={files['bad_ids']}",
                                                      f"x={files['ids']}", draw(text)]))]
        if draw(st.booleans()):
            argv += ["--save-outputs", draw(st.sampled_from([str(files["x"]), str(files["dir"] / "out"), draw(text) or "o"]))]
    elif command == "info":
        argv += [path()] + (["--json"] if draw(st.booleans()) else [])
    elif command == "bench":
        argv += [path(), "--number", str(draw(st.integers(-1, 2))), "--repeat", str(draw(st.integers(0, 2)))]
        if draw(st.booleans()):
            argv += ["--compare", path()]
    else:
        argv += [str(files["broken_onnx"]), str(draw(st.sampled_from([files["broken_onnx"], files["missing"]])))]
        argv += draw(st.sampled_from([[], ["--names", draw(text)], ["--input-shape", draw(text)]]))
        argv += ["-o", str(files["dir"] / draw(st.sampled_from(["o.so", "o.bin", "no/dir/o.so"])))]
    return argv


@pytest.fixture(scope="module")
def cli_files(tiny_artifact, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-fuzz")
    np.save(tmp / "x.npy", np.ones((2, 3), np.float32))
    np.save(tmp / "ids.npy", np.array([1, 4], np.int64))
    np.save(tmp / "bad_ids.npy", np.array([1, 5], np.int64))
    (tmp / "broken.onnx").write_bytes(b"\x08\x07\x12\x03abc")
    (tmp / "garbage.so").write_bytes(b"not a library")
    return {"lib": tiny_artifact, "manifest": manifest_path_for(tiny_artifact), "x": tmp / "x.npy",
            "ids": tmp / "ids.npy", "bad_ids": tmp / "bad_ids.npy", "broken_onnx": tmp / "broken.onnx",
            "garbage": tmp / "garbage.so", "missing": tmp / "missing.so", "dir": tmp}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_cli(cli_files, capsys, data):
    argv = _argv(data.draw, cli_files)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 1:
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("[gmorph-tvm]")]
        assert len(lines) == 1, (argv, err)
    if code == 0 and argv[0] == "run":
        assert "rows: float32[2, 3]" in out and "relu: float32[2, 3]" in out
