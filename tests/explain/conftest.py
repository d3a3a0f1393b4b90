"""Fixtures of the Explain pillar's tests: framework modules (skipped when missing) and seeds."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "agg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

FRAMEWORKS = ["torch", "tensorflow"]


@pytest.fixture(params=FRAMEWORKS)
def framework(request):
    pytest.importorskip("torch" if request.param == "torch" else "tensorflow")
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
