"""Activation rules, one entry each: forward, local derivative (S), backward and formula text (numpy, float64).

Elementwise rules give the diagonal of S; softmax gives the per-sample Jacobian (or, above
:data:`JACOBIAN_LIMIT_BYTES`, its product with a fixed probe) and a backward that never builds it.
"""

from __future__ import annotations

import math

import numpy as np

from ._table import ActivationRule, register

__all__ = [
    "JACOBIAN_LIMIT_BYTES",
    "SOFTMAX_LATEX",
    "SOFTMAX_PROBE_TEXT",
    "SOFTMAX_TEXT",
    "fmt_bytes",
    "jacobian_too_big",
    "sigmoid",
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


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    out = np.empty_like(x, dtype=np.float64)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


# ------------------------------------------------------------------------------------------- elementwise
register(
    ActivationRule(
        "identity",
        lambda z: z,
        lambda z: np.ones_like(z),
        lambda: "A = Z, S = 1",
        lambda: r"A = Z,\; S = 1",
    )
)
register(
    ActivationRule(
        "relu",
        lambda z: np.maximum(z, 0.0),
        lambda z: (z > 0).astype(np.float64),
        lambda: "A = max(Z, 0), S = [Z > 0]",
        lambda: r"A = \max(Z, 0),\; S = \mathbb{1}[Z > 0]",
    )
)
register(
    ActivationRule(
        "leaky_relu",
        lambda z, slope: np.where(z > 0, z, slope * z),
        lambda z, slope: np.where(z > 0, 1.0, slope),
        lambda slope: f"A = Z if Z > 0 else {slope:g}·Z, S = 1 if Z > 0 else {slope:g}",
        lambda slope: (
            rf"A = \begin{{cases}}Z & Z>0\\ {slope:g}\,Z\end{{cases}},\; "
            rf"S = \begin{{cases}}1 & Z>0\\ {slope:g}\end{{cases}}"
        ),
        {"slope": 0.01},
    )
)
register(
    ActivationRule(
        "elu",
        lambda z, alpha: np.where(z > 0, z, alpha * np.expm1(np.minimum(z, 0.0))),
        lambda z, alpha: np.where(z > 0, 1.0, alpha * np.exp(np.minimum(z, 0.0))),
        lambda alpha: f"A = Z if Z > 0 else {alpha:g}·(e^Z − 1), S = 1 if Z > 0 else {alpha:g}·e^Z",
        lambda alpha: (
            rf"A = \begin{{cases}}Z & Z>0\\ {alpha:g}(e^Z-1)\end{{cases}},\; "
            rf"S = \begin{{cases}}1 & Z>0\\ {alpha:g}\,e^Z\end{{cases}}"
        ),
        {"alpha": 1.0},
    )
)


def _gelu_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))


register(
    ActivationRule(
        "gelu",
        lambda z: z * _gelu_cdf(z),
        lambda z: _gelu_cdf(z) + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi),
        lambda: "A = Z·Φ(Z) = ½Z(1 + erf(Z/√2)), S = Φ(Z) + Z·φ(Z)",
        lambda: r"A = Z\,\Phi(Z),\; S = \Phi(Z) + Z\,\varphi(Z)",
    )
)


def _gelu_tanh_u(z: np.ndarray) -> np.ndarray:
    return _SQRT_2_OVER_PI * (z + 0.044715 * z**3)


def _gelu_tanh_d(z: np.ndarray) -> np.ndarray:
    t = np.tanh(_gelu_tanh_u(z))
    du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z**2)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du


register(
    ActivationRule(
        "gelu_tanh",
        lambda z: 0.5 * z * (1.0 + np.tanh(_gelu_tanh_u(z))),
        _gelu_tanh_d,
        lambda: "A = ½Z(1 + tanh(u)), u = √(2/π)(Z + 0.044715Z³), S = ½(1+tanh u) + ½Z(1−tanh²u)·u'",
        lambda: (
            r"A = \tfrac12 Z(1+\tanh u),\; u = \sqrt{2/\pi}(Z + 0.044715 Z^3),\; "
            r"S = \tfrac12(1+\tanh u) + \tfrac12 Z (1-\tanh^2 u)\,u'"
        ),
    )
)
register(
    ActivationRule(
        "sigmoid",
        sigmoid,
        lambda z: sigmoid(z) * (1.0 - sigmoid(z)),
        lambda: "A = σ(Z) = 1/(1 + e^−Z), S = σ(Z)(1 − σ(Z))",
        lambda: r"A = \sigma(Z),\; S = \sigma(Z)(1-\sigma(Z))",
    )
)
register(
    ActivationRule(
        "tanh",
        np.tanh,
        lambda z: 1.0 - np.tanh(z) ** 2,
        lambda: "A = tanh(Z), S = 1 − tanh²(Z)",
        lambda: r"A = \tanh Z,\; S = 1 - \tanh^2 Z",
    )
)


def _softplus(z: np.ndarray, beta: float, threshold: float | None) -> np.ndarray:
    bz = beta * z
    out = (np.maximum(bz, 0) + np.log1p(np.exp(-np.abs(bz)))) / beta
    return out if threshold is None else np.where(bz > threshold, z, out)


def _softplus_d(z: np.ndarray, beta: float, threshold: float | None) -> np.ndarray:
    out = sigmoid(beta * z)
    return out if threshold is None else np.where(beta * z > threshold, 1.0, out)


def _softplus_text(beta: float, threshold: float | None) -> str:
    extra = "" if threshold is None else f" (identity where {beta:g}·Z > {threshold:g})"
    return f"A = log(1 + e^({beta:g}·Z))/{beta:g}{extra}, S = σ({beta:g}·Z)"


register(
    ActivationRule(
        "softplus",
        _softplus,
        _softplus_d,
        _softplus_text,
        lambda beta, threshold: rf"A = \tfrac{{1}}{{{beta:g}}}\log(1+e^{{{beta:g}Z}}),\; S = \sigma({beta:g}Z)",
        {"beta": 1.0, "threshold": None},  # torch's threshold: identity where beta·z > threshold; Keras has none
    )
)
register(
    ActivationRule(
        "silu",
        lambda z: z * sigmoid(z),
        lambda z: sigmoid(z) * (1.0 + z * (1.0 - sigmoid(z))),
        lambda: "A = Z·σ(Z), S = σ(Z)(1 + Z(1 − σ(Z)))",
        lambda: r"A = Z\sigma(Z),\; S = \sigma(Z)(1 + Z(1-\sigma(Z)))",
    )
)

# ---------------------------------------------------------------------------------------------- softmax
SOFTMAX_TEXT = "A = softmax(Z) row-wise, S_i = diag(s_i) − s_i s_iᵀ (per-sample Jacobian, s_i = softmax(Z_i))"
SOFTMAX_LATEX = r"A = \mathrm{softmax}(Z),\; S_i = \mathrm{diag}(s_i) - s_i s_i^\top"
SOFTMAX_PROBE_TEXT = (
    "S_iᵀ·u_i = s_i ⊙ (u_i − u_i·s_i) with a fixed probe u ~ N(0, 1) (seed 0): the per-sample Jacobians "
    "diag(s_i) − s_i s_iᵀ are too large to build"
)


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


def _softmax_local(z: np.ndarray) -> tuple[np.ndarray, str, str, str]:
    """The S term: the per-sample Jacobians, or their product with the probe when they are too large."""
    if not jacobian_too_big(z.shape):
        return softmax_jacobian(z), SOFTMAX_TEXT, SOFTMAX_LATEX, "(n, f, f): S[i, j, k] = ∂A_ij/∂Z_ik"
    nbytes = fmt_bytes(z.shape[0] * z.shape[-1] ** 2 * 8)
    layout = (
        f"(n, f): S_iᵀ·u_i for a fixed probe u; the (n, f, f) Jacobians would take {nbytes} "
        f"(limit {fmt_bytes(JACOBIAN_LIMIT_BYTES)})"
    )
    return softmax_vjp(z), SOFTMAX_PROBE_TEXT, SOFTMAX_LATEX, layout


register(
    ActivationRule(
        "softmax",
        softmax_forward,
        None,
        lambda: SOFTMAX_TEXT,
        lambda: SOFTMAX_LATEX,
        backward=softmax_backward,
        local=_softmax_local,
        dz_text=lambda l: (
            f"dJ/dZ{l}_i = S{l}_iᵀ · dJ/dA{l}_i = A{l}_i ⊙ (dJ/dA{l}_i − dJ/dA{l}_i·A{l}_i) (per sample, "
            "without building S)"
        ),
        shapes="last axis of a 2-D (n, f) input",
    )
)
