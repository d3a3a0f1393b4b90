"""Synthetic run files for the Show tests (imported by conftest and by the tests as ``_synthetic``)."""

import numpy as np

from gradsight.store import RunWriter
from gradsight.summary import summarize

XSS = "<img src=x onerror=alert(1)>"


def write_synthetic_run(
    path,
    *,
    framework="torch",
    layers=None,
    n_layers=4,
    steps=12,
    seed=0,
    decay=0.3,
    nonfinite_at=None,
    dead_layer=None,
    units=True,
    updates=True,
    width=16,
):
    """Write a run file of a made-up dense network.

    Gradient scale falls by ``decay`` per layer toward the input (vanishing for small ``decay``); loss falls
    geometrically; ``nonfinite_at=(step, layer_index)`` puts a NaN into that layer's gradient; ``dead_layer`` makes
    half of that layer's units never active.
    """
    rng = np.random.default_rng(seed)
    names = (
        list(layers)
        if layers is not None
        else [f"dense_{i}" if framework == "keras" else f"{i}" for i in range(n_layers)]
    )
    sep = "/" if framework == "keras" else "."
    wname, bname = ("kernel", "bias") if framework == "keras" else ("weight", "bias")
    meta = {
        "framework": framework,
        "model": {"layers": [{"name": n, "type": "Dense" if framework == "keras" else "Linear"} for n in names]},
        "config": {"optimizer": "SGD", "lr": 0.1, "note": XSS},
    }
    with RunWriter(path, meta=meta) as w:
        ids = {}
        for n in names:
            for t, shape in ((wname, (width, width)), (bname, (width,))):
                for kind in ("weight", "grad") + (("update",) if updates else ()):
                    ids[(n, t, kind)] = w.tensor_id(f"{n}{sep}{t}", n, kind, shape, "float32")
            ids[(n, "out", "output")] = w.tensor_id(n, n, "output", (8, width), "float32")
        for step in range(steps):
            rows = []
            for li, n in enumerate(names):
                gscale = 0.5 * decay ** (len(names) - 1 - li) * (1 + 0.1 * step)
                for t, shape in ((wname, (width, width)), (bname, (width,))):
                    wv = rng.normal(0, 0.3, shape)
                    gv = rng.normal(0, gscale, shape)
                    if nonfinite_at is not None and nonfinite_at == (step, li) and t == wname:
                        gv[0, 0] = np.nan
                    rows.append((ids[(n, t, "weight")], summarize(wv)))
                    rows.append((ids[(n, t, "grad")], summarize(gv)))
                    if updates:
                        rows.append((ids[(n, t, "update")], summarize(-0.01 * np.nan_to_num(gv))))
                out = np.maximum(rng.normal(0, 1, (8, width)), 0)
                if dead_layer == li:
                    out[:, : width // 2] = 0
                if units:
                    rows.append((ids[(n, "out", "output")], summarize(out, unit_axis=-1)))
            w.log_summaries(step, rows)
            w.log_scalars(step, {"loss": 2.3 * 0.7**step})
    return path
