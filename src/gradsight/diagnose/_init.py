"""Rule ``bad-initialisation``: a weight scale or bias that puts a layer's units out of range from step 0.

Read at the run's first step, before any update could be blamed (the first logged step must be the first step the
run recorded), for every layer whose units are already out of range there **and still are** over the last
``recent_steps`` logged steps:

* **dead**: at least ``dead_fraction`` of its units are zero for every sample (per-unit activity counts);
* **saturated**: a ``tanh``/``sigmoid`` layer whose mean local derivative is below ``saturation_gain`` (the exact
  formula of :mod:`gradsight.diagnose._units`).

The parameter responsible is found on the layer that computes the pre-activation (the layer itself when it has
parameters, as a Keras ``Dense(activation=...)``, else the nearest layer with parameters before it, as the
``Linear`` before a torch ``ReLU``): the **bias** when its mean lies at least ``init_bias_sigmas`` standard
deviations of the weight term ``W·x`` away from 0 (the spread of the recorded pre-activation; without one, the
estimate ``rms(W)·sqrt(fan_in)·rms(x)`` from the weights and the recorded input, or unit-scale inputs when the
input was not recorded), else the **weights**, with their scale against He's (ReLU) or Glorot's (tanh, sigmoid).
Exact statistics from the summaries: mean, std, share of entries ``<= 0``.
"""

from __future__ import annotations

import math
from typing import Any

from ._base import Rule, RunData, Thresholds, fmt, ordered
from ._finding import Finding
from ._layers import fan, layer_stats, param_tensors, previous_layer, producer, unit_dead_fraction
from ._units import _saturation, activation_of, is_echo_layer

__all__ = ["BadInitialisationRule"]


class BadInitialisationRule(Rule):
    """Units dead or saturated from the first step because of a parameter's initial value (warning)."""

    name = "bad-initialisation"
    codes = ("bad-initialisation",)
    kinds = ("output", "weight")

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        out_steps = sorted(int(s) for s in data.frame("output")["step"].unique())
        if not out_steps:
            return []
        first = out_steps[0]
        starts = [first]
        if len(data.scalars.index):
            starts.append(int(data.scalars.index.min()))
        if first > min(starts):  # the first summary is not the run's first step: cannot speak of initialisation
            return []
        recent = out_steps[-th.recent_steps :]
        hits: dict[str, dict[str, Any]] = {}
        for layer in ordered({t.layer for t in data.run.tensors if t.kind == "output"}, data):
            if is_echo_layer(data, layer):
                continue
            state = _out_of_range(data, layer, first, recent, th)
            if state is None:
                continue
            cause = _blame(data, layer, state, first, th)
            if cause is not None:
                hits[layer] = cause
        if not hits:
            return []
        return [_finding(data, hits, first, th)]


def _out_of_range(data: RunData, layer: str, first: int, recent: list[int], th: Thresholds) -> dict[str, Any] | None:
    """Dead or saturated at ``first`` and still over ``recent``: the state, or ``None``."""
    dead0 = unit_dead_fraction(data, layer, [first])
    if dead0 is not None and dead0[0] >= th.dead_fraction and dead0[1] > 0:
        still = unit_dead_fraction(data, layer, recent)
        if still is not None and still[0] >= th.dead_fraction:
            return {"state": "dead", "fraction": dead0[0], "dead": dead0[1], "units": dead0[2], "recent": still[0]}
    act = activation_of(data, layer)
    if act is not None:
        sub = data.frame("output", hist=True)
        sub = sub[sub["layer"] == layer]
        sat = _saturation(sub, act, th)
        if sat is not None and sat["gain_first_logged"] < th.saturation_gain:
            return {"state": "saturated", "activation": act, "gain": sat["gain_first_logged"], "recent": sat["gain"]}
    return None


def _blame(data: RunData, layer: str, state: dict[str, Any], step: int, th: Thresholds) -> dict[str, Any] | None:
    """Which parameter of the producing layer puts ``layer`` out of range, with its statistics."""
    owner = producer(data, layer)
    if owner is None:
        return None
    params = param_tensors(data, owner)
    if "weight" not in params:
        return None
    wname, wshape = params["weight"]
    w = layer_stats(data, "weight", owner, step, tensor=wname)
    if w is None:
        return None
    b = layer_stats(data, "weight", owner, step, tensor=params["bias"][0]) if "bias" in params else None
    fan_in, fan_out = fan(data, wname, wshape)
    pre = layer_stats(data, "output", owner, step) if owner != layer else None
    source = "the recorded pre-activation"
    if pre is not None:
        spread = pre["std"]
    else:
        before = previous_layer(data, owner)
        x = layer_stats(data, "output", before, step) if before is not None else None
        x_rms = x["rms"] if x is not None else 1.0
        spread = w["rms"] * math.sqrt(fan_in) * x_rms
        source = (
            f"estimated as rms(W)·sqrt(fan_in)·rms(x) with x the output of {before!r}"
            if x is not None
            else "estimated as rms(W)·sqrt(fan_in), for unit-scale inputs (the input was not recorded)"
        )
    bias_mean = b["mean"] if b is not None else 0.0
    by_bias = b is not None and abs(bias_mean) >= th.init_bias_sigmas * spread
    if state["state"] == "dead" and by_bias and bias_mean > 0:
        by_bias = False  # a positive bias cannot kill a ReLU
    act = state.get("activation", "relu")
    if act == "relu":
        reference, ref_name = math.sqrt(2.0 / fan_in), "He"
    else:
        reference, ref_name = math.sqrt(2.0 / (fan_in + fan_out)), "Glorot"
    return {
        **state,
        "producer": owner,
        "parameter": "bias" if by_bias else "weight",
        "tensor": params["bias"][0] if by_bias else wname,
        "bias": b,
        "weight": w,
        "fan_in": fan_in,
        "fan_out": fan_out,
        "weight_term_spread": spread,
        "weight_term_source": source,
        "pre_activation": pre,
        "reference_std": reference,
        "reference": ref_name,
        "weight_scale": w["std"] / reference if reference > 0 else math.nan,
    }


def _sentence(layer: str, h: dict[str, Any], step: int) -> str:
    owner = h["producer"]
    if h["state"] == "dead":
        effect = f"{h['fraction']:.0%} of the units of {layer!r} are ≤ 0 (dead) from step {step}"
    else:
        effect = (
            f"the {h['activation']} units of {layer!r} pass back on average {fmt(h['gain'])} of the maximal gradient "
            f"from step {step} (saturated)"
        )
    if h["parameter"] == "bias":
        b = h["bias"]
        return (
            f"the bias of {owner!r} has mean {fmt(b['mean'])} (std {fmt(b['std'])}) while the weight term W·x "
            f"spreads only {fmt(h['weight_term_spread'])}, so {effect}"
        )
    w = h["weight"]
    pre = h["pre_activation"]
    pre_text = (
        f"; its pre-activations have mean {fmt(pre['mean'])}, std {fmt(pre['std'])}, "
        f"{pre['nonpositive_fraction']:.0%} ≤ 0"
        if pre is not None
        else ""
    )
    return (
        f"the weights of {owner!r} have std {fmt(w['std'])}, {fmt(h['weight_scale'])}x {h['reference']}'s "
        f"{fmt(h['reference_std'])} for fan-in {h['fan_in']}{pre_text}, so {effect}"
    )


def _advice(hits: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    out = []
    for h in hits.values():
        owner = h["producer"]
        if h["parameter"] == "bias":
            out.append(
                f"Initialise the bias of {owner!r} at 0 (torch.nn.init.zeros_(bias) / bias_initializer='zeros'); "
                f"it starts at mean {fmt(h['bias']['mean'])}."
            )
        elif h.get("activation", "relu") == "relu":
            out.append(
                f"Initialise the weights of {owner!r} with He's scheme (std sqrt(2/fan_in) = {fmt(h['reference_std'])}"
                "): torch.nn.init.kaiming_normal_(w, nonlinearity='relu') / kernel_initializer='he_normal'."
            )
        else:
            out.append(
                f"Initialise the weights of {owner!r} with Glorot's scheme (std {fmt(h['reference_std'])}): "
                "torch.nn.init.xavier_uniform_(w) / kernel_initializer='glorot_uniform'."
            )
    out.append(
        "Add normalisation (BatchNorm/LayerNorm) before the activation, so pre-activations start centred at "
        "unit scale whatever the initial parameters."
    )
    return tuple(dict.fromkeys(out))


def _finding(data: RunData, hits: dict[str, dict[str, Any]], step: int, th: Thresholds) -> Finding:
    layers = ordered(hits, data)
    worst = layers[0]
    names: list[str] = []
    for layer in layers:
        names += [hits[layer]["producer"], layer]
    msg = "Bad initialisation: " + _sentence(worst, hits[worst], step) + "."
    if len(layers) > 1:
        msg += f" {len(layers) - 1} more layer(s) start out of range: " + ", ".join(map(repr, layers[1:])) + "."
    return Finding(
        code="bad-initialisation",
        severity="warning",
        layers=tuple(dict.fromkeys(names)),
        first_step=step,
        last_step=step,
        evidence={
            "step": step,
            "layers": hits,
            "threshold_bias_sigmas": th.init_bias_sigmas,
            "threshold_dead_fraction": th.dead_fraction,
            "threshold_saturation_gain": th.saturation_gain,
        },
        message=msg,
        explanation=(
            "Before the first update the units of these layers are already where they pass no gradient: a ReLU "
            "whose pre-activation is negative for every input outputs 0 with derivative 0, and a tanh/sigmoid "
            "driven far from 0 has a derivative near 0. Training cannot move them out, because the gradient that "
            "would do so is the one they block."
        ),
        advice=_advice(hits),
    )
