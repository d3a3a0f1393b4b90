"""``jacobian_vs_gradient``: what ``tape.gradient`` / ``backward(ones)`` returns versus the full Jacobian.

For a target T = f(X), autodiff's "gradient of T w.r.t. X" is the gradient of Σ T: a vector-Jacobian product
with a vector of ones, ``g = Jᵀ·1``, i.e. the Jacobian summed over the target's axes. It is *not* the Jacobian.

The built-in case, A = Z·S (an activation written as a matrix): ∂A_ij/∂Z_pq = δ_ip S_qj, so

* the Jacobian holds Sᵀ on its sample-diagonal blocks: J[i, :, i, :] = Sᵀ (and zero blocks for i ≠ p);
* the gradient is g_pq = Σ_j S_qj: every row of g equals the row sums of S (g = 1_n (S·1_f)ᵀ). With S = I that
  is a matrix of ones — which is why ``tape.gradient(A1, Z1)`` returns ones instead of diag(): the gradient of
  ΣA, not the Jacobian.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import InputError
from ._adapter import adapter, default_framework
from ._trace import clean_json, preview
from .rules import JACOBIAN_LIMIT_BYTES, fmt_bytes

__all__ = ["JacobianVsGradient", "jacobian_vs_gradient"]

#: the default source Z (first 2 rows of X = ones(7, 3) times the example weight matrix) and S = diag(2, 0, 1).
DEFAULT_Z = np.array([[2.65, 1.3, 0.65], [2.65, 1.3, 0.65]])
DEFAULT_S = np.diag([2.0, 0.0, 1.0])


@dataclass
class JacobianVsGradient:
    """The full Jacobian, autodiff's gradient, and the relation between them, verified.

    Attributes:
        framework: which autodiff computed them.
        description: what the target is.
        target: T = f(X).
        source: X.
        jacobian: ∂T/∂X with shape ``T.shape + X.shape``.
        gradient: what ``tape.gradient(T, X)`` / ``torch.autograd.grad(T, X, ones)`` returns (shape of X).
        relation: the stated relation, ``g = Jᵀ·1`` (the Jacobian summed over T's axes).
        relation_err: ``max|g − Σ_T J|``.
        ok: the relation holds to 1e-12 (float64) — and, for the matmul case, the closed forms hold too.
        closed_form: for T = X·S: {"gradient": 1 (S·1)ᵀ, "jacobian_block": Sᵀ, "errors": ...}, else None.
    """

    framework: str
    description: str
    target: np.ndarray
    source: np.ndarray
    jacobian: np.ndarray
    gradient: np.ndarray
    relation: str
    relation_err: float
    ok: bool
    closed_form: dict | None = None

    def __repr__(self) -> str:
        return (
            f"JacobianVsGradient({self.description!r}, jacobian {self.jacobian.shape}, gradient "
            f"{self.gradient.shape}, ok={self.ok})"
        )

    def __str__(self) -> str:
        lines = [
            f"Jacobian vs gradient — {self.description} ({self.framework})",
            f"  source X {self.source.shape}, target T {self.target.shape}",
            f"  full Jacobian ∂T/∂X has shape {self.jacobian.shape} (T's axes, then X's)",
            f"  autodiff's 'gradient' (tape.gradient / backward(ones)) has X's shape {self.gradient.shape}:",
            *("    " + ln for ln in preview(self.gradient).splitlines()),
            f"  relation: {self.relation}",
            f"  {'✓' if self.relation_err <= 1e-12 * max(1.0, float(np.abs(self.gradient).max(initial=0))) else '✗'}"
            f" max|g − Σ_T J| = {self.relation_err:.2e}",
        ]
        if self.closed_form is not None:
            cf = self.closed_form
            lines += [
                "  closed form for T = X·S:",
                "    ∂T_ij/∂X_pq = δ_ip S_qj  →  Jacobian block J[i, :, i, :] = Sᵀ, zero for i ≠ p:",
                *("      " + ln for ln in preview(cf["jacobian_block"]).splitlines()),
                "    gradient g_pq = Σ_j S_qj: every row of g is the row sums of S:",
                *("      " + ln for ln in preview(cf["row_sums"]).splitlines()),
                f"    {'✓' if cf['ok'] else '✗'} max errors: Jacobian {cf['jacobian_err']:.2e}, "
                f"gradient {cf['gradient_err']:.2e}",
                "    so with S = I the gradient is all ones — not S (the activation-as-matrix trap).",
            ]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """Markdown form."""
        out = [
            f"### Jacobian vs gradient — {self.description} ({self.framework})",
            "",
            f"- full Jacobian $\\partial T/\\partial X$: shape `{self.jacobian.shape}`",
            f"- autodiff's gradient: shape `{self.gradient.shape}` — "
            r"$g = J^\top \mathbf{1}$ (the Jacobian summed over $T$'s axes)",
            f"- relation error: {self.relation_err:.2e} {'✓' if self.ok else '✗'}",
        ]
        if self.closed_form is not None:
            out += [
                r"- for $T = XS$: $\partial T_{ij}/\partial X_{pq} = \delta_{ip} S_{qj}$, blocks $S^\top$; "
                r"$g = \mathbf{1}_n (S\mathbf{1}_f)^\top$ (rows = row sums of $S$)",
            ]
        return "\n".join(out)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def to_dict(self, values: bool = True) -> dict:
        """JSON-ready form (arrays included unless ``values=False``)."""
        d: dict[str, Any] = {
            "framework": self.framework,
            "description": self.description,
            "relation": self.relation,
            "relation_err": self.relation_err,
            "ok": self.ok,
            "jacobian_shape": list(self.jacobian.shape),
            "gradient_shape": list(self.gradient.shape),
        }
        if values:
            d.update(target=self.target, source=self.source, jacobian=self.jacobian, gradient=self.gradient)
            if self.closed_form is not None:
                d["closed_form"] = self.closed_form
        return clean_json(d)


def _closed_form(src: np.ndarray, s: np.ndarray, jac: np.ndarray, grad: np.ndarray) -> dict:
    """The closed forms of T = X·S (Jacobian blocks Sᵀ, gradient rows = row sums of S), checked."""
    n, _f = src.shape
    jac_cf = np.einsum("ip,qj->ijpq", np.eye(n), s)
    row_sums = s.sum(axis=1)
    grad_cf = np.broadcast_to(row_sums, src.shape)
    je = float(np.max(np.abs(jac_cf - jac)))
    ge = float(np.max(np.abs(grad_cf - grad)))
    closed = {
        "jacobian_block": s.T,
        "row_sums": row_sums,
        "jacobian_err": je,
        "gradient_err": ge,
        "ok": je <= 1e-12 and ge <= 1e-12,
    }
    return closed


def _matrix(matrix: Any) -> np.ndarray:
    """``matrix=`` as a finite float64 array (its shape is checked against the source by the caller).

    Raises:
        InputError: not numeric (a string, a ragged list, ...) or not finite.
    """
    from ._explain import to_numpy

    try:
        s = to_numpy(matrix, "matrix")
    except ValueError:  # numpy refuses a ragged nested list
        s = None
    if s is None or s.dtype == bool or not np.all(np.isfinite(s)):
        raise InputError(
            f"matrix must be a 2-D array of finite numbers S (f, k), got {type(matrix).__name__} {matrix!r:.80}; "
            "e.g. matrix=[[2, 0, 0], [0, 0, 0], [0, 0, 1]], or leave it out for diag(2, 0, 1)."
        )
    return s


def _jacobian(ad: Any, target_fn: Callable[[Any], Any], src: np.ndarray, desc: str) -> tuple[Any, Any, Any]:
    """The adapter's ``(target, Jacobian, gradient)``; a target cut off from the source is explained.

    Raises:
        InputError: the target does not depend on the source through autodiff (a detached tensor, ``.numpy()``).
    """
    try:
        return ad.jacobian_and_gradient(target_fn, src)
    except RuntimeError as exc:
        if "does not require grad" not in str(exc):
            raise
        raise InputError(
            f"target_fn {desc!r} returned a tensor that autodiff cannot trace back to its input (it does not require "
            "grad): it was detached (.detach(), .numpy(), torch.no_grad, a new tensor built from values). Fix: "
            "compute the target from the input tensor with framework ops only, e.g. lambda z: z @ s."
        ) from exc


def jacobian_vs_gradient(
    target_fn: Callable[[Any], Any] | None = None,
    source: Any = None,
    *,
    matrix: Any = None,
    framework: str | None = None,
) -> JacobianVsGradient:
    """Compare the full Jacobian of a target with what autodiff calls its gradient, and state the relation.

    Called with no arguments it runs the activation-as-matrix example A = Z·S with S = diag(2, 0, 1).

    Args:
        target_fn: a function of one framework tensor (torch or TensorFlow ops). None → ``Z ↦ Z·matrix``.
        source: the point X (array-like). Defaults to Z = [[2.65, 1.3, 0.65]] × 2 rows.
        matrix: S for the default target (defaults to diag(2, 0, 1)); enables the closed-form check.
        framework: ``"torch"`` or ``"tensorflow"``; default torch if installed, else TensorFlow.

    Returns:
        The :class:`JacobianVsGradient`.
    """
    from ._explain import to_numpy

    ad = adapter(framework or default_framework())
    fw = ad.CONVENTIONS.name
    src = DEFAULT_Z if source is None else to_numpy(source, "source")
    if src.size == 0 or not np.all(np.isfinite(src)):
        raise InputError(
            f"source must be a non-empty array of finite numbers, got shape {src.shape!r}"
            + ("" if src.size == 0 else f" with {int(np.sum(~np.isfinite(src)))} NaN/inf values")
        )
    src = np.asarray(src, dtype=np.float64)
    if src.size * src.size * 8 > JACOBIAN_LIMIT_BYTES and target_fn is None:
        raise InputError(
            f"the Jacobian of Z·S for a source of shape {src.shape!r} would hold {src.size}² entries "
            f"({fmt_bytes(src.size * src.size * 8)}, limit {fmt_bytes(JACOBIAN_LIMIT_BYTES)}). Fix: pass a "
            "smaller source (a few rows show the same relation)"
        )
    s = None
    if target_fn is None:
        s = np.asarray(DEFAULT_S if matrix is None else _matrix(matrix), dtype=np.float64)
        if s.ndim != 2 or src.ndim != 2 or s.shape[0] != src.shape[-1]:
            raise InputError(f"matrix S must be ({src.shape[-1]}, f) to multiply Z of shape {src.shape}; got {s.shape}")
        target_fn = ad.matmul_target(s)
        desc = f"A = Z·S, S = {np.array2string(s, precision=3, separator=', ').replace(chr(10), '')}"
    else:
        if not callable(target_fn):
            raise InputError(f"target_fn must be a callable of one tensor, got {target_fn!r}")
        desc = getattr(target_fn, "__name__", "target_fn")
    target, jac, grad = _jacobian(ad, target_fn, src, desc)
    t_axes = tuple(range(target.ndim))
    summed = jac.sum(axis=t_axes) if t_axes else jac
    err = float(np.max(np.abs(summed - grad))) if grad.size else 0.0
    ok = err <= 1e-12 * max(1.0, float(np.max(np.abs(grad), initial=0.0)))
    closed = None if s is None else _closed_form(src, s, jac, grad)
    ok = ok and (closed is None or closed["ok"])
    return JacobianVsGradient(
        framework=fw,
        description=desc,
        target=target,
        source=src,
        jacobian=jac,
        gradient=grad,
        relation="g = Jᵀ·1: autodiff's gradient of a non-scalar T is the gradient of ΣT, the Jacobian summed "
        "over T's axes",
        relation_err=err,
        ok=ok,
        closed_form=closed,
    )
