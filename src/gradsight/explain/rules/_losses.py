"""Loss rules, one entry each: value, closed-form dJ/dŶ and formula text, in a framework's convention.

A framework's convention arrives as data (:class:`~gradsight.explain._spec.LossConvention`), reproduced
exactly (Keras 3.15 ``keras/src/losses/losses.py``, ``loss.py``, ``backend/tensorflow/nn.py``; torch 2.x):

* without ``last_axis_mean`` (torch) ``mse``/``mae``/``bce``/``bce_logits`` average over *all* elements
  (``mean``) or sum them (``sum``); cross-entropies (2-D ``(n, C)`` only, ``ce_needs_2d``) average over the
  batch. Torch's ``bce`` clamps ``log`` at −100 (only matters within e^−100 of 0 or 1).
* with ``last_axis_mean`` (Keras) those first average the *last axis* of each sample, then reduce the
  per-sample values, so a Keras ``sum`` is torch's ``sum`` divided by f_L. With ``clip_probabilities``
  probability BCE clips ŷ to [ε, 1−ε] (gradient zero where clipped); probability CE first normalises ŷ by its
  sum over the last axis, then clips; sparse probability CE clips ŷ (no normalisation) and feeds log ŷ to a
  sparse softmax cross-entropy. With ``softmax_ce_grad_normalised`` (TensorFlow) the softmax cross-entropy
  gradient is ``softmax(Z) − Y`` (it assumes each row of Y sums to 1); otherwise ``softmax(Z)·ΣY − Y``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..._errors import InputError
from .._spec import LossSpec
from ._table import LOSS_RULES, LossRule, register

__all__ = ["LOSS_KINDS", "LossResult", "evaluate_loss", "logits_variant"]


@dataclass(frozen=True)
class LossResult:
    """Value and gradient of a loss rule, with its formula text."""

    value: float
    grad: np.ndarray
    formula: str
    latex: str
    scale: str


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ----------------------------------------------------------------------------------------- the entries
def _mse(yh: np.ndarray, t: np.ndarray, spec: LossSpec):
    e = yh - t
    return e * e, 2.0 * e, "(Ŷ − Y)²", r"(\hat Y - Y)^2", "2·(Ŷ − Y)"


def _mae(yh: np.ndarray, t: np.ndarray, spec: LossSpec):
    e = yh - t
    return np.abs(e), np.sign(e), "|Ŷ − Y|", r"|\hat Y - Y|", "sign(Ŷ − Y)"


#: torch's BCE backward divides by ``max(Ŷ(1 − Ŷ), EPSILON)`` with a C++ ``float`` EPSILON = 1e-12, which is
#: 9.99999996e-13 in float64: at a saturated output (Ŷ rounds to 1) the two differ by 4e-9 relative.
_TORCH_BCE_EPS = float(np.float32(1e-12))


def _bce(yh: np.ndarray, t: np.ndarray, spec: LossSpec):
    base, lbase = "−(Y log Ŷ + (1−Y) log(1−Ŷ))", r"-(Y\log\hat Y + (1-Y)\log(1-\hat Y))"
    if spec.convention.clip_probabilities:
        eps = spec.epsilon
        p = np.clip(yh, eps, 1 - eps)
        mask = ((yh >= eps) & (yh <= 1 - eps)).astype(np.float64)
        vals = -(t * np.log(p) + (1 - t) * np.log(1 - p))
        g = mask * (-t / p + (1 - t) / (1 - p))
        return vals, g, base, lbase, "(−Y/P + (1−Y)/(1−P))·[ε ≤ Ŷ ≤ 1−ε], P = clip(Ŷ, ε, 1−ε)"
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = -(t * np.maximum(np.log(yh), -100) + (1 - t) * np.maximum(np.log1p(-yh), -100))
        g = (yh - t) / np.maximum(yh * (1 - yh), _TORCH_BCE_EPS)
    return vals, g, base, lbase, "(Ŷ − Y)/(Ŷ(1 − Ŷ))"


def _bce_logits(yh: np.ndarray, t: np.ndarray, spec: LossSpec):
    vals = np.maximum(yh, 0) - yh * t + np.log1p(np.exp(-np.abs(yh)))
    return vals, _sigmoid(yh) - t, "softplus(Z) − Y·Z", r"\mathrm{softplus}(Z) - YZ", "σ(Ŷ) − Y"


def _cce(yh: np.ndarray, t: np.ndarray, spec: LossSpec):
    if not spec.convention.clip_probabilities:
        with np.errstate(divide="ignore"):
            vals = -(t * np.log(yh)).sum(axis=-1)
        return vals, -t / yh, "−Σ_c Y log Ŷ", r"-\sum_c Y\log\hat Y", "−Y/Ŷ"
    eps = spec.epsilon
    s = yh.sum(axis=-1, keepdims=True)
    q = yh / s
    c = np.clip(q, eps, 1 - eps)
    mask = ((q >= eps) & (q <= 1 - eps)).astype(np.float64)
    gq = mask * (-t / c)
    return (
        -(t * np.log(c)).sum(axis=-1),
        (gq - (gq * q).sum(axis=-1, keepdims=True)) / s,
        "−Σ_c Y log clip(Ŷ/ΣŶ, ε, 1−ε)",
        r"-\sum_c Y \log \mathrm{clip}(\hat Y/\sum\hat Y)",
        "(G − Σ_c G·Q)/ΣŶ, G = −Y/clip(Q)·[ε ≤ Q ≤ 1−ε], Q = Ŷ/ΣŶ",
    )


def _sparse_cce(yh: np.ndarray, t: np.ndarray, spec: LossSpec):
    if not spec.convention.clip_probabilities:
        return _cce(yh, t, spec)
    eps = spec.epsilon
    c = np.clip(yh, eps, 1 - eps)
    mask = ((yh >= eps) & (yh <= 1 - eps)).astype(np.float64)
    sc = c.sum(axis=-1, keepdims=True)
    return (
        -(t * np.log(c / sc)).sum(axis=-1),
        mask * (1.0 / sc - t / c),
        "−log(P_y/ΣP), P = clip(Ŷ, ε, 1−ε)",
        r"-\log(P_y / \sum P)",
        "(1/ΣP − onehot/P)·[ε ≤ Ŷ ≤ 1−ε], P = clip(Ŷ, ε, 1−ε)",
    )


def _cce_logits(yh: np.ndarray, t: np.ndarray, spec: LossSpec):
    s = _softmax(yh)
    if spec.class_weights is not None:
        wt = t * np.asarray(spec.class_weights, dtype=np.float64)
        return (
            -(wt * _log_softmax(yh)).sum(axis=-1),
            s * wt.sum(axis=-1, keepdims=True) - wt,
            "−Σ_c w_c·Y_c log softmax(Ŷ)_c",
            r"-\sum_c w_c Y_c \log\mathrm{softmax}(\hat Y)_c",
            "softmax(Ŷ)·Σ_c w_c Y_c − w ⊙ Y",
        )
    vals = -(t * _log_softmax(yh)).sum(axis=-1)
    base, lbase = "−Σ_c Y log softmax(Ŷ)", r"-\sum_c Y \log\mathrm{softmax}(\hat Y)"
    if spec.convention.softmax_ce_grad_normalised:
        return vals, s - t, base, lbase, "softmax(Ŷ) − Y"
    return vals, s * t.sum(axis=-1, keepdims=True) - t, base, lbase, "softmax(Ŷ)·Σ_c Y − Y"


register(LossRule("mse", _mse, per_element=True))
register(LossRule("mae", _mae, per_element=True))
register(LossRule("bce", _bce, per_element=True, logits="bce_logits"))
register(LossRule("bce_logits", _bce_logits, per_element=True))
register(LossRule("cce", _cce, logits="cce_logits"))
register(LossRule("cce_logits", _cce_logits))
register(LossRule("sparse_cce", _sparse_cce, logits="sparse_cce_logits", sparse=True))
register(LossRule("sparse_cce_logits", _cce_logits, sparse=True))
register(
    LossRule(
        "output_mean",
        direct=lambda yh: (
            float(yh.mean()),
            np.full_like(yh, 1.0 / yh.size),
            "J = mean(Ŷ)",
            r"J = \mathrm{mean}(\hat Y)",
            "1/N",
        ),
    )
)
register(
    LossRule("output_sum", direct=lambda yh: (float(yh.sum()), np.ones_like(yh), "J = Σ Ŷ", r"J = \sum \hat Y", "1"))
)

#: loss kinds with a closed form; ``custom`` means an arbitrary scalar callable (autodiff only).
LOSS_KINDS = tuple(LOSS_RULES)


def logits_variant(spec: LossSpec) -> LossSpec:
    """The ``from_logits`` twin of a probability loss (used when the framework computed J from the logits)."""
    rule = LOSS_RULES.get(spec.kind)
    return replace(spec, kind=rule.logits) if rule is not None and rule.logits else spec


# -------------------------------------------------------------------------------------------- evaluation
def _onehot(y: np.ndarray, c: int, pred_ndim: int) -> np.ndarray:
    yi = np.asarray(y)
    if yi.ndim == pred_ndim and yi.shape[-1:] == (1,):
        yi = yi[..., 0]
    if not np.all(np.equal(np.mod(yi, 1), 0)):
        raise InputError(f"sparse cross-entropy needs integer class indices, got y with values like {yi.flat[0]!r}")
    yi = yi.astype(np.int64)
    if yi.size and (yi.min() < 0 or yi.max() >= c):
        raise InputError(
            f"sparse cross-entropy class indices must lie in [0, {c - 1}] for {c} classes, got values in "
            f"[{yi.min()}, {yi.max()}]"
        )
    return np.eye(c)[yi]


def _targets(rule: LossRule, spec: LossSpec, yh: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The targets in ŷ's shape (one-hot for a sparse rule), label smoothing applied."""
    if rule.sparse:
        t = _onehot(y, yh.shape[-1], yh.ndim)
        if t.shape != yh.shape:
            raise InputError(
                f"sparse cross-entropy needs one class index per sample: y has shape {np.shape(y)!r}, "
                f"ŷ has shape {yh.shape!r}"
            )
    else:
        t = np.asarray(y, dtype=np.float64)
        if spec.convention.expand_rank and t.ndim == yh.ndim - 1 and yh.shape[-1] == 1:
            t = t[..., None]  # Keras' squeeze_or_expand_to_same_rank
        if t.shape != yh.shape:
            raise InputError(
                f"y has shape {t.shape!r} but the model's output ŷ has shape {yh.shape!r}; the loss would "
                "broadcast them. Pass y with the output's shape, or run gradsight.check_loss(loss, y, y_hat) "
                "to see what the broadcast does."
            )
    if spec.label_smoothing:
        ls = spec.label_smoothing
        t = t * (1 - ls) + (0.5 * ls if rule.kind.startswith("bce") else ls / yh.shape[-1])
    return t


def _kept(rule: LossRule, spec: LossSpec, y: np.ndarray) -> np.ndarray | None:
    """1.0 for the samples a sparse cross-entropy keeps, 0.0 for those with ``ignore_index`` (None: all kept)."""
    if not rule.sparse or spec.ignore_index is None:
        return None
    yi = np.asarray(y).reshape(-1)
    return (yi != spec.ignore_index).astype(np.float64)


def _weighted_count(rule: LossRule, spec: LossSpec, y: np.ndarray, n: int) -> tuple[float, str] | None:
    """The mean's divisor of a class-weighted or ``ignore_index`` sparse cross-entropy (torch), else None."""
    if not rule.sparse or (spec.class_weights is None and spec.ignore_index is None):
        return None
    yi = np.asarray(y).reshape(-1).astype(np.int64)
    keep = _kept(rule, spec, y)
    keep = np.ones(len(yi)) if keep is None else keep
    if spec.class_weights is None:
        return float(keep.sum()), "n_kept"
    w = np.asarray(spec.class_weights, dtype=np.float64)
    return float((w[np.where(keep > 0, yi, 0)] * keep).sum()), "Σ_i w_{y_i}"


def _count(rule: LossRule, spec: LossSpec, yh: np.ndarray) -> tuple[int, str]:
    """How many values the mean divides by, and its name in the formula."""
    if spec.convention.last_axis_mean:
        what = "N" if yh.ndim > 2 else ("n·f_L" if rule.per_element else "n")
        return int(np.prod(yh.shape[:-1])), what
    if rule.per_element:
        return yh.size, "n·f_L" if yh.ndim == 2 else "N"
    if spec.convention.ce_needs_2d and yh.ndim != 2:
        raise InputError(
            f"{spec.convention.name} cross-entropy closed form needs 2-D (n, C) predictions, got shape {yh.shape!r}"
        )
    return yh.shape[0], "n"


def evaluate_loss(spec: LossSpec, y_hat: np.ndarray, y: np.ndarray) -> LossResult:
    """Evaluate a loss rule at ``(ŷ, y)`` in float64, in the convention of ``spec``.

    Args:
        spec: the loss.
        y_hat: predictions ŷ = A_L (framework layout).
        y: targets: same shape as ŷ, or class indices for the sparse kinds.

    Returns:
        The :class:`LossResult` with J, dJ/dŶ and the formula (scale written out).

    Raises:
        InputError: shapes that the loss cannot pair, or a kind without a rule.
    """
    rule = LOSS_RULES.get(spec.kind)
    if rule is None:
        raise InputError(f"no closed form for loss kind {spec.kind!r}; expected one of {LOSS_KINDS}")
    yh = np.asarray(y_hat, dtype=np.float64)
    if rule.direct is not None:
        return LossResult(*rule.direct(yh))
    y_kept = y
    if rule.sparse and spec.ignore_index is not None:  # ignored samples: a valid index, then masked out
        y_kept = np.where(np.asarray(y) == spec.ignore_index, 0, np.asarray(y))
        t = _targets(rule, spec, yh, y_kept) * _kept(rule, spec, y)[:, None]
    else:
        t = _targets(rule, spec, yh, y)
    count, what = _count(rule, spec, yh)
    wc = _weighted_count(rule, spec, y, yh.shape[0])
    if wc is not None:
        count, what = wc
        if count == 0 and spec.reduction == "mean":
            why = (
                f"every target equals ignore_index ({spec.ignore_index})"
                if what == "n_kept"
                else "the class weights of its targets sum to 0"
            )
            raise InputError(
                f"the batch has nothing to average: {why}, so the mean cross-entropy divides 0 by 0 and the loss "
                "is NaN (as the framework computes it), with NaN gradients. Pass a batch with at least one target "
                "that counts."
            )
    vals, g, base, lbase, gtxt = rule.pointwise(yh, t, spec)
    conv, red = spec.convention, spec.reduction
    axis_mean = conv.last_axis_mean and rule.per_element
    if axis_mean:
        vals = vals.mean(axis=-1)
        g = g / yh.shape[-1]
    if red == "mean":
        value = float(vals.sum() / count)
        g = g / count
        scale = f"1/({what})" if ("·" in what or "Σ" in what) else f"1/{what}"
    else:
        value = float(vals.sum())
        scale = "1/f_L" if axis_mean else "1"
    if rule.kind == "mse" and scale != "1":
        grad_formula = f"2/{scale[2:]}·(Ŷ − Y)"
    else:
        grad_formula = ("" if scale == "1" else f"{scale}·") + gtxt
    words = conv.reduction_words[(rule.per_element, red)]
    formula = f"J = {words} of {base} ({conv.name} convention); dJ/dŶ = {grad_formula}"
    latex = (
        rf"J = \mathrm{{{red}}}\left[{lbase}\right],\quad "
        rf"\frac{{\partial J}}{{\partial \hat Y}} = {scale}\cdot ({gtxt})"
    )
    return LossResult(value, g, formula, latex, scale)
