"""A small synthetic run file (numpy only) with the raw arrays behind it, for checking exports against them."""

from dataclasses import dataclass, field

import numpy as np
import pytest

from gradsight import RunWriter, summarize

# tensor name -> (layer, shape); layer "" is the root module
TENSORS = {
    "fc1.weight": ("fc1", (4, 3)),
    "fc1.bias": ("fc1", (4,)),
    "fc2.weight": ("fc2", (2, 4)),
    "scale": ("", (1,)),
}
STEPS = (0, 1, 2, 5)  # not contiguous, as with a logging schedule


@dataclass
class SyntheticRun:
    path: object
    arrays: dict = field(default_factory=dict)  # (step, name, kind) -> np.ndarray
    layers: dict = field(default_factory=dict)  # name -> layer
    scalars: dict = field(default_factory=dict)  # (step, name) -> float


def _write(path, rng):
    syn = SyntheticRun(path)
    with RunWriter(path, meta={"framework": "numpy-test"}) as w:
        for step in STEPS:
            items = []
            for name, (layer, shape) in TENSORS.items():
                syn.layers[name] = layer
                weight = rng.normal(size=shape).astype(np.float32)
                grad = (rng.normal(size=shape) * 10.0 ** rng.integers(-6, 2)).astype(np.float32)
                update = (-1e-2 * grad).astype(np.float32)
                if step == 2 and name == "fc1.weight":  # a broken step: NaN, +Inf, -Inf and zeros in the grad
                    grad.flat[:4] = [np.nan, np.inf, -np.inf, 0.0]
                for kind, a in (("weight", weight), ("grad", grad), ("update", update)):
                    syn.arrays[(step, name, kind)] = a
                    items.append((w.tensor_id(name, layer, kind, a.shape, "float32"), summarize(a)))
            out = np.maximum(rng.normal(size=(8, 4)), 0).astype(np.float32)
            out[:, 1] = 0.0  # a dead unit
            syn.arrays[(step, "fc1", "output")] = out
            syn.layers["fc1"] = "fc1"
            items.append((w.tensor_id("fc1", "fc1", "output", out.shape, "float32"), summarize(out, unit_axis=-1)))
            w.log_summaries(step, items)
            loss = float("nan") if step == 5 else 1.0 / (step + 1)
            w.log_scalars(step, {"loss": loss, "lr": 0.1})
            syn.scalars[(step, "loss")] = loss
            syn.scalars[(step, "lr")] = 0.1
        w.log_scalars(3, {"loss": 0.3})  # a step with scalars and no summaries
        syn.scalars[(3, "loss")] = 0.3
    return syn


@pytest.fixture
def synthetic_run(tmp_path):
    return _write(tmp_path / "run.db", np.random.default_rng(1234))
