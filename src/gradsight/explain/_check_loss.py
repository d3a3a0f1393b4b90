"""``check_loss``: what a loss really computes on given arrays — reduction, gradient scale, and traps.

The loss is evaluated by its own framework (adapter ``loss_probe``) on ``y_true``/``y_pred``; dJ/dŶ is measured
by autodiff (of the *sum* when the loss is not a scalar — exactly what training would do). Findings:

* ``broadcast`` — y_true and y_pred have different shapes and the loss broadcast them (the broadcasting trap:
  targets (7, 1) against outputs (7, 3));
* ``non_scalar`` — the loss returns one value per sample; autodiff differentiates their sum;
* ``gradient_scale`` — the measured dJ/dŶ written as a formula, e.g. ``dJ/dŶ = 2/(n·f)·(Ŷ − Y)``;
* ``keras_last_axis_mean`` — Keras MSE/MAE/BCE average the last axis of each sample first;
* ``framework_warning`` — a warning the loss raised (torch warns on a target-size mismatch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import GradsightError, InputError
from .._frameworks import framework_of
from ._adapter import ExplainAdapter, adapter, check_loss_framework
from ._trace import clean_json, preview
from .rules import LOSS_RULES, evaluate_loss

__all__ = ["LossFinding", "LossReport", "check_loss"]

_MARK = {"error": "✗", "warning": "!", "info": "·"}


@dataclass(frozen=True)
class LossFinding:
    """One finding: a code, a severity, a one-or-two-sentence explanation, and the fix."""

    code: str
    severity: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        out = f"{_MARK.get(self.severity, '?')} [{self.code}] {self.message}"
        return out + (f"\n    fix: {self.fix}" if self.fix else "")

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"code": self.code, "severity": self.severity, "message": self.message, "fix": self.fix}


@dataclass
class LossReport:
    """What :func:`check_loss` found.

    Attributes:
        framework: ``"torch"`` or ``"keras"``.
        loss: the loss as displayed.
        y_true_shape / y_pred_shape: the shapes given.
        value: the loss's output (scalar or per-sample array).
        grad: autodiff's dJ/dŶ (of the sum when the output is not a scalar).
        gradient_formula: the measured dJ/dŶ as a formula, when one fits.
        findings: the findings, most severe first.
    """

    framework: str
    loss: str
    y_true_shape: tuple[int, ...]
    y_pred_shape: tuple[int, ...]
    value: np.ndarray
    grad: np.ndarray
    gradient_formula: str | None
    findings: list[LossFinding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No error or warning findings."""
        return not any(f.severity in ("error", "warning") for f in self.findings)

    @property
    def codes(self) -> list[str]:
        """The finding codes."""
        return [f.code for f in self.findings]

    def __getitem__(self, code: str) -> LossFinding:
        for f in self.findings:
            if f.code == code:
                return f
        raise KeyError(f"no finding {code!r}; found: {', '.join(self.codes) or 'none'}")

    def __repr__(self) -> str:
        return f"LossReport({self.loss!r}, findings={self.codes}, ok={self.ok})"

    def __str__(self) -> str:
        val = np.asarray(self.value)
        lines = [
            f"check_loss — {self.loss} ({self.framework})",
            f"  y_true {self.y_true_shape}, y_pred {self.y_pred_shape}",
            f"  value: {preview(val) if val.ndim else f'{float(val):.6g}'}",
        ]
        if self.gradient_formula:
            lines.append(f"  measured: {self.gradient_formula}")
        lines += ["  " + ln for f in self.findings for ln in str(f).splitlines()]
        lines.append(f"{'✓ no problems found' if self.ok else '✗ problems found'}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """Markdown form."""
        out = [f"### check_loss — `{self.loss}` ({self.framework})", ""]
        if self.gradient_formula:
            out += [f"Measured: {self.gradient_formula}", ""]
        out += ["| | code | finding | fix |", "|---|---|---|---|"]
        out += [f"| {_MARK[f.severity]} | `{f.code}` | {f.message} | {f.fix} |" for f in self.findings]
        return "\n".join(out)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return clean_json(
            {
                "framework": self.framework,
                "loss": self.loss,
                "y_true_shape": self.y_true_shape,
                "y_pred_shape": self.y_pred_shape,
                "value": np.asarray(self.value),
                "gradient_formula": self.gradient_formula,
                "ok": self.ok,
                "findings": [f.to_dict() for f in self.findings],
            }
        )


def _loss_framework(loss: Any, framework: str | None) -> str:
    """The framework that evaluates ``loss``: ``framework``, else the loss's own.

    Raises:
        InputError: no loss (not callable, not a name), a loss of another framework than ``framework``, or a
            plain function or name without ``framework``.
    """
    if not isinstance(loss, str) and not callable(loss):
        raise InputError(
            f"loss must be a loss object or function (nn.MSELoss(), keras.losses.MeanSquaredError()) or a loss "
            f"name such as 'mse' (with framework=), got {loss!r:.60} of type {type(loss).__name__!r}"
        )
    if framework is not None:
        check_loss_framework(loss, framework, where=f"check_loss(framework={framework!r})")
        return framework
    fw = framework_of(loss)
    if fw is None:
        raise InputError(
            f"cannot tell which framework the loss {loss!r:.60} belongs to (a plain function or a name). "
            "Fix: check_loss(loss, y_true, y_pred, framework='torch') or framework='tensorflow'"
        )
    return fw


def _per_element(kind: str) -> bool:
    rule = LOSS_RULES.get(kind)
    return rule is not None and rule.per_element


def _scale_formula(g: np.ndarray, e: np.ndarray, n: int, f: int) -> str | None:
    """Express g = c·e with c as a simple fraction of n and f, when it fits."""
    ee = float(np.sum(e * e))
    if ee == 0 or g.shape != e.shape:
        return None
    c = float(np.sum(g * e)) / ee
    if np.max(np.abs(g - c * e)) > 1e-4 * max(np.max(np.abs(g)), 1e-30):
        return None
    cands = {
        "2/(n·f)": 2 / (n * f),
        "2/n": 2 / n,
        "2/f": 2 / f,
        "2": 2.0,
        "1/(n·f)": 1 / (n * f),
        "1/n": 1 / n,
        "1/f": 1 / f,
        "1": 1.0,
    }
    for name, v in cands.items():
        if abs(c - v) <= 1e-5 * abs(v):
            if name in ("1", "2"):  # no n or f in it: nothing to evaluate
                return f"dJ/dŶ = {name}·(Ŷ − Y)" if name == "2" else "dJ/dŶ = Ŷ − Y"
            return f"dJ/dŶ = {name}·(Ŷ − Y) (n = {n}, f = {f}: {name} = {v:.6g})"
    return f"dJ/dŶ = {c:.6g}·(Ŷ − Y)"


def _arrays(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """y_true and y_pred as numpy (y_pred float64), refusing empty and non-finite arrays."""
    from ._explain import to_numpy

    yt = to_numpy(y_true, "y_true")
    yp = to_numpy(y_pred, "y_pred").astype(np.float64)
    if yp.ndim == 0 or yp.size == 0:
        raise InputError(f"y_pred must be a non-empty batch, got shape {yp.shape!r}")
    if yt.size == 0:
        raise InputError(f"y_true must be a non-empty batch, got shape {yt.shape!r}")
    for what, arr in (("y_true", yt), ("y_pred", yp)):
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise InputError(
                f"{what} contains {int(np.sum(~np.isfinite(arr)))} NaN or infinite values; the loss and its gradient "
                "would be NaN, so nothing could be measured. Fix: drop or impute those samples"
            )
    return yt, yp


def _probe(ad: ExplainAdapter, loss: Any, yt: np.ndarray, yp: np.ndarray) -> dict[str, Any]:
    """The adapter's loss probe, with a documentary error when the loss fails on the arrays."""
    try:
        return ad.loss_probe(loss, yt, yp)
    except GradsightError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise InputError(
            f"the loss {loss!r:.60} failed on y_true of shape {yt.shape!r} ({yt.dtype}) and y_pred of shape "
            f"{yp.shape!r}: {first}. Fix: pass y_true in the form the loss expects (ŷ's shape, or class indices "
            "of shape (n,) for a sparse cross-entropy)"
        ) from exc


def _pairing(
    yt: np.ndarray, yp: np.ndarray, value: np.ndarray, sparse: bool, expand_rank: bool
) -> tuple[np.ndarray | None, list[LossFinding]]:
    """The error Ŷ − Y the gradient is measured against (None when it cannot be paired), and shape findings."""
    findings: list[LossFinding] = []
    e = None
    if not sparse and yt.shape != yp.shape:
        keras_ok = expand_rank and yt.ndim == yp.ndim - 1 and yp.shape[-1] == 1 and yt.shape == yp.shape[:-1]
        try:
            b = np.broadcast_shapes(yt.shape, yp.shape)
        except ValueError:
            b = None
        if not keras_ok:
            if b is None:
                findings.append(
                    LossFinding(
                        "shape_mismatch",
                        "error",
                        f"y_true {yt.shape} and y_pred {yp.shape} cannot be paired.",
                        "make y_true the shape of the model's output",
                    )
                )
            else:
                e = yp - yt
                cols = ""
                if yp.ndim == 2 and yp.shape[1] > 1:
                    per_col = np.mean(e * e, axis=0)
                    cols = (
                        f" Squared error per output column against the same targets: "
                        f"{np.array2string(per_col, precision=4)}."
                    )
                got = f"{float(value):.6g}" if value.ndim == 0 else f"{value.shape} values like {value.ravel()[0]:.6g}"
                findings.append(
                    LossFinding(
                        "broadcast",
                        "error",
                        f"y_true {yt.shape} and y_pred {yp.shape} were broadcast to {b}: each target is compared "
                        f"with all {yp.shape[-1]} outputs of its sample, so the loss you got ({got}) is not a "
                        f"per-output loss.{cols}",
                        f"if the model should predict one value per sample, give its last layer 1 unit; otherwise "
                        f"pass y_true with shape {yp.shape}.",
                    )
                )
    elif not sparse:
        e = yp - yt.astype(np.float64)
    if expand_rank and e is None and not sparse and yt.shape == yp.shape[:-1]:
        e = yp - yt[..., None]
    return e, findings


def _gradient_scale(
    g: np.ndarray, e: np.ndarray | None, value: np.ndarray, spec: Any, yt: np.ndarray, yp: np.ndarray
) -> tuple[str | None, list[LossFinding]]:
    """The measured dJ/dŶ as a formula (a multiple of Ŷ − Y, or the loss rule's), and its finding."""
    findings: list[LossFinding] = []
    n = yp.shape[0]
    f = int(np.prod(yp.shape[1:])) if yp.ndim > 1 else 1
    formula = None
    if e is not None and g.shape == e.shape:
        formula = _scale_formula(g, e, n, f)
    red = "sum of its outputs" if value.size > 1 else "its scalar value"
    if formula is not None:
        findings.append(LossFinding("gradient_scale", "info", f"measured by autodiff (of {red}): {formula}.", ""))
    elif spec is not None and spec.reduction != "none" and yt.shape == yp.shape:
        try:
            res = evaluate_loss(spec, yp, yt)
            agree = np.allclose(res.grad, g, rtol=1e-4, atol=1e-6)
            findings.append(
                LossFinding(
                    "gradient_scale",
                    "info",
                    f"{res.formula}; autodiff {'agrees' if agree else 'DISAGREES'} (mean |dJ/dŶ| = "
                    f"{float(np.mean(np.abs(g))):.4g}).",
                    "",
                )
            )
            formula = res.formula
        except InputError:
            pass
    return formula, findings


def check_loss(loss: Any, y_true: Any, y_pred: Any, *, framework: str | None = None) -> LossReport:
    """Evaluate ``loss`` on the given arrays and report its effective reduction, gradient scale and traps.

    Precision: torch losses are evaluated in float64. Keras losses run in their own ``dtype``: float32 for a loss
    function and for a loss object created without ``dtype=`` (Keras' default float type), whatever the arrays'
    dtype; create the loss object with ``dtype="float64"`` to check it to float64 precision.

    Args:
        loss: a torch or Keras loss object or function, a loss name (with ``framework=``), or a plain callable
            (with ``framework=``; torch callables are called ``loss(y_pred, y_true)``, Keras ones
            ``loss(y_true, y_pred)``).
        y_true: the targets.
        y_pred: the predictions.
        framework: ``"torch"`` or ``"tensorflow"``; detected from the loss when it belongs to one.

    Returns:
        The :class:`LossReport`.

    Raises:
        InputError: a loss class instead of an instance, empty or non-finite arrays, or a loss that fails on
            the given arrays (its message is quoted).
    """
    from ._explain import _loss_class_error

    if isinstance(loss, type):
        raise _loss_class_error(loss)

    fw = _loss_framework(loss, framework)
    ad = adapter(fw)
    conv = ad.CONVENTIONS
    fw = conv.name
    yt, yp = _arrays(y_true, y_pred)
    probe = _probe(ad, loss, yt, yp)
    value = np.asarray(probe["value"])
    g = np.asarray(probe["grad"])
    spec = probe["spec"]
    display = probe["display"]
    sparse = spec is not None and spec.kind.startswith("sparse")
    e, findings = _pairing(yt, yp, value, sparse, conv.loss.expand_rank)
    # ---------------------------------------------------------------------------------------- framework warnings
    for w in probe["warnings"]:
        findings.append(LossFinding("framework_warning", "warning", f"the loss warned: {w}", "fix the shapes it names"))
    # ---------------------------------------------------------------------------------------------- non-scalar
    if value.size > 1:
        findings.append(
            LossFinding(
                "non_scalar",
                "warning",
                f"the loss returns shape {value.shape} (one value per sample), not a scalar. Autodiff "
                f"differentiates the sum of these {value.size} values, so every gradient is {value.size}× that "
                f"of their mean (the value printed is not what training minimises).",
                "use the loss object (keras.losses.MeanSquaredError() / nn.MSELoss()) or reduce with .mean()",
            )
        )
    formula, scale = _gradient_scale(g, e, value, spec, yt, yp)
    findings += scale
    # ------------------------------------------------------------------------------- last-axis mean (Keras)
    if conv.loss.last_axis_mean and spec is not None and _per_element(spec.kind) and yp.shape[-1] > 1:
        findings.append(
            LossFinding(
                "keras_last_axis_mean",
                "info",
                f"{conv.loss.display} {spec.kind.upper()} averages the last axis (f = {yp.shape[-1]}) of each "
                f"sample before reducing over the batch: with reduction 'sum' J is 1/{yp.shape[-1]} of torch's sum and "
                f"dJ/dŶ = 2/f·(Ŷ − Y) for MSE; with the default mean both agree (2/(n·f)).",
                "",
            )
        )
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda x: order.get(x.severity, 3))
    return LossReport(fw, display, tuple(yt.shape), tuple(yp.shape), value, g, formula, findings)
