"""Rule ``loss-not-decreasing``: the loss at the end of the run is not clearly below the loss at its start.

Reads the ``loss`` scalar (finite values only; a NaN/Inf loss is the non-finite rule's business). The *end* is the
median of the last ``loss_window`` fraction of values (at least 3). The *start* is the median of the first
``loss_window`` fraction, leaving out spikes: values above ``damage_loss_rise`` times the initial loss (the lowest
of the first ``baseline_steps`` values; a spike can only raise a loss) or times the window's median, whichever is
larger (at a noise floor the lowest first value is a lucky batch), that the loss came back down from. So a loss
spike early in the run — a broken run's first overshooting steps — cannot raise the start and make a flat run look
as if it had decreased. Needs ``loss_min_steps`` finite values, otherwise the rule stays silent (too early to tell).
A run whose loss fell and then stayed at its floor has decreased: no finding. A loss counts as *rising* (never
an info) only when its end median is also above 90 % of the start window's values, i.e. outside its noise.

A loss that did not decrease is one of two things, told apart from what else was recorded:

* **never learned** (warning): something blocks training — the other findings usually say what;
* **flat from the start with healthy training signals** (info): gradients finite and non-zero in every layer
  with parameters, every layer's update/weight ratio within ``[update_ratio_low, update_ratio_high]``, no
  NaN/Inf, no dead layer. Then the optimizer is doing its job and the loss sits at the floor this data allows —
  most often chance level: cross-entropy over ``V`` equally likely classes is ``ln V`` (the finding names the
  ``V`` with ``ln V`` closest to the loss when it is within 2 %), as with random labels or tokens. A run that
  records neither gradients nor updates cannot be judged healthy and stays a warning.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._base import LOSS_SCALARS, Rule, RunData, Thresholds, fmt, recent
from ._clip import clipping_too_tight
from ._finding import Finding
from ._layers import unit_dead_fraction
from ._series import layer_update_ratios, loss, loss_window, nonfinite_steps, tensor_grad_norms

__all__ = ["LossNotDecreasingRule"]

#: How close ``ln V`` must be to the loss for the finding to name ``V`` (relative): minibatch noise around a
#: chance-level loss is a few percent for batches of tens of samples.
_CHANCE_TOLERANCE = 0.02


class LossNotDecreasingRule(Rule):
    """The loss did not fall by at least ``loss_min_decrease`` (relative) from start to end.

    A warning, or info when every recorded training signal is healthy (see the module docstring).
    """

    name = "loss-not-decreasing"
    codes = ("loss-not-decreasing",)
    scalars = LOSS_SCALARS

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        name = data.loss_name()
        if name is None:  # pragma: no cover - excluded by missing()
            return []
        values = loss(data)
        n = len(values)
        if n < max(th.loss_min_steps, 6):
            return []
        w = loss_window(n, th)
        k = max(1, min(th.baseline_steps, w))
        first = values.iloc[:w].to_numpy()
        initial = float(first[:k].min())
        # spikes are judged against the start window's median as well: at a noise floor (a fine-tune) the lowest
        # of the first values is a lucky batch, and half of the ordinary batches lie above twice it
        base = max(initial, float(np.median(first)))
        start, spikes = _start_level(first, base, th.damage_loss_rise)
        end = float(np.median(values.iloc[-w:].to_numpy()))
        scale = abs(start) if start != 0 else 1.0
        decrease = (start - end) / scale
        if decrease >= th.loss_min_decrease:
            return []
        healthy = _healthy(data, th)
        # rose by more than the band a flat loss may drift in, and above the start window's own noise: at a floor
        # of 0.05, minibatch losses spread over tens of percent, and a median 10 % up is not a rise
        calm = first[first <= th.damage_loss_rise * base] if base > 0 else first  # without the spikes
        rising = -decrease > th.loss_min_decrease and end > float(np.quantile(calm if calm.size else first, 0.9))
        evidence: dict[str, Any] = {
            "loss_start": start,
            "loss_initial": initial,
            "start_spikes_left_out": spikes,
            "loss_end": end,
            "relative_decrease": decrease,
            "window": w,
            "steps": n,
            "threshold": th.loss_min_decrease,
            "scalar": name,
            "healthy_signals": healthy,
        }
        start_text = f"{fmt(start)} for the first {w}"
        if spikes:
            start_text += (
                f" (leaving out {spikes} spike(s) above {fmt(th.damage_loss_rise)}x the initial loss or the window's "
                "median, whichever is larger)"
            )
        msg = (
            f"The loss did not decrease: the median of the last {w} logged values is {fmt(end)} against "
            f"{start_text} ({'+' if end > start else ''}{fmt(-decrease * 100)} %; at least "
            f"-{fmt(th.loss_min_decrease * 100)} % expected) over {n} steps."
        )
        if healthy.get("healthy") and not rising:
            return [_floor_finding(values, evidence, msg, end)]
        return [
            Finding(
                code="loss-not-decreasing",
                severity="warning",
                layers=(),
                first_step=int(values.index[0]),
                last_step=int(values.index[-1]),
                evidence=evidence,
                message=msg,
                explanation=(
                    "Training makes progress only if the loss goes down. A loss that stays flat means the updates "
                    "do not reach the weights that matter (vanishing gradients, dead units, a learning rate far too "
                    "small, frozen parameters) or that the targets/loss are wrong; a loss that rises means the "
                    "steps overshoot (learning rate too high)."
                ),
                advice=(
                    "Check the other findings first: vanishing gradients, dead or saturated units and update "
                    "ratios explain most flat losses.",
                    "Sweep the learning rate over a few orders of magnitude (e.g. 1e-4 to 1e-1) on a short run.",
                    "Overfit a single small batch first: if even that fails, the model, the loss formulation or "
                    "the labels are wrong (e.g. applying softmax twice, wrong target encoding, a detached tensor).",
                ),
            )
        ]


def _start_level(first: np.ndarray, initial: float, rise: float) -> tuple[float, int]:
    """The median of the start window without its spikes, and how many values were left out.

    A spike is a value above ``rise`` times the initial loss that the loss came back down from within the window;
    a loss that rises and stays up is a rise, not a spike, and counts in full.
    """
    if initial <= 0:
        return float(np.median(first)), 0
    calm = np.flatnonzero(first <= rise * initial)
    last_calm = int(calm[-1]) if calm.size else -1
    spike = np.zeros(first.size, dtype=bool)
    spike[: last_calm + 1] = first[: last_calm + 1] > rise * initial
    kept = first[~spike]
    return float(np.median(kept if kept.size else first)), int(spike.sum())


def _floor_finding(values: Any, evidence: dict[str, Any], msg: str, end: float) -> Finding:
    """The info finding: a flat loss with healthy gradients and updates."""
    classes = round(math.exp(end)) if 0 < end < 30 else 0
    chance = ""
    if classes >= 2 and abs(math.log(classes) - end) <= _CHANCE_TOLERANCE * end:
        chance = (
            f" A loss of {fmt(end)} is ln {classes} = {fmt(math.log(classes))}: the cross-entropy of a uniform guess "
            f"over {classes} classes, i.e. chance level if the task has {classes} classes."
        )
        evidence["chance_classes"] = classes
    return Finding(
        code="loss-not-decreasing",
        severity="info",
        layers=(),
        first_step=int(values.index[0]),
        last_step=int(values.index[-1]),
        evidence=evidence,
        message=msg[:-1] + ", while gradients and updates are healthy in every layer." + chance,
        explanation=(
            "Every recorded training signal is healthy — gradients finite and non-zero, update/weight ratios in "
            "the usual range, no dead layer — so the optimizer is working, and the loss sits at the floor it can "
            "reach on this data from the start. That is expected when the targets carry no learnable signal "
            "(random labels or tokens) or the model already fits what it can; it is a problem only if this loss is "
            "above what the task should allow."
        ),
        advice=(
            "Compare the loss with the task's chance level (ln V for V-class cross-entropy): if it sits there, "
            "check that inputs and targets are paired correctly and carry signal (shuffle bugs, random labels).",
            "If the task should be learnable, overfit one small batch: a model that can is fine, the data is not.",
        ),
    )


def _healthy(data: RunData, th: Thresholds) -> dict[str, Any]:
    """Whether every recorded training signal is healthy, and why not."""
    out: dict[str, Any] = {"healthy": False}
    if nonfinite_steps(data):
        out["reason"] = "NaN/Inf recorded"
        return out
    grads, _ = tensor_grad_norms(data)
    if grads.empty or not grads.shape[1]:
        out["reason"] = "no per-tensor gradient norms recorded"
        return out
    never = [str(t) for t in grads.columns if not (grads[t].fillna(0) > 0).any()]
    if never:
        out["reason"] = f"tensors without a non-zero gradient: {never[:8]}"
        return out
    tight = clipping_too_tight(data, th)
    if tight is not None:
        out["reason"] = f"gradients clipped at {tight['share']:.0%} of the steps, {tight['factor']:.3g}x on median"
        return out
    ratios, _ = layer_update_ratios(data)
    if ratios.empty or not ratios.shape[1]:
        out["reason"] = "no update ratios recorded"
        return out
    med = ratios.median()
    off = {str(k): float(v) for k, v in med.items() if not th.update_ratio_low <= v <= th.update_ratio_high}
    if off:
        out["reason"] = f"update ratios out of range: {off}"
        return out
    if "output" in data.kinds:
        steps = recent(data.frame("output")["step"].unique(), th)
        for layer in {t.layer for t in data.tensors if t.kind == "output"}:
            dead = unit_dead_fraction(data, layer, steps)
            if dead is not None and dead[0] >= th.dead_fraction:
                out["reason"] = f"layer {layer!r} has {dead[0]:.0%} dead units"
                return out
    out["healthy"] = True
    out["median_update_ratio"] = {str(k): float(v) for k, v in med.items()}
    return out
