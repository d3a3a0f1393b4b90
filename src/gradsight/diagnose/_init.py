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
import re
from typing import Any

from ._base import Rule, RunData, Thresholds, fmt, ordered, recent
from ._finding import Finding
from ._layers import (
    WEIGHTED,
    fan,
    first_weight_step,
    layer_stats,
    param_tensors,
    previous_layer,
    producer,
    unit_dead_fraction,
)
from ._units import _saturation, activation_of, is_echo_layer

__all__ = ["BadInitialisationRule"]


class BadInitialisationRule(Rule):
    """Units out of range, or a chain of weights far off scale, from the first step (warning).

    See the module docstring.
    """

    name = "bad-initialisation"
    codes = ("bad-initialisation",)
    kinds = ("weight",)

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        first = first_weight_step(data)
        if first is None:
            return []
        chains = _scale_chains(data, first, th)
        hits: dict[str, dict[str, Any]] = {}
        if "output" in data.kinds:
            out_steps = sorted(int(s) for s in data.frame("output")["step"].unique())
            if out_steps and out_steps[0] == first:
                late = recent(out_steps, th)
                for layer in ordered({t.layer for t in data.tensors if t.kind == "output"}, data):
                    if is_echo_layer(data, layer):
                        continue
                    state = _out_of_range(data, layer, first, late, th)
                    cause = _blame(data, layer, state, first, th) if state is not None else None
                    if cause is not None:
                        hits[layer] = cause
        if not hits and not chains:
            return []
        return [_finding(data, hits, chains, first, th)]


#: Parameter-free layers that pass a chain's signal on without re-scaling it to a fixed size.
_PASS = re.compile(
    r"relu|tanh|sigmoid|gelu|silu|swish|elu|softplus|mish|leaky|activation|dropout|flatten|pool|"
    r"identity|reshape|permute",
    re.IGNORECASE,
)


def _following_activation(data: RunData, layer: str) -> str:
    """``"relu"``, ``"tanh"``, ``"sigmoid"`` or ``"none"``: the activation applied to a weighted layer's output.

    The layer's own (a Keras ``activation=``), else the first activation among the pass-through layers after it,
    before the next weighted layer.
    """
    i = data.layer_index(layer)
    for name in data.layers[i : i + 4]:
        info = data.layer_info(name)
        kind = str(info.get("type") or "")
        if name != layer and WEIGHTED.match(kind):
            break
        act = activation_of(data, name)
        if act is not None:
            return act
        text = f"{kind} {info.get('activation') or ''}".lower()
        if any(word in text for word in ("relu", "gelu", "silu", "swish", "elu", "mish")):
            return "relu"
    return "none"


def _reference(data: RunData, layer: str, fan_in: int, fan_out: int) -> tuple[float, str]:
    """The standard initial std for a layer by the activation after it.

    He for ReLU-like, Glorot for tanh and sigmoid, LeCun for none (a linear output layer).
    """
    act = _following_activation(data, layer)
    if act == "relu":
        return math.sqrt(2.0 / fan_in), "He"
    if act in ("tanh", "sigmoid"):
        return math.sqrt(2.0 / (fan_in + fan_out)), "Glorot"
    return math.sqrt(1.0 / fan_in), "LeCun"


def _scale_chains(data: RunData, step: int, th: Thresholds) -> list[dict[str, Any]]:
    """Runs of at least ``init_chain`` consecutive weighted layers off the standard scale the same way.

    Off scale: a weight std ``init_scale_factor`` times above (or below) the standard one. Consecutive: only
    pass-through layers between them, and where layer outputs were recorded, each output's RMS moved on from the
    previous one's in the chain's direction (:func:`_compounds`).
    """
    keras = data.meta.get("framework") == "keras"
    chains: list[list[dict[str, Any]]] = [[]]
    for layer in data.layers:
        kind = str(data.layer_info(layer).get("type") or "")
        weighted = bool(WEIGHTED.match(kind)) and not (kind == "Conv1D" and not keras)
        entry = _scale_entry(data, layer, step) if weighted else None
        if entry is not None:
            chains[-1].append(entry)
        elif not (kind and _PASS.search(kind) and not data.layer_info(layer).get("params")):
            chains.append([])
    out = []
    for chain in chains:
        run: list[dict[str, Any]] = []
        for entry in [*chain, None]:
            direction = _direction(entry, th) if entry is not None else None
            if run and direction == run[-1]["direction"] and _compounds(run[-1], entry, direction, th):
                run.append({**entry, "direction": direction})
                continue
            if len(run) >= th.init_chain:
                out.append({"direction": run[0]["direction"], "layers": run})
            run = [{**entry, "direction": direction}] if direction is not None else []
    return out


def _compounds(prev: dict[str, Any], entry: dict[str, Any], direction: str, th: Thresholds) -> bool:
    """Whether the recorded outputs show the scale error compounding from ``prev`` to ``entry`` (True if unknown).

    In a chain each layer takes the previous one's output, so an output RMS ``s`` times off shrinks (or grows) by
    ``s`` again at the next layer: the link compounds when the next output's RMS moves at least
    ``sqrt(init_scale_factor)`` times in the chain's direction. Layers that only follow one another in the model
    order but read the same input (an attention block's query, key and value projections) have outputs of the
    same RMS: not a chain. Judged only where the output is the weight term's (no bias, or a bias small against
    the output); a layer whose bias was not recorded, or dominates its output (a tiny W with a default-sized
    bias), is taken as a link.
    """
    a, b = prev.get("output_rms"), entry.get("output_rms")
    if not a or not b or not (a > 0 and b > 0) or not (math.isfinite(a) and math.isfinite(b)):
        return True
    bias = entry.get("bias_rms")
    if bias is None or not bias < 0.5 * b:  # unknown, or the bias dominates the output: its RMS says nothing of W·x
        return True
    step = math.sqrt(th.init_scale_factor)
    return b <= a / step if direction == "small" else b >= a * step


def _scale_entry(data: RunData, layer: str, step: int) -> dict[str, Any] | None:
    params = param_tensors(data, layer)
    if "weight" not in params:
        return None
    name, shape = params["weight"]
    w = layer_stats(data, "weight", layer, step, tensor=name)
    if w is None:
        return None
    fan_in, fan_out = fan(data, name, shape)
    ref, scheme = _reference(data, layer, fan_in, fan_out)
    out = layer_stats(data, "output", layer, step) if "output" in data.kinds else None
    bias: float | None = 0.0  # no bias: the output is the weight term
    if "bias" in params:
        b = layer_stats(data, "weight", layer, step, tensor=params["bias"][0])
        bias = b["rms"] if b is not None else None
    return {
        "layer": layer,
        "tensor": name,
        "std": w["std"],
        "fan_in": fan_in,
        "reference_std": ref,
        "reference": scheme,
        "scale": w["std"] / ref if ref > 0 else math.nan,
        "output_rms": out["rms"] if out is not None else None,
        "bias_rms": bias,
    }


def _direction(entry: dict[str, Any], th: Thresholds) -> str | None:
    scale = entry["scale"]
    if not scale > 0:
        return None
    if scale >= th.init_scale_factor:
        return "large"
    if scale <= 1.0 / th.init_scale_factor:
        return "small"
    return None


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
    # a bias of 0 explains nothing, even against a weight term of 0 (all-zero weights: the weights are the cause)
    by_bias = b is not None and bias_mean != 0 and abs(bias_mean) >= th.init_bias_sigmas * spread
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
        "weight_scale": (scale := w["std"] / reference if reference > 0 else math.nan),
        # within init_scale_factor of the standard std: the weights are not what is off (the inputs they get are)
        "standard_scale": 1.0 / th.init_scale_factor < scale < th.init_scale_factor,
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
    standard = " (a standard scale: the inputs it receives, not its weights, are off)" if h["standard_scale"] else ""
    return (
        f"the weights of {owner!r} have std {fmt(w['std'])}, {fmt(h['weight_scale'])}x {h['reference']}'s "
        f"{fmt(h['reference_std'])} for fan-in {h['fan_in']}{standard}{pre_text}, so {effect}"
    )


def _advice(hits: dict[str, dict[str, Any]], chains: list[dict[str, Any]]) -> tuple[str, ...]:
    out = []
    for chain in chains:
        first = chain["layers"][0]
        out.append(
            f"Initialise the weights of {', '.join(repr(e['layer']) for e in chain['layers'])} with the scheme that "
            f"fits their activation ({first['reference']}: std {fmt(first['reference_std'])} for {first['layer']!r}; "
            "torch.nn.init.kaiming_normal_ for ReLU, xavier_uniform_ for tanh/sigmoid; Keras 'he_normal' / "
            "'glorot_uniform'), or keep the framework's default."
        )
    for h in hits.values():
        owner = h["producer"]
        if h["parameter"] == "bias":
            out.append(
                f"Initialise the bias of {owner!r} at 0 (torch.nn.init.zeros_(bias) / bias_initializer='zeros'); "
                f"it starts at mean {fmt(h['bias']['mean'])}."
            )
        elif h["standard_scale"]:  # re-initialising to the scale they already have would change nothing
            continue
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


def _chain_sentence(chain: dict[str, Any], step: int) -> str:
    layers = chain["layers"]
    scales = [e["scale"] for e in layers]
    worst = max(layers, key=lambda e: abs(math.log(e["scale"])))
    word = "larger" if chain["direction"] == "large" else "smaller"
    lo, hi = min(scales), max(scales)
    span = f"{fmt(lo)}x" if fmt(lo) == fmt(hi) else f"{fmt(lo)}x–{fmt(hi)}x"
    names = ", ".join(repr(e["layer"]) for e in layers)
    rms = [e["output_rms"] for e in layers if e["output_rms"] is not None]
    signal = ""
    if len(rms) >= 2 and rms[0] > 0:
        signal = f"; their outputs' RMS goes from {fmt(rms[0])} to {fmt(rms[-1])} along the chain at step {step}"
    return (
        f"the weights of {len(layers)} consecutive layers ({names}) start {span} {word} than the standard scale "
        f"(e.g. {worst['layer']!r}: std {fmt(worst['std'])} against {worst['reference']}'s "
        f"{fmt(worst['reference_std'])} for fan-in {worst['fan_in']}), with no normalisation between them, so the "
        f"error compounds layer after layer{signal}"
    )


def _finding(
    data: RunData, hits: dict[str, dict[str, Any]], chains: list[dict[str, Any]], step: int, th: Thresholds
) -> Finding:
    layers = ordered(hits, data)
    names: list[str] = []
    sentences = [_chain_sentence(c, step) for c in chains]
    for c in chains:
        names += [e["layer"] for e in c["layers"]]
    for layer in layers:
        names += [hits[layer]["producer"], layer]
    sentences += [_sentence(layer, hits[layer], step) for layer in layers[:1]]
    msg = "Bad initialisation: " + "; and ".join(sentences) + "."
    if len(layers) > 1:
        msg += f" {len(layers) - 1} more layer(s) start out of range: " + ", ".join(map(repr, layers[1:])) + "."
    explanation = []
    if chains:
        explanation.append(
            "A layer multiplies the size of its input by about its weight std times sqrt(fan-in); the standard "
            "initialisations choose the std so that this factor is about 1 for the activation that follows. Weights "
            "several times larger or smaller than that, layer after layer, make activations and gradients grow or "
            "shrink geometrically with depth: huge logits, a huge loss and huge steps at the start, or a signal and "
            "a gradient that never reach the far end."
        )
    if hits:
        explanation.append(
            "Before the first update the units of these layers are already where they pass no gradient: a ReLU "
            "whose pre-activation is negative for every input outputs 0 with derivative 0, and a tanh/sigmoid "
            "driven far from 0 has a derivative near 0. Training cannot move them out, because the gradient that "
            "would do so is the one they block."
        )
    return Finding(
        code="bad-initialisation",
        severity="warning",
        layers=tuple(dict.fromkeys(names)),
        first_step=step,
        last_step=step,
        evidence={
            "step": step,
            "layers": hits,
            "scale_chains": chains,
            "direction": chains[0]["direction"] if chains else None,
            "threshold_bias_sigmas": th.init_bias_sigmas,
            "threshold_dead_fraction": th.dead_fraction,
            "threshold_saturation_gain": th.saturation_gain,
            "threshold_scale_factor": th.init_scale_factor,
            "threshold_chain": th.init_chain,
        },
        message=msg,
        explanation=" ".join(explanation),
        advice=_advice(hits, chains),
    )
