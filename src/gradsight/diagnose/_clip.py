"""Rule ``gradients-clipped``: gradient clipping was active, and whether it hid an explosion.

Reads the per-step ``grad_norm_preclip`` (the global gradient norm as backward left it) next to ``grad_norm``
(what the optimizer received), ``clip_ratio`` (their ratio, recorded at the steps where they differ) and the run
metadata ``clipping: {"first_step": s}``. A step is *clipped* when ``clip_ratio`` was recorded below 1 there, or
the pre-clip norm exceeds the post-clip one by more than a relative 1e-6 (float32 rounding of the same norm).

* **info**: clipping was active — at how many steps, since when, the pre-clip norm's median and maximum against the
  post-clip one.
* **warning**: clipping hides an explosion — the *running median* of the pre-clip norm (over
  ``reference_steps`` steps) rose to ``explode_growth`` times its lowest earlier value while the running median of
  the post-clip norm stayed within ``sqrt(explode_growth)`` of its own. Medians, not single steps, so the
  isolated spikes clipping is meant to catch (an LSTM's cliffs) stay info; a gradient that keeps growing behind a
  flat clipped norm is a divergence the clipped curve does not show.
* **warning**: clipping sets every step — it bit at 90 % of the steps or more, cutting the median pre-clip norm
  10x or more, and the loss fell by less than 10 % (start and end medians as ``loss-not-decreasing`` takes
  them): the limit, far below the gradient's usual norm, divides the effective learning rate. (A run that clips
  every step while its loss falls further is info.)
* **warning**: clipping at a rising loss — it bit at 90 % of the steps or more and the loss's end median is
  ``damage_loss_rise`` times the initial loss (the lowest of the first ``baseline_steps`` values): every step has
  the size learning rate x limit, and that is too large (the advice lowers the learning rate).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._advice import lower_lr
from ._base import Rule, RunData, Thresholds, fmt
from ._finding import Finding
from ._series import cached, grad_norm, loss, loss_window, preclip_norm

__all__ = ["GradientsClippedRule", "clipping_too_tight"]

#: Relative difference below which the pre- and post-clip norms are the same norm (float32 rounding).
_SAME = 1e-6


class GradientsClippedRule(Rule):
    """Clipping was active (info), hid an explosion of the pre-clip gradient norm, or set every step (warnings)."""

    name = "gradients-clipped"
    codes = ("gradients-clipped",)

    def missing(self, data: RunData) -> list[str]:
        """Needs the per-step ``grad_norm_preclip`` or ``clip_ratio`` signal."""
        cols = set(map(str, data.scalars.columns))
        if cols & {"grad_norm_preclip", "clip_ratio"}:
            return []
        return ["the per-step 'grad_norm_preclip' or 'clip_ratio' signal"]

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        clipping = _clipping(data)
        if clipping is None:
            return []
        steps, pre, post, shared = clipping
        hidden = _hidden_explosion(pre, post, th)
        meta = data.meta.get("clipping")
        evidence: dict[str, Any] = {
            **shared,
            "meta_first_step": meta.get("first_step") if isinstance(meta, dict) else None,
            "hidden_explosion": hidden,
        }
        base = (
            f"gradients were clipped at {len(steps)} of {evidence['steps']} steps (first at step {steps[0]}): the "
            f"pre-clip norm had median {fmt(evidence['preclip_median'])} (max {fmt(evidence['preclip_max'])}) "
            f"against {fmt(evidence['postclip_median'])} after clipping"
        )
        if hidden is not None:
            return [
                _finding(
                    "warning",
                    hidden["first_step"],
                    steps,
                    evidence,
                    "Clipping hides an explosion: the pre-clip gradient norm's running median grew "
                    f"{fmt(hidden['growth'])}x, from {fmt(hidden['from'])} to {fmt(hidden['to'])} by step "
                    f"{hidden['step']}, while the clipped norm's stayed within {fmt(hidden['post_growth'])}x; "
                    + base
                    + ".",
                    _HIDDEN,
                )
            ]
        rose = _clipped_while_rising(data, evidence, th)
        if rose is not None:
            evidence["loss_rose"] = rose
            message = (
                f"Clipping at almost every step while the loss rose: {base}, and the loss rose from "
                f"{fmt(rose['loss_start'])} at the start to a median {fmt(rose['loss_end'])} at the end."
            )
            return [_finding("warning", steps[0], steps, evidence, message, _ROSE)]
        tight = _too_tight(data, evidence, th)
        if tight is not None:
            evidence["too_tight"] = tight
            text = {
                **_TIGHT,
                "advice": (
                    f"Raise the clipping limit (max_norm / clipnorm) above the usual pre-clip norm (median "
                    f"{fmt(evidence['preclip_median'])}; 2-5x it is common), so that it catches spikes only.",
                    *_TIGHT["advice"],
                ),
            }
            message = (
                f"Clipping sets every step: {base}, a median {fmt(tight['factor'])}x cut, and the loss hardly fell "
                f"(median {fmt(tight['loss_start'])} at the start, {fmt(tight['loss_end'])} at the end)."
            )
            return [_finding("warning", steps[0], steps, evidence, message, text)]
        return [_finding("info", steps[0], steps, evidence, "Gradient clipping was active: " + base + ".", _ACTIVE)]


#: The explanation and advice of the three findings (the tight one's first advice names the pre-clip norm).
_ACTIVE = {
    "explanation": (
        "Clipping rescales the gradient when its norm exceeds a limit, so the optimizer sees at most that norm. "
        "Occasional clipping contains spikes; clipping at most steps means the limit, not the gradient, sets the "
        "step size."
    ),
    "advice": (
        "Nothing to change while the loss falls; if clipping is active at most steps, the limit acts as the "
        "learning rate: compare the pre-clip norm with the limit.",
    ),
}
_TIGHT = {
    "explanation": (
        "Clipping rescales the gradient to the limit whenever its norm exceeds it. With a limit far below the "
        "gradient's usual norm every step is rescaled, so the limit, not the gradient, sets the step size: the "
        "effective learning rate is divided by the cut factor, and training crawls while gradients and the "
        "learning rate look fine."
    ),
    "advice": ("Then tune the learning rate with clipping inactive at most steps.",),
}
_ROSE = {
    "explanation": (
        "With the gradient clipped at almost every step, each step has the size learning rate x limit whatever "
        "the gradient says; a loss that rises under such steps means that size is too large. Clipping bounds a "
        "step, it does not make a learning rate that is too high safe."
    ),
    "advice": (
        lower_lr(" (try 10x lower) until the loss falls and clipping bites at a few steps only."),
        "Then set the clipping limit at 2-5x the usual pre-clip norm, so that it catches spikes only.",
    ),
}
_HIDDEN = {
    "explanation": (
        "The gradient the optimizer receives looks flat because clipping caps it, but the gradient backward "
        "computes keeps growing: the network is diverging underneath (weights or activations growing), and the "
        "capped steps only slow the divergence down. Curves of the clipped norm do not show it."
    ),
    "advice": (
        "Find what makes the raw gradient grow (see the other findings: learning rate, initialisation, "
        "accumulation) instead of relying on the clip; plot grad_norm_preclip.",
        "Lower the learning rate until the pre-clip norm stops growing.",
    ),
}


def _finding(
    severity: str, first: int, steps: list[int], evidence: dict[str, Any], message: str, text: dict[str, Any]
) -> Finding:
    """A ``gradients-clipped`` finding over the clipped ``steps`` (from ``first``)."""
    return Finding(
        code="gradients-clipped",
        severity=severity,
        layers=(),
        first_step=first,
        last_step=steps[-1],
        evidence=evidence,
        message=message,
        explanation=text["explanation"],
        advice=text["advice"],
    )


#: Clipping "sets every step" when it bites at at least this share of the steps ...
_TIGHT_SHARE = 0.9
#: ... cutting the median pre-clip norm at least this many times, ...
_TIGHT_FACTOR = 10.0
#: ... while the loss fell by less than this fraction from the start to the end of the run (a run whose every step
#: is cut 10x or more and still learns is using an optimizer that ignores the gradient's scale, as Adam does).
_TIGHT_LOSS_FALL = 0.1


def _clipping(data: RunData) -> tuple[list[int], Any, Any, dict[str, Any]] | None:
    """The clipped steps, the pre- and post-clip norms and their evidence, or ``None`` (no step clipped).

    Read once per diagnosis: the rule and the loss rule's health check (:func:`clipping_too_tight`) share it.
    """

    def make() -> tuple[list[int], Any, Any, dict[str, Any]] | None:
        pre = preclip_norm(data)
        post, _ = grad_norm(data)
        post = post[np.isfinite(post.to_numpy())]
        steps = _clipped_steps(data, pre, post)
        if not steps:
            return None
        pre_c, post_c = pre.reindex(steps).dropna(), post.reindex(steps).dropna()
        evidence = {
            "clipped_steps": len(steps),
            "steps": len(post) or len(pre),
            "first_step": steps[0],
            "preclip_median": float(pre_c.median()) if len(pre_c) else math.nan,
            "preclip_max": float(pre_c.max()) if len(pre_c) else math.nan,
            "postclip_median": float(post_c.median()) if len(post_c) else math.nan,
        }
        return steps, pre, post, evidence

    return cached(data, "clipping", make)


def clipping_too_tight(data: RunData, th: Thresholds) -> dict[str, Any] | None:
    """The evidence that clipping set every step of a run whose loss hardly fell, or ``None`` (see the rule)."""
    clipping = _clipping(data)
    return None if clipping is None else _too_tight(data, clipping[3], th)


def _too_tight(data: RunData, evidence: dict[str, Any], th: Thresholds) -> dict[str, Any] | None:
    """Clipped at nearly every step by an order of magnitude, and the loss did not fall: the limit sets the steps."""
    total, clipped = evidence["steps"], evidence["clipped_steps"]
    pre_med, post_med = evidence["preclip_median"], evidence["postclip_median"]
    if not total or clipped < _TIGHT_SHARE * total or not (post_med > 0 and pre_med >= _TIGHT_FACTOR * post_med):
        return None
    lo = loss(data)
    if len(lo) < th.loss_min_steps:
        return None
    w = loss_window(len(lo), th)
    start, end = float(np.median(lo.iloc[:w].to_numpy())), float(np.median(lo.iloc[-w:].to_numpy()))
    if start != 0 and (start - end) / abs(start) >= _TIGHT_LOSS_FALL:
        return None  # the loss falls: the clip costs speed at most
    return {"factor": pre_med / post_med, "loss_start": start, "loss_end": end, "share": clipped / total}


def _clipped_while_rising(data: RunData, evidence: dict[str, Any], th: Thresholds) -> dict[str, Any] | None:
    """Clipped at nearly every step while the loss rose: its end median ``damage_loss_rise`` times the initial loss.

    The initial loss is the lowest of the first ``baseline_steps`` values, as ``loss-not-decreasing`` takes it.
    """
    total, clipped = evidence["steps"], evidence["clipped_steps"]
    if not total or clipped < _TIGHT_SHARE * total:
        return None
    lo = loss(data)
    if len(lo) < th.loss_min_steps:
        return None
    w = loss_window(len(lo), th)
    start = float(lo.iloc[: max(1, min(th.baseline_steps, w))].min())  # the initial loss: spikes cannot raise it
    end = float(np.median(lo.iloc[-w:].to_numpy()))
    if not (start > 0 and end >= th.damage_loss_rise * start):
        return None
    return {"loss_start": start, "loss_end": end, "share": clipped / total}


def _clipped_steps(data: RunData, pre: Any, post: Any) -> list[int]:
    """Steps with ``clip_ratio < 1``, or with a pre-clip norm above the post-clip one (beyond float rounding)."""
    clipped: set[int] = set()
    if "clip_ratio" in data.scalars.columns:
        ratio = data.scalars["clip_ratio"].astype("float64").dropna()
        clipped |= {int(s) for s in ratio.index[ratio.to_numpy() < 1.0]}
    both = pre.index.intersection(post.index)
    if len(both):
        p, q = pre.loc[both].to_numpy(), post.loc[both].to_numpy()
        with np.errstate(invalid="ignore"):
            clipped |= {int(s) for s in both[p > q * (1 + _SAME)]}
    return sorted(clipped)


def _hidden_explosion(pre: Any, post: Any, th: Thresholds) -> dict[str, Any] | None:
    """The growth of the pre-clip norm's running median while the post-clip one stays flat, or ``None``."""
    p = pre[np.isfinite(pre.to_numpy()) & (pre.to_numpy() > 0)]
    q = post[np.isfinite(post.to_numpy()) & (post.to_numpy() > 0)]
    if len(p) < 2 * th.damage_steps or len(q) < 2:
        return None
    pm = p.rolling(th.reference_steps, min_periods=1).median()
    qm = q.rolling(th.reference_steps, min_periods=1).median()
    low = pm.cummin()
    growth = pm / low
    hit = growth[growth >= th.explode_growth]
    if hit.empty:
        return None
    step = int(hit.index[0])
    qq = qm[qm.index <= step]
    post_growth = float(qq.max() / qq.min()) if len(qq) else math.nan
    if not post_growth < math.sqrt(th.explode_growth):
        return None
    return {
        "first_step": int(low.index[int(np.argmin(low.loc[:step].to_numpy()))]),
        "step": step,
        "from": float(low.loc[step]),
        "to": float(pm.loc[step]),
        "growth": float(hit.iloc[0]),
        "post_growth": post_growth,
    }
