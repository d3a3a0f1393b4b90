"""Loss rules: value, closed-form dJ/dŶ and formula text, in torch's and in Keras' convention (numpy, float64).

Conventions reproduced exactly (Keras 3.15 sources: ``keras/src/losses/losses.py``, ``loss.py`` and
``keras/src/backend/tensorflow/nn.py``; torch 2.x ``torch.nn`` losses):

* **torch** ``mse``/``mae``/``bce``/``bce_logits`` average over *all* elements (``mean``) or sum them (``sum``);
  cross-entropies (2-D ``(n, C)`` only) average over the batch ``n``. ``bce`` uses ``log`` clamped at −100
  (not reproduced: only matters for p within e^−100 of 0 or 1).
* **Keras** ``mse``/``mae``/``bce``/``bce_logits`` first average the *last axis* of each sample, then reduce the
  per-sample values (``sum_over_batch_size`` = mean over them, or ``sum``), so Keras ``sum`` is torch ``sum``
  divided by f_L. Probability BCE clips ŷ to [ε, 1−ε] (ε = ``keras.config.epsilon()`` = 1e-7, gradient zero
  where clipped). Probability CE first normalises ŷ by its sum over the last axis, then clips. Sparse
  probability CE clips ŷ (no normalisation) and feeds log ŷ to ``sparse_softmax_cross_entropy_with_logits``.
  TensorFlow's ``softmax_cross_entropy_with_logits`` gradient is ``softmax(Z) − Y`` (it assumes each row of Y
  sums to 1); torch's is ``softmax(Z)·ΣY − Y``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._errors import InputError

__all__ = ["LOSS_KINDS", "LossResult", "LossSpec", "evaluate_loss", "logits_variant"]

KERAS_EPSILON = 1e-7

#: loss kinds with a closed form; ``custom`` means an arbitrary scalar callable (autodiff only).
LOSS_KINDS = (
    "mse",
    "mae",
    "bce",
    "bce_logits",
    "cce",
    "cce_logits",
    "sparse_cce",
    "sparse_cce_logits",
    "output_mean",
    "output_sum",
)

_LOGITS = {"bce": "bce_logits", "cce": "cce_logits", "sparse_cce": "sparse_cce_logits"}


@dataclass(frozen=True)
class LossSpec:
    """A framework-neutral loss description.

    Attributes:
        kind: one of :data:`LOSS_KINDS`, or ``"custom"``.
        reduction: ``"mean"`` or ``"sum"``.
        convention: ``"torch"`` or ``"keras"``.
        display: how the user's loss is shown, e.g. ``"torch.nn.MSELoss(reduction='mean')"``.
        label_smoothing: Keras' label smoothing (bce, cce), 0 otherwise.
        epsilon: Keras' clipping epsilon.
    """

    kind: str
    reduction: str = "mean"
    convention: str = "torch"
    display: str = ""
    label_smoothing: float = 0.0
    epsilon: float = KERAS_EPSILON


@dataclass(frozen=True)
class LossResult:
    """Value and gradient of a loss rule, with its formula text."""

    value: float
    grad: np.ndarray
    formula: str
    latex: str
    scale: str


def logits_variant(spec: LossSpec) -> LossSpec:
    """The ``from_logits`` twin of a probability loss (Keras uses it when ŷ carries ``_keras_logits``)."""
    return LossSpec(
        _LOGITS.get(spec.kind, spec.kind),
        spec.reduction,
        spec.convention,
        spec.display,
        spec.label_smoothing,
        spec.epsilon,
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


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


def evaluate_loss(spec: LossSpec, y_hat: np.ndarray, y: np.ndarray) -> LossResult:
    """Evaluate a loss rule at ``(ŷ, y)`` in float64.

    Args:
        spec: the loss.
        y_hat: predictions ŷ = A_L (framework layout).
        y: targets: same shape as ŷ, or class indices for the sparse kinds.

    Returns:
        The :class:`LossResult` with J, dJ/dŶ and the formula (scale written out).

    Raises:
        InputError: shapes that the loss cannot pair.
    """
    k, red, conv = spec.kind, spec.reduction, spec.convention
    yh = np.asarray(y_hat, dtype=np.float64)
    sparse = k.startswith("sparse")
    if k in ("output_mean", "output_sum"):
        n_el = yh.size
        if k == "output_mean":
            return LossResult(
                float(yh.mean()), np.full_like(yh, 1.0 / n_el), "J = mean(Ŷ)", r"J = \mathrm{mean}(\hat Y)", "1/N"
            )
        return LossResult(float(yh.sum()), np.ones_like(yh), "J = Σ Ŷ", r"J = \sum \hat Y", "1")
    if sparse:
        t = _onehot(y, yh.shape[-1], yh.ndim)
        if t.shape != yh.shape:
            raise InputError(
                f"sparse cross-entropy needs one class index per sample: y has shape {np.shape(y)!r}, "
                f"ŷ has shape {yh.shape!r}"
            )
    else:
        t = np.asarray(y, dtype=np.float64)
        if conv == "keras" and t.ndim == yh.ndim - 1 and yh.shape[-1] == 1:
            t = t[..., None]  # Keras' squeeze_or_expand_to_same_rank
        if t.shape != yh.shape:
            raise InputError(
                f"y has shape {t.shape!r} but the model's output ŷ has shape {yh.shape!r}; the loss would "
                "broadcast them. Pass y with the output's shape, or run gradsight.check_loss(loss, y, y_hat) "
                "to see what the broadcast does."
            )
    if spec.label_smoothing:
        ls = spec.label_smoothing
        t = t * (1 - ls) + (0.5 * ls if k.startswith("bce") else ls / yh.shape[-1])
    per_element = k in ("mse", "mae", "bce", "bce_logits")
    if conv == "torch":
        if per_element:
            count, what = yh.size, "n·f_L" if yh.ndim == 2 else "N"
        else:
            if yh.ndim != 2:
                raise InputError(
                    f"torch cross-entropy closed form needs 2-D (n, C) predictions, got shape {yh.shape!r}"
                )
            count, what = yh.shape[0], "n"
    else:
        count = int(np.prod(yh.shape[:-1]))
        what = "n·f_L" if per_element else "n"
        if yh.ndim > 2:
            what = "N"
    f_last = yh.shape[-1]
    # ---- per-element / per-sample value and gradient (before reduction)
    eps = spec.epsilon
    if k == "mse":
        e = yh - t
        vals, g = e * e, 2.0 * e
        base, lbase, gtxt = "(Ŷ − Y)²", r"(\hat Y - Y)^2", "2·(Ŷ − Y)"
    elif k == "mae":
        e = yh - t
        vals, g = np.abs(e), np.sign(e)
        base, lbase, gtxt = "|Ŷ − Y|", r"|\hat Y - Y|", "sign(Ŷ − Y)"
    elif k == "bce":
        if conv == "keras":
            p = np.clip(yh, eps, 1 - eps)
            mask = ((yh >= eps) & (yh <= 1 - eps)).astype(np.float64)
            vals = -(t * np.log(p) + (1 - t) * np.log(1 - p))
            g = mask * (-t / p + (1 - t) / (1 - p))
            gtxt = "(−Y/P + (1−Y)/(1−P))·[ε ≤ Ŷ ≤ 1−ε], P = clip(Ŷ, ε, 1−ε)"
        else:
            p = yh
            with np.errstate(divide="ignore", invalid="ignore"):
                vals = -(t * np.maximum(np.log(p), -100) + (1 - t) * np.maximum(np.log1p(-p), -100))
                g = (p - t) / np.maximum(p * (1 - p), 1e-12)
            gtxt = "(Ŷ − Y)/(Ŷ(1 − Ŷ))"
        base, lbase = "−(Y log Ŷ + (1−Y) log(1−Ŷ))", r"-(Y\log\hat Y + (1-Y)\log(1-\hat Y))"
    elif k == "bce_logits":
        vals = np.maximum(yh, 0) - yh * t + np.log1p(np.exp(-np.abs(yh)))
        g = _sigmoid(yh) - t
        base, lbase, gtxt = "softplus(Z) − Y·Z", r"\mathrm{softplus}(Z) - YZ", "σ(Ŷ) − Y"
    elif k in ("cce", "sparse_cce") and conv == "keras":
        if k == "cce":
            s = yh.sum(axis=-1, keepdims=True)
            q = yh / s
            c = np.clip(q, eps, 1 - eps)
            mask = ((q >= eps) & (q <= 1 - eps)).astype(np.float64)
            vals = -(t * np.log(c)).sum(axis=-1)
            gq = mask * (-t / c)
            g = (gq - (gq * q).sum(axis=-1, keepdims=True)) / s
            gtxt = "(G − Σ_c G·Q)/ΣŶ, G = −Y/clip(Q)·[ε ≤ Q ≤ 1−ε], Q = Ŷ/ΣŶ"
            base, lbase = "−Σ_c Y log clip(Ŷ/ΣŶ, ε, 1−ε)", r"-\sum_c Y \log \mathrm{clip}(\hat Y/\sum\hat Y)"
        else:
            c = np.clip(yh, eps, 1 - eps)
            mask = ((yh >= eps) & (yh <= 1 - eps)).astype(np.float64)
            sc = c.sum(axis=-1, keepdims=True)
            vals = -(t * np.log(c / sc)).sum(axis=-1)
            g = mask * (1.0 / sc - t / c)
            gtxt = "(1/ΣP − onehot/P)·[ε ≤ Ŷ ≤ 1−ε], P = clip(Ŷ, ε, 1−ε)"
            base, lbase = "−log(P_y/ΣP), P = clip(Ŷ, ε, 1−ε)", r"-\log(P_y / \sum P)"
    elif k in ("cce", "sparse_cce"):  # torch convention, plain probabilities
        with np.errstate(divide="ignore"):
            vals = -(t * np.log(yh)).sum(axis=-1)
        g = -t / yh
        base, lbase, gtxt = "−Σ_c Y log Ŷ", r"-\sum_c Y\log\hat Y", "−Y/Ŷ"
    elif k in ("cce_logits", "sparse_cce_logits"):
        vals = -(t * _log_softmax(yh)).sum(axis=-1)
        s = _softmax(yh)
        if conv == "torch":
            g = s * t.sum(axis=-1, keepdims=True) - t
            gtxt = "softmax(Ŷ)·Σ_c Y − Y"
        else:
            g = s - t
            gtxt = "softmax(Ŷ) − Y"
        base, lbase = "−Σ_c Y log softmax(Ŷ)", r"-\sum_c Y \log\mathrm{softmax}(\hat Y)"
    else:  # pragma: no cover - guarded by callers
        raise InputError(f"no closed form for loss kind {k!r}; expected one of {LOSS_KINDS}")
    # ---- reduction
    keras_axis_mean = conv == "keras" and per_element
    if keras_axis_mean:
        vals = vals.mean(axis=-1)
        g = g / f_last
    if red == "mean":
        value = float(vals.sum() / count)
        g = g / count
        scale = f"1/({what})" if "·" in what else f"1/{what}"
    else:
        value = float(vals.sum())
        scale = "1/f_L" if keras_axis_mean else "1"
    red_txt = {
        ("torch", True, "mean"): "mean over all elements",
        ("torch", True, "sum"): "sum over all elements",
        ("torch", False, "mean"): "mean over the batch",
        ("torch", False, "sum"): "sum over the batch",
        ("keras", True, "mean"): "mean over the last axis, then over the batch",
        ("keras", True, "sum"): "mean over the last axis, then sum over the batch",
        ("keras", False, "mean"): "sum over classes, mean over the batch",
        ("keras", False, "sum"): "sum over classes, sum over the batch",
    }[(conv, per_element, red)]
    coeff = "" if scale == "1" else f"{scale}·"
    if k == "mse" and scale != "1":
        grad_formula = f"2/{scale[2:]}·(Ŷ − Y)"
    elif k == "mse":
        grad_formula = "2·(Ŷ − Y)"
    else:
        grad_formula = f"{coeff}{gtxt}"
    formula = f"J = {red_txt} of {base} ({conv} convention); dJ/dŶ = {grad_formula}"
    latex = (
        rf"J = \mathrm{{{red}}}\left[{lbase}\right],\quad "
        rf"\frac{{\partial J}}{{\partial \hat Y}} = {scale}\cdot ({gtxt})"
    )
    return LossResult(value, g, formula, latex, scale)
