"""Graph-op rules, part 2: the layers with parameters and the pooling ops (numpy, float64).

* ``linear`` — ``A = X·Wᵀ + b`` (torch, ``layout="out_in"``) or ``X·W + b`` (Keras, ``addmm``: ``"in_out"``).
* ``conv`` — 1-D and 2-D cross-correlation with stride, zero padding, dilation and groups, channels first or
  last, kernels ``(cout, cin/g, *k)`` (``weight_layout="oi"``) or ``(*k, cin/g, cout)`` (``"io"``); computed tap
  by tap (the im2col product without building the column matrix).
* ``batch_norm`` — training mode (batch statistics: the gradient flows through the batch mean and variance) or
  inference mode (running statistics, constants).
* ``layer_norm``, ``rms_norm`` — over the trailing ``n_axes`` axes.
* ``embedding`` — a row lookup; its weight's gradient is sparse (only looked-up rows are non-zero).
* ``max_pool``, ``avg_pool`` — 1-D/2-D windows with stride and padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._ops import unbroadcast
from ._table import OpNames, OpRule, register

__all__ = [
    "batch_norm_backward",
    "batch_norm_forward",
    "conv_nd_backward",
    "conv_nd_forward",
    "layer_norm_backward",
    "layer_norm_forward",
    "linear_backward",
    "linear_forward",
]

Array = np.ndarray


def _f(a: Any) -> Array:
    return np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------------------------------------------- linear
def _w_io(w: Array, layout: str) -> Array:
    return w.T if layout == "out_in" else w


def linear_forward(x: Array, w: Array, b: Array | None, layout: str = "out_in") -> Array:
    """``X·Wᵀ + b`` (``out_in``) or ``X·W + b`` (``in_out``) over the last axis of X."""
    z = x @ _w_io(w, layout)
    return z if b is None else z + b


def linear_backward(g: Array, x: Array, w: Array, layout: str = "out_in") -> tuple[Array, Array, Array]:
    """``(dJ/dX, dJ/dW, dJ/db)`` of :func:`linear_forward`: ``g·W``, ``Σ gᵀ·X`` over every leading axis, ``Σ g``."""
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    dw_io = x2.T @ g2
    return g @ _w_io(w, layout).T, (dw_io.T if layout == "out_in" else dw_io), g2.sum(axis=0)


def _linear_fwd(ins, attrs):
    b = _f(ins[2]) if len(ins) > 2 and ins[2] is not None else None
    return linear_forward(_f(ins[0]), _f(ins[1]), b, attrs.get("layout", "out_in"))


def _linear_bwd(g, ins, attrs, out):
    dx, dw, db = linear_backward(g, _f(ins[0]), _f(ins[1]), attrs.get("layout", "out_in"))
    return [dx, dw] + ([unbroadcast(db, np.shape(ins[2]))] if len(ins) > 2 else [])


def _linear_text(nm: OpNames) -> str:
    t = "ᵀ" if nm.attrs.get("layout", "out_in") == "out_in" else ""
    return f"{nm.out} = {nm.i(0)}·{nm.i(1)}{t}" + (f" + {nm.i(2)}" if len(nm.ins) > 2 else "")


def _linear_contrib(nm: OpNames, k: int) -> str:
    t = nm.attrs.get("layout", "out_in") == "out_in"
    if k == 0:
        return f"{nm.g}·{nm.i(1)}" + ("" if t else "ᵀ")
    if k == 1:
        return (
            f"({nm.g}ᵀ·{nm.i(0)})" + ("" if t else "ᵀ") + " (summed over every leading axis: the batch, the sequence)"
        )
    return f"Σ {nm.g} over every leading axis"


register(
    OpRule(
        "linear",
        _linear_fwd,
        _linear_bwd,
        _linear_text,
        lambda nm: (
            f"∂{nm.out}/∂{nm.i(0)} = {nm.i(1)}"
            + ("ᵀ" if nm.attrs.get("layout", "out_in") == "out_in" else "")
            + " for every row; ∂/∂W is the outer product of the row and the incoming gradient"
        ),
        _linear_contrib,
        roles=("x", "W", "b"),
        shapes="(..., in) → (..., out); W (out, in) [torch] or (in, out) [Keras, addmm]",
    )
)


# ------------------------------------------------------------------------------------------------------ conv
def _taps(size: tuple[int, int], k: tuple[int, int], s: tuple[int, int], d: tuple[int, int]):
    ho = (size[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (size[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    taps = [
        (
            i,
            j,
            slice(i * d[0], i * d[0] + s[0] * (ho - 1) + 1, s[0]),
            slice(j * d[1], j * d[1] + s[1] * (wo - 1) + 1, s[1]),
        )
        for i in range(k[0])
        for j in range(k[1])
    ]
    return ho, wo, taps


def conv_nd_forward(x: Array, w: Array, b: Array | None, stride, pads, dilation, groups: int) -> Array:
    """2-D cross-correlation, NCHW input, ``(cout, cin/g, kh, kw)`` kernel, zero ``pads ((t, b), (l, r))``."""
    n = x.shape[0]
    cout, cig, kh, kw = w.shape
    g = int(groups)
    xp = np.pad(x, ((0, 0), (0, 0), tuple(pads[0]), tuple(pads[1])))
    ho, wo, taps = _taps(xp.shape[2:], (kh, kw), stride, dilation)
    xg = xp.reshape(n, g, cig, *xp.shape[2:])
    wg = w.reshape(g, cout // g, cig, kh, kw)
    z = np.zeros((n, g, cout // g, ho, wo))
    for i, j, si, sj in taps:
        z += np.einsum("ngchw,goc->ngohw", xg[:, :, :, si, sj], wg[:, :, :, i, j], optimize=True)
    z = z.reshape(n, cout, ho, wo)
    return z if b is None else z + b[None, :, None, None]


def conv_nd_backward(gz: Array, x: Array, w: Array, stride, pads, dilation, groups: int):
    """``(dJ/dX, dJ/dW, dJ/db)`` of :func:`conv_nd_forward`, tap by tap (col2im without the columns)."""
    n, _, h, wd = x.shape
    cout, cig, kh, kw = w.shape
    g = int(groups)
    xp = np.pad(x, ((0, 0), (0, 0), tuple(pads[0]), tuple(pads[1])))
    _, _, taps = _taps(xp.shape[2:], (kh, kw), stride, dilation)
    xg = xp.reshape(n, g, cig, *xp.shape[2:])
    wg = w.reshape(g, cout // g, cig, kh, kw)
    gg = gz.reshape(n, g, cout // g, *gz.shape[2:])
    dw = np.zeros(wg.shape)
    dxg = np.zeros(xg.shape)
    for i, j, si, sj in taps:
        dw[:, :, :, i, j] = np.einsum("ngohw,ngchw->goc", gg, xg[:, :, :, si, sj], optimize=True)
        dxg[:, :, :, si, sj] += np.einsum("ngohw,goc->ngchw", gg, wg[:, :, :, i, j], optimize=True)
    dxp = dxg.reshape(xp.shape)
    (pt, _), (pl, _) = pads
    return dxp[:, :, pt : pt + h, pl : pl + wd], dw.reshape(w.shape), gz.sum(axis=(0, 2, 3))


def _conv_canon(ins, attrs):
    """Input and kernel in NCHW / (cout, cin/g, kh, kw), 1-D lifted to 2-D; and the 2-D settings."""
    x, w = _f(ins[0]), _f(ins[1])
    if attrs.get("channels_last"):
        x = np.moveaxis(x, -1, 1)
    if attrs.get("weight_layout", "oi") == "io":
        w = np.moveaxis(np.moveaxis(w, -1, 0), -1, 1)
    stride, pads, dil = tuple(attrs["stride"]), tuple(tuple(p) for p in attrs["pads"]), tuple(attrs["dilation"])
    if attrs["nd"] == 1:
        x, w = x[:, :, None, :], w[:, :, None, :]
        stride, pads, dil = (1, *stride), ((0, 0), *pads), (1, *dil)
    return x, w, stride, pads, dil


def _conv_back_layout(x: Array, attrs: Mapping[str, Any]) -> Array:
    if attrs["nd"] == 1:
        x = x[:, :, 0, :]
    return np.moveaxis(x, 1, -1) if attrs.get("channels_last") else x


def _conv_fwd(ins, attrs):
    x, w, stride, pads, dil = _conv_canon(ins, attrs)
    b = _f(ins[2]) if len(ins) > 2 else None
    return _conv_back_layout(conv_nd_forward(x, w, b, stride, pads, dil, attrs.get("groups", 1)), attrs)


def _conv_bwd(g, ins, attrs, out):
    x, w, stride, pads, dil = _conv_canon(ins, attrs)
    gz = np.moveaxis(g, -1, 1) if attrs.get("channels_last") else g
    if attrs["nd"] == 1:
        gz = gz[:, :, None, :]
    dx, dw, db = conv_nd_backward(gz, x, w, stride, pads, dil, attrs.get("groups", 1))
    if attrs["nd"] == 1:
        dw = dw[:, :, 0, :]
    if attrs.get("weight_layout", "oi") == "io":
        dw = np.moveaxis(np.moveaxis(dw, 1, -1), 0, -1)
    return [_conv_back_layout(dx, attrs), dw] + ([db] if len(ins) > 2 else [])


def _conv_cfg(nm: OpNames) -> str:
    a = nm.attrs
    bits = [f"stride={tuple(a['stride'])}", f"pads={tuple(tuple(p) for p in a['pads'])}"]
    if any(d != 1 for d in a["dilation"]):
        bits.append(f"dilation={tuple(a['dilation'])}")
    if a.get("groups", 1) != 1:
        bits.append(f"groups={a['groups']}")
    return ", ".join(bits)


register(
    OpRule(
        "conv",
        _conv_fwd,
        _conv_bwd,
        lambda nm: (
            f"{nm.out} = conv{nm.attrs['nd']}d({nm.i(0)}, {nm.i(1)}; {_conv_cfg(nm)})"
            + (f" + {nm.i(2)}" if len(nm.ins) > 2 else "")
            + "  [im2col: Z_col = W_col·X_col per group]"
        ),
        lambda nm: (
            "∂Z/∂X is the transposed convolution with the same kernel (col2im(W_colᵀ·g)); ∂Z/∂W correlates "
            "the input with the incoming gradient"
        ),
        lambda nm, k: (
            f"conv_transpose({nm.g}, {nm.i(1)}) = col2im({nm.i(1)}_colᵀ·{nm.g}_col)"
            if k == 0
            else (
                f"Σ_n {nm.g}_col·{nm.i(0)}_colᵀ (im2col of the input)" if k == 1 else f"Σ {nm.g} over batch and space"
            )
        ),
        roles=("x", "W", "b"),
        shapes="1-D/2-D, channels first or last; stride, zero padding, dilation, groups",
    )
)


# ------------------------------------------------------------------------------------------------ norms
def _bshape(v: Any, ndim: int, axis: int) -> Any:
    """A per-channel vector shaped to broadcast along ``axis`` of an ``ndim``-D tensor (scalars unchanged)."""
    v = _f(v)
    if v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis % ndim] = v.size
    return v.reshape(shape)


def batch_norm_forward(x: Array, gamma, beta, mean, var, axis: int, eps: float, training: bool):
    """Return ``(y, x̂, 1/√(σ²+ε))``; batch statistics over every axis but ``axis`` when ``training``."""
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    if training:
        mu = x.mean(axis=red, keepdims=True)
        var_b = ((x - mu) ** 2).mean(axis=red, keepdims=True)
    else:
        mu, var_b = _bshape(mean, x.ndim, axis), _bshape(var, x.ndim, axis)
    inv = 1.0 / np.sqrt(var_b + eps)
    xh = (x - mu) * inv
    return _bshape(gamma, x.ndim, axis) * xh + _bshape(beta, x.ndim, axis), xh, inv


def batch_norm_backward(g: Array, x: Array, gamma, axis: int, eps: float, training: bool, xh: Array, inv: Array):
    """``(dJ/dX, dJ/dγ, dJ/dβ)``; in training ``dX = (γ/σ)(g − mean(g) − x̂·mean(g·x̂))`` per channel."""
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    gx = g * _bshape(gamma, x.ndim, axis)
    if training:
        dx = inv * (gx - gx.mean(axis=red, keepdims=True) - xh * (gx * xh).mean(axis=red, keepdims=True))
    else:
        dx = gx * inv
    return dx, (g * xh).sum(axis=red), g.sum(axis=red)


def _bn_fwd(ins, attrs):
    return batch_norm_forward(
        _f(ins[0]), ins[1], ins[2], ins[3], ins[4], attrs["axis"], attrs["eps"], attrs["training"]
    )[0]


def _bn_bwd(g, ins, attrs, out):
    x = _f(ins[0])
    _, xh, inv = batch_norm_forward(x, ins[1], ins[2], ins[3], ins[4], attrs["axis"], attrs["eps"], attrs["training"])
    dx, dg, db = batch_norm_backward(g, x, ins[1], attrs["axis"], attrs["eps"], attrs["training"], xh, inv)
    return [
        dx,
        dg.reshape(np.shape(ins[1])) if np.ndim(ins[1]) else None,
        db.reshape(np.shape(ins[2])) if np.ndim(ins[2]) else None,
        None,
        None,
    ]


def _bn_text(nm: OpNames) -> str:
    x = nm.i(0)
    if nm.attrs["training"]:
        stats = f"μ_B, σ²_B = mean and (biased) variance of {x} over every axis but the channel axis {nm.attrs['axis']}"
    else:
        stats = f"μ, σ² = the running statistics {nm.i(3)}, {nm.i(4)} (inference mode: constants)"
    return f"{nm.out} = {nm.i(1)} ⊙ ({x} − μ)/√(σ² + {nm.attrs['eps']:g}) + {nm.i(2)};  {stats}"


def _bn_local(nm: OpNames) -> str:
    if nm.attrs["training"]:
        return (
            "per channel, with x̂ = (x − μ_B)/σ_B over its m values: ∂A/∂X = (γ/σ_B)(I − 1/m − x̂x̂ᵀ/m), applied as "
            "(γ/σ_B)(g − mean(g) − x̂·mean(g⊙x̂)) — the gradient flows through μ_B and σ²_B too"
        )
    return "diag(γ/√(σ² + ε)) per channel: the running statistics are constants"


def _bn_contrib(nm: OpNames, k: int) -> str:
    if k == 0:
        if nm.attrs["training"]:
            return f"(γ/σ_B)·({nm.g}⊙ − mean − x̂·mean(·⊙x̂)) [training-mode BN backward of {nm.g}]"
        return f"{nm.g} ⊙ γ/√(σ² + ε)"
    return f"Σ {nm.g} ⊙ x̂ over batch and space" if k == 1 else f"Σ {nm.g} over batch and space"


register(
    OpRule(
        "batch_norm",
        _bn_fwd,
        _bn_bwd,
        _bn_text,
        _bn_local,
        _bn_contrib,
        roles=("x", "W", "b", "running_mean", "running_var"),
        shapes="channel axis attrs['axis'] (1: NC..., −1: N...C); training (batch statistics) or inference",
    )
)


def _trail(x: Array, n_axes: int) -> tuple[int, ...]:
    return tuple(range(x.ndim - int(n_axes), x.ndim))


def layer_norm_forward(x: Array, gamma, beta, n_axes: int, eps: float) -> tuple[Array, Array, Array]:
    """Return ``(y, x̂, 1/σ)``: normalisation over the trailing ``n_axes`` axes."""
    ax = _trail(x, n_axes)
    mu = x.mean(axis=ax, keepdims=True)
    inv = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=ax, keepdims=True) + eps)
    xh = (x - mu) * inv
    y = xh * (_f(gamma) if gamma is not None else 1.0) + (_f(beta) if beta is not None else 0.0)
    return y, xh, inv


def layer_norm_backward(g: Array, xh: Array, inv: Array, gamma, n_axes: int):
    """``(dJ/dX, dJ/dγ, dJ/dβ)``: ``dX = (1/σ)(γg − mean(γg) − x̂·mean(γg⊙x̂))`` over the normalised axes."""
    ax = _trail(xh, n_axes)
    gx = g * (_f(gamma) if gamma is not None else 1.0)
    dx = inv * (gx - gx.mean(axis=ax, keepdims=True) - xh * (gx * xh).mean(axis=ax, keepdims=True))
    lead = tuple(range(xh.ndim - int(n_axes)))
    return dx, (g * xh).sum(axis=lead), g.sum(axis=lead)


def _opt(ins: list, k: int):
    return ins[k] if len(ins) > k and ins[k] is not None and np.ndim(ins[k]) > 0 else None


def _ln_fwd(ins, attrs):
    return layer_norm_forward(_f(ins[0]), _opt(ins, 1), _opt(ins, 2), attrs["n_axes"], attrs["eps"])[0]


def _ln_bwd(g, ins, attrs, out):
    _, xh, inv = layer_norm_forward(_f(ins[0]), _opt(ins, 1), _opt(ins, 2), attrs["n_axes"], attrs["eps"])
    dx, dg, db = layer_norm_backward(g, xh, inv, _opt(ins, 1), attrs["n_axes"])
    out_ = [dx]
    if len(ins) > 1:
        out_.append(dg if _opt(ins, 1) is not None else None)
    if len(ins) > 2:
        out_.append(db if _opt(ins, 2) is not None else None)
    return out_


register(
    OpRule(
        "layer_norm",
        _ln_fwd,
        _ln_bwd,
        lambda nm: (
            f"{nm.out} = {nm.i(1) if len(nm.ins) > 1 else '1'} ⊙ ({nm.i(0)} − μ)/√(σ² + {nm.attrs['eps']:g})"
            + (f" + {nm.i(2)}" if len(nm.ins) > 2 else "")
            + f";  μ, σ² = mean and (biased) variance over the last {nm.attrs['n_axes']} axis/axes of each row"
        ),
        lambda nm: (
            "per row of f normalised values x̂ = (x − μ)/σ: ∂A/∂X = (1/σ)(I − 1/f − x̂x̂ᵀ/f)·diag(γ), applied "
            "as (1/σ)(γ⊙g − mean(γ⊙g) − x̂·mean(γ⊙g⊙x̂)) without building it"
        ),
        lambda nm, k: (
            f"(1/σ)(γ⊙{nm.g} − mean(γ⊙{nm.g}) − x̂·mean(γ⊙{nm.g}⊙x̂))"
            if k == 0
            else (f"Σ {nm.g} ⊙ x̂ over every leading axis" if k == 1 else f"Σ {nm.g} over every leading axis")
        ),
        roles=("x", "W", "b"),
        shapes="(..., *normalized_shape): statistics over the trailing n_axes axes",
    )
)


def _rms_parts(x: Array, n_axes: int, eps: float) -> tuple[Array, Array]:
    ax = _trail(x, n_axes)
    inv = 1.0 / np.sqrt((x * x).mean(axis=ax, keepdims=True) + eps)
    return x * inv, inv


def _rms_fwd(ins, attrs):
    xh, _ = _rms_parts(_f(ins[0]), attrs["n_axes"], attrs["eps"])
    return xh * _f(ins[1]) if _opt(ins, 1) is not None else xh


def _rms_bwd(g, ins, attrs, out):
    x = _f(ins[0])
    xh, inv = _rms_parts(x, attrs["n_axes"], attrs["eps"])
    gam = _opt(ins, 1)
    gx = g * (_f(gam) if gam is not None else 1.0)
    ax = _trail(x, attrs["n_axes"])
    dx = inv * (gx - xh * (gx * xh).mean(axis=ax, keepdims=True))
    lead = tuple(range(x.ndim - int(attrs["n_axes"])))
    return [dx] + ([(g * xh).sum(axis=lead) if gam is not None else None] if len(ins) > 1 else [])


register(
    OpRule(
        "rms_norm",
        _rms_fwd,
        _rms_bwd,
        lambda nm: (
            f"{nm.out} = {nm.i(0)}/√(mean({nm.i(0)}²) + {nm.attrs['eps']:g})"
            + (f" ⊙ {nm.i(1)}" if len(nm.ins) > 1 else "")
            + f";  mean over the last {nm.attrs['n_axes']} axis/axes"
        ),
        lambda nm: (
            "per row, x̂ = x/r with r = √(mean(x²) + ε): ∂A/∂X = (1/r)(I − x̂x̂ᵀ/f)·diag(γ), applied as "
            "(1/r)(γ⊙g − x̂·mean(γ⊙g⊙x̂)) (no mean is subtracted)"
        ),
        lambda nm, k: f"(1/r)(γ⊙{nm.g} − x̂·mean(γ⊙{nm.g}⊙x̂))" if k == 0 else f"Σ {nm.g} ⊙ x̂ over every leading axis",
        roles=("x", "W"),
        shapes="(..., *normalized_shape)",
    )
)


# ------------------------------------------------------------------------------------------------- embedding
def _emb_ids(a: Any) -> Array:
    return np.asarray(a).astype(np.int64)


def _emb_bwd(g, ins, attrs, out):
    ids, w = _emb_ids(ins[0]), _f(ins[1])
    dw = np.zeros(w.shape)
    np.add.at(dw, ids.reshape(-1), g.reshape(-1, w.shape[-1]))
    pad = attrs.get("padding_idx")
    if pad is not None:
        dw[pad] = 0.0
    return [None, dw]


def _emb_contrib(nm: OpNames, k: int) -> str:
    pad = nm.attrs.get("padding_idx")
    extra = f"; row {pad} (padding_idx) stays 0" if pad is not None else ""
    return f"scatter-add of the rows of {nm.g} into the rows ids of a zero matrix (sparse: only looked-up rows){extra}"


register(
    OpRule(
        "embedding",
        lambda ins, attrs: _f(ins[1])[_emb_ids(ins[0])],
        _emb_bwd,
        lambda nm: f"{nm.out}[..., :] = {nm.i(1)}[{nm.i(0)}[...], :]  (a row lookup by integer id)",
        lambda nm: (
            "∂A[i, :]/∂W[id_i, :] = I, every other row 0: the gradient is sparse, one row per distinct id; "
            "the ids themselves get no gradient"
        ),
        _emb_contrib,
        roles=("ids", "W"),
        shapes="integer ids of any shape → (*ids.shape, dim)",
    )
)


# ------------------------------------------------------------------------------------------------- pooling
def _pool_canon(x: Array, attrs: Mapping[str, Any]):
    if attrs.get("channels_last"):
        x = np.moveaxis(x, -1, 1)
    k, s, p = tuple(attrs["kernel"]), tuple(attrs["stride"]), tuple(tuple(q) for q in attrs["pads"])
    if attrs["nd"] == 1:
        x = x[:, :, None, :]
        k, s, p = (1, *k), (1, *s), ((0, 0), *p)
    return x, k, s, p


def _pool_fwd(ins, attrs):
    x, k, s, p = _pool_canon(_f(ins[0]), attrs)
    is_max = attrs["kind"] == "max"
    xp = np.pad(x, ((0, 0), (0, 0), *p), constant_values=-np.inf if is_max else 0.0)
    ho, wo, taps = _taps(xp.shape[2:], k, s, (1, 1))
    if is_max:
        out = np.full((*x.shape[:2], ho, wo), -np.inf)
        for _, _, si, sj in taps:
            out = np.maximum(out, xp[:, :, si, sj])
    else:
        out = sum(xp[:, :, si, sj] for _, _, si, sj in taps) / _divisor(x, k, s, p, attrs)
    return _conv_back_layout(out, attrs)


def _divisor(x: Array, k, s, p, attrs) -> Any:
    if attrs.get("count_include_pad", True):
        return float(k[0] * k[1])
    ones = np.pad(np.ones((1, 1, *x.shape[2:])), ((0, 0), (0, 0), *p))
    _, _, taps = _taps(ones.shape[2:], k, s, (1, 1))
    return sum(ones[:, :, si, sj] for _, _, si, sj in taps)


def _pool_bwd(g, ins, attrs, out):
    x, k, s, p = _pool_canon(_f(ins[0]), attrs)
    gz = np.moveaxis(g, -1, 1) if attrs.get("channels_last") else g
    if attrs["nd"] == 1:
        gz = gz[:, :, None, :]
    is_max = attrs["kind"] == "max"
    xp = np.pad(x, ((0, 0), (0, 0), *p), constant_values=-np.inf if is_max else 0.0)
    _, _, taps = _taps(xp.shape[2:], k, s, (1, 1))
    dxp = np.zeros(xp.shape)
    if is_max:
        best = np.full(gz.shape, -np.inf)
        arg = np.zeros(gz.shape, dtype=np.int64)
        for t, (_, _, si, sj) in enumerate(taps):
            v = xp[:, :, si, sj]
            better = v > best  # strictly greater: the first maximum in window order wins, as torch does
            best = np.where(better, v, best)
            arg = np.where(better, t, arg)
        for t, (_, _, si, sj) in enumerate(taps):
            dxp[:, :, si, sj] += gz * (arg == t)
    else:
        gd = gz / _divisor(x, k, s, p, attrs)
        for _, _, si, sj in taps:
            dxp[:, :, si, sj] += gd
    (pt, _), (pl, _) = p
    dx = dxp[:, :, pt : pt + x.shape[2], pl : pl + x.shape[3]]
    return [_conv_back_layout(dx, attrs)]


register(
    OpRule(
        "pool",
        _pool_fwd,
        _pool_bwd,
        lambda nm: (
            f"{nm.out} = {nm.attrs['kind']}_pool{nm.attrs['nd']}d({nm.i(0)}; kernel={tuple(nm.attrs['kernel'])}, "
            f"stride={tuple(nm.attrs['stride'])}, pads={tuple(tuple(q) for q in nm.attrs['pads'])})"
        ),
        lambda nm: (
            "1 at each window's (first) maximum, 0 elsewhere: backward routes each gradient entry to its arg-max"
            if nm.attrs["kind"] == "max"
            else "1/(window size) for every entry of a window: backward spreads each gradient entry evenly"
            + ("" if nm.attrs.get("count_include_pad", True) else " (padding not counted)")
        ),
        lambda nm, k: (
            f"{nm.g} routed to each window's arg-max"
            if nm.attrs["kind"] == "max"
            else f"{nm.g} spread over each window"
        ),
        roles=("x",),
        shapes="1-D/2-D windows, channels first or last; stride and padding",
    )
)
