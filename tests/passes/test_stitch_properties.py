"""Property tests of CanonicalizeOps + StitchSharedWeights over random multi-model sets.

Random DAG CNNs/MLPs (tests/passes/random_models.py) with random sharing patterns: for every set,
the fused module matches PyTorch within 1e-5, each distinct weighted layer is computed exactly
once, the weight parameters are exactly the distinct weights, and bound constants stitch alike.
"""

from __future__ import annotations

import tvm
from hypothesis import HealthCheck, given, settings
from random_models import assert_close, bind_constants, multi_model_cases, run_module
from tvm import relax

from gmorph_tvm import import_models
from gmorph_tvm.passes import CanonicalizeOps, StitchSharedWeights, stitch
from gmorph_tvm.passes._util import count_ops, count_weights, weight_bytes

WEIGHTED_OPS = ("relax.nn.conv2d", "relax.matmul")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=multi_model_cases())
def test_fused_equals_separate_and_shares_exactly_what_is_identical(case):
    note = case.describe()
    mm = import_models(case.models, case.inputs)
    assert weight_bytes(mm.mod) == case.total_weight_bytes(), note

    # Weights alone: the parameters become exactly the distinct weight tensors of all models.
    only = StitchSharedWeights()(mm.mod)
    relax.analysis.well_formed(only)
    assert weight_bytes(only) == case.unique_weight_bytes(), note

    # Full stitch: each distinct weighted layer once; never more ops than the models separately.
    fused = stitch(mm)
    relax.analysis.well_formed(fused.mod)
    ops, separate = count_ops(fused.mod), count_ops(CanonicalizeOps()(mm.mod))
    expected = case.expected_weighted_ops()
    assert {op: ops[op] for op in WEIGHTED_OPS} == {op: expected[op] for op in WEIGHTED_OPS}, note
    assert sum(ops.values()) <= sum(separate.values()), note
    assert weight_bytes(fused.mod) == count_weights(fused.mod)[1], note  # no duplicate left

    # Weights bound as constants stitch to the same graph and the same stored weights.
    bound = tvm.transform.Sequential([CanonicalizeOps(), StitchSharedWeights()])(bind_constants(mm.mod))
    assert {op: count_ops(bound)[op] for op in WEIGHTED_OPS} == {op: expected[op] for op in WEIGHTED_OPS}, note
    assert count_weights(bound) == count_weights(fused.mod), note

    assert_close(run_module(fused.mod, case.inputs), case.torch_outputs())
