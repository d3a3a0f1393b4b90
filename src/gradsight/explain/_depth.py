"""``depth_sweep``: how the per-layer gradient RMS of a dense stack grows with depth, with the closed form.

Calibration (the depth and initialisation example): X = ones(n, f_0), every layer Dense without bias, loss =
Keras-style mean MSE (J = mean over n and f_L of (Ŷ − Y)²), and Y = Ŷ − 1 so that the error is 1 everywhere,
dJ/dŶ = 2/(n·f_L).

Closed forms (identity or ReLU activation; every pre-activation stays positive):

* ``init="ones"`` (W_l = 1): every entry of dJ/dW_l equals (2/f_L)·∏_{k=0}^{l−2} f_k·∏_{k=l+1}^{L} f_k; with all
  widths f this is (2/f)·f^{L−1} for every layer: 0.667, 2, 6, 18, 54 for f = 3 and depths 1..5.
* ``init="scaled"`` (W_l = 1/f_{l−1}): every A_l is 1 and dJ/dW_l = 2/f_l: flat, 0.667 for f = 3.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import InputError
from ..zoo import check_seed
from ._trace import clean_json
from .rules import ELEMENTWISE, Activation, activation_rule, dense_backward, dense_forward

__all__ = ["DepthSweep", "depth_sweep"]

_COLUMNS = ["depth", "layer", "fan_in", "fan_out", "grad_rms", "predicted", "autodiff_rms", "ok"]


@dataclass
class DepthSweep:
    """The table of per-layer gradient RMS against depth.

    Attributes:
        rows: one dict per (depth, layer) with the columns ``depth, layer, fan_in, fan_out, grad_rms``
            (numpy closed-form chain), ``predicted`` (the formula's value, None where no closed form exists),
            ``autodiff_rms`` (the framework's, None unless ``framework=`` was given) and ``ok``.
        init, activation, widths, n, framework: the settings.
    """

    rows: list[dict[str, Any]]
    init: str
    activation: str
    widths: list[int]
    n: int
    framework: str | None = None
    formula: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every row agrees with its prediction and autodiff (where present)."""
        return all(r["ok"] for r in self.rows)

    def _fmt(self, v: Any) -> str:
        return "—" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))

    def __str__(self) -> str:
        head = [
            f"depth sweep — init {self.init!r}, activation {self.activation}, widths {self.widths}, n = {self.n}"
            + (f", checked with {self.framework}" if self.framework else ""),
            f"  {self.formula}",
            "  " + "  ".join(f"{c:>12}" for c in _COLUMNS),
        ]
        body = ["  " + "  ".join(f"{self._fmt(r[c]):>12}" for c in _COLUMNS) for r in self.rows]
        return "\n".join(head + body + [f"{'✓' if self.ok else '✗'} {len(self.rows)} rows"])

    def __repr__(self) -> str:
        return f"DepthSweep(init={self.init!r}, depths={sorted({r['depth'] for r in self.rows})}, ok={self.ok})"

    def to_markdown(self) -> str:
        """Markdown table."""
        out = [f"### depth sweep — init `{self.init}`, activation `{self.activation}`", "", self.formula, ""]
        out += ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        out += ["| " + " | ".join(self._fmt(r[c]) for c in _COLUMNS) + " |" for r in self.rows]
        return "\n".join(out)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return clean_json(
            {
                "init": self.init,
                "activation": self.activation,
                "widths": self.widths,
                "n": self.n,
                "framework": self.framework,
                "formula": self.formula,
                "ok": self.ok,
                "rows": self.rows,
            }
        )

    def to_pandas(self) -> Any:
        """The table as a ``pandas.DataFrame``."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=_COLUMNS)

    def by_depth(self) -> dict[int, list[float]]:
        """``{depth: [grad_rms of layer 1..depth]}``."""
        out: dict[int, list[float]] = {}
        for r in self.rows:
            out.setdefault(r["depth"], []).append(r["grad_rms"])
        return out

    def plot(self, ax: Any = None) -> Any:
        """Plot gradient RMS per layer, one line per depth (log scale); returns the matplotlib Figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 4))
        else:
            fig = ax.figure
        for d, vals in self.by_depth().items():
            ax.plot(range(1, len(vals) + 1), vals, marker="o", label=f"depth {d}")
        pred = [(r["layer"], r["predicted"]) for r in self.rows if r["predicted"] is not None]
        if pred:
            ax.scatter(*zip(*pred, strict=False), marker="x", color="k", zorder=3, label="closed form")
        ax.set_yscale("log")
        ax.set_xlabel("layer l")
        ax.set_ylabel("RMS of dJ/dW_l")
        ax.set_title(f"gradient RMS vs depth (init {self.init}, {self.activation})")
        ax.legend(fontsize="small")
        return fig


def _weights(init: str, widths: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for fi, fo in itertools.pairwise(widths):
        if init == "ones":
            out.append(np.ones((fi, fo)))
        elif init == "scaled":
            out.append(np.ones((fi, fo)) / fi)
        elif init == "normal":
            out.append(rng.normal(0.0, 1.0 / np.sqrt(fi), (fi, fo)))
        elif init == "he":
            out.append(rng.normal(0.0, np.sqrt(2.0 / fi), (fi, fo)))
        else:
            raise InputError(f"init must be one of 'ones', 'scaled', 'normal', 'he'; got {init!r}")
    return out


def _predicted(init: str, act: str, widths: Sequence[int], l: int) -> float | None:
    if act not in ("identity", "relu") or init not in ("ones", "scaled"):
        return None
    L = len(widths) - 1
    if init == "scaled":
        return 2.0 / widths[l]
    # Python ints (np.prod overflows int64 silently), then one correctly rounded division
    return 2 * math.prod(widths[: l - 1]) * math.prod(widths[l + 1 : L + 1]) / widths[L]


#: the most float64 numbers one depth of a sweep may hold (weights + activations + gradients): 256 MB.
MAX_ELEMENTS = 32 * 2**20
#: the deepest stack a sweep builds.
MAX_DEPTH = 1000


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_sizes(widths: Any, depths: Any, n: Any, init: Any) -> tuple[list[int], list[int]]:
    """Validate depth_sweep's sizes; return (depths, widths f_0..f_dmax)."""
    if _is_int(depths):
        if depths < 1:
            raise InputError(
                f"depths must be a positive depth L (meaning 1..L) or an iterable of positive depths, got {depths!r}. "
                "Fix: e.g. depth_sweep(3, 5) for depths 1..5"
            )
        ds = list(range(1, int(depths) + 1))
    else:
        try:
            given = list(depths)  # once: a generator is consumed by reading it
            ds = sorted({int(d) for d in given if _is_int(d)})
        except TypeError:
            raise InputError(f"depths must be an int or an iterable of ints, got {depths!r}") from None
        if not ds or len(ds) != len(set(given)) or min(ds) < 1:
            raise InputError(f"depths must be positive integers, got {depths!r}. Fix: e.g. depths=[1, 2, 4]")
    dmax = max(ds)
    if dmax > MAX_DEPTH:
        raise InputError(f"depth {dmax} is above the limit of {MAX_DEPTH} layers. Fix: sweep fewer depths")
    if _is_int(widths):
        ws = [int(widths)] * (dmax + 1)
    else:
        try:
            ws = [int(w) if _is_int(w) else None for w in widths]
        except TypeError:
            raise InputError(f"widths must be an int or a sequence of ints, got {widths!r}") from None
        if any(w is None for w in ws):
            raise InputError(f"widths must be integers, got {widths!r}")
    if len(ws) < dmax + 1 or min(ws) < 1:
        raise InputError(
            f"widths must be one positive width f, or f_0..f_{dmax} ({dmax + 1} positive values) for depth {dmax}; "
            f"got {widths!r}. Fix: e.g. depth_sweep(3, {dmax}) or widths=[3] * {dmax + 1}"
        )
    if not _is_int(n) or n < 1:
        raise InputError(f"n (the batch size) must be a positive integer, got {n!r}")
    if init not in ("ones", "scaled", "normal", "he"):
        raise InputError(f"init must be one of 'ones', 'scaled', 'normal', 'he'; got {init!r}")
    ws = ws[: dmax + 1]
    elements = sum(a * b for a, b in itertools.pairwise(ws)) * 2 + 3 * int(n) * sum(ws)
    if elements > MAX_ELEMENTS:
        raise InputError(
            f"a depth-{dmax} stack of widths {ws[:4]}{'…' if len(ws) > 4 else ''} with n = {n} needs about "
            f"{elements * 8 / 1e9:.3g} GB of float64 arrays (limit {MAX_ELEMENTS * 8 / 1e6:.0f} MB). Fix: use "
            "smaller widths or batch; the gradient RMS pattern does not depend on n and shows at small widths"
        )
    return ds, ws


class _BeyondFloat64(ArithmeticError):
    """The calibration Y = Ŷ − 1 is not exact in float64 at this depth (the output is too large)."""

    def __init__(self, output: float) -> None:
        super().__init__(output)
        self.output = output


def _largest_depth(init: str, act: str, widths: Sequence[int]) -> int | None:
    """The deepest stack whose output ∏ f_0..f_(d−1) (``init="ones"``) stays below 2**53; None if not known."""
    if init != "ones" or act not in ("identity", "relu"):
        return None
    d, out = 0, 1
    while d < len(widths) - 1 and out * widths[d] <= 2**53:
        out *= widths[d]
        d += 1
    return d


def _beyond_message(d: int, exc: _BeyondFloat64, init: str, act: str, ws: Sequence[int], done: list[int]) -> str:
    largest = _largest_depth(init, act, ws)
    if largest is not None:
        works = f"The deepest stack that works for these widths is {largest}"
    elif done:
        works = f"Depths up to {max(done)} of this sweep worked"
    else:
        works = "No depth of this sweep worked"
    return (
        f"depth_sweep: at depth {d} the network output reaches {exc.output:.3g}, too large for float64 to hold the "
        "calibration target Y = Ŷ − 1 exactly (from 2**53 = 9.0e15 on it rounds to Ŷ, the error is no longer 1 "
        f"and every gradient would read 0). {works}. Fix: sweep shallower depths, or use smaller widths or "
        "init='scaled'."
    )


def _numpy_chain(x: np.ndarray, weights: list[np.ndarray], rule: Activation) -> tuple[np.ndarray, list[np.ndarray]]:
    """Y = Ŷ − 1 and dJ/dW_l (mean MSE) of the bias-free dense chain, from the rule table in numpy."""
    acts, zs = [x], []
    for w in weights:
        z = dense_forward(acts[-1], w, None)
        zs.append(z)
        acts.append(rule.forward(z))
    y = acts[-1] - 1.0
    if not np.all(np.abs(acts[-1] - y - 1.0) <= 1e-9):  # |Ŷ| near 2**53 or inf: Ŷ − 1 rounds, the error is not 1
        raise _BeyondFloat64(float(np.max(np.abs(acts[-1]))))
    da = 2.0 / (x.shape[0] * weights[-1].shape[1]) * (acts[-1] - y)
    grads: list[np.ndarray] = [None] * len(weights)  # type: ignore[list-item]
    for l in range(len(weights), 0, -1):
        dz = da * rule.derivative(zs[l - 1])
        grads[l - 1], _, da = dense_backward(dz, acts[l - 1], weights[l - 1])
    return y, grads


def _row(d: int, l: int, w_d: Sequence[int], grad: np.ndarray, pred: float | None, auto: list | None) -> dict:
    """One table row: layer ``l`` of the depth-``d`` stack, its RMS against the closed form and autodiff."""
    rms = float(np.sqrt(np.mean(grad**2)))
    arms = None if auto is None else float(np.sqrt(np.mean(np.asarray(auto[l - 1]) ** 2)))
    ok = (pred is None or abs(rms - pred) <= 1e-9 * max(1.0, abs(pred))) and (
        arms is None or abs(rms - arms) <= 1e-9 * max(1.0, abs(arms))
    )
    return {
        "depth": d,
        "layer": l,
        "fan_in": w_d[l - 1],
        "fan_out": w_d[l],
        "grad_rms": rms,
        "predicted": pred,
        "autodiff_rms": arms,
        "ok": bool(ok),
    }


def _formula_text(init: str, act: str) -> str:
    if act not in ("identity", "relu"):
        return f"no closed form for activation {act!r}: numpy chain only"
    return {
        "ones": "closed form: dJ/dW_l = (2/f_L)·∏_{k<l−1} f_k·∏_{k>l} f_k per entry (equal widths: (2/f)·f^(L−1))",
        "scaled": "closed form: W_l = 1/f_(l−1) keeps A_l = 1, so dJ/dW_l = 2/f_l per entry (flat)",
    }.get(init, "no closed form for random inits: numpy chain only")


def depth_sweep(
    widths: int | Sequence[int] = 3,
    depths: int | Iterable[int] = 5,
    *,
    init: str = "ones",
    activation: str | None = None,
    n: int = 4,
    framework: str | None = None,
    seed: int = 0,
) -> DepthSweep:
    """Per-layer RMS of dJ/dW_l for dense stacks of depth 1..L, with the closed-form prediction.

    Args:
        widths: one width f for every layer (and the input), or f_0..f_Lmax (length max(depths) + 1; a stack of
            depth d uses f_0..f_d).
        depths: L (meaning 1..L) or an iterable of depths.
        init: ``"ones"``, ``"scaled"`` (1/f_in), ``"normal"`` (N(0, 1/f_in)) or ``"he"`` (N(0, 2/f_in)), seeded.
        activation: None (identity) or an elementwise activation name (``"relu"``, ``"tanh"``, ...).
        n: batch size (the result does not depend on it: the loss averages over n).
        framework: also compute the gradients with ``"torch"`` or ``"tensorflow"`` autodiff (via
            :func:`gradsight.explain`) and compare.
        seed: seed of the random inits, an int from 0 to 2**32 − 1.

    Returns:
        The :class:`DepthSweep`.

    The numbers are exact in float64 only while the network output Ŷ stays below 2**53 (about 9e15): beyond it
    the calibration target Y = Ŷ − 1 rounds to Ŷ and every gradient would read 0. A sweep that reaches such a
    depth is refused (rather than printing zeros marked ✗), and the message names the deepest stack that works —
    with ``init="ones"`` and width f that is the largest L with f^L <= 2**53, e.g. 33 for f = 3, 5 for f = 1000.

    Raises:
        InputError: non-positive or non-integer depths/widths/n, a seed outside [0, 2**32 − 1], an unknown init
            or activation, sizes whose arrays would exceed 256 MB (or a depth above 1000), or a depth whose
            output float64 cannot represent exactly (see above).
    """
    from ._explain import adapter, explain

    ds, ws = _check_sizes(widths, depths, n, init)
    seed = check_seed(seed)
    dmax = max(ds)
    act = activation or "identity"
    try:
        if act not in ELEMENTWISE:
            raise KeyError(act)
        rule = activation_rule(act)
    except KeyError:
        raise InputError(f"activation must be one of {ELEMENTWISE}, got {activation!r}") from None
    rows: list[dict[str, Any]] = []
    for d in ds:
        rng = np.random.default_rng(seed)
        w_d = ws[: d + 1]
        weights = _weights(init, w_d, rng)
        x = np.ones((n, w_d[0]))
        try:
            y, grads = _numpy_chain(x, weights, rule)
        except _BeyondFloat64 as exc:
            raise InputError(_beyond_message(d, exc, init, act, ws, [r["depth"] for r in rows])) from None
        auto = None
        if framework is not None:
            ad = adapter(framework)
            model = ad.build_dense_model(weights, None, [None if act == "identity" else act] * d, "float64")
            tr = explain(model, x, y, "mse")
            auto = [tr[f"dJ/dW{l}"].autodiff for l in range(1, d + 1)]
        rows += [_row(d, l, w_d, grads[l - 1], _predicted(init, act, w_d, l), auto) for l in range(1, d + 1)]
    formula = _formula_text(init, act)
    fw_name = None if framework is None else ("torch" if framework == "torch" else "tensorflow")
    return DepthSweep(rows, init, act, ws[: dmax + 1], n, fw_name, formula)
