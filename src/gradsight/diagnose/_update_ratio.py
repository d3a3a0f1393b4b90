"""Rules ``update-ratio-high`` and ``update-ratio-low``: how far one optimizer step moves each layer's weights.

The ratio of a layer is ``||update|| / ||weight||`` with both norms pooled over all of the layer's parameters
(weights and biases together, so a zero-initialised bias cannot make the ratio explode), per logged step, from the
``update`` and ``weight`` summaries (``l2 = sqrt(sum_sq)``). The rule of thumb (CS231n, "ratio of weights:updates")
is that this is around 1e-3 for SGD: a heuristic, not a law, and adaptive optimizers sit higher early on. The
rules therefore judge the *median* over logged steps, with wide margins around it (see :class:`Thresholds`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._base import Rule, RunData, Thresholds, fmt, ordered
from ._finding import Finding

if TYPE_CHECKING:  # pragma: no cover - pandas is imported where it is used, not at import
    import pandas as pd

__all__ = ["UpdateRatioRule", "update_ratios"]


def update_ratios(data: RunData) -> pd.DataFrame:
    """Per (step, layer): ``update_l2``, ``weight_l2`` and ``ratio``, over steps where both are finite.

    Returns:
        A DataFrame with columns ``step``, ``layer``, ``update_l2``, ``weight_l2``, ``ratio``.
    """
    import pandas as pd

    cols = ["step", "layer", "sum_sq", "nonfinite"]
    u = data.frame("update")[cols].groupby(["step", "layer"]).sum()
    w = data.frame("weight")[cols].groupby(["step", "layer"]).sum()
    j = u.add_suffix("_u").join(w.add_suffix("_w"), how="inner")
    j = j[(j["nonfinite_u"] == 0) & (j["nonfinite_w"] == 0)]
    out = pd.DataFrame(
        {
            "update_l2": np.sqrt(j["sum_sq_u"].to_numpy(dtype="float64")),
            "weight_l2": np.sqrt(j["sum_sq_w"].to_numpy(dtype="float64")),
        },
        index=j.index,
    )
    out = out[np.isfinite(out["update_l2"]) & np.isfinite(out["weight_l2"]) & (out["weight_l2"] > 0)]
    out["ratio"] = out["update_l2"] / out["weight_l2"]
    return out.reset_index()


_HIGH = {
    "explanation": (
        "Each optimizer step rewrites a large fraction of these weights, so the network forgets what the previous "
        "batches taught it and the loss oscillates or diverges; it is the usual precursor of exploding gradients "
        "and NaNs. Around 1e-3 per step is the common heuristic for steady progress."
    ),
    "advice": (
        "Lower the learning rate (by the factor the ratio exceeds ~1e-3, as a first guess), or add a warm-up.",
        "Clip gradients (clip_grad_norm_ / clipnorm) so that single large gradients cannot produce huge steps.",
        "Use per-layer learning rates (parameter groups) if only some layers are affected.",
    ),
}
_LOW = {
    "explanation": (
        "One step moves these weights by a tiny fraction of their size, so the layer is effectively frozen: at "
        "this pace it needs millions of steps to change. Either the learning rate is far too small, or no "
        "gradient reaches the layer (vanishing gradients, dead units, detached or frozen parameters)."
    ),
    "advice": (
        "Check that the layer receives gradient at all (see vanishing-gradients / dead-units findings, "
        "requires_grad / trainable flags, detach() calls).",
        "Raise the learning rate, or use an adaptive optimizer (Adam) whose step size does not depend on the "
        "gradient's scale.",
        "Check the weight scale: huge weights (bad initialisation) make any update relatively small.",
    ),
}


class UpdateRatioRule(Rule):
    """Per-layer update/weight ratio far above or below ~1e-3 (``update-ratio-high`` / ``update-ratio-low``).

    Warns when a layer's median ratio over logged steps exceeds ``update_ratio_high`` or falls below
    ``update_ratio_low``. Needs ``update`` and ``weight`` summaries.
    """

    name = "update-ratio"
    codes = ("update-ratio-high", "update-ratio-low")
    kinds = ("update", "weight")

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the class docstring."""
        r = update_ratios(data)
        if r.empty:
            return []
        findings = []
        med = r.groupby("layer")["ratio"].median()
        for code, mask, thr, text in (
            ("update-ratio-high", med > th.update_ratio_high, th.update_ratio_high, _HIGH),
            ("update-ratio-low", med < th.update_ratio_low, th.update_ratio_low, _LOW),
        ):
            hit = med[mask]
            if hit.empty:
                continue
            layers = ordered(hit.index, data)
            worst = hit.idxmax() if code == "update-ratio-high" else hit.idxmin()
            sub = r[r["layer"].isin(layers)]
            steps = sorted(sub["step"].unique())
            per: dict[str, Any] = {}
            for layer in layers:
                lr = r[r["layer"] == layer]
                per[layer] = {
                    "median_ratio": float(hit[layer]),
                    "min_ratio": float(lr["ratio"].min()),
                    "max_ratio": float(lr["ratio"].max()),
                    "steps": len(lr),
                }
            word = "above" if code == "update-ratio-high" else "below"
            msg = (
                f"Update/weight ratio {'too high' if word == 'above' else 'too low'}: layer {worst!r} moves by "
                f"{fmt(float(hit[worst]))} of its weight norm per step (median over {per[worst]['steps']} logged "
                f"steps), {word} the threshold {fmt(thr)} (heuristic ~1e-3); {len(layers)} layer(s) {word} it."
            )
            findings.append(
                Finding(
                    code=code,
                    severity="warning",
                    layers=tuple(layers),
                    first_step=int(steps[0]),
                    last_step=int(steps[-1]),
                    evidence={"threshold": thr, "layers": per},
                    message=msg,
                    explanation=text["explanation"],
                    advice=text["advice"],
                )
            )
        return findings
