"""Rule ``nll-on-probabilities``: a softmax output fed to a negative log-likelihood that expects log-probabilities.

``F.nll_loss`` / ``nn.NLLLoss`` take log-probabilities and return ``-mean(x[i, y_i])``; they take no log
themselves. Given a softmax's probabilities ``p`` they return ``-mean(p[i, y_i])``, the negative mean probability of
the right class, which lies in ``[-1, 0]``. That objective raises ``p_y`` with the same gradient ``1/N`` however
wrong the prediction is (a cross-entropy's gradient is ``1/(N p_y)``), so confident mistakes are fixed no faster
than small ones, and learning is slow and stops short. Evidence, all of which must hold:

* the last layer with recorded outputs applies a softmax (its type, class or ``activation`` says so) and its
  outputs lie in ``[0, 1]`` at every logged step;
* every finite loss value lies in ``[-1, 0]`` (at least ``loss_min_steps`` of them), and not all are zero;
* the layer's output gradient, recorded at one logged step at least, is that of ``-mean(p[i, y_i])`` at every one
  with the loss: no entry above zero and a sum of ``-1`` (``-1/N`` at each of the ``N`` labels, zero elsewhere).
  A cross-entropy on ``log p`` gives ``-1/(N p_y)`` at the labels, summing to far below ``-1``; a squared error
  gives positive entries. Without output gradients the rule stays silent.

A ``reduction="sum"`` loss (``N`` times the range) is not recognised: the rule stays silent rather than guess.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._base import LOSS_SCALARS, Rule, RunData, Thresholds, fmt
from ._finding import Finding
from ._series import loss
from ._softmax import _applies_softmax, _classes, _output_layer

__all__ = ["NllOnProbabilitiesRule"]

#: Slack on the loss range and on the gradient's sum of -1 (float32 rounding over a batch).
_SLACK = 1e-3


class NllOnProbabilitiesRule(Rule):
    """A softmax output trained with a negative log-likelihood of it, not of its log (module docstring). A warning."""

    name = "nll-on-probabilities"
    codes = ("nll-on-probabilities",)
    kinds = ("output", "output_grad")
    scalars = LOSS_SCALARS

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        layer = _output_layer(data)
        if layer is None or not _applies_softmax(data.layer_info(layer), layer):
            return []
        f = data.frame("output", units=True)
        rows = f[(f["layer"] == layer) & (f["finite"] > 0)]
        if rows.empty or rows["min"].min() < 0 or rows["max"].max() > 1:
            return []
        series = loss(data)
        values = series.to_numpy(float)
        values = values[np.isfinite(values)]
        if values.size < th.loss_min_steps or values.min() < -1 - _SLACK or values.max() > _SLACK:
            return []
        if not (values < -_SLACK).any():
            return []
        g = data.frame("output_grad")
        grads = g[(g["layer"] == layer) & (g["finite"] > 0) & g["step"].isin(series.index)]
        if grads.empty or (grads["max"] > 0).any():
            return []
        sums = grads["sum"].to_numpy(float)
        if np.abs(sums + 1.0).max() > _SLACK:
            return []
        classes = _classes(rows)
        evidence: dict[str, Any] = {
            "layer": layer,
            "classes": classes,
            "loss_min": float(values.min()),
            "loss_max": float(values.max()),
            "output_grad_sum": float(np.median(sums)),
            "output_grad_steps": len(grads),
        }
        steps = series.index
        return [
            Finding(
                code="nll-on-probabilities",
                severity="warning",
                layers=(layer,),
                first_step=int(steps[0]),
                last_step=int(steps[-1]),
                evidence=evidence,
                message=(
                    f"The model ends in a softmax ({layer!r}) and the loss is the negative probability of the right "
                    f"class, not of its log: every loss value lies in [-1, 0] ({fmt(float(values.max()))} to "
                    f"{fmt(float(values.min()))}), and the output gradient has no positive entry and sums to -1 at "
                    f"all {len(grads)} logged steps, as the gradient of -mean(p_y) does (-1/N at each of the N "
                    "labels, 0 elsewhere): what F.nll_loss / nn.NLLLoss compute when they are fed probabilities."
                ),
                explanation=(
                    "nll_loss expects log-probabilities and takes no log itself: on probabilities p it returns "
                    "-mean(p[i, y_i]). That raises the right class's probability with the same gradient 1/N however "
                    "wrong the prediction is, where a cross-entropy gives 1/(N p_y): confident mistakes are fixed "
                    "no faster than small ones, so training is slow and stops short of a cross-entropy's fit."
                ),
                advice=(
                    f"Replace the final softmax {layer!r} with nn.LogSoftmax(dim=-1) and keep nn.NLLLoss / "
                    "F.nll_loss, or remove it and train with F.cross_entropy on the scores (apply softmax only "
                    "where you need probabilities).",
                ),
            )
        ]
