"""Rules ``exploding-gradients`` and ``vanishing-gradients``, from the parameter-gradient summaries.

A layer's gradient size is the pooled RMS of all its parameter gradients (weights and biases together) at a
logged step, over finite elements only; steps at which a layer's gradient holds a NaN/Inf are left out (that is
the non-finite rule's business). Two views:

* over **time** (exploding): each layer's RMS, and the global gradient norm (the ``grad_norm`` scalar when
  logged, else the norm over all recorded gradients), against its baseline — the median of the first
  ``baseline_steps`` logged values (the first half of the values when fewer than ``2 * baseline_steps`` were
  logged, as when a run diverges within a few steps). Growth beyond ``explode_growth`` is divergence.
* over **depth** (vanishing, and exploding through depth): each layer's median RMS over the run against the
  largest median RMS among the layers after it in model order. Backpropagation multiplies the gradient by each
  layer's local Jacobian on the way back, so a stack of contracting (expanding) Jacobians shows as early layers
  with gradients orders of magnitude below (above) the late ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._derived import global_norm, layer_rms
from ._base import Rule, RunData, Thresholds, fmt, ordered
from ._finding import Finding

if TYPE_CHECKING:  # pragma: no cover - pandas is imported where it is used, not at import
    import pandas as pd

__all__ = ["ExplodingGradientsRule", "VanishingGradientsRule", "depth_profile"]


def _finite_layer_rms(data: RunData) -> pd.DataFrame:
    g = layer_rms(data.frame("grad"))
    return g[(g["nonfinite"] == 0) & (g["finite"] > 0)]


def depth_profile(data: RunData) -> pd.DataFrame:
    """Per layer (model order): median gradient RMS over logged steps and its ratio to the largest downstream one.

    Returns:
        Columns ``layer``, ``rms`` (median), ``steps``, ``downstream`` (largest median RMS after it, NaN for the
        last layer), ``downstream_layer`` and ``ratio = rms / downstream``.
    """
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
    return pd.DataFrame(rows, columns=["layer", "rms", "steps", "downstream", "downstream_layer", "ratio"])


def _baseline_len(n: int, baseline_steps: int) -> int:
    """How many leading values form the baseline: ``baseline_steps``, or the first half of a short series.

    So a run that diverges within a few steps still has a baseline and something to compare with it.
    """
    if n < 2:
        return 0
    return max(1, min(baseline_steps, n // 2))


def _growth(series: pd.Series, baseline_steps: int) -> tuple[float, float, int | None, int | None, int | None]:
    """(baseline, peak, peak_step, first, last step after the baseline) of a step-indexed series, or NaNs."""
    s = series.dropna()
    s = s[s >= 0]
    k = _baseline_len(len(s), baseline_steps)
    if k == 0:
        return np.nan, np.nan, None, None, None
    base = float(np.median(s.iloc[:k].to_numpy()))
    rest = s.iloc[k:]
    peak_step = int(rest.idxmax())
    return base, float(rest.max()), peak_step, int(rest.index[0]), int(rest.index[-1])


class ExplodingGradientsRule(Rule):
    """Gradients that grow over time (or through depth) by orders of magnitude (``exploding-gradients``).

    Over time: a layer's gradient RMS, or the global gradient norm, exceeds ``explode_growth`` times its
    baseline (median of the first ``baseline_steps`` logged steps). Over depth: a layer's median gradient RMS
    exceeds ``explode_depth_ratio`` times the largest one after it. Severity warning; error when the growth
    reaches the square of the threshold (four orders of magnitude with the default). Needs ``grad`` summaries
    or a ``grad_norm`` scalar.
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
        k, limit = int(th.baseline_steps), th.explode_growth
        per_layer, layer_steps = _layer_growth(data, k, limit) if "grad" in data.kinds else ({}, [])
        glob, global_steps = _global_growth(data, k, limit)
        depth: list[dict[str, Any]] = []
        if "grad" in data.kinds:
            prof = depth_profile(data)
            depth = prof[prof["ratio"] > th.explode_depth_ratio].to_dict("records")
        if not per_layer and glob is None and not depth:
            return []
        layers = ordered(list(per_layer) + [d["layer"] for d in depth], data)
        msg, first, last, severity = _explode_message(per_layer, glob, depth, layer_steps + global_steps, th)
        evidence = {
            "threshold_growth": limit,
            "threshold_depth_ratio": th.explode_depth_ratio,
            "baseline_steps": k,
            "layers": per_layer,
            "global": glob,
            "depth": depth,
        }
        if first is None:
            steps = sorted(data.frame("grad")["step"].unique())
            first, last = (int(steps[0]), int(steps[-1])) if steps else (None, None)
        return [
            Finding(
                code="exploding-gradients",
                severity=severity,
                layers=tuple(layers),
                first_step=first,
                last_step=last,
                evidence=evidence,
                message=msg,
                explanation=_EXPLODE_EXPLANATION,
                advice=_EXPLODE_ADVICE,
            )
        ]


_EXPLODE_EXPLANATION = (
    "Each update moves the weights by the learning rate times the gradient; when gradients grow by "
    "orders of magnitude the steps overshoot, the loss rises instead of falling, the weights grow, "
    "which makes the gradients grow further — a feedback loop that ends in overflow (Inf, then NaN)."
)
_EXPLODE_ADVICE = (
    "Lower the learning rate (try 10x lower) and add a warm-up.",
    "Clip gradients: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), or clipnorm=1.0 on a Keras optimizer.",
    "Add normalisation (BatchNorm/LayerNorm) and use a variance-preserving initialisation "
    "(He for ReLU, Glorot for tanh) so that the backward Jacobians do not expand.",
    "Check the loss scale: a sum over a large batch instead of a mean multiplies every gradient.",
)


def _layer_growth(data: RunData, k: int, limit: float) -> tuple[dict[str, dict[str, Any]], list[int]]:
    """Layers whose gradient RMS grew ``limit``-fold over their baseline: ``(evidence per layer, steps hit)``."""
    per_layer: dict[str, dict[str, Any]] = {}
    steps_hit: list[int] = []
    for layer, sub in _finite_layer_rms(data).groupby("layer"):
        series = sub.set_index("step")["rms"].sort_index()
        base, peak, peak_step, _, _ = _growth(series, k)
        if base > 0 and peak / base >= limit:
            rest = series.iloc[_baseline_len(len(series.dropna()), k) :]
            above = rest[rest / base >= limit]
            steps_hit += [int(above.index[0]), int(above.index[-1])]
            per_layer[str(layer)] = {
                "baseline_steps": _baseline_len(len(series.dropna()), k),
                "baseline_rms": base,
                "peak_rms": peak,
                "peak_step": peak_step,
                "growth": peak / base,
                "first_step": int(above.index[0]),
            }
    return per_layer, steps_hit


def _global_norm_series(data: RunData) -> tuple[pd.Series, str]:
    """The global gradient norm per step (the ``grad_norm`` scalar, else from the grad summaries) and its source."""
    import pandas as pd

    if "grad_norm" in data.scalars.columns:
        norm = data.scalars["grad_norm"].astype("float64")
        norm = norm[np.isfinite(norm.to_numpy())]
        source = "scalar grad_norm"
    elif "grad" in data.kinds:
        per_step = data.frame("grad").groupby("step")[["sum_sq", "nonfinite"]].sum()
        norm = pd.Series(global_norm(per_step["sum_sq"].to_numpy(), per_step["nonfinite"].to_numpy()), per_step.index)
        source = "grad summaries"
    else:  # pragma: no cover - excluded by missing()
        norm = pd.Series(dtype="float64")
        source = ""
    return norm.sort_index().dropna(), source


def _global_growth(data: RunData, k: int, limit: float) -> tuple[dict[str, Any] | None, list[int]]:
    """The global gradient norm's growth when it reached ``limit``-fold: ``(evidence or None, steps hit)``."""
    norm, source = _global_norm_series(data)
    base, peak, peak_step, _, _ = _growth(norm, k)
    if not (base > 0 and peak / base >= limit):
        return None, []
    rest = norm.iloc[_baseline_len(len(norm), k) :]
    above = rest[rest / base >= limit]
    glob = {
        "baseline_steps": _baseline_len(len(norm), k),
        "baseline_norm": base,
        "peak_norm": peak,
        "peak_step": peak_step,
        "growth": peak / base,
        "first_step": int(above.index[0]),
        "source": source,
    }
    return glob, [int(above.index[0]), int(above.index[-1])]


def _explode_message(
    per_layer: dict[str, dict[str, Any]],
    glob: dict[str, Any] | None,
    depth: list[dict[str, Any]],
    steps_hit: list[int],
    th: Thresholds,
) -> tuple[str, int | None, int | None, str]:
    """``(message, first step, last step, severity)`` of an exploding-gradients finding."""
    limit = th.explode_growth
    growth = max([v["growth"] for v in per_layer.values()] + ([glob["growth"]] if glob else []), default=np.nan)
    if per_layer or glob:
        ref = glob or max(per_layer.values(), key=lambda v: v["growth"])
        key = "norm" if glob else "rms"
        top = max(per_layer, key=lambda n: per_layer[n]["growth"]) if per_layer else None
        what = "the global gradient norm" if glob else f"the gradient RMS of layer {top!r}"
        msg = (
            f"Gradients exploded: {what} grew {fmt(ref['growth'])}x, from {fmt(ref['baseline_' + key])} "
            f"(median of the first {ref['baseline_steps']} logged steps) to {fmt(ref['peak_' + key])} "
            f"at step {ref['peak_step']} (threshold {fmt(limit)}x)"
        )
        if per_layer:
            msg += f"; {len(per_layer)} layer(s) above the threshold"
        msg += "."
        first = min(v["first_step"] for v in [*per_layer.values(), *([glob] if glob else [])])
        last = max(steps_hit)
        severity = "error" if growth >= limit**2 else "warning"
    else:
        worst = max(depth, key=lambda d: d["ratio"])
        msg = (
            f"Gradients grow through depth: layer {worst['layer']!r} has a median gradient RMS of "
            f"{fmt(worst['rms'])}, {fmt(worst['ratio'])}x that of the largest later layer "
            f"({worst['downstream_layer']!r}, {fmt(worst['downstream'])}; "
            f"threshold {fmt(th.explode_depth_ratio)}x)."
        )
        first, last = None, None
        severity = "warning"

    return msg, first, last, severity


class VanishingGradientsRule(Rule):
    """Early layers whose gradients are orders of magnitude below the later layers' (``vanishing-gradients``).

    A layer is flagged when its median gradient RMS is below ``vanish_ratio`` times the largest median gradient
    RMS among the layers after it. Layers with an exactly zero gradient are skipped (no gradient at all is a
    dead-units / frozen-layer matter). Severity warning. Needs ``grad`` summaries of at least two layers.
    """

    name = "vanishing-gradients"
    codes = ("vanishing-gradients",)
    kinds = ("grad",)

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the class docstring."""
        prof = depth_profile(data)
        hit = prof[(prof["rms"] > 0) & (prof["ratio"] < th.vanish_ratio)]
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
        return [
            Finding(
                code="vanishing-gradients",
                severity="warning",
                layers=layers,
                first_step=int(steps[0]),
                last_step=int(steps[-1]),
                evidence={"threshold_ratio": th.vanish_ratio, "layers": hit.to_dict("records")},
                message=msg,
                explanation=(
                    "Backpropagation multiplies the gradient by every layer's local derivative on its way to the "
                    "input. Saturating activations pass at most a fraction of it per layer (sigmoid at most 1/4), "
                    "so through many layers the early layers receive a gradient that is orders of magnitude "
                    "smaller: their weights barely move and the network cannot learn features there."
                ),
                advice=(
                    "Use non-saturating activations (ReLU, GELU, SiLU) in hidden layers instead of sigmoid/tanh.",
                    "Use a variance-preserving initialisation: He (kaiming_normal_) for ReLU, Glorot for tanh.",
                    "Add normalisation (BatchNorm/LayerNorm) or residual connections so gradients have a short path.",
                    "Make the network shallower, or use an optimizer with per-parameter scaling (Adam).",
                ),
            )
        ]
