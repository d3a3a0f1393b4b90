"""Rules ``exploding-gradients`` and ``vanishing-gradients``, from the parameter-gradient summaries.

A layer's gradient size is the pooled RMS of all its parameter gradients (weights and biases together) at a
logged step, over finite elements only; steps at which a layer's gradient holds a NaN/Inf are left out (that is
the non-finite rule's business). Two views:

* over **time** (exploding): each layer's RMS, and the global gradient norm (the ``grad_norm`` scalar, every
  step, when recorded, else the norm over all recorded gradients), each value against the lowest running median
  of the values before it (:func:`growth_event`). Growth beyond ``explode_growth`` is an explosion when it did
  harm (weights blew up, the loss rose, NaN/Inf followed; see :func:`_verdict`): a gradient that only grows from
  a tiny start to its working level (an LSTM at initialisation) is not one, and isolated spikes that training
  recovers from are reported as info.
* over **depth** (vanishing, and exploding through depth): each layer's median RMS over the run against the
  largest median RMS among the layers after it in model order. Backpropagation multiplies the gradient by each
  layer's local Jacobian on the way back, so a stack of contracting (expanding) Jacobians shows as early layers
  with gradients orders of magnitude below (above) the late ones.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .._derived import layer_rms
from ._advice import lower_lr
from ._base import Rule, RunData, Thresholds, fmt, ordered
from ._finding import Finding
from ._series import (
    anomalies_near,
    damage,
    global_weight_norm,
    grad_norm,
    loss,
    loss_rise_after,
    running_reference,
    spike_jumps,
    weight_damage_text,
)
from ._why import why_small

if TYPE_CHECKING:  # pragma: no cover - pandas is imported where it is used, not at import
    import pandas as pd

__all__ = ["ExplodingGradientsRule", "VanishingGradientsRule", "depth_profile", "growth_event"]


def _finite_layer_rms(data: RunData) -> pd.DataFrame:
    g = layer_rms(data.frame("grad"))
    return g[(g["nonfinite"] == 0) & (g["finite"] > 0)]


def depth_profile(data: RunData) -> pd.DataFrame:
    """Per layer (model order): median gradient RMS over logged steps and its ratio to the largest downstream one.

    Returns:
        Columns ``layer``, ``rms`` (median), ``steps``, ``downstream`` (largest median RMS after it, NaN for the
        last layer), ``downstream_layer`` and ``ratio = rms / downstream``.
    """
    if "depth_profile" in data.cache:
        return data.cache["depth_profile"]
    import pandas as pd

    g = _finite_layer_rms(data)
    med = g.groupby("layer")["rms"].agg(["median", "size"])
    layers = ordered(med.index, data)
    rows = []
    for i, layer in enumerate(layers):
        after = [(med.loc[m, "median"], m) for m in layers[i + 1 :] if np.isfinite(med.loc[m, "median"])]
        best = max(after) if after else (np.nan, None)
        rms = float(med.loc[layer, "median"])
        ratio = rms / best[0] if after and best[0] > 0 else np.nan
        rows.append(
            {
                "layer": layer,
                "rms": rms,
                "steps": int(med.loc[layer, "size"]),
                "downstream": float(best[0]),
                "downstream_layer": best[1],
                "ratio": ratio,
            }
        )
    out = pd.DataFrame(rows, columns=["layer", "rms", "steps", "downstream", "downstream_layer", "ratio"])
    data.cache["depth_profile"] = out
    return out


def growth_event(series: pd.Series, th: Thresholds) -> dict[str, Any] | None:
    """The first jump of a norm series to ``explode_growth`` times its earlier level, or ``None``.

    Each value is compared with the *lowest* running median the series had before it (the median of the up to
    ``reference_steps`` values preceding each earlier step): only the past is used, so an early spike cannot hide
    in a baseline, and a level the series once settled at stays the reference. Whether the growth mattered is
    judged separately (:func:`_verdict`).

    Returns:
        ``{"first_step", "reference", "value", "jump", "peak_step", "peak", "growth", "hits"}`` (``hits``: every
        step at which the series stood ``explode_growth`` times above its level).
    """
    s = series[np.isfinite(series.to_numpy())]
    s = s[s > 0]
    if len(s) < 2:
        return None
    level = running_reference(s, th.reference_steps).cummin()
    jump = s / level
    hits = jump[jump >= th.explode_growth]
    if hits.empty:
        return None
    first = int(hits.index[0])
    rest = s[s.index >= first]
    peak_step = int(rest.idxmax())
    ref = float(level.loc[first])
    return {
        "first_step": first,
        "reference": ref,
        "value": float(s.loc[first]),
        "jump": float(jump.loc[first]),
        "peak_step": peak_step,
        "peak": float(rest.max()),
        "growth": float(rest.max()) / ref,
        "hits": [int(i) for i in hits.index],
    }


def _verdict(data: RunData, series: pd.Series, event: dict[str, Any], th: Thresholds) -> tuple[str, dict[str, Any]]:
    """Whether a growth event harmed training: ``(verdict, damage)``.

    ``"damage"``: after one of its jumps the weights blew up, the loss rose or a NaN/Inf followed
    (:func:`gradsight.diagnose._series.damage`; a further gradient jump is part of the event, not damage), or
    the loss's median over the ``reference_steps`` steps after the first jump is ``damage_loss_rise`` times its
    median over the ``reference_steps`` before (Adam's momentum spreads a spike's damage over ~20 steps);
    ``"unknown"``: neither a loss nor weights were recorded to tell; ``"unfinished"``: the run (its last recorded
    step of any kind, not the series' last logged step) ended within ``damage_steps`` of the first jump;
    ``"transient"``: no damage and the series fell back to within ``sqrt(explode_growth)`` of its level (a spike
    training recovered from); ``"sustained"``: no damage and it stayed up — a small initial gradient reaching its
    working level, not an explosion.
    """
    for step in event["hits"][:64]:
        found = damage(data, step, **th.damage_args())
        found.pop("gradient", None)
        if found:
            return "damage", {"step": step, **found}
    first = event["first_step"]
    late = loss_rise_after(  # damage that takes longer than damage_steps to show (Adam's momentum after a spike)
        data,
        first,
        th.reference_steps,
        th.reference_steps,
        rise=th.damage_loss_rise,
        floor=th.damage_loss_floor,
        baseline=th.baseline_steps,
    )
    if late is not None:
        return "damage", {"step": first, "loss": late}
    if not len(loss(data)) and not len(global_weight_norm(data)[0]):
        return "unknown", {}
    s = series[np.isfinite(series.to_numpy())]
    later = s[s.index > event["first_step"]]
    end = int(s.index[-1])  # the run's end: a layer's series stops at its last full summary, the run goes on
    if len(data.scalars.index):
        end = max(end, int(data.scalars.index.max()))
    if end - event["first_step"] < th.damage_steps:
        return "unfinished", {}
    settled = float(np.median(later.iloc[: th.reference_steps].to_numpy())) if len(later) else event["value"]
    if settled >= math.sqrt(th.explode_growth) * event["reference"]:
        return "sustained", {}
    return "transient", {}


#: Verdicts that make an exploding-gradients warning.
_HARMFUL = ("damage", "unknown", "unfinished")


class ExplodingGradientsRule(Rule):
    """Gradients that grow over time (or through depth) by orders of magnitude (``exploding-gradients``).

    Over time: the global gradient norm (``grad_norm`` per step, else the grad summaries) or a layer's gradient
    RMS jumps to ``explode_growth`` times its earlier level (:func:`growth_event`: each step against the
    running medians before it). A warning when the growth harmed training — weights blew up, the loss rose, a
    NaN/Inf followed (``damage_*``), or nothing was recorded to tell — and an error when it reached the square
    of the threshold; info when training recovered from isolated spikes; nothing when the gradient merely grew
    from a small start to a level it kept without harm. Over depth: a layer's median gradient RMS exceeds
    ``explode_depth_ratio`` times the largest one after it (warning). Needs ``grad`` summaries or a
    ``grad_norm`` scalar.
    """

    name = "exploding-gradients"
    codes = ("exploding-gradients",)

    def missing(self, data: RunData) -> list[str]:
        """Needs ``grad`` summaries or a ``grad_norm`` scalar."""
        if "grad" in data.kinds or "grad_norm" in data.scalars.columns:
            return []
        return ["'grad' summaries or a 'grad_norm' scalar"]

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the class docstring."""
        norm, source = grad_norm(data)
        glob = growth_event(norm, th)
        judged: dict[str, tuple[dict[str, Any], str, dict[str, Any]]] = {}
        if glob is not None:
            glob["source"] = source
            verdict, harm = _verdict(data, norm, glob, th)
            judged["global"] = (glob, verdict, harm)
        if "grad" in data.kinds:
            for layer, sub in _finite_layer_rms(data).groupby("layer"):
                series = sub.set_index("step")["rms"].sort_index()
                ev = growth_event(series, th)
                if ev is not None:
                    judged[str(layer)] = (ev, *_verdict(data, series, ev, th))
        depth: list[dict[str, Any]] = []
        if "grad" in data.kinds:
            prof = depth_profile(data)
            depth = prof[prof["ratio"] > th.explode_depth_ratio].to_dict("records")
        harmful = {k: v for k, v in judged.items() if v[1] in _HARMFUL}
        spikes = {k: v for k, v in judged.items() if v[1] == "transient"}
        if harmful or depth:
            return [_explode_finding(data, harmful, depth, th)]
        if spikes:
            return [_spike_finding(data, spikes, th)]
        return []


_EXPLODE_EXPLANATION = (
    "Each update moves the weights by the learning rate times the gradient; when gradients grow by "
    "orders of magnitude the steps overshoot, the loss rises instead of falling, the weights grow, "
    "which makes the gradients grow further — a feedback loop that ends in overflow (Inf, then NaN)."
)
_EXPLODE_ADVICE = (
    lower_lr(" (try 10x lower) and add a warm-up."),
    "Clip gradients: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), or clipnorm=1.0 on a Keras optimizer.",
    "Add normalisation (BatchNorm/LayerNorm) and use a variance-preserving initialisation "
    "(He for ReLU, Glorot for tanh) so that the backward Jacobians do not expand.",
    "Check the loss scale: a sum over a large batch instead of a mean multiplies every gradient.",
)


def _spike_advice(step: int) -> tuple[str, ...]:
    """The advice for an explosion that began with one step's gradient, at a learning rate fine until then."""
    return (
        "Clip gradients (torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), or clipnorm=1.0 on a Keras "
        "optimizer) so that one batch cannot make a huge step; the learning rate was fine for the steps before.",
        f"Look at the batch and the loss of step {step} (the watch's anomaly capture summarised that step): an "
        "outlier or mislabelled sample, or a loss term that can blow up (a log or a division of a value near 0).",
        "With Adam, a larger eps (1e-6 to 1e-4) damps the step that follows a tiny second-moment estimate.",
    )


def _describe_harm(verdict: str, harm: dict[str, Any]) -> str:
    if verdict == "unknown":
        return "no loss or weights were recorded to tell whether it harmed training"
    if verdict == "unfinished":
        return "the run ended while it lasted"
    parts = []
    if "weights" in harm:
        parts.append(weight_damage_text(harm["weights"]))
    if "loss" in harm:
        lo = harm["loss"]
        parts.append(f"the loss rose {fmt(lo['rise'])}x ({fmt(lo['before'])} to {fmt(lo['after'])})")
    if "non_finite" in harm:
        parts.append(f"NaN/Inf followed at step {harm['non_finite']['step']}")
    return "after it " + " and ".join(parts)


def _explode_evidence(
    harmful: dict[str, tuple[dict[str, Any], str, dict[str, Any]]],
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """The per-layer and global evidence of harmful growth events."""
    per_layer = {
        k: {
            "baseline_rms": ev["reference"],
            "peak_rms": ev["peak"],
            "peak_step": ev["peak_step"],
            "growth": ev["growth"],
            "first_step": ev["first_step"],
            "verdict": verdict,
            "damage": harm,
        }
        for k, (ev, verdict, harm) in harmful.items()
        if k != "global"
    }
    glob = None
    if "global" in harmful:
        ev, verdict, harm = harmful["global"]
        glob = {
            "baseline_norm": ev["reference"],
            "peak_norm": ev["peak"],
            "peak_step": ev["peak_step"],
            "growth": ev["growth"],
            "first_step": ev["first_step"],
            "source": ev["source"],
            "verdict": verdict,
            "damage": harm,
        }
    return per_layer, glob


def _explode_finding(
    data: RunData,
    harmful: dict[str, tuple[dict[str, Any], str, dict[str, Any]]],
    depth: list[dict[str, Any]],
    th: Thresholds,
) -> Finding:
    """The warning (or error) finding for harmful growth over time and/or growth through depth."""
    limit = th.explode_growth
    layers = ordered([k for k in harmful if k != "global"] + [d["layer"] for d in depth], data)
    per_layer, glob = _explode_evidence(harmful)
    if harmful:
        key = "global" if "global" in harmful else max(per_layer, key=lambda n: per_layer[n]["growth"])
        ev, verdict, harm = harmful[key]
        what = "the global gradient norm" if key == "global" else f"the gradient RMS of layer {key!r}"
        msg = (
            f"Gradients exploded: {what} grew {fmt(ev['growth'])}x, from {fmt(ev['reference'])} (the lowest of its "
            f"running medians before step {ev['first_step']}) to {fmt(ev['peak'])} at step {ev['peak_step']} "
            f"(threshold {fmt(limit)}x), and {_describe_harm(verdict, harm)}"
        )
        if per_layer:
            msg += f"; {len(per_layer)} layer(s) above the threshold"
        msg += "."
        growth = max(v[0]["growth"] for v in harmful.values())
        first = min(v[0]["first_step"] for v in harmful.values())
        last = max(max(v[0]["hits"]) for v in harmful.values())
        severity = "error" if growth >= limit**2 else "warning"
    else:
        worst = max(depth, key=lambda d: d["ratio"])
        msg = (
            f"Gradients grow through depth: layer {worst['layer']!r} has a median gradient RMS of "
            f"{fmt(worst['rms'])}, {fmt(worst['ratio'])}x that of the largest later layer "
            f"({worst['downstream_layer']!r}, {fmt(worst['downstream'])}; "
            f"threshold {fmt(th.explode_depth_ratio)}x)."
        )
        steps = sorted(data.frame("grad")["step"].unique())
        first, last = (int(steps[0]), int(steps[-1])) if steps else (None, None)
        severity = "warning"
    advice = _EXPLODE_ADVICE
    sudden = spike_jumps(data, th).get(first) if harmful else None
    if sudden is not None:  # one step's gradient, at a learning rate that was fine until then
        msg += (
            f" It began with a single step: the gradient norm at step {first} was {fmt(sudden)}x its running "
            "median, at an unchanged learning rate."
        )
        advice = _spike_advice(first)
    return Finding(
        code="exploding-gradients",
        severity=severity,  # type: ignore[arg-type]
        layers=tuple(layers),
        first_step=first,
        last_step=last,
        evidence={
            "threshold_growth": limit,
            "threshold_depth_ratio": th.explode_depth_ratio,
            "reference_steps": th.reference_steps,
            "layers": per_layer,
            "global": glob,
            "depth": depth,
            "anomaly_events": anomalies_near(data, first, last) if first is not None and last is not None else [],
        },
        message=msg,
        explanation=_EXPLODE_EXPLANATION,
        advice=advice,
    )


def _spike_finding(
    data: RunData, spikes: dict[str, tuple[dict[str, Any], str, dict[str, Any]]], th: Thresholds
) -> Finding:
    """The info finding for isolated gradient spikes that training recovered from."""
    key = "global" if "global" in spikes else max(spikes, key=lambda n: spikes[n][0]["growth"])
    ev = spikes[key][0]
    hits = sorted({h for v in spikes.values() for h in v[0]["hits"]})
    what = "the global gradient norm" if key == "global" else f"the gradient RMS of layer {key!r}"
    return Finding(
        code="exploding-gradients",
        severity="info",
        layers=tuple(ordered([k for k in spikes if k != "global"], data)),
        first_step=hits[0],
        last_step=hits[-1],
        evidence={
            "threshold_growth": th.explode_growth,
            "reference_steps": th.reference_steps,
            "spike_steps": hits[:64],
            "series": {k: {kk: vv for kk, vv in v[0].items() if kk != "hits"} for k, v in spikes.items()},
        },
        message=(
            f"Gradient spikes: {what} jumped to {fmt(ev['peak'])} at step {ev['peak_step']}, {fmt(ev['growth'])}x "
            f"the lowest of its running medians before it ({fmt(ev['reference'])}), at {len(hits)} step(s); "
            f"training recovered (no weight blow-up, loss rise or NaN/Inf within {th.damage_steps} steps after)."
        ),
        explanation=(
            "Isolated steps with a gradient orders of magnitude above the usual level, typical of recurrent "
            "networks crossing a steep region of the loss (a 'cliff'). Here they did no lasting harm; if they "
            "recur or grow, one of them can throw the weights far off."
        ),
        advice=(
            "Nothing to change while they stay harmless; clipping (clip_grad_norm_(params, 1.0) / clipnorm=1.0) "
            "caps them cheaply if they do not.",
        ),
    )


def _input_side(prof: pd.DataFrame, ratio: float) -> list[int]:
    """Rows of the depth profile that form the input side of the network with vanishing gradients.

    The layers from the first one on, in model order, whose gradient RMS is below ``ratio`` times the largest
    after them, up to the first that is not (layers with an exactly zero gradient are passed over: they are the
    dead-units and no-gradient rules' business). Gradients vanish *towards the input* only if the input side is
    small: a small layer after a healthy one — a LayerNorm on a weakly coupled residual branch of a transformer
    whose embeddings, before it, get the residual stream's full gradient — is not vanishing.
    """
    rows = []
    for i, rec in enumerate(prof.itertuples()):
        if not rec.rms > 0:
            continue
        if not rec.ratio < ratio:
            break
        rows.append(i)
    return rows


#: Layer types that look rows up by id (torch, Keras); a dense "PatchEmbedding" reads every weight at every step.
_TABLES = frozenset({"Embedding", "EmbeddingBag"})


def _lookup_table(data: RunData, layer: str) -> bool:
    """Whether ``layer`` is an embedding table, whose gradient RMS says nothing about vanishing.

    A batch's gradient reaches only the rows of the ids it holds, so the RMS over the table is diluted by its
    vocabulary, whatever reaches each used row (a BERT's 30k-row table is not vanishing).
    """
    return str(data.layer_info(layer).get("type", "")) in _TABLES


class VanishingGradientsRule(Rule):
    """Early layers whose gradients are orders of magnitude below the later layers' (``vanishing-gradients``).

    A layer is flagged when its median gradient RMS is below ``vanish_ratio`` times the largest median gradient RMS
    among the layers after it, and every layer with a gradient before it is flagged too (the input side of the
    network, see :func:`_input_side`). Each flagged layer's evidence says which factor of its gradient is small
    (:func:`gradsight.diagnose._why.why_small`). Layers with an exactly zero gradient are skipped (no gradient at
    all is a dead-units / frozen-layer matter). Severity warning. Needs ``grad`` summaries of at least two layers.
    """

    name = "vanishing-gradients"
    codes = ("vanishing-gradients",)
    kinds = ("grad",)

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the class docstring."""
        prof = depth_profile(data)
        hit = prof.iloc[_input_side(prof, th.vanish_ratio)]
        hit = hit[[not _lookup_table(data, str(n)) for n in hit["layer"]]]
        if hit.empty:
            return []
        worst = hit.loc[hit["ratio"].idxmin()]
        steps = sorted(data.frame("grad")["step"].unique())
        layers = tuple(hit["layer"])
        msg = (
            f"Gradients vanish towards the input: layer {worst['layer']!r} has a median gradient RMS of "
            f"{fmt(worst['rms'])}, {fmt(worst['ratio'])}x that of the largest later layer "
            f"({worst['downstream_layer']!r}, {fmt(worst['downstream'])}) over {int(worst['steps'])} logged steps; "
            f"{len(layers)} layer(s) below the threshold {fmt(th.vanish_ratio)}x."
        )
        why = {layer: why_small(data, layer, th) for layer in layers}
        reason = why[str(worst["layer"])]
        if reason["verdict"] not in ("unknown",):
            msg += " " + reason["sentence"]
        return [
            Finding(
                code="vanishing-gradients",
                severity="warning",
                layers=layers,
                first_step=int(steps[0]),
                last_step=int(steps[-1]),
                evidence={"threshold_ratio": th.vanish_ratio, "layers": hit.to_dict("records"), "why": why},
                message=msg,
                explanation=(
                    "Backpropagation multiplies the gradient by every layer's local derivative on its way to the "
                    "input. Saturating activations pass at most a fraction of it per layer (sigmoid at most 1/4), "
                    "so through many layers the early layers receive a gradient that is orders of magnitude "
                    "smaller: their weights barely move and the network cannot learn features there. "
                    + reason["sentence"]
                    + " "
                    + reason["exact"]
                ),
                advice=(
                    "Use non-saturating activations (ReLU, GELU, SiLU) in hidden layers instead of sigmoid/tanh.",
                    "Use a variance-preserving initialisation: He (kaiming_normal_) for ReLU, Glorot for tanh.",
                    "Add normalisation (BatchNorm/LayerNorm) or residual connections so gradients have a short path.",
                    "Make the network shallower, or use an optimizer with per-parameter scaling (Adam).",
                ),
            )
        ]
