"""Graph-op rules, part 3: attention — matmul of two activations, softmax over an axis, scaled-dot-product
attention and multi-head attention (numpy, float64).

The composites are built from the primitives, so each formula is derived once: ``sdpa`` is
``softmax(Q·Kᵀ·scale + mask)·V`` written with :func:`matmul_backward` and :func:`softmax_axis_backward`;
``mha`` is three projections, ``sdpa`` per head and an output projection written with the same functions.
The softmax Jacobian is never materialised: its vector-Jacobian product is ``S ⊙ (g − Σ g⊙S)``.
"""  # noqa: D205

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._ops import unbroadcast
from ._table import OpNames, OpRule, register

__all__ = [
    "matmul_backward",
    "mha_backward",
    "mha_forward",
    "sdpa_backward",
    "sdpa_forward",
    "softmax_axis",
    "softmax_axis_backward",
]

Array = np.ndarray


def _f(a: Any) -> Array:
    return np.asarray(a, dtype=np.float64)


def _t(a: Array) -> Array:
    return np.swapaxes(a, -1, -2)


# ----------------------------------------------------------------------------------------------- matmul
def matmul_backward(g: Array, a: Array, b: Array) -> tuple[Array, Array]:
    """``(dJ/dA, dJ/dB)`` of ``C = A·B`` (batched, broadcast): ``g·Bᵀ`` and ``Aᵀ·g`` summed over broadcast axes."""
    return unbroadcast(g @ _t(b), a.shape), unbroadcast(_t(a) @ g, b.shape)


def _mm_fwd(ins, attrs):
    a, b = _f(ins[0]), _f(ins[1])
    return a @ b


register(
    OpRule(
        "matmul",
        _mm_fwd,
        lambda g, ins, attrs, out: list(matmul_backward(g, _f(ins[0]), _f(ins[1]))),
        lambda nm: f"{nm.out} = {nm.i(0)}·{nm.i(1)}  (batched over leading axes)",
        lambda nm: (
            f"∂({nm.i(0)}·{nm.i(1)}) is bilinear: each factor's gradient is the incoming gradient times the "
            "other factor, transposed"
        ),
        lambda nm, k: f"{nm.g}·{nm.i(1)}ᵀ" if k == 0 else f"{nm.i(0)}ᵀ·{nm.g}",
        roles=("a", "b"),
        shapes="(..., m, k)·(..., k, p) → (..., m, p), leading axes broadcast (both operands at least 2-D)",
    )
)


# ---------------------------------------------------------------------------------------------- softmax
def softmax_axis(z: Array, axis: int = -1) -> Array:
    """Softmax over ``axis``, max-shifted."""
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_axis_backward(s: Array, g: Array, axis: int = -1) -> Array:
    """``S ⊙ (g − Σ g⊙S)`` over ``axis``: the softmax Jacobian applied to ``g`` without building it."""
    return s * (g - np.sum(g * s, axis=axis, keepdims=True))


register(
    OpRule(
        "softmax",
        lambda ins, attrs: softmax_axis(_f(ins[0]), int(attrs.get("axis", -1))),
        lambda g, ins, attrs, out: [softmax_axis_backward(out, g, int(attrs.get("axis", -1)))],
        lambda nm: f"{nm.out} = softmax({nm.i(0)}) over axis {nm.attrs.get('axis', -1)}",
        lambda nm: (
            "per slice s along the axis: ∂s/∂z = diag(s) − s sᵀ, applied as S ⊙ (g − Σ g⊙S) — never materialised"
        ),
        lambda nm, k: f"{nm.out} ⊙ ({nm.g} − Σ {nm.g}⊙{nm.out})",
        roles=("x",),
        shapes="any shape, any axis",
    )
)


def _log_softmax(z: Array, axis: int) -> Array:
    m = z.max(axis=axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


register(
    OpRule(
        "log_softmax",
        lambda ins, attrs: _log_softmax(_f(ins[0]), int(attrs.get("axis", -1))),
        lambda g, ins, attrs, out: [g - np.exp(out) * g.sum(axis=int(attrs.get("axis", -1)), keepdims=True)],
        lambda nm: f"{nm.out} = log_softmax({nm.i(0)}) over axis {nm.attrs.get('axis', -1)}",
        lambda nm: "∂/∂z = I − 1 sᵀ per slice (s = softmax(z)), applied as g − s·Σg",
        lambda nm, k: f"{nm.g} − softmax·Σ{nm.g}",
        roles=("x",),
        shapes="any shape, any axis",
    )
)


# ------------------------------------------------------------------------------------------------- sdpa
def _scores_mask(ls: int, lk: int, attrs: Mapping[str, Any], mask: Any) -> Array | None:
    """An additive mask (0 / −inf / float) from ``is_causal`` and a given mask, or None."""
    add = None
    if attrs.get("is_causal"):
        add = np.where(np.tril(np.ones((ls, lk), dtype=bool)), 0.0, -np.inf)
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype == bool:
            allowed = ~m if attrs.get("mask_true_blocks") else m
            m = np.where(allowed, 0.0, -np.inf)
        m = _f(m)
        add = m if add is None else add + m
    return add


def sdpa_forward(q: Array, k: Array, v: Array, scale: float, attrs: Mapping[str, Any], mask: Any = None):
    """``(O, P)``: ``P = softmax(Q·Kᵀ·scale + mask)`` over the keys, ``O = P·V``."""
    s = (q @ _t(k)) * scale
    add = _scores_mask(q.shape[-2], k.shape[-2], attrs, mask)
    if add is not None:
        s = s + add
    p = softmax_axis(s, -1)
    return p @ v, p


def sdpa_backward(g: Array, q: Array, k: Array, v: Array, p: Array, scale: float) -> tuple[Array, Array, Array]:
    """``(dQ, dK, dV)``: ``dV = Pᵀ·g``, ``dP = g·Vᵀ``, ``dS = P ⊙ (dP − Σ dP⊙P)``, ``dQ = dS·K·scale``,
    ``dK = dSᵀ·Q·scale`` — the primitives' backward, composed.
    """  # noqa: D205
    dp, dv = matmul_backward(g, p, v)
    ds = softmax_axis_backward(p, dp, -1) * scale
    dq, dkt = matmul_backward(ds, q, _t(k))
    return dq, unbroadcast(_t(dkt), k.shape), dv


def _scale(q: Array, attrs: Mapping[str, Any]) -> float:
    sc = attrs.get("scale")
    return 1.0 / math.sqrt(q.shape[-1]) if sc is None else float(sc)


def _sdpa_fwd(ins, attrs):
    q, k, v = _f(ins[0]), _f(ins[1]), _f(ins[2])
    return sdpa_forward(q, k, v, _scale(q, attrs), attrs, ins[3] if len(ins) > 3 else None)[0]


def _sdpa_bwd(g, ins, attrs, out):
    q, k, v = _f(ins[0]), _f(ins[1]), _f(ins[2])
    sc = _scale(q, attrs)
    _, p = sdpa_forward(q, k, v, sc, attrs, ins[3] if len(ins) > 3 else None)
    return [*sdpa_backward(g, q, k, v, p, sc)] + ([None] if len(ins) > 3 else [])


_SDPA_LOCAL = (
    "with S = Q·Kᵀ·scale (+ mask), P = softmax(S) over the keys: dV = Pᵀ·g, dP = g·Vᵀ, "
    "dS = P ⊙ (dP − Σ_k dP⊙P)·scale, dQ = dS·K, dK = dSᵀ·Q (the softmax Jacobian is never built)"
)


def _sdpa_text(nm: OpNames) -> str:
    sc = nm.attrs.get("scale")
    scale = "1/√d" if sc is None else f"{sc:g}"
    mask = " + mask" if len(nm.ins) > 3 else ""
    causal = " (causal: keys after the query masked)" if nm.attrs.get("is_causal") else ""
    return f"{nm.out} = softmax({nm.i(0)}·{nm.i(1)}ᵀ·{scale}{mask})·{nm.i(2)}{causal}"


register(
    OpRule(
        "sdpa",
        _sdpa_fwd,
        _sdpa_bwd,
        _sdpa_text,
        lambda nm: _SDPA_LOCAL,
        lambda nm, k: ("dS·K (query)", "dSᵀ·Q (key)", f"Pᵀ·{nm.g} (value)", "—")[k],
        roles=("query", "key", "value", "mask"),
        shapes="Q (..., L, d), K (..., S, d), V (..., S, dv); mask broadcasting to (..., L, S)",
    )
)


# -------------------------------------------------------------------------------------------------- mha
def _canon_weights(ins: list, attrs: Mapping[str, Any]) -> dict[str, Array | None]:
    """Projection weights as ``Wq/Wk/Wv (E_in, H, d)``, biases ``(H, d)``, ``Wo (H, d, E)``, ``bo (E,)``."""
    h = int(attrs["heads"])
    if attrs["layout"] == "torch":  # in_proj (3E, E) out_in, in_proj_bias (3E,), out_proj (E, E) out_in
        w_in, b_in, w_out, b_out = _f(ins[3]), ins[4], _f(ins[5]), ins[6]
        e = w_in.shape[0] // 3
        d = e // h
        out: dict[str, Array | None] = {}
        for i, n in enumerate("qkv"):
            out[f"W{n}"] = w_in[i * e : (i + 1) * e].reshape(h, d, w_in.shape[1]).transpose(2, 0, 1)
            out[f"b{n}"] = None if b_in is None or np.ndim(b_in) == 0 else _f(b_in)[i * e : (i + 1) * e].reshape(h, d)
        out["Wo"] = w_out.T.reshape(h, d, w_out.shape[0])
        out["bo"] = None if b_out is None or np.ndim(b_out) == 0 else _f(b_out)
        return out
    # keras: query/key/value kernels (E, H, d) and biases (H, d), output kernel (H, d, E) and bias (E,)
    names = ("Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo")
    return {
        n: (None if ins[3 + i] is None or np.ndim(ins[3 + i]) == 0 else _f(ins[3 + i])) for i, n in enumerate(names)
    }


def _proj(x: Array, w: Array, b: Array | None) -> Array:
    y = np.einsum("nle,ehd->nhld", x, w, optimize=True)
    return y if b is None else y + b[None, :, None, :]


def _proj_back(g: Array, x: Array, w: Array) -> tuple[Array, Array, Array]:
    return (
        np.einsum("nhld,ehd->nle", g, w, optimize=True),
        np.einsum("nle,nhld->ehd", x, g, optimize=True),
        g.sum(axis=(0, 2)),
    )


def _qkv(ins: list, attrs: Mapping[str, Any]) -> tuple[Array, Array, Array]:
    q, k, v = _f(ins[0]), _f(ins[1]), _f(ins[2])
    if not attrs.get("batch_first", True):
        q, k, v = (a.swapaxes(0, 1) for a in (q, k, v))
    return q, k, v


def mha_forward(ins: list, attrs: Mapping[str, Any]) -> tuple[Array, dict[str, Array]]:
    """Multi-head attention and its intermediates: ``Q_h = q·W_q,h + b_q,h`` (likewise K, V), ``O_h =
    sdpa(Q_h, K_h, V_h)``, ``out = Σ_h O_h·W_o,h + b_o``.
    """  # noqa: D205
    q, k, v = _qkv(ins, attrs)
    w = _canon_weights(ins, attrs)
    qh, kh, vh = _proj(q, w["Wq"], w["bq"]), _proj(k, w["Wk"], w["bk"]), _proj(v, w["Wv"], w["bv"])
    sc = 1.0 / math.sqrt(qh.shape[-1])
    o, p = sdpa_forward(qh, kh, vh, sc, attrs, attrs.get("mask"))
    out = np.einsum("nhld,hde->nle", o, w["Wo"], optimize=True)
    if w["bo"] is not None:
        out = out + w["bo"]
    if not attrs.get("batch_first", True):
        out = out.swapaxes(0, 1)
    return out, {"q": q, "k": k, "v": v, "Q": qh, "K": kh, "V": vh, "O": o, "P": p, "scale": sc, **w}


def mha_backward(g: Array, ins: list, attrs: Mapping[str, Any]) -> list[Array | None]:
    """The vector-Jacobian product of :func:`mha_forward` into every input position (composed primitives)."""
    _, c = mha_forward(ins, attrs)
    if not attrs.get("batch_first", True):
        g = g.swapaxes(0, 1)
    d_o = np.einsum("nle,hde->nhld", g, c["Wo"], optimize=True)
    d_wo = np.einsum("nhld,nle->hde", c["O"], g, optimize=True)
    d_bo = g.sum(axis=(0, 1))
    d_qh, d_kh, d_vh = sdpa_backward(d_o, c["Q"], c["K"], c["V"], c["P"], c["scale"])
    dq, dwq, dbq = _proj_back(d_qh, c["q"], c["Wq"])
    dk, dwk, dbk = _proj_back(d_kh, c["k"], c["Wk"])
    dv, dwv, dbv = _proj_back(d_vh, c["v"], c["Wv"])
    if not attrs.get("batch_first", True):
        dq, dk, dv = dq.swapaxes(0, 1), dk.swapaxes(0, 1), dv.swapaxes(0, 1)
    if attrs["layout"] == "torch":
        e_out = c["Wo"].shape[-1]
        w_in = np.concatenate([dw.transpose(1, 2, 0).reshape(-1, dw.shape[0]) for dw in (dwq, dwk, dwv)], axis=0)
        b_in = np.concatenate([db.reshape(-1) for db in (dbq, dbk, dbv)])
        w_out = d_wo.reshape(-1, e_out).T
        grads = [dq, dk, dv, w_in, b_in if c["bq"] is not None else None, w_out, d_bo if c["bo"] is not None else None]
        return grads[: len(ins)]
    pairs = [(dwq, dbq, "bq"), (dwk, dbk, "bk"), (dwv, dbv, "bv"), (d_wo, d_bo, "bo")]
    grads = [dq, dk, dv]
    for dw, db, bn in pairs:
        grads += [dw, db if c[bn] is not None else None]
    return grads[: len(ins)]


def _mha_text(nm: OpNames) -> str:
    q, k, v = nm.i(0), nm.i(1), nm.i(2)
    h = nm.attrs["heads"]
    if nm.attrs["layout"] == "torch":
        proj = f"[Q|K|V] = [{q}|{k}|{v}]·{nm.i(3)}ᵀ + {nm.i(4)} (the three row blocks of {nm.i(3)})"
        outp = f"{nm.i(5)}ᵀ + {nm.i(6)}"
    else:
        proj = f"Q = {q}·{nm.i(3)} + {nm.i(4)}, K = {k}·{nm.i(5)} + {nm.i(6)}, V = {v}·{nm.i(7)} + {nm.i(8)}"
        outp = f"{nm.i(9)} + {nm.i(10)}"
    return (
        f"{nm.out} = concat_h(O_h)·{outp}, O_h = softmax(Q_h·K_hᵀ/√d)·V_h for h = 1..{h};  {proj}, split into "
        f"{h} heads of d = E/{h}"
    )


def _mha_contrib(nm: OpNames, k: int) -> str:
    if k < 3:
        return (
            f"(dQ_h·W_q,hᵀ, dK_h·W_k,hᵀ, dV_h·W_v,hᵀ summed over heads)[{('query', 'key', 'value')[k]}] from "
            f"{nm.g}, via sdpa backward"
        )
    role = (
        ("W_in", "b_in", "W_out", "b_out")[k - 3]
        if nm.attrs["layout"] == "torch"
        else ("W_q", "b_q", "W_k", "b_k", "W_v", "b_v", "W_o", "b_o")[k - 3]
    )
    if role in ("W_out", "W_o"):
        return f"Σ_n concat_h(O_h)ᵀ·{nm.g}"
    if role in ("b_out", "b_o"):
        return f"Σ {nm.g} over batch and sequence"
    return f"Σ_n inputᵀ·d(Q|K|V)_h for {role} (the projections' backward)"


register(
    OpRule(
        "mha",
        lambda ins, attrs: mha_forward(ins, attrs)[0],
        lambda g, ins, attrs, out: mha_backward(g, ins, attrs),
        _mha_text,
        lambda nm: (
            "composite: the projections are linear layers, each head is scaled-dot-product attention ("
            + _SDPA_LOCAL
            + "), the output projection is linear; backward runs these rules in reverse"
        ),
        _mha_contrib,
        roles=("query", "key", "value", "W_in", "b_in", "W_out", "b_out"),
        shapes="(n, L, E) (batch_first, or (L, n, E)); torch in_proj layout or Keras (E, H, d) kernels",
    )
)
