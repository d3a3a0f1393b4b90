"""Benchmark: plain ``model.fit`` vs ``fit`` under ``gradsight.watch`` (Keras 3, TensorFlow backend).

MLP 784-128-64-10 (relu), batch 32, SGD. Plain and watched models of the same architecture alternate epochs of
``--steps`` steps in one process (interleaved, so machine noise hits both alike); each epoch's wall time over its
steps is one sample; the JSON reports medians per step and the ratio watched/plain for the default config and for
everything every step (``config="full"``). The machine may be shared and noisy: compare ratios, not absolutes.

Run: ``python benchmarks/bench_watch_keras.py [--steps 50] [--rounds 20]`` (JSON to stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from gradsight._watch import watch


def mlp() -> keras.Model:
    m = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    m.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def epoch_time(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    t = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50, help="steps per epoch (one timing sample)")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds (steps*rounds >= 200)")
    args = ap.parse_args()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.steps * 32, 784)).astype("float32")
    y = rng.integers(0, 10, size=args.steps * 32)
    tmp = tempfile.mkdtemp(prefix="gradsight-bench-")
    models = {"plain": mlp(), "default": mlp(), "full": mlp()}
    watches = {
        "default": watch(models["default"], path=os.path.join(tmp, "default.db")),
        "full": watch(models["full"], path=os.path.join(tmp, "full.db"), preset="full"),
    }
    for m in models.values():  # warm-up: tracing and first-call costs
        epoch_time(m, x, y)
    samples: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            samples[name].append(epoch_time(m, x, y) / args.steps * 1e3)
    for w in watches.values():
        w.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    out = {
        "benchmark": "keras fit, MLP 784-128-64-10, batch 32, SGD",
        "steps_per_sample": args.steps,
        "samples": args.rounds,
        "total_steps_per_variant": args.steps * args.rounds,
        "median_ms_per_step": {k: round(v, 4) for k, v in med.items()},
        "ratio_default": round(med["default"] / med["plain"], 3),
        "ratio_full_every_step": round(med["full"] / med["plain"], 3),
        "target_default_ratio": 1.25,
        "default_config": {
            "every": watches["default"].schedule.every,
            "kinds": list(watches["default"].schedule.kinds),
        },
        "all_samples_ms_per_step": {k: [round(s, 4) for s in v] for k, v in samples.items()},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()},
        "machine": f"{os.cpu_count()} CPUs (shared, noisy), {platform.machine()}",
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
