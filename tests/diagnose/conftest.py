"""Synthetic runs for the diagnosis rules: RunWriter + the numpy reference summaries, no framework."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from gradsight.store import Run, RunWriter
from gradsight.summary import summarize

LAYERS = [
    {"name": "fc1", "type": "Linear"},
    {"name": "act1", "type": "ReLU"},
    {"name": "fc2", "type": "Linear"},
]


class Synth:
    """Builds a run file step by step from numpy arrays."""

    def __init__(self, path: Path, layers: Iterable[dict] = LAYERS, **meta):
        self.path = path
        self.writer = RunWriter(path, meta={"framework": "synthetic", "model": {"layers": list(layers)}, **meta})

    def log(self, step, kind, layer, x, *, tensor=None, unit_axis=None, dtype="float32"):
        x = np.asarray(x, dtype=np.float32)
        name = tensor or (f"{layer}.weight" if kind in ("weight", "grad", "update") else layer)
        tid = self.writer.tensor_id(name, layer, kind, x.shape, dtype)
        self.writer.log_summaries(step, [(tid, summarize(x, unit_axis=unit_axis))])

    def scalars(self, step, **values):
        self.writer.log_scalars(step, values)

    def run(self) -> Run:
        self.writer.close()
        return Run(self.path)


@pytest.fixture
def synth(tmp_path):
    runs = []

    def make(name="run.db", layers=LAYERS, **meta):
        s = Synth(tmp_path / name, layers, **meta)
        runs.append(s)
        return s

    yield make
    for s in runs:
        s.writer.close()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def healthy_step(s: Synth, step: int, rng, *, loss=None, nan_at=None):
    """A well-behaved 3-layer step: outputs, output grads, grads, updates, weights, loss.

    ``nan_at`` = (kind, layer) puts two NaNs into that summary.
    """

    def arr(shape, scale):
        a = rng.normal(0, scale, size=shape).astype(np.float32)
        return a

    vals = {
        ("output", "fc1"): arr((8, 4), 1.0),
        ("output", "act1"): np.maximum(arr((8, 4), 1.0), 0) + 0.01,
        ("output", "fc2"): arr((8, 2), 1.0),
        ("output_grad", "fc2"): arr((8, 2), 0.1),
        ("output_grad", "act1"): arr((8, 4), 0.1),
        ("output_grad", "fc1"): arr((8, 4), 0.05),
        ("grad", "fc2"): arr((2, 4), 0.05),
        ("grad", "fc1"): arr((4, 3), 0.03),
        ("update", "fc2"): arr((2, 4), 5e-4),
        ("update", "fc1"): arr((4, 3), 5e-4),
        ("weight", "fc2"): arr((2, 4), 0.5),
        ("weight", "fc1"): arr((4, 3), 0.5),
    }
    if nan_at is not None:
        v = vals[nan_at].copy()
        v.flat[0] = np.nan
        v.flat[1] = np.nan
        vals[nan_at] = v
    for (kind, layer), v in vals.items():
        s.log(step, kind, layer, v, unit_axis=-1 if kind == "output" else None)
    s.scalars(step, loss=2.0 * 0.95**step if loss is None else loss)
