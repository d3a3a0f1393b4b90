"""Rule ``learning-rate-too-high``: a step so large that it damaged the network, named with its step.

An optimizer step is *too large* when it moves the parameters by at least ``lr_step_ratio`` of their norm: the
update/weight ratio ``‖ΔW‖ / ‖W‖`` pooled over **all** parameters (so a zero-initialised layer, whose own ratio
is huge and harmless, cannot trigger it), per step from ``update_norm/<t>`` and ``weight_norm/<t>`` where
recorded, else at the logged steps from the update and weight summaries. A large step alone is not a finding
(Adam's first steps can be large, and a run may cope); it is one when *damage* follows within ``damage_steps``
steps (:func:`gradsight.diagnose._series.damage`): the weights blow up (their norm doubles), the loss rises
(doubles), the gradient norm jumps an order of magnitude above its running median, or a NaN/Inf appears.

A step also counts as too large when the *median over layers* of each layer's own ratio reaches
``lr_step_ratio``: the pooled ratio is dominated by the layers with the largest norms (a transformer's embeddings
and LayerNorm gains), and a step that moves most layers by more than their own norm can pool to below it.

Without update norms the rule falls back on the weights alone: a step after which the norm of all weights at
least doubles within ``damage_steps`` steps, when another consequence (loss, gradient, NaN) confirms it.

The finding names the first such step, the update ratio there and per layer, what followed, and the learning
rate of that step when recorded; its advice lowers the learning rate by the factor that brings that update
ratio to ~1e-2 (a first guess, the nearest power of ten, at least 10), adds a warm-up, and clips gradients.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ._advice import lower_lr
from ._base import Rule, RunData, Thresholds, fmt, ordered
from ._finding import Finding
from ._inputs import input_advice, input_scale
from ._series import (
    anomalies_near,
    damage,
    global_update_ratio,
    global_weight_norm,
    gradient_spikes,
    layer_update_ratios,
    loss,
    lr,
    nonfinite_steps,
    weight_damage_text,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["LearningRateTooHighRule"]

#: The update/weight ratio a lowered learning rate should bring the damaging step to: the upper end of the
#: ~1e-3 heuristic's decade (for the advice only).
_TARGET_RATIO = 1e-2


class LearningRateTooHighRule(Rule):
    """A step that moved the weights by ``lr_step_ratio`` of their norm and damaged training.

    A warning; an error when a NaN/Inf followed. See the module docstring. Needs update and weight norms (per step
    or summaries), or weight norms with another consequence to confirm.
    """

    name = "learning-rate-too-high"
    codes = ("learning-rate-too-high",)

    def missing(self, data: RunData) -> list[str]:
        """Needs weight norms: ``weight_norm/<t>`` per step or ``weight`` summaries."""
        if "weight" in data.kinds or any(str(c).startswith("weight_norm/") for c in data.scalars.columns):
            return []
        return ["'weight' summaries or per-step 'weight_norm/<tensor>' signals"]

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        ratio, source = global_update_ratio(data)
        typical = _typical_layer_ratio(data)
        large = set(ratio.index[ratio >= th.lr_step_ratio]) | set(typical.index[typical >= th.lr_step_ratio])
        hit = None
        spikes = gradient_spikes(data, th)
        for step in sorted(large):
            if int(step) in spikes:  # the gradient, not the learning rate, made this step large
                continue
            harm = damage(data, int(step), **th.damage_args())
            if harm:
                hit = (int(step), float(ratio.get(step, math.nan)), harm)
                break
        if hit is None and ratio.empty:
            hit = _weights_only(data, th)
            source = "weight norms only (no update norms recorded)"
        rise = None
        if hit is None:
            found = _scheduled_rise(data, th)
            if found is None:
                return []
            step, harm, rise = found
            hit = (step, float(ratio.get(step, math.nan)), harm)
        step, value, harm = hit
        return [_finding(data, step, value, harm, source, th, rise)]


#: A learning rate this many times its lowest earlier value counts as raised by a schedule (a warm-up, a cycle).
_RATE_RISE = 10.0
#: ... and as new ground when it is this many times every rate taken until ``reference_steps`` steps before.
_RATE_NEW = 1.2


def _scheduled_rise(data: RunData, th: Thresholds) -> tuple[int, dict[str, Any], tuple[float, float]] | None:
    """The first step at which a schedule had raised the learning rate into new ground and the loss rose.

    Raised: ``_RATE_RISE`` times its lowest earlier value; new ground: ``_RATE_NEW`` times every rate the run took
    until ``reference_steps`` steps before (a run that trained fine at its peak rate for a while, after a warm-up,
    did not break because of that rate). A damage window with a gradient spike at an unchanged rate
    (:func:`gradsight.diagnose._series.gradient_spikes`) is the spike's.

    ``(step, damage, (lowest earlier rate, rate))``, or ``None``. A one-cycle or warm-up schedule that peaks too
    high breaks a run at the rate it reaches, with steps that can each stay below ``lr_step_ratio`` (Adam moves
    each weight by about the rate). The loss must have risen as :func:`gradsight.diagnose._series.damage` says
    (``damage_loss_rise`` over ``damage_steps``, above ``damage_loss_floor`` of the initial loss); a gradient jump
    alone is not enough (a healthy warm-up's gradients move too).
    """
    rates = lr(data)
    rates = rates[np.isfinite(rates.to_numpy()) & (rates.to_numpy() > 0)]
    if len(rates) < 2:
        return None
    low = rates.cummin()
    # the rate is new ground: above every rate the run took until reference_steps earlier (a warm-up that ended
    # long before, at the rate the run then trained at fine, is not a rise into the damage)
    tried = rates.cummax().shift(int(th.reference_steps))
    new = (rates > _RATE_NEW * tried) | tried.isna()
    risen = rates.index[((rates >= _RATE_RISE * low) & new).to_numpy()]
    if not len(risen):
        return None
    spikes = gradient_spikes(data, th)
    values = loss(data)
    w = int(th.damage_steps)
    before_med = values.rolling(w, min_periods=1).median()
    after_med = values[::-1].rolling(w, min_periods=1).median()[::-1].shift(-1)
    initial = float(values.iloc[: max(1, int(th.baseline_steps))].min()) if len(values) else math.nan
    ok = (after_med >= th.damage_loss_rise * before_med) & (after_med >= th.damage_loss_floor * initial)
    broke = set(values.index[ok.fillna(False).to_numpy()]) | set(nonfinite_steps(data))
    for step in risen:
        if int(step) not in broke or any(int(step) <= g <= int(step) + th.damage_steps for g in spikes):
            continue  # no damage here, or a gradient spike at an unchanged rate made it
        harm = damage(data, int(step), **th.damage_args())
        if "loss" in harm or "non_finite" in harm:
            return int(step), harm, (float(low.loc[step]), float(rates.loc[step]))
    return None


def _typical_layer_ratio(data: RunData) -> pd.Series:
    """Per step, the median over layers of each layer's update/weight ratio (finite ones; steps with two or more).

    The pooled ratio is dominated by the layers with the largest weight norms: in a transformer, the embeddings
    and the LayerNorm gains (all ones) hold most of it, and a step that moves every other layer by more than its
    own norm still pools to below the threshold. The median over layers is the typical layer's step; one
    zero-initialised layer, whose own ratio is huge and harmless, cannot move it.
    """
    import pandas as pd

    table, _ = layer_update_ratios(data)
    if table.empty or table.shape[1] < 2:
        return pd.Series(dtype="float64")
    finite = table.where(np.isfinite(table.to_numpy(dtype="float64")))
    counted = finite.notna().sum(axis=1)
    return finite.median(axis=1, skipna=True)[counted >= 2]


def _weights_only(data: RunData, th: Thresholds) -> tuple[int, float, dict[str, Any]] | None:
    """Without update norms: the first step after which the weights doubled, confirmed by another consequence."""
    w, _ = global_weight_norm(data)
    w = w[np.isfinite(w.to_numpy()) & (w.to_numpy() > 0)]
    for step in w.index[:-1]:
        harm = damage(data, int(step), **th.damage_args())
        if "weights" in harm and len(harm) > 1:
            return int(step), math.nan, harm
    return None


def _consequences(harm: dict[str, Any]) -> str:
    parts = []
    if "weights" in harm:
        parts.append(weight_damage_text(harm["weights"]))
    if "loss" in harm:
        lo = harm["loss"]
        parts.append(f"the loss rose {fmt(lo['rise'])}x (median {fmt(lo['before'])} to {fmt(lo['after'])})")
    if "gradient" in harm:
        g = harm["gradient"]
        parts.append(
            f"the gradient norm jumped to {fmt(g['norm'])} at step {g['step']} ({fmt(g['jump'])}x its running median)"
        )
    if "non_finite" in harm:
        parts.append(f"NaN/Inf appeared at step {harm['non_finite']['step']}")
    return "; ".join(parts)


def _finding(
    data: RunData,
    step: int,
    value: float,
    harm: dict[str, Any],
    source: str,
    th: Thresholds,
    rise: tuple[float, float] | None = None,
) -> Finding:
    per_layer: dict[str, float] = {}
    table, _ = layer_update_ratios(data)
    if step in table.index:
        row = table.loc[step]
        per_layer = {str(k): float(v) for k, v in row.items() if np.isfinite(v)}
    big = {k: v for k, v in per_layer.items() if v >= th.lr_step_ratio}
    layers = ordered(big, data) if big else ()
    rates = lr(data)
    rate = float(rates.loc[step]) if step in rates.index else None
    top = sorted(per_layer.items(), key=lambda kv: -kv[1])[:4]
    detail = ", ".join(f"{name!r} {fmt(v)}" for name, v in top)
    typical = float(_typical_layer_ratio(data).get(step, math.nan))
    what = _what(step, value, per_layer, big, detail, typical, th)
    lr_text = f" The learning rate at step {step} was {fmt(rate)}." if rate is not None else ""
    if rise is not None:
        what = (
            f"the schedule had raised the learning rate to {fmt(rise[1])} by step {step}, {fmt(rise[1] / rise[0])}x "
            f"its lowest earlier value {fmt(rise[0])}"
        )
        lr_text = ""
    msg = f"The learning rate is too high: {what}, and within {th.damage_steps} steps {_consequences(harm)}.{lr_text}"
    scale = input_scale(data, th)
    advice = _advice(step, value, typical, rate, rise, scale, th)
    return Finding(
        code="learning-rate-too-high",
        severity="error" if "non_finite" in harm else "warning",
        layers=tuple(layers),
        first_step=step,
        last_step=max([step] + [int(v["step"]) for v in harm.values() if isinstance(v, dict) and "step" in v]),
        evidence={
            "step": step,
            "update_ratio": value,
            "layer_update_ratios": per_layer,
            "median_layer_ratio": typical,
            "input_scale": scale,
            "threshold_step_ratio": th.lr_step_ratio,
            "damage": harm,
            "damage_steps": th.damage_steps,
            "lr": rate,
            "lr_rise": {"from": rise[0], "to": rise[1]} if rise is not None else None,
            "source": source,
            "anomaly_events": anomalies_near(data, step, step + th.damage_steps),
        },
        message=msg,
        explanation=(
            "A step of size learning rate x gradient that is as large as the weights themselves does not follow "
            "the loss surface, it jumps across it: the loss rises, weights blow up, ReLU units are pushed to where "
            "they never fire again, and gradients grow with the weights until they overflow. Everything that "
            "goes wrong afterwards (dead units, frozen layers, a flat loss, NaN) follows from this step."
        ),
        advice=tuple(advice),
    )


def _advice(
    step: int,
    value: float,
    typical: float,
    rate: float | None,
    rise: tuple[float, float] | None,
    scale: dict[str, Any] | None,
    th: Thresholds,
) -> list[str]:
    """The finding's advice: the learning rate (or the schedule's peak) to try first, then what else helps."""
    by_layers = (math.isnan(value) or value < th.lr_step_ratio) and not math.isnan(typical)
    advice = [_lower_advice(typical if by_layers else value, rate, step, "a typical layer's" if by_layers else None)]
    if rise is not None:
        advice = [
            lower_lr(
                f" peak of the schedule (max_lr, the warm-up's target) by about 10x, to {fmt(rise[1] / 10)} or less: "
                f"the run broke at step {step}, when the schedule had raised the rate to {fmt(rise[1])}."
            )
        ]
    if step <= 10 * th.damage_steps:
        advice.append(
            "Add a learning-rate warm-up (start 10-100x lower and ramp up over the first few hundred steps): "
            "the first steps, taken before the weights and optimizer statistics settle, are the largest."
        )
    advice.append(
        "Clip gradients (torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) / clipnorm=1.0 on a Keras "
        "optimizer) so that one large gradient cannot make a huge step."
    )
    if step <= th.damage_steps:
        advice.append(
            "If the loss sums over the batch (reduction='sum', or a sum over tokens) or gradients are accumulated "
            "without dividing the loss, every gradient is that many times larger: take the mean instead."
        )
    if scale is not None:
        advice.insert(0, input_advice(scale))
    return advice


def _what(
    step: int,
    value: float,
    per_layer: dict[str, float],
    big: dict[str, float],
    detail: str,
    typical: float,
    th: Thresholds,
) -> str:
    """What the step did: the weights blew up, the typical layer moved by its norm, or all of them together did."""
    if math.isnan(value) and not big:
        what = f"after step {step} the weights blew up"
    elif math.isnan(value) or value < th.lr_step_ratio:
        what = (
            f"the update of step {step} moved {len(big)} of {len(per_layer)} layers by at least "
            f"{fmt(th.lr_step_ratio)} of their own norm (median over layers {fmt(typical)}; per layer: {detail}"
            + (
                ""
                if math.isnan(value)
                else f"; all parameters together {fmt(value)}, held down by the layers with the largest norms"
            )
            + "; heuristic ~1e-3)"
        )
    else:
        what = (
            f"the update of step {step} moved the weights by {fmt(value)} of their norm (all parameters together"
            + (f"; per layer: {detail}" if detail else "")
            + f"; threshold {fmt(th.lr_step_ratio)}, heuristic ~1e-3)"
        )
    return what


def _lower_advice(value: float, rate: float | None, step: int, whose: str | None = None) -> str:
    if math.isnan(value) or value <= 0:
        return lower_lr(" (try 10x lower), and check what made the weights grow at that step.")
    factor = 10 ** max(1, round(math.log10(value / _TARGET_RATIO)))  # the nearest power of ten, at least 10
    target = f" (from {fmt(rate)} to {fmt(rate / factor)} or less)" if rate else ""
    whose = whose or "the weights'"
    return lower_lr(
        f" by about {factor:g}x{target}: the update at step {step} was {fmt(value)} of {whose} norm, and "
        f"~{_TARGET_RATIO:g} or less per step is safe (a first guess; sweep around it)."
    )
