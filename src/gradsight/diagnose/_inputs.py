"""The scale of a model's inputs, estimated from its first layer: are they normalised?

Read by the rules whose findings large inputs cause (dead units, a learning rate too high for them), which then
advise normalising the inputs first.
"""

from __future__ import annotations

import math
from typing import Any

from ._base import RunData, Thresholds, fmt
from ._layers import WEIGHTED, fan, first_weight_step, layer_stats, param_tensors

__all__ = ["input_advice", "input_scale"]


def input_scale(data: RunData, th: Thresholds) -> dict[str, Any] | None:
    """The inputs' estimated RMS when it reaches ``input_rms_high`` (inputs not normalised), else ``None``.

    From the first weighted layer of the forward (a Linear/Dense or convolution; ``None`` when a layer with
    other parameters, such as an Embedding or a normalisation, comes first) at the first logged step, before any
    update: for weights drawn independently of the inputs, ``E[z²] = fan_in · E[w²] · E[x²]`` (plus the bias's
    share), so ``rms(x) = sqrt(rms(z)² - rms(b)²) / (rms(W) · sqrt(fan_in))``. A Keras layer with a fused
    activation records its output after it, which can only make the estimate smaller.
    """
    key = ("input_scale", th.input_rms_high)
    if key in data.cache:
        return data.cache[key]
    data.cache[key] = None
    if "output" not in data.kinds or "weight" not in data.kinds:
        return None
    step = first_weight_step(data)
    if step is None:
        return None
    for layer in data.layers:
        info = data.layer_info(layer)
        kind = str(info.get("type") or "")
        params = param_tensors(data, layer)
        if not WEIGHTED.match(kind):
            if params:
                return None  # an embedding or a normalisation reads the inputs first
            continue
        if "weight" not in params:
            return None
        name, shape = params["weight"]
        w = layer_stats(data, "weight", layer, step, tensor=name)
        z = layer_stats(data, "output", layer, step)
        if w is None or z is None or not w["rms"] > 0:
            return None
        b = layer_stats(data, "weight", layer, step, tensor=params["bias"][0]) if "bias" in params else None
        fan_in, _ = fan(data, name, shape)
        signal = math.sqrt(max(z["rms"] ** 2 - (b["rms"] ** 2 if b is not None else 0.0), 0.0))
        rms = signal / (w["rms"] * math.sqrt(fan_in))
        if rms >= th.input_rms_high:
            data.cache[key] = {"layer": layer, "step": step, "input_rms": rms, "pre_activation_rms": z["rms"]}
        return data.cache[key]
    return None


def input_advice(scale: dict[str, Any]) -> str:
    """The advice to normalise the inputs, with the evidence of :func:`input_scale`."""
    return (
        f"Normalise the inputs first: at step {scale['step']} the first layer {scale['layer']!r} had "
        f"pre-activations of RMS {fmt(scale['pre_activation_rms'])}, which its weights' scale puts at inputs of "
        f"RMS ~{fmt(scale['input_rms'])} (standardised features have 1, images in [0, 1] about 0.5): standardise "
        "features ((x - mean) / std over the training set) or scale pixels to [0, 1]. Large inputs make every "
        "pre-activation and gradient of the first layer as large, so a learning rate tuned for normalised data "
        "overshoots and ReLUs die."
    )
