"""Rule ``double-softmax``: a model that outputs probabilities, trained with a cross-entropy that expects logits.

``nn.CrossEntropyLoss`` / ``F.cross_entropy`` and Keras' cross-entropies with ``from_logits=True`` apply a softmax
themselves. Fed the output of a final ``Softmax`` (probabilities ``p``), they compute the cross-entropy of
``softmax(p)``: since ``0 <= p_i <= 1``, the right class can get at most ``e / (e + C - 1)`` of the mass, so the
loss of *every* batch lies in the band

    ``log(1 + (C - 1) / e)  <=  loss  <=  log(e + C - 1)``     (C classes; 1.46 and 2.46 for C = 10)

— it can never fall below ``log(1 + (C - 1) / e)``, however long the model trains — and the gradient through the
two softmaxes is weak. Evidence, all of which must hold:

* the last layer with recorded outputs applies a softmax (its type, class or ``activation`` says so, not a
  log-softmax) and its outputs lie in ``[0, 1]`` at every logged step; ``C`` is its number of units;
* every finite loss value lies in that band (up to float32 rounding), at least ``loss_min_steps`` of them;
* the loss depends on ``p`` the way a second softmax does: the layer's output gradient, recorded at one logged
  step at least, sums to zero at each (``sum_j dJ/dp_j = 0`` for every sample, because ``softmax(p)`` does not
  change when a constant is added to every ``p_j``; a negative log-likelihood of ``log p`` has every entry
  ``<= 0``; a squared error on ``p`` also sums to zero but stays far below the band). Without output gradients
  the rule stays silent: a healthy probability loss (Keras' cross-entropy on a softmax output, whose output
  gradient the watch cannot record) can lie in the band for a whole run.

A ``reduction="sum"`` loss (B times the band) is not recognised: the rule stays silent rather than guess.

**A softmax applied in the forward code** (``F.softmax`` / ``torch.softmax`` after the last layer, ``keras.ops.softmax``
in ``call()``) leaves no layer that says so: the last layer with recorded outputs gives the logits ``z``, and the loss
is the cross-entropy of ``softmax(softmax(z))``. The band holds all the same, and what tells it from a cross-entropy
on ``z`` is the strength of the gradient ``dJ/dz``. For a cross-entropy on logits with mean reduction it is
``(softmax(z) - y) / N`` over the ``N`` rows (samples or tokens), so the root-mean-square row norm
``rho = sqrt(N * sum_sq)`` is close to ``sqrt(C / (C - 1)) * (1 - exp(-loss))`` — the ratio
``q = rho / (1 - exp(-loss))`` is about 1 (1.054 for ``C = 10`` at a uniform prediction). A second softmax puts the
softmax's Jacobian, whose norm is at most 1/2 and near ``1/C`` at a uniform prediction, in front of it: ``q`` starts
at ``1 / sqrt(C (C - 1))`` (0.105 for ``C = 10``) and falls as the model grows confident. Evidence, all of which must
hold, for ``C >= 4`` classes (units of the last layer):

* every finite loss value lies in the band, at least ``loss_min_steps`` of them, and the median of the last window
  lies in the lower half of the band (the run has learned towards the floor);
* the layer's output gradient sums to zero at every logged step (as above), at ``_MIN_Q_STEPS`` steps at least
  where the loss was logged too;
* ``q <= _FIRST_Q / sqrt(C (C - 1))`` at the first of them and ``q <= _MAX_Q`` at every one.

A cross-entropy on soft targets (probabilities as labels) can have weak gradients too, but only with a target
close to uniform; it then starts at ``q`` near that value and stays in the upper half of the band (its loss cannot
fall below the targets' entropy), so the lower-half condition leaves it out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._base import LOSS_SCALARS, Rule, RunData, Thresholds, fmt
from ._finding import Finding
from ._series import loss, loss_window

__all__ = ["DoubleSoftmaxRule", "softmax_band"]

#: Relative slack on the band's edges: the loss is computed in float32 and averaged over the batch.
_SLACK = 1e-3
#: A softmax applied in the forward code: the fewest classes judged (below, weak gradients separate less), the
#: fewest logged steps with both the loss and the output gradient, and the largest gradient ratio ``q`` allowed at
#: any of them (a cross-entropy on logits gives about 1; a second softmax 0.1-0.2 for 10 classes).
_MIN_CLASSES = 4
_MIN_Q_STEPS = 3
_MAX_Q = 0.35
#: ... and at the first of them, at most this many times a second softmax's ``q`` at a uniform prediction.
_FIRST_Q = 1.5
#: ``|sum of dJ/dp|`` at most this fraction of ``sqrt(count * sum of squares)`` (a bound on ``sum |dJ/dp|``) counts
#: as zero: float32 rounding leaves ~1e-7 of it; a log-likelihood of ``log p`` gives ``~1/sqrt(C)``.
_ZERO_SUM = 1e-3


def softmax_band(classes: int) -> tuple[float, float]:
    """``(floor, ceiling)`` of the cross-entropy of ``softmax(p)`` over ``classes`` classes, for probabilities p."""
    c = float(classes)
    return math.log1p((c - 1.0) / math.e), math.log(math.e + c - 1.0)


def _applies_softmax(info: Mapping[str, Any], layer: str) -> bool:
    """The layer's metadata (type, class, ``activation``) or, without any, its name says it ends in a softmax."""
    texts = [str(info.get(k, "")).lower() for k in ("type", "class", "activation")]
    config = info.get("config")
    if isinstance(config, Mapping):
        texts.append(str(config.get("activation", "")).lower())
    tokens = {t.rsplit(".", 1)[-1].replace("_", "") for t in texts if t}
    if tokens & {"logsoftmax", "softmin", "softmax2d"}:
        return False
    if tokens:
        return "softmax" in tokens
    return layer.lower().rsplit(".", 1)[-1] == "softmax"


def _output_layer(data: RunData) -> str | None:
    """The last layer (in the order the forward calls them) with recorded outputs."""
    with_outputs = {t.layer for t in data.tensors if t.kind == "output"}
    return next((n for n in reversed(data.layers) if n in with_outputs), None)


def _classes(rows: Any) -> int | None:
    """The layer's number of units (classes), from its per-unit counts."""
    sizes = {np.asarray(a).size for a in rows["units_active"] if a is not None and not _isnan(a)}
    return int(sizes.pop()) if len(sizes) == 1 else None


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _zero_sum(data: RunData, layer: str) -> bool | None:
    """Whether the layer's recorded output gradients sum to zero at every logged step (None: not recorded)."""
    if "output_grad" not in data.kinds:
        return None
    f = data.frame("output_grad")
    rows = f[(f["layer"] == layer) & (f["finite"] > 0)]
    if rows.empty:
        return None
    scale = np.sqrt(rows["finite"].to_numpy(float) * rows["sum_sq"].to_numpy(float))
    ok = np.abs(rows["sum"].to_numpy(float)) <= _ZERO_SUM * scale
    return bool(ok.all()) and bool((scale > 0).any())


def _gradient_ratios(data: RunData, layer: str, classes: int) -> list[tuple[int, float]]:
    """``(step, q)`` at each logged step with the layer's output gradient and the loss (see the module docstring)."""
    if "output_grad" not in data.kinds:
        return []
    f = data.frame("output_grad")
    rows = f[(f["layer"] == layer) & (f["finite"] > 0)].sort_values("step")
    values = loss(data)
    out = []
    for step, finite, sum_sq in zip(rows["step"], rows["finite"], rows["sum_sq"], strict=True):
        value = values.get(int(step))
        if value is None or not value > 0:
            continue
        rho = math.sqrt(float(sum_sq) * float(finite) / classes)  # the rows' RMS norm under a mean reduction
        out.append((int(step), rho / -math.expm1(-float(value))))
    return out


class DoubleSoftmaxRule(Rule):
    """A final softmax fed to a cross-entropy that applies its own (see the module docstring). A warning."""

    name = "double-softmax"
    codes = ("double-softmax",)
    kinds = ("output",)
    scalars = LOSS_SCALARS

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        layer = _output_layer(data)
        if layer is None:
            return []
        f = data.frame("output", units=True)
        rows = f[f["layer"] == layer]
        classes = _classes(rows)
        if classes is None or classes < 2:
            return []
        values = loss(data).to_numpy(float)
        if values.size < th.loss_min_steps:
            return []
        floor, ceiling = softmax_band(classes)
        if values.min() < floor * (1 - _SLACK) or values.max() > ceiling * (1 + _SLACK):
            return []
        w = loss_window(values.size, th)
        start, end = float(np.median(values[:w])), float(np.median(values[-w:]))
        # without output gradients a healthy probability loss can sit in the band too
        if _zero_sum(data, layer) is not True:
            return []
        if _applies_softmax(data.layer_info(layer), layer):
            if rows["min"].min() < 0 or rows["max"].max() > 1:
                return []
            return [self._finding(data, layer, classes, values, (start, end), None)]
        ratios = _gradient_ratios(data, layer, classes)
        if (
            classes < _MIN_CLASSES
            or end > (floor + ceiling) / 2
            or len(ratios) < _MIN_Q_STEPS
            or ratios[0][1] > _FIRST_Q / math.sqrt(classes * (classes - 1))
            or max(q for _, q in ratios) > _MAX_Q
        ):
            return []
        return [self._finding(data, layer, classes, values, (start, end), ratios)]

    def _finding(
        self,
        data: RunData,
        layer: str,
        classes: int,
        values: np.ndarray,
        start_end: tuple[float, float],
        ratios: list[tuple[int, float]] | None,
    ) -> Finding:
        """The finding; ``ratios`` are the gradient ratios ``q`` where the softmax is applied in the forward code."""
        floor, ceiling = softmax_band(classes)
        steps = loss(data).index
        keras = data.meta.get("framework") == "keras"
        evidence: dict[str, Any] = {
            "layer": layer,
            "classes": classes,
            "loss_floor": floor,
            "loss_ceiling": ceiling,
            "loss_min": float(values.min()),
            "loss_max": float(values.max()),
            "loss_start": start_end[0],
            "loss_end": start_end[1],
            "output_grad_sums_to_zero": True,
        }
        band = (
            f"every loss value lies in [{fmt(floor)}, {fmt(ceiling)}] (median {fmt(start_end[0])} at the start, "
            f"{fmt(start_end[1])} at the end), the range of a cross-entropy that applies a second softmax to "
            f"probabilities: the loss can never fall below {fmt(floor)}."
        )
        where, fix, weak = _texts(layer, classes, keras, ratios, evidence)
        return Finding(
            code="double-softmax",
            severity="warning",
            layers=(layer,),
            first_step=int(steps[0]),
            last_step=int(steps[-1]),
            evidence=evidence,
            message=where + band,
            explanation=(
                "A cross-entropy that expects logits applies softmax itself. Given probabilities p (each between 0 "
                f"and 1) it computes the cross-entropy of softmax(p), which gives the right class at most e/(e+C-1) "
                f"of the mass: with C = {classes} the loss cannot go below log(1+(C-1)/e) = {fmt(floor)}, and the "
                "gradient through two softmaxes is weak, so training crawls towards that floor and stops there." + weak
            ),
            advice=(fix,),
        )


def _texts(
    layer: str, classes: int, keras: bool, ratios: list[tuple[int, float]] | None, evidence: dict[str, Any]
) -> tuple[str, str, str]:
    """The message's opening, the advice and the explanation's last part; adds the gradient ratios to ``evidence``."""
    if ratios is None:
        where = f"The model ends in a softmax ({layer!r}, {classes} classes) and "
        fix = (
            (
                "Remove activation='softmax' from the last layer and keep from_logits=True in the loss, or keep "
                "the softmax and pass from_logits=False."
            )
            if keras
            else (
                f"Remove the final softmax {layer!r}: nn.CrossEntropyLoss / F.cross_entropy applies log-softmax "
                "itself and expects raw scores (logits). Apply softmax only where you need probabilities (at "
                "inference), or end the model in nn.LogSoftmax and train it with nn.NLLLoss."
            )
        )
        weak = " Its output gradient sums to zero at every logged step, as a second softmax makes it."
    else:
        qs = [q for _, q in ratios]
        evidence.update(
            softmax_applied_in_code=True,
            gradient_ratio_first=qs[0],
            gradient_ratio_max=max(qs),
            gradient_ratio_steps=len(qs),
        )
        where = (
            f"The gradient of the last layer's outputs ({layer!r}, {classes} units) is at least "
            f"{fmt(1 / max(qs))} times weaker than a cross-entropy on them gives at the same loss, and "
        )
        fix = (
            (
                f"Remove the softmax applied to {layer!r}'s output in call() (keras.ops.softmax / tf.nn.softmax) "
                "and keep from_logits=True in the loss, or keep it and pass from_logits=False."
            )
            if keras
            else (
                f"Remove the softmax applied to {layer!r}'s output in forward() or before the loss (F.softmax / "
                "torch.softmax / .softmax()): nn.CrossEntropyLoss / F.cross_entropy applies log-softmax itself "
                "and expects raw scores (logits). Apply softmax only where you need probabilities (at inference), "
                "or return F.log_softmax and train with F.nll_loss."
            )
        )
        weak = (
            " The layer's outputs are the scores the first softmax reads: the gradient reaching them passes "
            "through that softmax's Jacobian, which shrinks it. A cross-entropy on the scores themselves gives "
            "a gradient whose ratio q = RMS row norm / (1 - exp(-loss)) is about 1 (1.05 at a uniform "
            f"prediction); here q was {fmt(qs[0])} at the first logged step and at most {fmt(max(qs))} over "
            f"{len(qs)} logged steps. Its output gradient sums to zero at every logged step, as a softmax "
            "after it makes it."
        )
    return where, fix, weak
