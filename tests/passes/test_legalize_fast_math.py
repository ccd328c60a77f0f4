"""LegalizeFastMath: float32 exp/erf/tanh/sigmoid (and GELU, SiLU, softmax on them) become
vectorisable polynomials in the CPU pipeline; errors vs float64 over a dense float32 sweep; NaN,
+-inf, huge and subnormal inputs; whole models against onnxruntime."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from helpers import onnx_model
from onnx import TensorProto, helper
from scipy import special
from tvm import relax
from tvm.script import ir as I  # noqa: N812
from tvm.script import relax as R  # noqa: N812

import gmorph_tvm
from gmorph_tvm.core.targets import resolve_target
from gmorph_tvm.passes import legalize_fast_math as fm
from gmorph_tvm.passes.legalize_fast_math import LegalizeFastMath
from gmorph_tvm.tuning.pipeline import Pipeline

TARGET = resolve_target("llvm")
FLT_MIN = float(np.finfo(np.float32).tiny)


def _gelu(x):
    return x * (0.5 + special.erf(x * np.sqrt(0.5)) * 0.5)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _silu(x):
    return x * special.expit(x)


# relax op, float64 reference, error bound. "abs": max |err| (the op's values lie in [-1, 1]);
# "scaled": max |err| / max(1, |ref|) (GELU, SiLU: ~x for large x, ~0 for very negative x).
OPS = {
    "exp": (relax.op.exp, np.exp, None),  # ulp-checked separately
    "sigmoid": (relax.op.sigmoid, special.expit, ("abs", 2e-7)),
    "erf": (relax.op.erf, special.erf, ("abs", 5e-7)),
    "tanh": (relax.op.tanh, np.tanh, ("abs", 5e-7)),
    "gelu": (relax.op.nn.gelu, _gelu, ("scaled", 2e-6)),
    "gelu_tanh": (relax.op.nn.gelu_tanh, _gelu_tanh, ("scaled", 2e-6)),
    "silu": (relax.op.nn.silu, _silu, ("scaled", 2e-6)),
}

SPECIAL = np.array([np.nan, -np.nan, np.inf, -np.inf, 3e38, -3e38, 1e30, -1e30, 100.0, -100.0, 89.0, -89.0,
                    88.72, 88.73, -87.3, -88.0, -100.0, -103.0, -104.0, -110.0, 9.0, -9.0, 4.0, -4.0, 1e-3, -1e-3,
                    1e-20, FLT_MIN, -FLT_MIN, 1e-40, -1e-40, 1.4e-45, 0.0, -0.0], np.float32)


def _module(op, n, dtype="float32"):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n,), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(op(x))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x):
    ex = tvm.compile(mod, target=TARGET)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _fast(op, x):
    """``op`` on ``x`` through LegalizeFastMath, then LegalizeOps for anything left."""
    mod = tvm.transform.Sequential([LegalizeFastMath(), relax.transform.LegalizeOps()])(_module(op, x.size))
    return _run(mod, x)


def _sweep(step: int = 997) -> np.ndarray:
    """Every ``step``-th float32 bit pattern from 0 to the largest finite value, both signs."""
    pos = np.arange(0, 0x7F800000, step, dtype=np.uint32).view(np.float32)
    return np.concatenate([pos, -pos, SPECIAL])


# ---- structure -----------------------------------------------------------------------------------


def test_rewrites_float32_transcendentals_and_leaves_the_rest():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), h: R.Tensor((2, 8), "float16")):
            with R.dataflow():
                a = R.nn.gelu(x)
                b = R.nn.softmax(a, axis=-1)
                c = R.nn.relu(b)
                d = R.exp(h)
                out = (c, d)
                R.output(out)
            return out

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8), "float32"))
    h = relax.Var("h", relax.TensorType((2, 8), "float16"))
    with bb.function("main", [x, h]):
        with bb.dataflow():
            a = bb.emit(bb.call_te(fm._gelu, x, primfunc_name_hint="gelu"))
            b = bb.emit(bb.call_te(fm._softmax, a, 1, primfunc_name_hint="softmax"))
            c = bb.emit(relax.op.nn.relu(b))
            d = bb.emit(relax.op.exp(h))
            out = bb.emit_output(relax.Tuple([c, d]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(LegalizeFastMath()(Before), bb.get())


def _gelu_kernel_llvm_ir(op=relax.op.nn.gelu) -> str:
    """The generated LLVM IR of one kernel at MiniLM's GELU shape, through the whole CPU pipeline
    (default schedules, no tuning record)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 1536), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(op(x))
        bb.emit_func_output(out)
    lowered = Pipeline(TARGET, fuse=False, shipped_records=False).run(
        bb.get(), phases=("import_cleanup", "target_lowering", "apply_tuning"))
    return tvm.compile(lowered, target=TARGET).mod.imports[0].inspect_source("ll")


@pytest.mark.parametrize("name", ["gelu", "exp", "sigmoid", "tanh", "gelu_tanh", "silu"])
def test_cpu_pipeline_kernels_call_no_libm_and_are_vectorised(name):
    ll = _gelu_kernel_llvm_ir(OPS[name][0])
    calls = set(re.findall(r"call [^@]*@([\w.]+)", ll))
    scalar = {c for c in calls if re.fullmatch(r"(erf|exp|tanh|expm1)f?|llvm\.(exp|exp2|tanh)\.f32", c)}
    assert not scalar, f"{name}: per-element libm calls {sorted(scalar)}"
    assert not any(re.fullmatch(r"llvm\.(exp|exp2)\.v\d+f32", c) for c in calls), name  # scalarised by the backend
    assert re.search(r"fmul <(8|16) x float>", ll), f"{name}: kernel not vectorised"


def test_cpu_pipeline_softmax_calls_no_libm():
    ll = _gelu_kernel_llvm_ir(lambda x: relax.op.nn.softmax(x, axis=-1))
    assert not re.search(r"call [^@]*@(expf|llvm\.exp\.)", ll)


# ---- numerics ------------------------------------------------------------------------------------


def test_exp_within_two_ulp_and_overflow_underflow_as_libm():
    x = _sweep()
    got = _fast(relax.op.exp, x).astype(np.float64)
    with np.errstate(over="ignore"):
        ref = np.exp(x.astype(np.float64))
        ref32 = np.exp(x)  # numpy's float32 exp: correctly rounded to within 1 ulp; inf past 88.7228
    np.testing.assert_array_equal(np.isnan(got), np.isnan(x))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(ref32))
    normal = np.isfinite(ref32) & (ref >= FLT_MIN)
    ulp = np.abs(got[normal] - ref[normal]) / np.spacing(ref[normal].astype(np.float32)).astype(np.float64)
    assert ulp.max() <= 2.0, (ulp.max(), x[normal][ulp.argmax()])
    sub = ~np.isnan(x) & (ref < FLT_MIN)  # subnormal or zero results: within two of the smallest steps
    assert np.abs(got[sub] - ref[sub]).max() <= 2 * 1.4e-45
    assert got[x == np.inf].tolist() == [np.inf] and got[x == -np.inf].tolist() == [0.0]
    assert np.isinf(got[(x >= 89.0) & np.isfinite(x)]).all()  # exp(100), exp(3e38): inf, never finite
    assert (got[x <= -104.0] == 0.0).all()
    assert np.isfinite(_fast(relax.op.exp, np.array([88.72], np.float32))).all()  # the largest finite results


@pytest.mark.parametrize("name", [n for n in OPS if n != "exp"])
def test_error_vs_float64_over_the_float32_range(name):
    op, ref_fn, (kind, bound) = OPS[name]
    x = _sweep()
    got = _fast(op, x).astype(np.float64)
    with np.errstate(all="ignore"):
        ref = ref_fn(x.astype(np.float64))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg=f"{name}: NaN positions")
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(got[~finite & ~np.isnan(ref)], ref[~finite & ~np.isnan(ref)], err_msg=name)
    err = np.abs(got[finite] - ref[finite])
    if kind == "scaled":
        err = err / np.maximum(1.0, np.abs(ref[finite]))
    assert err.max() <= bound, (name, err.max(), x[finite][err.argmax()])


@pytest.mark.parametrize("name", list(OPS))
def test_nan_inf_and_huge_inputs_give_what_the_libm_lowering_gives(name):
    """Special inputs: LegalizeFastMath's results have the NaNs, infinities, signs and (to float32
    rounding) values of TVM's own lowering (LegalizeOps; libm)."""
    op = OPS[name][0]
    fast = _fast(op, SPECIAL)
    libm = _run(relax.transform.LegalizeOps()(_module(op, SPECIAL.size)), SPECIAL)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(libm), err_msg=name)
    np.testing.assert_array_equal(np.isinf(fast), np.isinf(libm), err_msg=name)
    np.testing.assert_allclose(fast, libm, rtol=2e-6, atol=1e-6, equal_nan=True, err_msg=name)


def test_softmax_rows_with_inf_nan_and_large_values():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 300)) * 30).astype(np.float32)
    x[1, 5] = np.nan
    x[2, 7] = np.inf
    x[3, :] = -np.inf
    x[3, 9] = 0.0
    x[4, 11] = 3e38
    x[5, :] = 1e-40
    mod = tvm.transform.Sequential([LegalizeFastMath(), relax.transform.LegalizeOps()])(
        _module_2d(x.shape))
    got = _run(mod, x)
    libm = _run(relax.transform.LegalizeOps()(_module_2d(x.shape)), x)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(libm))
    np.testing.assert_allclose(got, libm, rtol=5e-6, atol=1e-7, equal_nan=True)
    with np.errstate(all="ignore"):
        x64 = x.astype(np.float64)
        e = np.exp(x64 - x64.max(-1, keepdims=True))
        ref = e / e.sum(-1, keepdims=True)
    ok = ~np.isnan(ref)
    assert np.abs(got[ok] - ref[ok]).max() <= 5e-7


def _module_2d(shape):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.softmax(x, axis=-1))
        bb.emit_func_output(out)
    return bb.get()


# ---- whole models ----------------------------------------------------------------------------


def test_onnx_model_through_build_matches_onnxruntime_on_special_inputs():
    F = TensorProto.FLOAT
    S = [1, 4, 64]
    n = helper.make_node
    nodes = [
        n("Exp", ["x"], ["exp"]), n("Erf", ["x"], ["erf"]), n("Tanh", ["x"], ["tanh"]),
        n("Sigmoid", ["x"], ["sigmoid"]), n("Softmax", ["x"], ["softmax"], axis=-1),
        # GELU as torch's dynamo=False exporter writes it (recomposed into relax.nn.gelu).
        n("Div", ["x", "sqrt2"], ["d"]), n("Erf", ["d"], ["e"]), n("Add", ["e", "one"], ["a"]),
        n("Mul", ["x", "a"], ["m"]), n("Mul", ["m", "half"], ["gelu"]),
        n("Mul", ["x", "sigmoid"], ["silu"]),
    ]
    names = ["exp", "erf", "tanh", "sigmoid", "softmax", "gelu", "silu"]
    model = onnx_model(nodes, [("x", F, S)], [(o, F, S) for o in names],
                       [("sqrt2", np.float32(np.sqrt(2.0))), ("one", np.float32(1.0)), ("half", np.float32(0.5))])
    art = gmorph_tvm.build(gmorph_tvm.import_models({"t": model}), shipped_records=False)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(S) * 6).astype(np.float32)
    flat = x.reshape(-1)
    flat[: SPECIAL.size] = SPECIAL
    x[0, 2] = (rng.standard_normal(64) * 3).astype(np.float32)  # one softmax row without specials
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    got = art.run(x)["t"]
    with np.errstate(all="ignore"):  # the values against float64 (onnxruntime's sigmoid is ~1e-7 off)
        x64 = x.astype(np.float64)
        e = np.exp(x64 - x64.max(-1, keepdims=True))
        exact = [np.exp(x64), special.erf(x64), np.tanh(x64), special.expit(x64), e / e.sum(-1, keepdims=True),
                 _gelu(x64), _silu(x64)]
    for name, want, have, ref in zip(names, expected, got, exact):
        np.testing.assert_array_equal(np.isnan(have), np.isnan(want), err_msg=f"NaN positions of {name}")
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=2e-6, equal_nan=True, err_msg=name)
        with np.errstate(over="ignore"):  # exp's float64 values past float32's range: inf
            ref32 = ref.astype(np.float32)
        np.testing.assert_allclose(have, ref32, rtol=1e-6, atol=1e-6, equal_nan=True, err_msg=name)
