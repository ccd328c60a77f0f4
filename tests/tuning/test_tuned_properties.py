"""Property test: tuned builds of random fused multi-model DAGs equal their untuned builds.

Random CNN/MLP sets (tests/random_models.py) are imported, fused losslessly, tuned with a
few trials on their heaviest kernel and built with and without the records. The tuned build
must apply records, drop none (no :class:`TuningWarning`: every measured schedule was right)
and match the untuned build within 1e-5 relative.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from random_models import assert_close, multi_model_cases

from gmorph_tvm import build, import_models
from gmorph_tvm.pipeline import fuse_lossless
from gmorph_tvm.tuning import TuningWarning, tune


@pytest.mark.slow
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(case=multi_model_cases(min_models=2, max_models=3, families=("cnn",)))
def test_tuned_build_equals_untuned_build(case, tmp_path_factory):
    note = case.describe()
    fused = fuse_lossless(import_models(case.models, case.inputs))
    work_dir = tmp_path_factory.mktemp("tuned")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # The heaviest kernel, 8 trials: one search round of the untrained cost model (CI time;
        # ~6 min per example on two busy cores with two kernels).
        report = tune(fused.bound_module(), "llvm", trials=8, work_dir=work_dir, min_trials_per_task=8,
                      trials_per_round=8, population_size=32, progress=False)
        tuned = build(fused, "llvm", tuning_db=work_dir)
    dropped = [str(w.message) for w in record if issubclass(w.category, TuningWarning)]
    assert not dropped, f"{note}: {dropped}"
    assert report.tuned and tuned.manifest["tuning"]["applied"], note
    untuned = build(fused, "llvm")
    inputs = [np.ascontiguousarray(x.numpy()) for x in case.inputs]
    assert_close(_flat(tuned.run(inputs)), _flat(untuned.run(inputs)), rtol=1e-5)


def _flat(outputs: dict) -> list[np.ndarray]:
    return [a for value in outputs.values() for a in (value if isinstance(value, list) else [value])]
