"""Rule ``gradients-accumulating``: gradients summed across steps, the signature of a missing ``zero_grad()``.

PyTorch adds every ``backward()`` into ``.grad``; without ``optimizer.zero_grad()`` between steps the optimizer
receives ``g_1 + g_2 + ... + g_s`` at step ``s``. Its norm then grows steadily with the number of steps — like
``s`` while the minibatch gradients point the same way, like ``sqrt(s)`` when they are unrelated — and rises at
almost every step, while a fresh minibatch gradient's norm fluctuates up and down around a level.

The rule reads the gradient norm of the parameters the optimizer holds (from the per-tensor ``grad_norm/<t>`` where
it holds fewer parameters than have gradients: a parameter outside the optimizer is never zeroed by
``optimizer.zero_grad()``, which is the not-optimized rule's business; else the global ``grad_norm`` every step,
else the grad summaries' norm at the logged steps) from the first recorded step, over windows of growing length (at
least ``accumulate_min_steps`` values), and reports the longest window in which

* the norm rose at ``accumulate_monotone`` or more of the steps,
* it grew at least ``accumulate_growth``-fold,
* ``log ‖g‖`` against ``log(steps since the start)`` is a straight line (R² ≥ ``accumulate_fit``) of slope
  between 0.4 and 1.5 (a power law between ``sqrt(s)`` and a little above ``s``), which exponential divergence is
  not, and
* the loss did not grow with it: its median over the window's last quarter is below ``sqrt(growth)`` times the
  median over its first quarter (a diverging run's loss grows with its gradients; a run that sums its
  gradients can even keep learning, with Adam).

Only windows starting at the run's first step are tried: the missing call is in the training loop, so the sum
starts with the run.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._base import Rule, RunData, Thresholds, fmt
from ._finding import Finding
from ._series import held_grad_norm, loss, median_between

__all__ = ["GradientsAccumulatingRule"]

#: The power laws of a sum of s gradients: sqrt(s) for unrelated gradients, s for aligned ones; the upper bound
#: leaves room for the weights' own growth under such steps.
_SLOPE = (0.4, 1.5)


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and R² of ``log y`` against ``log x``."""
    lx, ly = np.log(x), np.log(y)
    slope, icept = np.polyfit(lx, ly, 1)
    resid = ly - (slope * lx + icept)
    var = float(np.var(ly))
    return float(slope), (1.0 - float(np.var(resid)) / var) if var > 0 else 0.0


def accumulation_window(data: RunData, th: Thresholds) -> dict[str, Any] | None:
    """The longest window from the first step in which the gradient norm grows as a running sum, or ``None``."""
    norm, source = held_grad_norm(data)
    g = norm[np.isfinite(norm.to_numpy())]
    g = g[g > 0]
    n_all = len(g)
    if n_all < th.accumulate_min_steps:
        return None
    steps = g.index.to_numpy(dtype="float64")
    start = steps[0]
    best = None
    lengths = sorted({*range(th.accumulate_min_steps, min(n_all, 64) + 1, 4), *np.geomspace(64, n_all, 12).astype(int)})
    for n in (m for m in lengths if th.accumulate_min_steps <= m <= n_all):
        y = g.to_numpy()[:n]
        x = steps[:n] - start + 1.0
        rises = float(np.mean(np.diff(y) > 0))
        growth = float(np.median(y[-3:]) / y[0])
        if rises < th.accumulate_monotone or growth < th.accumulate_growth:
            continue
        slope, r2 = _fit(x, y)
        if not (_SLOPE[0] <= slope <= _SLOPE[1]) or r2 < th.accumulate_fit:
            continue
        lo = loss(data)
        q = max(1, n // 4)
        before = median_between(lo, steps[0], steps[q - 1]) if len(lo) else math.nan
        after = median_between(lo, steps[n - q], steps[n - 1]) if len(lo) else math.nan
        if np.isfinite(before) and np.isfinite(after) and before > 0 and after >= math.sqrt(growth) * before:
            continue
        best = {
            "first_step": int(steps[0]),
            "last_step": int(steps[n - 1]),
            "values": n,
            "rising_fraction": rises,
            "growth": growth,
            "slope": slope,
            "r2": r2,
            "norm_start": float(y[0]),
            "norm_end": float(y[-1]),
            "loss_start": before,
            "loss_end": after,
            "source": source,
        }
    return best


class GradientsAccumulatingRule(Rule):
    """The gradient norm grows like a running sum from the first step (warning). See the module docstring.

    Not judged on Keras runs: ``fit`` and ``optimizer.apply`` take a fresh gradient at every step, and a regression
    whose gradient grows as its output layer reaches large targets looked like a running sum.
    """

    name = "gradients-accumulating"
    codes = ("gradients-accumulating",)

    def missing(self, data: RunData) -> list[str]:
        """Needs ``grad`` summaries or a ``grad_norm`` scalar."""
        if "grad" in data.kinds or "grad_norm" in data.scalars.columns:
            return []
        return ["'grad' summaries or a 'grad_norm' scalar"]

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        if data.meta.get("framework") == "keras":
            return []  # fit and apply take a fresh gradient each step: a Keras run cannot sum them by mistake
        w = accumulation_window(data, th)
        if w is None:
            return []
        loss_text = ""
        if np.isfinite(w["loss_start"]) and np.isfinite(w["loss_end"]) and w["loss_start"] > 0:
            change = (w["loss_end"] / w["loss_start"] - 1) * 100
            loss_text = f", while the loss changed by {'+' if change >= 0 else ''}{fmt(change)} %"
        msg = (
            f"Gradients accumulate across steps: the gradient norm grew {fmt(w['growth'])}x over steps "
            f"{w['first_step']}–{w['last_step']} ({fmt(w['norm_start'])} to {fmt(w['norm_end'])}), rising at "
            f"{w['rising_fraction']:.0%} of the steps like a running sum (∝ steps^{w['slope']:.2f}, R² "
            f"{w['r2']:.2f}){loss_text}: gradients are added up instead of replaced, as without "
            "optimizer.zero_grad()."
        )
        return [
            Finding(
                code="gradients-accumulating",
                severity="warning",
                layers=(),
                first_step=w["first_step"],
                last_step=w["last_step"],
                evidence={
                    **w,
                    "threshold_rising": th.accumulate_monotone,
                    "threshold_growth": th.accumulate_growth,
                    "threshold_fit": th.accumulate_fit,
                    "slope_range": list(_SLOPE),
                },
                message=msg,
                explanation=(
                    "backward() adds each new gradient into the parameters' .grad; unless it is reset every step, "
                    "the optimizer follows the sum of all gradients so far. The step grows with the number of steps "
                    "(with SGD it acts like momentum 1, overshooting and then diverging), and it keeps pointing where "
                    "the first batches pointed instead of where the current batch points."
                ),
                advice=(
                    "Call optimizer.zero_grad() once per step, before loss.backward() (or model.zero_grad(); "
                    "set_to_none=True is the default and cheapest).",
                    "If you accumulate gradients over micro-batches on purpose, zero them right after each "
                    "optimizer.step(), and divide the loss by the number of micro-batches.",
                ),
            )
        ]
