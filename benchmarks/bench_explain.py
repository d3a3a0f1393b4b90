"""How long ``gradsight.explain`` takes for an 8-layer, 256-wide ReLU MLP, batch 128, MSE, per framework.

Prints JSON: {"machine": ..., "torch": {"median_s": ...}, "tensorflow": {...}, "target_s": 3.0}. Timings are
taken after import and one warm-up call, median of ``REPEATS`` runs. Performance targets live here, never as
timed test assertions.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np

from gradsight.explain import explain

DEPTH, WIDTH, BATCH, REPEATS, TARGET_S = 8, 256, 128, 5, 3.0


def _time(fn) -> dict:
    fn()  # warm-up
    runs = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(runs), 4), "min_s": round(min(runs), 4), "runs": REPEATS}


def bench_torch() -> dict:
    import torch
    from torch import nn

    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(DEPTH):
        mods += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    model = nn.Sequential(*mods)
    x, y = torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH)
    out = _time(lambda: explain(model, x, y, nn.MSELoss()))
    out["ok"] = bool(explain(model, x, y, nn.MSELoss()).ok)
    return out


def bench_tensorflow() -> dict:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((WIDTH,))] + [keras.layers.Dense(WIDTH, activation="relu") for _ in range(DEPTH)]
    )
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(BATCH, WIDTH)).astype("float32"), rng.normal(size=(BATCH, WIDTH)).astype("float32")
    loss = keras.losses.MeanSquaredError()
    out = _time(lambda: explain(model, x, y, loss))
    out["ok"] = bool(explain(model, x, y, loss).ok)
    return out


def main() -> None:
    result: dict = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, "
        f"{platform.system()} {platform.release()}".strip(),
        "model": f"{DEPTH}x{WIDTH} ReLU MLP, batch {BATCH}, MSE",
    }
    for name, fn in (("torch", bench_torch), ("tensorflow", bench_tensorflow)):
        try:
            result[name] = fn()
        except ImportError as exc:
            result[name] = {"skipped": str(exc)}
    result["target_s"] = TARGET_S
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
