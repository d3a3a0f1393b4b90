"""One rule per primitive: forward, local gradient and formula text side by side (numpy, float64).

Every rule works on float64 numpy arrays and knows nothing about torch or Keras. Layouts:

* dense: ``A_prev`` of shape ``(..., in)`` and the kernel in *(in, out)* form ``W_io`` (Keras' own layout; the
  torch adapter's ``(out, in)`` weight is transposed by the caller);
* conv2d: NCHW activations and a ``(cout, cin, kh, kw)`` kernel (torch's own layout; Keras' NHWC /
  ``(kh, kw, cin, cout)`` is transposed by the caller);
* activations: elementwise, any shape; softmax over the last axis of a 2-D array.

A composite layer (weighted op + activation) is assembled by the caller from these primitives, so each formula
is written exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ACTIVATIONS",
    "ActivationRule",
    "conv2d_backward",
    "conv2d_forward",
    "dense_backward",
    "dense_forward",
    "elementwise_rule",
    "jacobian_too_big",
    "softmax_backward",
    "softmax_forward",
    "softmax_jacobian",
    "softmax_probe",
    "softmax_vjp",
]

#: the largest array explain materialises for a per-sample Jacobian (bytes, float64). Above it the softmax S is
#: checked through a Jacobian-vector product instead (see :func:`softmax_vjp`).
JACOBIAN_LIMIT_BYTES = 64 * 2**20


def fmt_bytes(n: float) -> str:
    """``n`` bytes in words, e.g. ``"25.6 GB"``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.3g} TB"  # pragma: no cover


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _erf(x: np.ndarray) -> np.ndarray:
    """Elementwise erf in float64 (``math.erf`` is exact to the last ulp; vectorised)."""
    return np.vectorize(math.erf, otypes=[np.float64])(x) if x.size else x.astype(np.float64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float64)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


@dataclass(frozen=True)
class ActivationRule:
    """An elementwise activation: forward, derivative (the diagonal of S) and formula text.

    Attributes:
        name: rule name, e.g. ``"relu"``.
        params: the activation's parameters, e.g. ``{"slope": 0.01}``.
        forward: ``z -> a``.
        derivative: ``z -> da/dz`` elementwise (the diagonal of the local Jacobian S).
        text: plain-text formula of ``a = f(z)`` and ``f'(z)``.
        latex: LaTeX of the same.
    """

    name: str
    params: dict = field(default_factory=dict)
    forward: Callable[[np.ndarray], np.ndarray] = field(default=lambda z: z, repr=False)
    derivative: Callable[[np.ndarray], np.ndarray] = field(default=lambda z: np.ones_like(z), repr=False)
    text: str = ""
    latex: str = ""


def _gelu_erf(z: np.ndarray) -> np.ndarray:
    return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))


def _gelu_erf_d(z: np.ndarray) -> np.ndarray:
    cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


def _gelu_tanh(z: np.ndarray) -> np.ndarray:
    return 0.5 * z * (1.0 + np.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z**3)))


def _gelu_tanh_d(z: np.ndarray) -> np.ndarray:
    u = _SQRT_2_OVER_PI * (z + 0.044715 * z**3)
    t = np.tanh(u)
    du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z**2)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du


def _softplus(z: np.ndarray, beta: float, threshold: float | None) -> np.ndarray:
    bz = beta * z
    out = (np.maximum(bz, 0) + np.log1p(np.exp(-np.abs(bz)))) / beta
    if threshold is not None:
        out = np.where(bz > threshold, z, out)
    return out


def _softplus_d(z: np.ndarray, beta: float, threshold: float | None) -> np.ndarray:
    out = _sigmoid(beta * z)
    if threshold is not None:
        out = np.where(beta * z > threshold, 1.0, out)
    return out


def elementwise_rule(name: str, **params: float) -> ActivationRule:
    """Build the rule of an elementwise activation.

    Args:
        name: one of ``identity, relu, leaky_relu, elu, gelu, gelu_tanh, sigmoid, tanh, softplus, silu``.
        **params: ``slope`` (leaky_relu), ``alpha`` (elu), ``beta``/``threshold`` (softplus; torch's
            ``threshold`` switches to the identity where ``beta·z > threshold``, Keras has none).

    Returns:
        The :class:`ActivationRule`.

    Raises:
        KeyError: for an activation without a rule (callers turn this into an "autodiff only" layer).
    """
    if name == "identity":
        return ActivationRule("identity", {}, lambda z: z, np.ones_like, "A = Z, S = 1", r"A = Z,\; S = 1")
    if name == "relu":
        return ActivationRule(
            "relu",
            {},
            lambda z: np.maximum(z, 0.0),
            lambda z: (z > 0).astype(np.float64),
            "A = max(Z, 0), S = [Z > 0]",
            r"A = \max(Z, 0),\; S = \mathbb{1}[Z > 0]",
        )
    if name == "leaky_relu":
        a = float(params.get("slope", 0.01))
        return ActivationRule(
            "leaky_relu",
            {"slope": a},
            lambda z: np.where(z > 0, z, a * z),
            lambda z: np.where(z > 0, 1.0, a),
            f"A = Z if Z > 0 else {a:g}·Z, S = 1 if Z > 0 else {a:g}",
            rf"A = \begin{{cases}}Z & Z>0\\ {a:g}\,Z\end{{cases}},\; S = \begin{{cases}}1 & Z>0\\ {a:g}\end{{cases}}",
        )
    if name == "elu":
        a = float(params.get("alpha", 1.0))
        return ActivationRule(
            "elu",
            {"alpha": a},
            lambda z: np.where(z > 0, z, a * np.expm1(np.minimum(z, 0.0))),
            lambda z: np.where(z > 0, 1.0, a * np.exp(np.minimum(z, 0.0))),
            f"A = Z if Z > 0 else {a:g}·(e^Z − 1), S = 1 if Z > 0 else {a:g}·e^Z",
            rf"A = \begin{{cases}}Z & Z>0\\ {a:g}(e^Z-1)\end{{cases}},\; "
            rf"S = \begin{{cases}}1 & Z>0\\ {a:g}\,e^Z\end{{cases}}",
        )
    if name == "gelu":
        return ActivationRule(
            "gelu",
            {"approximate": False},
            _gelu_erf,
            _gelu_erf_d,
            "A = Z·Φ(Z) = ½Z(1 + erf(Z/√2)), S = Φ(Z) + Z·φ(Z)",
            r"A = Z\,\Phi(Z),\; S = \Phi(Z) + Z\,\varphi(Z)",
        )
    if name == "gelu_tanh":
        return ActivationRule(
            "gelu_tanh",
            {"approximate": True},
            _gelu_tanh,
            _gelu_tanh_d,
            "A = ½Z(1 + tanh(u)), u = √(2/π)(Z + 0.044715Z³), S = ½(1+tanh u) + ½Z(1−tanh²u)·u'",
            r"A = \tfrac12 Z(1+\tanh u),\; u = \sqrt{2/\pi}(Z + 0.044715 Z^3),\; "
            r"S = \tfrac12(1+\tanh u) + \tfrac12 Z (1-\tanh^2 u)\,u'",
        )
    if name == "sigmoid":
        return ActivationRule(
            "sigmoid",
            {},
            _sigmoid,
            lambda z: _sigmoid(z) * (1.0 - _sigmoid(z)),
            "A = σ(Z) = 1/(1 + e^−Z), S = σ(Z)(1 − σ(Z))",
            r"A = \sigma(Z),\; S = \sigma(Z)(1-\sigma(Z))",
        )
    if name == "tanh":
        return ActivationRule(
            "tanh",
            {},
            np.tanh,
            lambda z: 1.0 - np.tanh(z) ** 2,
            "A = tanh(Z), S = 1 − tanh²(Z)",
            r"A = \tanh Z,\; S = 1 - \tanh^2 Z",
        )
    if name == "softplus":
        beta = float(params.get("beta", 1.0))
        thr = params.get("threshold")
        thr = None if thr is None else float(thr)
        extra = "" if thr is None else f" (identity where {beta:g}·Z > {thr:g})"
        return ActivationRule(
            "softplus",
            {"beta": beta, "threshold": thr},
            lambda z: _softplus(z, beta, thr),
            lambda z: _softplus_d(z, beta, thr),
            f"A = log(1 + e^({beta:g}·Z))/{beta:g}{extra}, S = σ({beta:g}·Z)",
            rf"A = \tfrac{{1}}{{{beta:g}}}\log(1+e^{{{beta:g}Z}}),\; S = \sigma({beta:g}Z)",
        )
    if name == "silu":
        return ActivationRule(
            "silu",
            {},
            lambda z: z * _sigmoid(z),
            lambda z: _sigmoid(z) * (1.0 + z * (1.0 - _sigmoid(z))),
            "A = Z·σ(Z), S = σ(Z)(1 + Z(1 − σ(Z)))",
            r"A = Z\sigma(Z),\; S = \sigma(Z)(1 + Z(1-\sigma(Z)))",
        )
    raise KeyError(name)


#: names with an elementwise rule (``softmax`` is handled separately: its S is a full Jacobian).
ACTIVATIONS = (
    "identity",
    "relu",
    "leaky_relu",
    "elu",
    "gelu",
    "gelu_tanh",
    "sigmoid",
    "tanh",
    "softplus",
    "silu",
)

SOFTMAX_TEXT = "A = softmax(Z) row-wise, S_i = diag(s_i) − s_i s_iᵀ (per-sample Jacobian, s_i = softmax(Z_i))"
SOFTMAX_LATEX = r"A = \mathrm{softmax}(Z),\; S_i = \mathrm{diag}(s_i) - s_i s_i^\top"


def softmax_forward(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, max-shifted."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def jacobian_too_big(shape: tuple[int, ...]) -> bool:
    """Whether the per-sample softmax Jacobians of a ``(n, f)`` input exceed :data:`JACOBIAN_LIMIT_BYTES`."""
    n, f = int(shape[0]), int(shape[-1])
    return n * f * f * 8 > JACOBIAN_LIMIT_BYTES


def softmax_jacobian(z: np.ndarray) -> np.ndarray:
    """Per-sample Jacobian ``S[i, j, k] = ∂A_ij/∂Z_ik = s_ij(δ_jk − s_ik)`` of shape ``(n, f, f)``.

    Raises:
        MemoryError: when the ``(n, f, f)`` array would exceed :data:`JACOBIAN_LIMIT_BYTES` (use
            :func:`softmax_backward` / :func:`softmax_vjp`, which never build it).
    """
    if jacobian_too_big(z.shape):
        raise MemoryError(
            f"softmax Jacobians of shape {(z.shape[0], z.shape[-1], z.shape[-1])} would take "
            f"{fmt_bytes(z.shape[0] * z.shape[-1] ** 2 * 8)} (limit {fmt_bytes(JACOBIAN_LIMIT_BYTES)})"
        )
    s = softmax_forward(z)
    return np.einsum("ij,jk->ijk", s, np.eye(s.shape[-1])) - np.einsum("ij,ik->ijk", s, s)


def softmax_backward(z: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``dJ/dZ = S_iᵀ·g_i = s ⊙ (g − Σ_k g_k s_k)`` per sample, without building the ``(n, f, f)`` Jacobian.

    S is symmetric, so the same expression is the Jacobian-vector product ``S_i·g_i``.
    """
    s = softmax_forward(z)
    return s * (g - np.sum(g * s, axis=-1, keepdims=True))


def softmax_probe(shape: tuple[int, ...]) -> np.ndarray:
    """The fixed probe u (standard normal, seed 0) with which a too-large softmax S is checked as ``S_iᵀ·u_i``."""
    return np.random.default_rng(0).standard_normal(tuple(int(d) for d in shape))


def softmax_vjp(z: np.ndarray) -> np.ndarray:
    """``S_iᵀ·u_i`` for the fixed probe u of :func:`softmax_probe`: S checked without materialising it."""
    return softmax_backward(z, softmax_probe(z.shape))


SOFTMAX_PROBE_TEXT = (
    "S_iᵀ·u_i = s_i ⊙ (u_i − u_i·s_i) with a fixed probe u ~ N(0, 1) (seed 0): the per-sample Jacobians "
    "diag(s_i) − s_i s_iᵀ are too large to build"
)


# ----------------------------------------------------------------------------------------------------- dense
DENSE_TEXT = "Z = A_prev · W + b"
DENSE_LATEX = r"Z_l = A_{l-1} W_l + b_l"


def dense_forward(a_prev: np.ndarray, w_io: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """``Z = A_prev · W_io (+ b)`` over the last axis of ``a_prev``."""
    z = a_prev @ w_io
    return z if b is None else z + b


def dense_backward(dz: np.ndarray, a_prev: np.ndarray, w_io: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(dJ/dW_io, dJ/db, dJ/dA_prev)`` given ``dJ/dZ``.

    ``dJ/dW = A_prevᵀ · dJ/dZ`` (summed over every leading axis, i.e. over the batch), ``dJ/db = Σ_n dJ/dZ``,
    ``dJ/dA_prev = dJ/dZ · Wᵀ``.
    """
    a2 = a_prev.reshape(-1, a_prev.shape[-1])
    d2 = dz.reshape(-1, dz.shape[-1])
    return a2.T @ d2, d2.sum(axis=0), dz @ w_io.T


# ---------------------------------------------------------------------------------------------------- conv2d
CONV_TEXT = (
    "im2col: Z_col = W_col · X_col (+ b); dJ/dW_col = Σ_n dJ/dZ_col · X_colᵀ; "
    "dJ/dX = col2im(W_colᵀ · dJ/dZ_col); dJ/db = Σ_{n,h,w} dJ/dZ"
)
CONV_LATEX = (
    r"Z_{col} = W_{col} X_{col} + b,\; \frac{\partial J}{\partial W_{col}} = \sum_n "
    r"\frac{\partial J}{\partial Z_{col}} X_{col}^\top,\; \frac{\partial J}{\partial X} = "
    r"\mathrm{col2im}\!\left(W_{col}^\top \frac{\partial J}{\partial Z_{col}}\right)"
)


def same_padding(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's ``'same'`` padding ``(before, after)`` for one spatial axis (extra on the after side)."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _taps(
    x_shape: tuple[int, ...], kh: int, kw: int, stride: tuple[int, int], pads: tuple[int, int, int, int]
) -> tuple[int, int, list[tuple[int, int, slice, slice]]]:
    """Output size and, per kernel tap (i, j), the strided slices of the padded input it multiplies."""
    _, _, h, w = x_shape
    pt, pb, pl, pr = pads
    sh, sw = stride
    ho = (h + pt + pb - kh) // sh + 1
    wo = (w + pl + pr - kw) // sw + 1
    taps = [
        (i, j, slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))
        for i in range(kh)
        for j in range(kw)
    ]
    return ho, wo, taps


def conv2d_forward(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
) -> np.ndarray:
    """2-D cross-correlation, NCHW input, ``(cout, cin, kh, kw)`` kernel, zero padding ``(top, bottom, left,
    right)``: ``Z_col = W_col · X_col (+ b)``.

    Computed tap by tap (a sum over the kh·kw kernel positions of strided input slices), which is the im2col
    product without building the ``(n, cin·kh·kw, ho·wo)`` column matrix: memory stays that of Z and X.
    """  # noqa: D205
    pt, pb, pl, pr = pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    cout, _, kh, kw = w.shape
    ho, wo, taps = _taps(x.shape, kh, kw, stride, pads)
    z = np.zeros((x.shape[0], cout, ho, wo))
    for i, j, si, sj in taps:
        z += np.einsum("nchw,oc->nohw", xp[:, :, si, sj], w[:, :, i, j], optimize=True)
    if b is not None:
        z += b[None, :, None, None]
    return z


def conv2d_backward(
    dz: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(dJ/dW, dJ/db, dJ/dX)`` of :func:`conv2d_forward` given ``dJ/dZ`` (NCHW), tap by tap."""
    pt, pb, pl, pr = pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    _, _, kh, kw = w.shape
    _, _, taps = _taps(x.shape, kh, kw, stride, pads)
    dw = np.zeros(w.shape)
    dxp = np.zeros(xp.shape)
    for i, j, si, sj in taps:
        dw[:, :, i, j] = np.einsum("nohw,nchw->oc", dz, xp[:, :, si, sj], optimize=True)
        dxp[:, :, si, sj] += np.einsum("nohw,oc->nchw", dz, w[:, :, i, j], optimize=True)
    db = dz.sum(axis=(0, 2, 3))
    h, wd = x.shape[2], x.shape[3]
    return dw, db, dxp[:, :, pt : pt + h, pl : pl + wd]
