"""Rules ``update-ratio-high`` and ``update-ratio-low``: how far one optimizer step moves each layer's weights.

The ratio of a layer is ``||update|| / ||weight||`` with both norms pooled over the layer's parameters that have
both an update and a weight summary at that step (weights and biases together, so a zero-initialised bias cannot
make the ratio explode); the one definition is :func:`gradsight._derived.update_ratio`, which the figures, the
report and the exports use too. Steps where it is undefined (a NaN/Inf in an update or weight, a zero weight
norm) do not enter the median; each layer's evidence says how many there were (``undefined_steps``).

The rule of thumb (CS231n, "ratio of weights:updates") is that this is around 1e-3 for SGD: a heuristic, not a
law, and adaptive optimizers sit higher early on. The rules therefore judge the *median* over logged steps, with
wide margins around it (see :class:`Thresholds`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._derived import update_ratio_table
from ._base import Rule, RunData, Thresholds, fmt, ordered
from ._finding import Finding
from ._series import layer_update_ratios

if TYPE_CHECKING:  # pragma: no cover - pandas is imported where it is used, not at import
    import pandas as pd

__all__ = ["UpdateRatioRule", "update_ratios"]


def update_ratios(data: RunData) -> pd.DataFrame:
    """Per (step, layer) the update/weight ratio, as :func:`gradsight._derived.update_ratio_table` defines it.

    Returns:
        A DataFrame with columns ``step``, ``layer``, ``tensors``, ``update_sum_sq``, ``weight_sum_sq``,
        ``nonfinite``, ``update_l2``, ``weight_l2`` and ``ratio``; rows whose ratio is undefined (a NaN/Inf among
        the layer's updates or weights, or a zero weight norm) are kept with ``ratio`` NaN.
    """
    import pandas as pd

    return update_ratio_table(pd.concat([data.frame("update"), data.frame("weight")], ignore_index=True))


def _ratios(data: RunData) -> pd.DataFrame:
    """Long (step, layer, ratio) table: per step from the per-step norms where recorded, else :func:`update_ratios`."""
    table, source = layer_update_ratios(data)
    if source.startswith("per-step"):
        long = table.rename_axis("step").reset_index().melt(id_vars="step", var_name="layer", value_name="ratio")
        return long
    return update_ratios(data)


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

    Warns when a layer's median ratio over the steps exceeds ``update_ratio_high`` or falls below
    ``update_ratio_low``: every step from the per-step ``update_norm/<t>`` and ``weight_norm/<t>`` where recorded
    (pooled per layer as :func:`gradsight._derived.update_ratio` defines it), else the logged steps' ``update`` and
    ``weight`` summaries.
    """

    name = "update-ratio"
    codes = ("update-ratio-high", "update-ratio-low")
    kinds = ("update", "weight")

    def missing(self, data: RunData) -> list[str]:
        """Needs ``update`` and ``weight`` summaries, or the per-step ``update_norm/<t>`` and ``weight_norm/<t>``."""
        cols = [str(c) for c in data.scalars.columns]
        if any(c.startswith("update_norm/") for c in cols) and any(c.startswith("weight_norm/") for c in cols):
            return []
        return super().missing(data)

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the class docstring."""
        r = _ratios(data)
        if r.empty:
            return []
        defined = r[r["ratio"].notna()]
        med = defined.groupby("layer")["ratio"].median()
        findings = []
        for code, mask, thr, text in (
            ("update-ratio-high", med > th.update_ratio_high, th.update_ratio_high, _HIGH),
            ("update-ratio-low", med < th.update_ratio_low, th.update_ratio_low, _LOW),
        ):
            if mask.any():
                if code == "update-ratio-low" and _all_moving_slowly(med, mask, r):
                    text = {**text, "advice": (text["advice"][1], text["advice"][0], *text["advice"][2:])}
                findings.append(_finding(code, med[mask], r, data, thr, text))
        return findings


def _all_moving_slowly(med: pd.Series, mask: pd.Series, r: pd.DataFrame) -> bool:
    """Every layer is below the low threshold and each moved at some step: the learning rate, not a cut-off path.

    Then raising the learning rate is the first advice; a single slow layer, or one that never moved, points at
    its gradient path first.
    """
    if not bool(mask.all()) or len(med) < 2:
        return False
    moved = r[r["ratio"].notna()].groupby("layer")["ratio"].max()
    return bool((moved.reindex(med.index) > 0).all())


def _finding(code: str, hit: pd.Series, r: pd.DataFrame, data: RunData, thr: float, text: dict[str, Any]) -> Finding:
    """One ``update-ratio-*`` finding for the layers in ``hit`` (their median ratios) from the ratio table ``r``."""
    layers = ordered(hit.index, data)
    worst = hit.idxmax() if code == "update-ratio-high" else hit.idxmin()
    per: dict[str, Any] = {}
    steps: list[int] = []
    for layer in layers:
        lr = r[r["layer"] == layer]
        ok = lr[lr["ratio"].notna()]
        steps += [int(ok["step"].min()), int(ok["step"].max())]
        per[layer] = {
            "median_ratio": float(hit[layer]),
            "min_ratio": float(ok["ratio"].min()),
            "max_ratio": float(ok["ratio"].max()),
            "steps": len(ok),
            "undefined_steps": len(lr) - len(ok),
        }
    word = "above" if code == "update-ratio-high" else "below"
    # the per-step norms cover every step; the summaries only the logged ones
    kind = "" if layer_update_ratios(data)[1].startswith("per-step") else "logged "
    undefined = per[worst]["undefined_steps"]
    left_out = f"; {undefined} step(s) with an undefined ratio (NaN/Inf or zero weights) left out" if undefined else ""
    msg = (
        f"Update/weight ratio {'too high' if word == 'above' else 'too low'}: layer {worst!r} moves by "
        f"{fmt(float(hit[worst]))} of its weight norm per step (median over {per[worst]['steps']} {kind}"
        f"steps{left_out}), {word} the threshold {fmt(thr)} (heuristic ~1e-3); {len(layers)} layer(s) {word} it."
    )
    return Finding(
        code=code,
        severity="warning",
        layers=tuple(layers),
        first_step=min(steps),
        last_step=max(steps),
        evidence={"threshold": thr, "layers": per},
        message=msg,
        explanation=text["explanation"],
        advice=text["advice"],
    )
