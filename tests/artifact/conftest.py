"""Fixtures shared by the build tests: two tiny CNNs on one input, imported as one MultiModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN

import gmorph_tvm


@pytest.fixture(scope="module")
def models():
    return {"shape": TinyCNN(4, 0).eval(), "color": TinyCNN(3, 1).eval()}


@pytest.fixture(scope="module")
def x():
    return torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype("float32"))


@pytest.fixture(scope="module")
def multimodel(models, x):
    return gmorph_tvm.import_models(models, example_inputs=x)
