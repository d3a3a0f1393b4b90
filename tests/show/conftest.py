"""Fixtures for the Show tests: headless matplotlib and synthetic runs whose every number the test controls."""

import os

os.environ["MPLBACKEND"] = "agg"  # before matplotlib is imported anywhere

import matplotlib

matplotlib.use("agg")

import pytest
from _synthetic import XSS, write_synthetic_run

__all__ = ["XSS", "write_synthetic_run"]


@pytest.fixture
def make_run(tmp_path):
    counter = iter(range(1000))

    def make(**kw):
        return write_synthetic_run(tmp_path / f"run{next(counter)}.db", **kw)

    return make
