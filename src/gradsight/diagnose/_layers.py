"""Layer statistics at one step, read from the summaries: what the root-cause and "why near zero" rules share.

A summary stores exact count, sum, sum of squares, zeros and positives of a tensor (see
:class:`gradsight.summary.TensorSummary`), so a layer's mean, standard deviation, RMS, share of exact zeros and
share of entries ``<= 0`` at a logged step are exact, pooled over its tensors of one kind.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from ._base import RunData

__all__ = [
    "WEIGHTED",
    "fan",
    "first_weight_step",
    "layer_stats",
    "param_layers",
    "param_tensors",
    "previous_layer",
    "producer",
    "unit_dead_fraction",
]


def param_layers(data: RunData) -> set[str]:
    """Layers that own parameter tensors (any weight, grad or update summary, or parameters in the metadata)."""
    if "param_layers" not in data.cache:
        layers = {t.layer for t in data.tensors if t.kind in ("weight", "grad", "update")}
        layers |= {n for n in data.layers if data.layer_info(n).get("params")}
        data.cache["param_layers"] = layers
    return data.cache["param_layers"]


def param_tensors(data: RunData, layer: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{"weight": (name, shape), "bias": (name, shape)}`` of a layer's recorded weight tensors.

    Either may be missing. The kernel/weight is the tensor with 2+ dimensions named ``weight`` or ``kernel`` (else the
    largest), the bias the one named ``bias``.
    """
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    tensors = [t for t in data.tensors if t.kind == "weight" and t.layer == layer]
    for t in tensors:
        leaf = t.name.replace("/", ".").rsplit(".", 1)[-1].split(":")[0].lower()
        if leaf == "bias":
            out["bias"] = (t.name, t.shape)
        elif leaf in ("weight", "kernel") and len(t.shape) >= 2:
            out["weight"] = (t.name, t.shape)
    if "weight" not in out:
        big = [t for t in tensors if len(t.shape) >= 2]
        if big:
            t = max(big, key=lambda t: math.prod(t.shape))
            out["weight"] = (t.name, t.shape)
    return out


def fan(data: RunData, name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight tensor: torch stores ``(out, in, *kernel)``, Keras ``(*kernel, in, out)``."""
    keras = data.meta.get("framework") == "keras" or "kernel" in name.lower()
    if len(shape) < 2:
        return (int(shape[0]) if shape else 1), 1
    if keras:
        return math.prod(shape[:-1]), math.prod(shape[:-2]) * int(shape[-1])
    return math.prod(shape[1:]), int(shape[0]) * math.prod(shape[2:])


def layer_stats(data: RunData, kind: str, layer: str, step: int, tensor: str | None = None) -> dict[str, float] | None:
    """Pooled exact statistics of one layer's (or one tensor's) summaries of ``kind`` at ``step``, or ``None``.

    Returns:
        ``count``, ``mean``, ``std``, ``rms``, ``zero_fraction`` (exact zeros), ``nonpositive_fraction``
        (entries ``<= 0``), ``nonfinite`` — over the finite entries.
    """
    if kind not in data.kinds:
        return None
    key = ("layer_stats", kind, step, tensor is not None)
    if key not in data.cache:  # one pass over the step's rows for every layer (or tensor): rules ask many
        f = data.frame(kind)
        rows = f[f["step"] == step]
        by = ["layer", "tensor"] if tensor is not None else ["layer"]
        cols = ["finite", "sum", "sum_sq", "zeros", "positive", "nonfinite"]
        data.cache[key] = {
            (k if isinstance(k, tuple) else (k,)): _stats(g) for k, g in rows.groupby(by)[cols].sum().iterrows()
        }
    return data.cache[key].get((layer, tensor) if tensor is not None else (layer,))


def _stats(row: Any) -> dict[str, float] | None:
    n = float(row["finite"])
    if n <= 0:
        return None
    total, sq = float(row["sum"]), float(row["sum_sq"])
    mean = total / n
    return {
        "count": n,
        "mean": mean,
        "std": math.sqrt(max(sq / n - mean * mean, 0.0)),
        "rms": math.sqrt(max(sq / n, 0.0)),
        "zero_fraction": float(row["zeros"]) / n,
        "nonpositive_fraction": 1.0 - float(row["positive"]) / n,
        "nonfinite": float(row["nonfinite"]),
    }


def producer(data: RunData, layer: str) -> str | None:
    """The layer with parameters that computes ``layer``'s pre-activation.

    The layer itself when it has parameters (a Keras ``Dense(activation=...)``), else the nearest earlier layer with
    parameters, reached through parameter-free layers only (a torch ``Linear`` followed by ``ReLU``).
    """
    owners = param_layers(data)
    if layer in owners:
        return layer
    i = data.layer_index(layer)
    for name in reversed(data.layers[:i]):
        if name in owners:
            return name
    return None


def previous_layer(data: RunData, layer: str, kind: str = "output") -> str | None:
    """The nearest layer before ``layer`` (model order) that has summaries of ``kind``: its input's producer."""
    key = ("layers_with", kind)
    if key not in data.cache:
        data.cache[key] = {t.layer for t in data.tensors if t.kind == kind}
    have = data.cache[key]
    i = data.layer_index(layer)
    for name in reversed(data.layers[:i]):
        if name in have:
            return name
    return None


def unit_dead_fraction(data: RunData, layer: str, steps: list[int]) -> tuple[float, int, int] | None:
    """``(dead fraction, dead units, units)`` of a layer's output over ``steps`` pooled.

    A unit is dead when it was zero for every entry of those steps; ``None`` without unit counts. Of a layer with
    several output tensors, the one with the largest dead fraction.
    """
    if "output" not in data.kinds:
        return None
    key = ("unit_dead_fraction", tuple(steps))
    if key not in data.cache:  # every layer at once: rules ask for many
        f = data.frame("output", units=True)
        rows = f[f["step"].isin(steps) & f["units_active"].notna()]
        out: dict[str, tuple[float, int, int]] = {}
        for (name, _), sub in rows.groupby(["layer", "tensor"]):
            arrays = [np.asarray(a) for a in sub["units_active"]]
            if len({a.size for a in arrays}) != 1 or arrays[0].size == 0:
                continue
            active = np.sum(np.stack(arrays), axis=0)
            dead = int((active == 0).sum())
            value = (dead / active.size, dead, int(active.size))
            if str(name) not in out or value[0] > out[str(name)][0]:
                out[str(name)] = value
        data.cache[key] = out
    return data.cache[key].get(layer)


def stats_text(stats: dict[str, float] | None) -> dict[str, Any]:
    """The statistics as JSON-ready evidence (``{}`` when absent)."""
    return dict(stats) if stats else {}


#: Weighted layer types whose initial scale has a standard (LeCun, Glorot, He). HF's ``Conv1D`` (a transposed
#: linear layer) is told apart from Keras' by the framework.
WEIGHTED = re.compile(
    r"^(Linear|LazyLinear|Bilinear|Conv[123]d|ConvTranspose[123]d|Dense|Conv[123]D|Conv[123]DTranspose)$"
)


def first_weight_step(data: RunData) -> int | None:
    """The first step with weight summaries, when it is the run's first recorded step.

    ``None`` otherwise: the initialisation was not observed.
    """
    steps = sorted(int(s) for s in data.frame("weight")["step"].unique())
    if not steps:
        return None
    starts = [steps[0]]
    if len(data.scalars.index):
        starts.append(int(data.scalars.index.min()))
    return steps[0] if steps[0] <= min(starts) else None
