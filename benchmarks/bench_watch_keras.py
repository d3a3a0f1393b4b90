"""Benchmark: plain ``model.fit`` vs ``fit`` under ``gradsight.watch`` (Keras 3, TensorFlow backend).

MLP 784-128-64-10 (relu), batch 32, SGD. Plain and watched models of the same architecture alternate epochs of
``--steps`` steps in one process (interleaved, so machine noise hits both alike); each epoch's wall time over its
steps is one sample; the JSON reports medians per step and the ratio watched/plain for the default config and for
everything every step (``preset="full"``). The machine may be shared and noisy: compare ratios, not absolutes.

Start-up (``startup`` in the JSON): the wall time of a fresh model's first ``fit`` (``--startup-steps`` steps:
tracing the train step, optimising and running it) plain, watched with the default preset and with
``preset="full"``, interleaved in the same process over ``--startup-rounds`` rounds (the order rotating per
round), after one untimed plain ``fit`` that warms TensorFlow itself. It reports medians and the differences to
plain, and separately the first watched fit of each kind in the process, which also traces the summary functions
shared by every later watch (once per dtype per process). ``os.getloadavg()`` before and after each part.

Run: ``python benchmarks/bench_watch_keras.py [--steps 50] [--rounds 20] [--startup-rounds 7]
[--part both|steps|startup]`` (JSON to stdout).
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


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


STARTUP_KINDS = {"plain": None, "default": {}, "full": {"preset": "full"}}


def startup(rounds: int, steps: int, tmp: str) -> dict:
    """First-``fit`` wall time of fresh models, plain vs watched, interleaved (see the module docstring)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(steps * 32, 784)).astype("float32")
    y = rng.integers(0, 10, size=steps * 32)
    load_before = _load()
    mlp().fit(x, y, batch_size=32, epochs=1, verbose=0)  # warm TensorFlow itself (untimed)
    names = list(STARTUP_KINDS)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            m = mlp()
            settings = STARTUP_KINDS[name]
            t = time.perf_counter()
            if settings is None:
                m.fit(x, y, batch_size=32, epochs=1, verbose=0)
            else:
                with watch(m, path=os.path.join(tmp, f"start-{name}-{r}.db"), **settings):
                    m.fit(x, y, batch_size=32, epochs=1, verbose=0)
            samples[name].append(time.perf_counter() - t)
            del m
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "what": f"wall time of a fresh model's first fit ({steps} steps, batch 32), same process, interleaved",
        "rounds": rounds,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "median_extra_s": {k: round(med[k] - med["plain"], 3) for k in names[1:]},
        "first_in_process_s": {k: round(samples[k][0], 3) for k in names},
        "target_extra_s": 1.0,
        "all_samples_s": {k: [round(v, 3) for v in vs] for k, vs in samples.items()},
        "load_before": load_before,
        "load_after": _load(),
    }


def per_step(steps: int, rounds: int, tmp: str) -> dict:
    """Per-step time of plain and watched ``fit`` (see the module docstring)."""
    load_before = _load()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * 32, 784)).astype("float32")
    y = rng.integers(0, 10, size=steps * 32)
    models = {"plain": mlp(), "plain_aa": mlp(), "default": mlp(), "full": mlp()}  # plain_aa: the A/A control
    watches = {
        "default": watch(models["default"], path=os.path.join(tmp, "default.db")),
        "full": watch(models["full"], path=os.path.join(tmp, "full.db"), preset="full"),
    }
    for m in models.values():  # warm-up: tracing and first-call costs
        epoch_time(m, x, y)
    samples: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            samples[name].append(epoch_time(m, x, y) / steps * 1e3)
    for w in watches.values():
        w.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "steps_per_sample": steps,
        "samples": rounds,
        "total_steps_per_variant": steps * rounds,
        "median_ms_per_step": {k: round(v, 4) for k, v in med.items()},
        "ratio_aa": round(med["plain_aa"] / med["plain"], 3),
        "ratio_default": round(med["default"] / med["plain"], 3),
        "ratio_full_every_step": round(med["full"] / med["plain"], 3),
        "target_default_ratio": 1.15,
        "default_config": {
            "every": watches["default"].schedule.every,
            "kinds": list(watches["default"].schedule.kinds),
        },
        "all_samples_ms_per_step": {k: [round(s, 4) for s in v] for k, v in samples.items()},
        "load_before": load_before,
        "load_after": _load(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50, help="steps per epoch (one timing sample)")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds (steps*rounds >= 200)")
    ap.add_argument("--startup-rounds", type=int, default=7, help="interleaved rounds of first fits")
    ap.add_argument("--startup-steps", type=int, default=10, help="steps of each first fit")
    ap.add_argument("--part", choices=("both", "steps", "startup"), default="both")
    args = ap.parse_args()
    keras.utils.set_random_seed(0)
    tmp = tempfile.mkdtemp(prefix="gradsight-bench-")
    out: dict = {"benchmark": "keras fit, MLP 784-128-64-10, batch 32, SGD"}
    if args.part in ("both", "startup"):  # first: the first watched fit in the process is part of it
        out["startup"] = startup(args.startup_rounds, args.startup_steps, tmp)
    if args.part in ("both", "steps"):
        out.update(per_step(args.steps, args.rounds, tmp))
    out["versions"] = {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()}
    out["machine"] = f"{os.cpu_count()} CPUs (shared, noisy), {platform.machine()}"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
