"""Why is a layer's gradient near zero: which factor of ``dJ/dW = Aᵀ · dJ/dZ``, ``dJ/dZ = dJ/dA ⊙ S`` is small.

For a layer ``l`` with weights, the weight gradient is the product of its **input** ``A_{l-1}`` (the output of the
layer before it) and ``dJ/dZ_l``, itself the **incoming** gradient ``dJ/dA_l`` times the **local derivative**
``S_l`` of the activation applied to ``Z_l``. A near-zero ``dJ/dW_l`` has one of four reasons, each readable from
the recorded summaries of one logged step (the last at which the layer's gradient and the outputs around it were
recorded):

* **input** — ``A_{l-1}`` is (almost) all exact zeros: dead or zeroed units upstream (share of exact zeros
  ``>= why_zero_fraction``);
* **local derivative** — ``S_l`` is (almost) zero: a ReLU activation whose output is exactly 0 for at least
  ``why_zero_fraction`` of the entries (``S = 0`` there), or a tanh/sigmoid whose mean derivative relative to its
  maximum is below ``saturation_gain`` (exact, see :mod:`gradsight.diagnose._units`); where both ``dJ/dZ_l`` and
  ``dJ/dA_l`` are recorded (a separate activation module), also their measured ratio;
* **incoming** — ``dJ/dA_l`` is exactly zero (no gradient arrives: the layer where it stops is named), or below
  ``vanish_ratio`` times the largest output gradient of the layers after it (vanishing from above);
* **cancellation** — every factor is healthy but the product is small: the per-sample contributions
  ``A_nᵀ · dJ/dZ_n`` cancel when summed over the batch (the evidence compares ``rms(dJ/dW)`` with
  ``rms(A)·rms(dJ/dZ)·sqrt(N)``, the size of a sum of ``N`` unrelated terms).

The exact version, element by element on a batch, is :func:`gradsight.explain`: the finding names the layer's
terms there (``A{l-1}``, ``S{l}``, ``dJ/dA{l}``, ``dJ/dZ{l}``, ``dJ/dW{l}``, with explain's layer index).
"""

from __future__ import annotations

import math
import re
from typing import Any

from ._base import RunData, Thresholds, fmt
from ._layers import layer_stats, param_layers, previous_layer, unit_dead_fraction
from ._units import activation_of

__all__ = ["explain_index", "why_small"]

_WEIGHTED = re.compile(r"linear|dense|conv|embedding|lstm|gru|rnn|attention", re.IGNORECASE)
_ACTIVATION = re.compile(
    r"relu|tanh|sigmoid|gelu|silu|swish|elu|softplus|mish|hardtanh|activation|leaky", re.IGNORECASE
)
_RELU_LIKE = re.compile(r"relu", re.IGNORECASE)
#: Without a factor past its own threshold, the incoming gradient is named as the main reason when it is at least
#: an order of magnitude below the largest output gradient after the layer: the biggest single share of the loss.
_MOSTLY = 0.1


def _type(data: RunData, layer: str) -> str:
    info = data.layer_info(layer)
    return str(info.get("type") or info.get("class") or "")


def explain_index(data: RunData, layer: str) -> int | None:
    """The layer's index l in :func:`gradsight.explain`'s numbering, from the model structure.

    A weighted op and the activation right after it share one index; other layers get their own. ``None`` when
    unknown.
    """
    model = (data.meta.get("model") or {}).get("layers") or []
    names = [str(e.get("name")) for e in model if isinstance(e, dict) and "name" in e]
    if layer not in names:
        return None
    index, prev_weighted = 0, False
    for name in names:
        kind = _type(data, name)
        if _WEIGHTED.search(kind) or name in param_layers(data):
            index, prev_weighted = index + 1, True
        elif _ACTIVATION.search(kind) and prev_weighted:
            prev_weighted = False
        else:
            index, prev_weighted = index + 1, False
        if name == layer:
            return index
    return None  # pragma: no cover - layer is in names


def _activation_layer(data: RunData, layer: str) -> tuple[str, str] | None:
    """``(activation layer, kind)`` applied to the layer's output.

    The layer itself (Keras ``activation=``) or the parameter-free layer right after it; kind ``"relu"``,
    ``"tanh"``, ``"sigmoid"`` or ``"other"``.
    """
    candidates = [layer]
    i = data.layer_index(layer)
    if i + 1 < len(data.layers) and data.layers[i + 1] not in param_layers(data):
        candidates.append(data.layers[i + 1])
    for name in candidates:
        act = activation_of(data, name)
        if act is not None:
            return name, act
        info = data.layer_info(name)
        text = " ".join(str(v) for v in (info.get("type"), info.get("class"), info.get("activation")) if v)
        if _RELU_LIKE.search(text):
            return name, "relu"
        if name != layer and _ACTIVATION.search(text):
            return name, "other"
    return None


def _step(data: RunData, layer: str) -> int | None:
    """The last logged step with the layer's gradient and output summaries."""
    if "grad" not in data.kinds or "output" not in data.kinds:
        return None
    g = data.frame("grad")
    o = data.frame("output")
    steps = set(g.loc[g["layer"] == layer, "step"]) & set(o["step"])
    return int(max(steps)) if steps else None


def why_small(data: RunData, layer: str, th: Thresholds) -> dict[str, Any]:
    """Which factor makes ``layer``'s weight gradient small, with the numbers; see the module docstring.

    Returns:
        ``{"verdict": "input" | "local_derivative" | "incoming" | "cancellation" | "unknown", "sentence": ...,
        "step", "input", "local_derivative", "incoming", "product", "exact"}``.
    """
    out: dict[str, Any] = {"layer": layer, "exact": _exact(layer, explain_index(data, layer))}
    step = _step(data, layer)
    if step is None:
        out["verdict"] = "unknown"
        out["sentence"] = (
            f"Which factor makes the gradient of {layer!r} small cannot be read from this run: its layer outputs "
            "and output gradients were not recorded at a step with its gradient (record the 'output' and "
            "'output_grad' kinds)."
        )
        return out
    out["step"] = step
    bad: list[tuple[str, str]] = []
    act = _activation_layer(data, layer)
    out["input"] = _input_factor(data, layer, step, th, bad)
    out["local_derivative"] = _local_factor(data, layer, act, step, th, bad)
    top = act[0] if act is not None else layer
    out["incoming"] = _incoming_factor(data, top, step, th, bad)
    product = _product(data, layer, act, step, out["input"])
    if product is not None:
        out["product"] = product
    if bad:
        out["verdict"] = bad[0][0]
        out["factors"] = [b[0] for b in bad]
        out["sentence"] = (
            f"The gradient of {layer!r} is small at step {step} because " + "; and ".join(b[1] for b in bad) + "."
        )
        return out
    down = out["incoming"].get("downstream")
    if down and down["ratio"] < _MOSTLY:
        local = out["local_derivative"]
        gain = local.get("gain", local.get("measured_pass"))
        s_text = f", and S passes {fmt(gain)} on average" if gain is not None else ""
        out["verdict"] = "incoming"
        out["factors"] = ["incoming"]
        out["sentence"] = (
            f"The gradient of {layer!r} is small at step {step} mostly because the incoming gradient dJ/dA at "
            f"{top!r} has RMS {fmt(out['incoming']['rms'])}, {fmt(down['ratio'])}x that at {down['layer']!r}: it "
            f"shrank on its way down from the layers above{s_text}."
        )
        return out
    known = "count" in out["input"] or "count" in out["incoming"]
    out["verdict"] = "cancellation" if known else "unknown"
    ratio = ""
    if product is not None and product["expected_unrelated"] == product["expected_unrelated"]:
        ratio = (
            f" (rms(dJ/dW) = {fmt(product['grad_rms'])} against {fmt(product['expected_unrelated'])} for a sum of "
            f"{int(product['terms'])} unrelated terms)"
        )
    out["sentence"] = (
        f"At step {step} the factors of the gradient of {layer!r} look healthy — input, local derivative and "
        f"incoming gradient are neither zero nor vanishing — so the per-sample products A_nᵀ·dJ/dZ_n cancel when "
        f"summed over the batch{ratio}."
        if known
        else f"Too little was recorded around {layer!r} at step {step} to name the factor."
    )
    return out


def _input_factor(data: RunData, layer: str, step: int, th: Thresholds, bad: list[tuple[str, str]]) -> dict[str, Any]:
    """The input ``A_{l-1}``: the output of the layer before; flagged when (almost) all exact zeros."""
    prev = previous_layer(data, layer)
    a = layer_stats(data, "output", prev, step) if prev is not None else None
    if a is not None and a["zero_fraction"] >= th.why_zero_fraction:
        dead = unit_dead_fraction(data, prev, [step])  # type: ignore[arg-type]
        units = f", {dead[0]:.0%} of its units dead" if dead else ""
        bad.append(
            (
                "input",
                f"its input A (the output of {prev!r}) is exactly 0 in {a['zero_fraction']:.0%} of its entries"
                f"{units}: dead or zeroed units upstream",
            )
        )
    return {"layer": prev, **(a or {})}


def _local_factor(
    data: RunData, layer: str, act: tuple[str, str] | None, step: int, th: Thresholds, bad: list[tuple[str, str]]
) -> dict[str, Any]:
    """The local derivative ``S_l`` of the activation on the layer's output: dead ReLU or saturated tanh/sigmoid."""
    if act is None:
        return {}
    name, kind = act
    local: dict[str, Any] = {"layer": name, "activation": kind}
    o = layer_stats(data, "output", name, step)
    if o is not None and kind == "relu":
        local["zero_fraction"] = o["zero_fraction"]
        if o["zero_fraction"] >= th.why_zero_fraction:
            bad.append(
                (
                    "local_derivative",
                    f"the local derivative S of its ReLU {name!r} is 0 for {o['zero_fraction']:.0%} of the entries "
                    "(the units output exactly 0: dead ReLU)",
                )
            )
    elif o is not None and kind in ("tanh", "sigmoid"):
        gain = 1 - o["rms"] ** 2 if kind == "tanh" else 4 * (o["mean"] - o["rms"] ** 2)
        local["gain"] = gain = min(max(gain, 0.0), 1.0)
        if gain < th.saturation_gain:
            bad.append(
                (
                    "local_derivative",
                    f"the local derivative S of its {kind} {name!r} is on average {fmt(gain)} of its maximum "
                    f"(saturated units, over {int(o['count'])} entries)",
                )
            )
    if name != layer:
        dz = layer_stats(data, "output_grad", layer, step)
        da = layer_stats(data, "output_grad", name, step)
        if dz is not None and da is not None and da["rms"] > 0:
            local["measured_pass"] = dz["rms"] / da["rms"]
    return local


def _incoming_factor(data: RunData, top: str, step: int, th: Thresholds, bad: list[tuple[str, str]]) -> dict[str, Any]:
    """The incoming gradient ``dJ/dA_l`` at the activation's output: exactly zero, or vanished from above."""
    da = layer_stats(data, "output_grad", top, step)
    incoming: dict[str, Any] = {"layer": top, **(da or {})}
    later = data.layers[data.layer_index(top) + 1 :]
    downstream = [(s["rms"], n) for n in later if (s := layer_stats(data, "output_grad", n, step)) is not None]
    if da is None:
        return incoming
    if da["zero_fraction"] >= th.why_zero_fraction and da["rms"] == 0:
        stop = next((n for rms, n in downstream if rms > 0), None)
        incoming["stops_at"] = stop
        where = f": the gradient stops at {stop!r}, whose output gradient is non-zero" if stop else ""
        bad.append(("incoming", f"the incoming gradient dJ/dA at {top!r} is exactly 0{where}"))
        return incoming
    if not downstream:
        return incoming
    best, best_layer = max(downstream)
    if best > 0:
        incoming["downstream"] = {"layer": best_layer, "rms": best, "ratio": da["rms"] / best}
        if da["rms"] / best < th.vanish_ratio:
            bad.append(
                (
                    "incoming",
                    f"the incoming gradient dJ/dA at {top!r} has RMS {fmt(da['rms'])}, {fmt(da['rms'] / best)}x "
                    f"that at {best_layer!r} ({fmt(best)}): it vanished on its way down from the layers above",
                )
            )
    return incoming


def _product(
    data: RunData, layer: str, act: tuple[str, str] | None, step: int, a: dict[str, Any]
) -> dict[str, Any] | None:
    """``rms(dJ/dW)`` against ``rms(A)·rms(dJ/dZ)·sqrt(N)``, the size of a sum of N unrelated per-sample terms."""
    g = layer_stats(data, "grad", layer, step)
    dz = layer_stats(data, "output_grad", layer, step) if act is not None and act[0] != layer else None
    if g is None or "rms" not in a or dz is None:
        return None
    units = _units(data, layer, step)
    terms = dz["count"] / units if units else math.nan
    expected = a["rms"] * dz["rms"] * math.sqrt(terms) if terms == terms else math.nan
    return {"grad_rms": g["rms"], "expected_unrelated": expected, "terms": terms}


def _units(data: RunData, layer: str, step: int) -> int | None:
    f = data.frame("output", units=True)
    rows = f[(f["layer"] == layer) & (f["step"] == step) & f["units_active"].notna()]
    if rows.empty:
        return None
    return int(sum(len(u) for u in rows["units_active"]))


def _exact(layer: str, idx: int | None) -> str:
    if idx is None:
        return (
            f"Exact version: gradsight.explain(model, x, y, loss) on a captured batch derives this layer's terms "
            f"(A, S, dJ/dA, dJ/dZ, dJ/dW of {layer!r}) and checks each against autodiff."
        )
    return (
        f"Exact version: gradsight.explain(model, x, y, loss) on a captured batch gives, for {layer!r} (explain's "
        f"layer {idx}), dJ/dW{idx} = A{idx - 1}ᵀ·dJ/dZ{idx} with dJ/dZ{idx} = dJ/dA{idx} ⊙ S{idx}: compare "
        f"trace['A{idx - 1}'], trace['S{idx}'] and trace['dJ/dA{idx}']."
    )
