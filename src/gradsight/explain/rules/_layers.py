"""Layer rules, one entry each: forward, backward and formula text (numpy, float64).

The rules' own layouts: dense takes ``A_prev`` of shape ``(..., in)`` and an ``(in, out)`` kernel; conv2d takes
NCHW activations and a ``(cout, cin, kh, kw)`` kernel. Weights and activations in another layout (stated by the
adapter's :class:`~gradsight.explain._spec.Conventions` and ``LayerSpec.conv``) are converted on the way in and
the gradients converted back, so every value a term shows is in the framework's own layout. A layer with an
activation (Linear + ReLU) is composed by the derive loop from the layer rule and the activation rule.
"""

from __future__ import annotations

import numpy as np

from .._spec import Conventions, LayerSpec
from ._table import LayerRule, register

__all__ = [
    "CONV_LATEX",
    "CONV_TEXT",
    "conv2d_backward",
    "conv2d_forward",
    "dense_backward",
    "dense_forward",
    "same_padding",
]


# ----------------------------------------------------------------------------------------------------- dense
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


def _io(w: np.ndarray, conv: Conventions) -> np.ndarray:
    """A dense weight in the framework's layout ↔ ``(in, out)`` (a transpose is its own inverse)."""
    return w.T if conv.dense_weight == "out_in" else w


def _dense_text(ls: LayerSpec, l: int, conv: Conventions) -> tuple[str, str]:
    t = conv.dense_weight == "out_in"
    bias, lbias = (f" + b{l}", rf" + b_{{{l}}}") if ls.bias is not None else ("", "")
    tr = r"^\top" if t else ""
    return (
        f"Z{l} = A{l - 1} · W{l}{'ᵀ' if t else ''}{bias}",
        rf"Z_{{{l}}} = A_{{{l - 1}}} W_{{{l}}}{tr}{lbias}",
    )


def _dense_grad_text(ls: LayerSpec, l: int, conv: Conventions) -> tuple[str, str]:
    t = conv.dense_weight == "out_in"
    return (
        f"dJ/dW{l} = (A{l - 1}ᵀ · dJ/dZ{l}){'ᵀ' if t else ''}  (summed over the batch)",
        rf"\frac{{\partial J}}{{\partial W_{{{l}}}}} = A_{{{l - 1}}}^\top \frac{{\partial J}}{{\partial Z_{{{l}}}}}",
    )


def _dense_backward(ls: LayerSpec, dz: np.ndarray, a_prev: np.ndarray, w: np.ndarray | None, conv: Conventions):
    dw_io, db, da = dense_backward(dz, a_prev, _io(w, conv))
    return _io(dw_io, conv), db, da


register(
    LayerRule(
        "dense",
        lambda ls, a, w, b, conv: dense_forward(a, _io(w, conv), b),
        _dense_backward,
        _dense_text,
        _dense_grad_text,
        weighted=True,
        shapes="(..., in) → (..., out)",
    )
)


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


def _nchw(a: np.ndarray, ls: LayerSpec) -> np.ndarray:
    return a.transpose(0, 3, 1, 2) if ls.conv["channels_last"] else a


def _framework_act(a: np.ndarray, ls: LayerSpec) -> np.ndarray:
    return a.transpose(0, 2, 3, 1) if ls.conv["channels_last"] else a


def _oihw(w: np.ndarray, conv: Conventions) -> np.ndarray:
    return w.transpose(3, 2, 0, 1) if conv.conv_weight == "hwio" else w


def _conv_forward(ls: LayerSpec, a: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, conv: Conventions):
    c = ls.conv
    return _framework_act(conv2d_forward(_nchw(a, ls), _oihw(w, conv), b, c["stride"], c["pads"]), ls)


def _conv_backward(ls: LayerSpec, dz: np.ndarray, a_prev: np.ndarray, w: np.ndarray | None, conv: Conventions):
    c = ls.conv
    dw, db, dx = conv2d_backward(_nchw(dz, ls), _nchw(a_prev, ls), _oihw(w, conv), c["stride"], c["pads"])
    return (dw.transpose(2, 3, 1, 0) if conv.conv_weight == "hwio" else dw), db, _framework_act(dx, ls)


def _conv_text(ls: LayerSpec, l: int, conv: Conventions) -> tuple[str, str]:
    c = ls.conv
    text = f"Z{l} = conv2d(A{l - 1}, W{l}, stride={c['stride']}, pads(t,b,l,r)={c['pads']})"
    return text + (f" + b{l}" if ls.bias is not None else "") + f"; {CONV_TEXT}", CONV_LATEX


def _conv_grad_text(ls: LayerSpec, l: int, conv: Conventions) -> tuple[str, str]:
    return (
        f"dJ/dW{l} = Σ_n dJ/dZ{l}_col · X_colᵀ (im2col of A{l - 1}); dJ/dA{l - 1} = col2im(W_colᵀ · dJ/dZ{l}_col)",
        CONV_LATEX,
    )


register(
    LayerRule(
        "conv2d",
        _conv_forward,
        _conv_backward,
        _conv_text,
        _conv_grad_text,
        weighted=True,
        act_layout=lambda ls: "NHWC" if ls.conv.get("channels_last") else "NCHW",
        shapes="NCHW or NHWC (LayerSpec.conv['channels_last']); zero padding, no dilation or groups",
    )
)

# ---------------------------------------------------------------------------------------- parameter-free
register(
    LayerRule(
        "activation",
        lambda ls, a, w, b, conv: a,
        lambda ls, dz, a_prev, w, conv: (None, None, dz),
        lambda ls, l, conv: (f"Z{l} = A{l - 1} (activation layer: its input)", rf"Z_{{{l}}} = A_{{{l - 1}}}"),
        shapes="any (the activation rule's)",
    )
)
register(
    LayerRule(
        "flatten",
        lambda ls, a, w, b, conv: a.reshape(a.shape[0], -1),
        lambda ls, da, a_prev, w, conv: (None, None, da.reshape(a_prev.shape)),
        lambda ls, l, conv: (f"A{l} = reshape(A{l - 1}, (n, −1))", r"A_l = \mathrm{flatten}(A_{l-1})"),
        pre_activation=False,
        shapes="(n, ...) → (n, −1)",
    )
)
register(
    LayerRule(
        "dropout",
        lambda ls, a, w, b, conv: a,
        lambda ls, da, a_prev, w, conv: (None, None, da),
        lambda ls, l, conv: (f"A{l} = A{l - 1} (dropout at inference)", r"A_l = A_{l-1}"),
        pre_activation=False,
        shapes="any (identity at inference)",
    )
)
