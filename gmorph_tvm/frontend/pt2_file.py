"""Read a ``.pt2`` (``torch.export.save``) file without running code it carries.

``torch.export.load`` alone is not safe on a file from elsewhere: it unpickles weights marked
``use_pickle`` (``weights_only=False``) and ``pickle.loads`` opaque constants, falls back to
``weights_only=False`` for sample inputs that the safe loader refuses, loads AOTInductor shared
libraries, ``sympify``s (``eval``) symbolic shape strings and calls whatever ``torch.*`` attribute a
node names; ``ExportedProgram.module()`` ``exec``s the file's guard code. :func:`read_checked_pt2`
reads the archive once into memory and refuses it unless every entry is one ``torch.export.save``
writes for a plain program (tensor payloads, JSON, sample inputs that load with
``weights_only=True``), every node calls an ATen operator (not one that reads or writes files) or a
Python operator from a short list, and every symbolic expression is arithmetic on shape symbols.
Only that same in-memory copy may then be deserialised (``torch.export.load(io.BytesIO(data))``).
Used by the importer (``gmorph-tvm build x.pt2``) and the search (``gmorph-tvm search --model``).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import GmorphError, one_line

#: Largest JSON entry of a .pt2 read (the program, payload configs); larger ones are refused.
MAX_PT2_JSON_BYTES = 256 << 20
#: Largest symbolic-expression string accepted in a .pt2.
MAX_EXPR_CHARS = 2000

_PY_OPERATORS = {
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "abs", "eq", "ne", "lt", "le",
    "gt", "ge", "and_", "or_", "not_", "invert",
}  # fmt: skip
# ATen operators that touch files or print: never run from a model file.
_ATEN_DENIED = {"save", "from_file", "_print", "warn", "load"}
_SYM_FUNCTIONS = {
    "Max", "Min", "Abs", "Mod", "FloorDiv", "CeilDiv", "CleanDiv", "ModularIndexing", "Where", "PythonMod",
    "CeilToInt", "FloorToInt", "TruncToInt", "RoundToInt", "IntTrueDiv", "FloatTrueDiv", "ToFloat", "TruncToFloat",
    "LShift", "RShift", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "Identity", "floor", "ceiling", "Eq", "Ne",
    "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality",
    "Unequality", "And", "Or", "Not", "True", "False", "oo", "Integer", "Rational", "Float", "Symbol", "Add", "Mul",
    "Infinity", "NegativeInfinity", "One", "Zero", "NegativeOne",
    # assumptions, as keyword arguments of Symbol('s0', positive=True, integer=True)
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero", "nonzero", "even", "odd",
}  # fmt: skip
_SYMBOL = re.compile(r"[a-z]{1,4}\d+")
# sympy's srepr form: Mul(Integer(2), Symbol('s77', positive=True, integer=True)); numbers of at most 18 digits
_EXPR_TOKEN = re.compile(
    r"\s*(?:(\d{1,18}(?:\.\d{1,18})?(?:e[+-]?\d{1,3})?)|'[a-z]{1,4}\d{1,9}'|([A-Za-z_][A-Za-z0-9_]*)|(==|!=|<=|>=|//|[-+*/%(),<>=]))"
)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
# Argument kinds of the serialized graph that name code or nested graphs: refused.
_DENIED_ARG_KINDS = {"as_graph", "as_custom_obj", "as_operator", "as_custom_objs", "as_operators", "as_graphs"}



def read_checked_pt2(name: str, path: Path, error: type[GmorphError]) -> bytes:
    """``path``'s bytes after every check above; a refusal is ``error`` naming model ``name`` and the file."""
    try:
        return _read_checked_pt2(name, Path(path))
    except _Refused as refused:
        raise error(str(refused)) from refused.__cause__


class _Refused(GmorphError):
    """A refusal, re-raised by :func:`read_checked_pt2` as the caller's error type."""


def _refuse(name: str, path: Path, why: str) -> _Refused:
    return _Refused(f"model {name!r}: {str(path)!r} refused: {why} (only plain torch.export programs are loaded)")


def _read_checked_pt2(name: str, path: Path) -> bytes:
    """The file's bytes, after checking every entry (see the module docstring); read once."""
    from torch.export.pt2_archive import constants as pc

    data = path.read_bytes()
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise _Refused(f"model {name!r}: {str(path)!r} is not a torch.export (.pt2) archive ({err})") from err
    roots = {info.filename.split("/", 1)[0] for info in infos}
    if len(roots) != 1 or any("/" not in info.filename for info in infos):
        raise _refuse(name, path, "entries outside one archive folder")
    (root,) = roots
    entries = {info.filename.split("/", 1)[1]: info for info in infos}
    fixed = {pc.ARCHIVE_FORMAT_PATH, pc.ARCHIVE_VERSION_PATH, "byteorder", ".data/version", ".data/serialization_id"}
    models = [n[len(pc.MODELS_DIR):-len(".json")] for n in entries if n.startswith(pc.MODELS_DIR) and n.endswith(".json")]
    if not models:
        raise _refuse(name, path, "no models/*.json program")
    allowed = set(fixed)
    for m in models:
        allowed |= {pc.MODELS_FILENAME_FORMAT.format(m), pc.SAMPLE_INPUTS_FILENAME_FORMAT.format(m),
                    pc.WEIGHTS_CONFIG_FILENAME_FORMAT.format(m), pc.CONSTANTS_CONFIG_FILENAME_FORMAT.format(m)}

    def read(entry: str, limit: int | None = None) -> bytes:
        info = entries[entry]
        if limit is not None and info.file_size > limit:
            raise _refuse(name, path, f"{entry} is {info.file_size} bytes (limit {limit})")
        try:
            return zf.read(info)
        except Exception as err:
            raise _refuse(name, path, f"{entry} cannot be read ({one_line(err, 120)})") from err

    def read_json(entry: str) -> Any:
        try:
            return json.loads(read(entry, MAX_PT2_JSON_BYTES))
        except (ValueError, RecursionError) as err:
            raise _refuse(name, path, f"{entry} is not JSON ({type(err).__name__})") from err

    if read(pc.ARCHIVE_VERSION_PATH, 64).decode(errors="replace").strip() != pc.ARCHIVE_VERSION_VALUE:
        raise _refuse(name, path, "archive version of another torch release")
    payloads: set[str] = set()
    for m in models:
        for config_entry, folder, prefix in (
            (pc.WEIGHTS_CONFIG_FILENAME_FORMAT.format(m), pc.WEIGHTS_DIR, pc.WEIGHT_FILENAME_PREFIX),
            (pc.CONSTANTS_CONFIG_FILENAME_FORMAT.format(m), pc.CONSTANTS_DIR, pc.TENSOR_CONSTANT_FILENAME_PREFIX),
        ):
            if config_entry not in entries:
                raise _refuse(name, path, f"no {config_entry}")
            config = read_json(config_entry)
            items = config.get("config") if isinstance(config, dict) else None
            if not isinstance(items, dict):
                raise _refuse(name, path, f"{config_entry} has no config mapping")
            for fqn, meta in items.items():
                if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
                    raise _refuse(name, path, f"{fqn!r} is a pickled payload")
                file = meta.get("path_name")
                if not isinstance(file, str) or not file.startswith(prefix) or "/" in file:
                    raise _refuse(name, path, f"{fqn!r} is not a tensor payload ({file!r})")
                payloads.add(folder + file)
        _check_program(name, path, read_json(pc.MODELS_FILENAME_FORMAT.format(m)))
        sample = pc.SAMPLE_INPUTS_FILENAME_FORMAT.format(m)
        if sample in entries:  # torch retries a failed safe load with weights_only=False: make sure it never fails
            try:
                torch.load(io.BytesIO(read(sample)), map_location="cpu", weights_only=True)
            except Exception as err:
                raise _refuse(name, path, f"its sample inputs are not plain tensors ({type(err).__name__})") from err
    for entry in entries:
        if entry in allowed or entry in payloads or entry.startswith(pc.EXTRA_DIR) or entry.endswith("/"):
            continue
        raise _refuse(name, path, f"unexpected entry {root}/{entry}")
    return data


def _check_program(name: str, path: Path, program: Any) -> None:
    """Every node target, argument kind, name and symbolic expression of a serialized program."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise _refuse(name, path, "the program JSON has no graph_module")
    for key in program.get("range_constraints") or {}:
        _check_expr(name, path, key)
    stack: list[Any] = [program["graph_module"]]
    while stack:
        obj = stack.pop()
        if isinstance(obj, list):
            stack.extend(obj)
            continue
        if not isinstance(obj, dict):
            continue
        if "target" in obj and "inputs" in obj and "outputs" in obj:
            _check_target(name, path, obj["target"])
        for key, value in obj.items():
            if key in _DENIED_ARG_KINDS and value:
                raise _refuse(name, path, f"it uses {key[3:]} arguments")
            if key == "expr_str":
                _check_expr(name, path, value)
            elif key == "name" and isinstance(value, str) and not _IDENT.fullmatch(value):
                raise _refuse(name, path, f"value name {value[:60]!r}")
            elif key == "custom_obj_values" and value:
                raise _refuse(name, path, "it holds custom objects")
            elif key in ("metadata", "stack_trace"):
                continue  # free text, never evaluated (nn_module_stack / torch_fn types are only looked up)
            if isinstance(value, (dict, list)):
                stack.append(value)


def _check_target(name: str, path: Path, target: Any) -> None:
    if not isinstance(target, str):
        raise _refuse(name, path, f"node target {target!r}")
    parts = target.split(".")
    if len(parts) == 2 and parts[0] == "_operator" and parts[1] in _PY_OPERATORS:
        return
    if len(parts) == 2 and parts[0] == "torch" and re.fullmatch(r"sym_(int|float|max|min|not|ite|sum|sqrt)", parts[1]):
        return
    if len(parts) == 5 and parts[:3] == ["torch", "ops", "aten"] and parts[3] in _ATEN_DENIED:
        raise _refuse(name, path, f"node calls {target} (reads, writes or prints)")
    if len(parts) == 5 and parts[:3] == ["torch", "ops", "aten"] and all(re.fullmatch(r"\w+", p) for p in parts[3:]):
        op = getattr(torch.ops.aten, parts[3], None)
        overload = getattr(op, parts[4], None) if op is not None else None
        if overload is None:
            raise _refuse(name, path, f"unknown operator {target}")
        if any(arg.name in ("filename", "path", "file") for arg in overload._schema.arguments):
            raise _refuse(name, path, f"operator {target} takes a file name")
        return
    raise _refuse(name, path, f"node calls {target[:80]!r}, not an ATen or arithmetic operator")


def _check_expr(name: str, path: Path, expr: Any) -> None:
    """A symbolic shape expression torch will ``sympify`` (``eval``): numbers, shape symbols, arithmetic
    and comparison operators and sympy's integer functions only (no attributes, other strings or
    names, no powers: ``Pow(2, Pow(2, 99))`` would not finish)."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS or "**" in expr:
        raise _refuse(name, path, f"symbolic expression {str(expr)[:60]!r}")
    position = 0
    while position < len(expr.rstrip()):
        match = _EXPR_TOKEN.match(expr, position)
        if match is None or match.end() == position:
            raise _refuse(name, path, f"symbolic expression {expr[:60]!r}")
        ident = match.group(2)
        if ident is not None and ident not in _SYM_FUNCTIONS and not _SYMBOL.fullmatch(ident):
            raise _refuse(name, path, f"symbolic expression {expr[:60]!r} names {ident!r}")
        position = match.end()
