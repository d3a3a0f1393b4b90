"""How long ``gradsight.explain`` takes, per framework, for

* a chain: an 8-layer, 256-wide ReLU MLP, batch 128, MSE (target 3 s);
* a graph (issue #15): a pre-norm transformer block of width 64, 4 heads, MLP 64→256→64 with GELU, sequence 16,
  batch 4, float64, MSE — traced, derived and verified against autodiff (target 5 s), and the same with finite
  differences on request.

Prints JSON: {"machine": ..., "torch": {"median_s": ...}, "tensorflow": {...}, "target_s": 3.0,
"transformer_block": {"torch": {...}, "tensorflow": {...}, "target_s": 5.0}}. Timings are taken after import and
one warm-up call, median of ``REPEATS`` runs. Performance targets live here, never as timed test assertions.
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
#: the transformer block: width, heads, MLP width, sequence length, batch; target seconds
BLOCK_D, BLOCK_HEADS, BLOCK_HIDDEN, BLOCK_SEQ, BLOCK_BATCH, BLOCK_TARGET_S = 64, 4, 256, 16, 4, 5.0


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


def _block_timings(call) -> dict:
    out = _time(lambda: call(False))
    out["ok"] = bool(call(False).ok)
    fd = _time(lambda: call(True))
    trace = call(True)
    out["with_finite_differences"] = {"median_s": fd["median_s"], "min_s": fd["min_s"], "ok": bool(trace.ok)}
    out["terms"] = len(trace.terms)
    out["nodes"] = len(trace.graph)
    return out


def bench_torch_block() -> dict:
    import torch

    from gradsight.frameworks.torch._graph_examples import PreNormBlock

    torch.manual_seed(0)
    model = PreNormBlock(BLOCK_D, BLOCK_HEADS, BLOCK_HIDDEN).double()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(BLOCK_BATCH, BLOCK_SEQ, BLOCK_D)), rng.normal(size=(BLOCK_BATCH, BLOCK_SEQ, BLOCK_D))
    loss = torch.nn.MSELoss()
    return _block_timings(lambda fd: explain(model, x, y, loss, finite_differences=fd))


def bench_tensorflow_block() -> dict:
    import keras

    from gradsight.frameworks.keras._graph_examples import transformer_block

    keras.utils.set_random_seed(0)
    model = transformer_block(BLOCK_D, BLOCK_HEADS, BLOCK_HIDDEN, BLOCK_SEQ)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(BLOCK_BATCH, BLOCK_SEQ, BLOCK_D)), rng.normal(size=(BLOCK_BATCH, BLOCK_SEQ, BLOCK_D))
    loss = keras.losses.MeanSquaredError(dtype="float64")
    return _block_timings(lambda fd: explain(model, x, y, loss, finite_differences=fd))


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
    block: dict = {
        "model": f"pre-norm transformer block, width {BLOCK_D}, {BLOCK_HEADS} heads, MLP {BLOCK_HIDDEN} (GELU), "
        f"sequence {BLOCK_SEQ}, batch {BLOCK_BATCH}, float64, MSE"
    }
    for name, fn in (("torch", bench_torch_block), ("tensorflow", bench_tensorflow_block)):
        try:
            block[name] = fn()
        except ImportError as exc:
            block[name] = {"skipped": str(exc)}
    block["target_s"] = BLOCK_TARGET_S
    result["transformer_block"] = block
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
