"""Rule ``loss-unbounded``: a loss that falls far below zero and is still falling: its formula has no lower bound.

Cross-entropy, binary cross-entropy, a negative log-likelihood of (log-)probabilities and squared or absolute
errors are all ``>= 0``. A loss that the optimizer drives to -180 and further is not being minimised towards a
fit: the model found a direction in which the formula decreases without end, almost always because of a mistake
in it — ``F.nll_loss`` fed raw scores instead of log-probabilities (``-z_y`` falls as the right logit grows, for
ever), a sign error (maximising a likelihood), a log of values that can exceed 1. The weights then grow along that
direction at every step, and everything downstream of the loss follows.

Evidence, all of which must hold (finite loss values only, at least ``loss_min_steps`` of them):

* the end median (the last ``loss_window`` fraction of values) is below zero by at least ``unbounded_loss_factor``
  times the size of the start median (at least 1): a loss that started near 0 and reached -10 or less, or one
  that started at -2 (a sign-flipped cross-entropy) and reached -20;
* it is still falling at the end: each of the last three windows' medians lies below the one before by at least
  ``loss_min_decrease`` of its size. A loss with a floor below zero (a Gaussian negative log-likelihood with a
  learned variance) flattens out there; one without a floor does not.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from ._base import LOSS_SCALARS, Rule, RunData, Thresholds, fmt
from ._finding import Finding
from ._series import loss

__all__ = ["LossUnboundedRule"]


class LossUnboundedRule(Rule):
    """A loss far below zero and still falling at the end of the run (see the module docstring). A warning."""

    name = "loss-unbounded"
    codes = ("loss-unbounded",)
    scalars = LOSS_SCALARS

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        values = loss(data)
        n = len(values)
        if n < max(th.loss_min_steps, 9):
            return []
        w = max(3, min(math.ceil(th.loss_window * n), n // 3))
        series = values.to_numpy(float)
        start = float(np.median(series[:w]))
        ends = [float(np.median(series[n - (k + 1) * w : n - k * w])) for k in (2, 1, 0)]
        end = ends[-1]
        if end >= -th.unbounded_loss_factor * max(abs(start), 1.0):
            return []
        falling = all(b < a - th.loss_min_decrease * abs(b) for a, b in itertools.pairwise(ends))
        if not falling:
            return []
        keras = data.meta.get("framework") == "keras"
        advice = (
            (
                "Check the loss function: a standard loss is never negative. With a custom loss, look for a "
                "missing minus sign (maximising instead of minimising) or a log of values that can exceed 1; "
                "with a built-in cross-entropy, check from_logits against the last layer's activation."
            )
            if keras
            else (
                "Check the loss function: a standard loss is never negative. F.nll_loss / nn.NLLLoss expects "
                "log-probabilities: feed it F.log_softmax(logits, dim=-1), or use F.cross_entropy on the raw "
                "logits. With a custom loss, look for a missing minus sign (maximising instead of minimising) or a "
                "log of values that can exceed 1."
            ),
        )
        advice = (
            *advice,
            "If the objective is meant to fall without bound (a policy-gradient loss -R·log π as returns grow), "
            "this finding does not apply.",
        )
        return [
            Finding(
                code="loss-unbounded",
                severity="warning",
                layers=(),
                first_step=int(values.index[0]),
                last_step=int(values.index[-1]),
                evidence={
                    "loss_start": start,
                    "loss_end": end,
                    "window_medians": ends,
                    "window": w,
                    "steps": n,
                    "factor": th.unbounded_loss_factor,
                    "scalar": data.loss_name(),
                },
                message=(
                    f"The loss fell from {fmt(start)} to {fmt(end)} (medians of the first and last {w} values) and "
                    f"is still falling ({', '.join(fmt(v) for v in ends)} over the last three windows): the loss "
                    "formula has no lower bound."
                ),
                explanation=(
                    "Standard losses (cross-entropy, negative log-likelihood of probabilities, squared and absolute "
                    "errors) are never negative. A loss far below zero that keeps falling means the model found a "
                    "direction in which the formula decreases without end, and every step pushes the weights "
                    "further along it instead of fitting the data: the loss is not measuring what it should."
                ),
                advice=advice,
            )
        ]
