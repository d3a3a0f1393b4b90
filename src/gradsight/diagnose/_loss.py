"""Rule ``loss-not-decreasing``: the loss at the end of the run is not clearly below the loss at its start.

Reads the ``loss`` scalar (finite values only; a NaN/Inf loss is the non-finite rule's business). Compares the
median of the first ``loss_window`` fraction of values (at least 3) with the median of the last; medians resist
minibatch noise. Needs ``loss_min_steps`` finite values, otherwise the rule stays silent (too early to tell).
"""

from __future__ import annotations

import math

import numpy as np

from ._base import LOSS_SCALARS, Rule, RunData, Thresholds, fmt
from ._finding import Finding

__all__ = ["LossNotDecreasingRule"]


class LossNotDecreasingRule(Rule):
    """The loss did not fall by at least ``loss_min_decrease`` (relative) from start to end (warning)."""

    name = "loss-not-decreasing"
    codes = ("loss-not-decreasing",)
    scalars = LOSS_SCALARS

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        name = data.loss_name()
        if name is None:  # pragma: no cover - excluded by missing()
            return []
        loss = data.scalars[name].astype("float64")
        loss = loss[np.isfinite(loss.to_numpy())]
        n = len(loss)
        if n < max(th.loss_min_steps, 6):
            return []
        w = max(3, math.ceil(th.loss_window * n))
        start = float(np.median(loss.iloc[:w].to_numpy()))
        end = float(np.median(loss.iloc[-w:].to_numpy()))
        scale = abs(start) if start != 0 else 1.0
        decrease = (start - end) / scale
        if decrease >= th.loss_min_decrease:
            return []
        rising = end > start
        msg = (
            f"The loss did not decrease: the median of the last {w} logged values is {fmt(end)} against "
            f"{fmt(start)} for the first {w} ({'+' if rising else ''}{fmt(-decrease * 100)} %; at least "
            f"-{fmt(th.loss_min_decrease * 100)} % expected) over {n} steps."
        )
        return [
            Finding(
                code="loss-not-decreasing",
                severity="warning",
                layers=(),
                first_step=int(loss.index[0]),
                last_step=int(loss.index[-1]),
                evidence={
                    "loss_start": start,
                    "loss_end": end,
                    "relative_decrease": decrease,
                    "window": w,
                    "steps": n,
                    "threshold": th.loss_min_decrease,
                    "scalar": name,
                },
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
