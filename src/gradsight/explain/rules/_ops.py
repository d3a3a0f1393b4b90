"""Graph-op rules, part 1: elementwise arithmetic, activations, shape ops and reductions (numpy, float64).

Each entry: forward, backward (a vector-Jacobian product per input position, never a Jacobian), the local
derivative in words, and the text of what it sends back to each input. Binary ops broadcast like numpy; their
backward sums the gradient back to each operand's shape (:func:`unbroadcast`). Attributes (``attrs``) are
plain data the adapter read from the framework: axes, shapes, permutations, slice keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._table import OpNames, OpRule, activation_rule, register

__all__ = ["fmt_key", "normalize_axes", "unbroadcast"]

Array = np.ndarray


def unbroadcast(g: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``g`` over the axes that broadcasting added or stretched, so it takes ``shape``."""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    if lead > 0:
        g = g.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, (a, b) in enumerate(zip(shape, g.shape, strict=True)) if a == 1 and b != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def normalize_axes(axes: Any, ndim: int) -> tuple[int, ...]:
    """Axes as a sorted tuple of non-negative ints (``None``: every axis)."""
    if axes is None:
        return tuple(range(ndim))
    if isinstance(axes, (int, np.integer)):
        axes = (int(axes),)
    return tuple(sorted(int(a) % ndim for a in axes))


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(np.shape(a))


# ------------------------------------------------------------------------------------------ elementwise
def _bin(kind: str, fwd, grads, sym: str, local: str, contrib, identity=()) -> None:
    def backward(g, ins, attrs, out):
        a, b = ins
        ga, gb = grads(g, np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), out)
        return [unbroadcast(ga, _shape(a)), unbroadcast(gb, _shape(b))]

    register(
        OpRule(
            kind,
            lambda ins, attrs: fwd(np.asarray(ins[0], dtype=np.float64), np.asarray(ins[1], dtype=np.float64)),
            backward,
            lambda nm: f"{nm.out} = {nm.i(0)} {sym} {nm.i(1)}",
            lambda nm: local,
            contrib,
            identity=identity,
            roles=("a", "b"),
            shapes="any two shapes that broadcast; the gradient is summed back over broadcast axes",
        )
    )


_bin(
    "add",
    np.add,
    lambda g, a, b, out: (g, g),
    "+",
    "∂(a + b)/∂a = ∂(a + b)/∂b = I: the gradient passes through unchanged (summed over broadcast axes)",
    lambda nm, k: nm.g,
    identity=(0, 1),
)
_bin(
    "sub",
    np.subtract,
    lambda g, a, b, out: (g, -g),
    "−",
    "∂(a − b)/∂a = I, ∂(a − b)/∂b = −I",
    lambda nm, k: nm.g if k == 0 else f"−{nm.g}",
    identity=(0,),
)
_bin(
    "mul",
    np.multiply,
    lambda g, a, b, out: (g * b, g * a),
    "⊙",
    "∂(a ⊙ b)/∂a = diag(b), ∂(a ⊙ b)/∂b = diag(a): each factor's gradient is g times the other factor (gating)",
    lambda nm, k: f"{nm.g} ⊙ {nm.i(1 - k)}",
)
_bin(
    "div",
    np.divide,
    lambda g, a, b, out: (g / b, -g * a / (b * b)),
    "/",
    "∂(a/b)/∂a = diag(1/b), ∂(a/b)/∂b = diag(−a/b²)",
    lambda nm, k: f"{nm.g} / {nm.i(1)}" if k == 0 else f"−{nm.g} ⊙ {nm.i(0)} / {nm.i(1)}²",
)


def _pow_forward(ins, attrs):
    return np.power(np.asarray(ins[0], dtype=np.float64), float(np.asarray(ins[1])))


def _pow_backward(g, ins, attrs, out):
    x, p = np.asarray(ins[0], dtype=np.float64), float(np.asarray(ins[1]))
    return [g * p * np.power(x, p - 1.0), None]


register(
    OpRule(
        "pow",
        _pow_forward,
        _pow_backward,
        lambda nm: f"{nm.out} = {nm.i(0)}^{nm.i(1)}",
        lambda nm: f"∂(x^p)/∂x = diag(p·x^(p−1)), p = {nm.i(1)} (a constant exponent)",
        lambda nm, k: f"{nm.g} ⊙ {nm.i(1)}·{nm.i(0)}^({nm.i(1)}−1)",
        roles=("x", "p"),
        shapes="any shape, a constant scalar exponent",
    )
)

#: unary elementwise functions: forward, derivative from (x, out), words for the derivative.
_UNARY: dict[str, tuple[Any, Any, str, str]] = {
    "neg": (np.negative, lambda x, y: -np.ones_like(x), "−{x}", "−1"),
    "exp": (np.exp, lambda x, y: y, "exp({x})", "exp(x) (the output itself)"),
    "log": (np.log, lambda x, y: 1.0 / x, "log({x})", "1/x"),
    "sqrt": (np.sqrt, lambda x, y: 0.5 / y, "√{x}", "1/(2√x)"),
    "rsqrt": (lambda x: 1.0 / np.sqrt(x), lambda x, y: -0.5 * y**3, "1/√{x}", "−½·x^(−3/2)"),
    "reciprocal": (np.reciprocal, lambda x, y: -(y * y), "1/{x}", "−1/x²"),
    "abs": (np.abs, lambda x, y: np.sign(x), "|{x}|", "sign(x)"),
    "square": (np.square, lambda x, y: 2.0 * x, "{x}²", "2x"),
    "sin": (np.sin, lambda x, y: np.cos(x), "sin({x})", "cos(x)"),
    "cos": (np.cos, lambda x, y: -np.sin(x), "cos({x})", "−sin(x)"),
}


def _unary(kind: str) -> None:
    fn, d, text, dtext = _UNARY[kind]
    register(
        OpRule(
            kind,
            lambda ins, attrs: fn(np.asarray(ins[0], dtype=np.float64)),
            lambda g, ins, attrs, out: [g * d(np.asarray(ins[0], dtype=np.float64), out)],
            lambda nm: f"{nm.out} = " + text.format(x=nm.i(0)),
            lambda nm: f"elementwise: ∂{nm.out}/∂{nm.i(0)} = diag({dtext})",
            lambda nm, k: f"{nm.g} ⊙ {dtext.replace('x', nm.i(0))}" if kind != "neg" else f"−{nm.g}",
            roles=("x",),
            shapes="elementwise, any shape",
        )
    )


for _k in _UNARY:
    _unary(_k)


def _act(attrs: Mapping[str, Any]):
    return activation_rule(attrs["name"], **dict(attrs.get("params", {})))


register(
    OpRule(
        "act",
        lambda ins, attrs: _act(attrs).forward(np.asarray(ins[0], dtype=np.float64)),
        lambda g, ins, attrs, out: [_act(attrs).backward(np.asarray(ins[0], dtype=np.float64), g)],
        lambda nm: f"{nm.out} = {nm.attrs['name']}({nm.i(0)})",
        lambda nm: f"elementwise, S = ∂{nm.out}/∂{nm.i(0)} diagonal: {_act(nm.attrs).text}",
        lambda nm, k: f"{nm.g} ⊙ S[{nm.out[2:-1]}]",
        roles=("x",),
        shapes="elementwise, any shape (the activation rules' elementwise entries)",
    )
)


def _where(ins, attrs):
    mask = np.asarray(ins[1], dtype=bool)
    return np.where(mask, float(attrs["value"]), np.asarray(ins[0], dtype=np.float64))


register(
    OpRule(
        "masked_fill",
        _where,
        lambda g, ins, attrs, out: [
            unbroadcast(np.where(np.asarray(ins[1], dtype=bool), 0.0, g), _shape(ins[0])),
            None,
        ],
        lambda nm: f"{nm.out} = {nm.i(0)} where not {nm.i(1)}, else {nm.attrs['value']}",
        lambda nm: "diag([not mask]): masked entries are constants, their gradient is 0",
        lambda nm, k: f"{nm.g} ⊙ [not {nm.i(1)}]",
        roles=("x", "mask"),
        shapes="x, and a boolean mask that broadcasts to it",
    )
)

# --------------------------------------------------------------------------------------------- identity
register(
    OpRule(
        "identity",
        lambda ins, attrs: np.asarray(ins[0], dtype=np.float64),
        lambda g, ins, attrs, out: [g],
        lambda nm: f"{nm.out} = {nm.i(0)}" + (f"  ({nm.attrs['what']})" if nm.attrs.get("what") else ""),
        lambda nm: "I (the gradient passes through unchanged)",
        lambda nm, k: nm.g,
        identity=(0,),
        roles=("x",),
        shapes="any (dropout at inference, contiguous, clone, a cast in float64)",
    )
)
register(
    OpRule(
        "detach",
        lambda ins, attrs: np.asarray(ins[0], dtype=np.float64),
        lambda g, ins, attrs, out: [None],
        lambda nm: f"{nm.out} = stop_gradient({nm.i(0)})",
        lambda nm: "0: no gradient flows back through a detached tensor",
        lambda nm, k: "0",
        roles=("x",),
        shapes="any",
    )
)


# ------------------------------------------------------------------------------------------- shape ops
def fmt_key(key: Any) -> str:
    """A slice key as Python writes it, e.g. ``[:, 0, 1:3]``."""

    def one(k):
        if isinstance(k, slice):
            s = "" if k.start is None else str(k.start)
            e = "" if k.stop is None else str(k.stop)
            st = "" if k.step in (None, 1) else f":{k.step}"
            return f"{s}:{e}{st}"
        if k is None:
            return "None"
        if k is Ellipsis:
            return "..."
        return str(k)

    keys = key if isinstance(key, tuple) else (key,)
    return "[" + ", ".join(one(k) for k in keys) + "]"


register(
    OpRule(
        "reshape",
        lambda ins, attrs: np.reshape(np.asarray(ins[0], dtype=np.float64), tuple(attrs["shape"])),
        lambda g, ins, attrs, out: [np.reshape(g, _shape(ins[0]))],
        lambda nm: f"{nm.out} = reshape({nm.i(0)}, {tuple(nm.attrs['shape'])})",
        lambda nm: "a permutation-free relabelling of entries: backward reshapes the gradient back",
        lambda nm, k: f"reshape({nm.g}, shape of {nm.i(0)})",
        roles=("x",),
        shapes="any → the recorded output shape (view, reshape, flatten, unflatten, squeeze, unsqueeze)",
    )
)
register(
    OpRule(
        "permute",
        lambda ins, attrs: np.transpose(np.asarray(ins[0], dtype=np.float64), tuple(attrs["perm"])),
        lambda g, ins, attrs, out: [np.transpose(g, tuple(np.argsort(attrs["perm"])))],
        lambda nm: f"{nm.out} = permute({nm.i(0)}, {tuple(nm.attrs['perm'])})",
        lambda nm: "moves entries: backward applies the inverse permutation",
        lambda nm, k: f"permute({nm.g}, {tuple(int(i) for i in np.argsort(nm.attrs['perm']))})",
        roles=("x",),
        shapes="any (transpose, permute, .T, .mT)",
    )
)


def _index_backward(g, ins, attrs, out):
    x = ins[0]
    gx = np.zeros(_shape(x))
    key = attrs["key"]
    if attrs.get("advanced"):
        np.add.at(gx, key, g)
    else:
        gx[key] += g
    return [gx]


register(
    OpRule(
        "index",
        lambda ins, attrs: np.asarray(ins[0], dtype=np.float64)[attrs["key"]].copy(),
        _index_backward,
        lambda nm: f"{nm.out} = {nm.i(0)}{fmt_key(nm.attrs['key']) if not nm.attrs.get('advanced') else '[ids]'}",
        lambda nm: "selects entries: backward scatters the gradient into zeros of the input's shape",
        lambda nm, k: (
            f"scatter({nm.g} into zeros at {fmt_key(nm.attrs['key']) if not nm.attrs.get('advanced') else 'ids'})"
        ),
        roles=("x",),
        shapes="basic indexing (ints, slices, None, ...), split/chunk/unbind/narrow/select",
    )
)


def _concat_backward(g, ins, attrs, out):
    axis = int(attrs["axis"]) % g.ndim
    if attrs.get("stack"):
        return [np.take(g, i, axis=axis) for i in range(len(ins))]
    cuts = np.cumsum([_shape(a)[axis] for a in ins])[:-1]
    return list(np.split(g, cuts, axis=axis))


register(
    OpRule(
        "concat",
        lambda ins, attrs: (np.stack if attrs.get("stack") else np.concatenate)(
            [np.asarray(a, dtype=np.float64) for a in ins], axis=int(attrs["axis"])
        ),
        _concat_backward,
        lambda nm: (
            f"{nm.out} = {'stack' if nm.attrs.get('stack') else 'concat'}([{', '.join(nm.ins)}], "
            f"axis={nm.attrs['axis']})"
        ),
        lambda nm: "places its inputs side by side: backward cuts the gradient into the same pieces",
        lambda nm, k: f"piece {k} of {nm.g} along axis {nm.attrs['axis']}",
        roles=(),
        shapes="tensors equal in every axis but the concatenation axis",
    )
)
register(
    OpRule(
        "expand",
        lambda ins, attrs: np.broadcast_to(np.asarray(ins[0], dtype=np.float64), tuple(attrs["shape"])).copy(),
        lambda g, ins, attrs, out: [unbroadcast(g, _shape(ins[0]))],
        lambda nm: f"{nm.out} = broadcast({nm.i(0)}, {tuple(nm.attrs['shape'])})",
        lambda nm: "copies entries along broadcast axes: backward sums over them",
        lambda nm, k: f"Σ {nm.g} over the broadcast axes",
        roles=("x",),
        shapes="any shape that broadcasts to the recorded one",
    )
)


# ------------------------------------------------------------------------------------------- reductions
def _red_forward(fn):
    def forward(ins, attrs):
        x = np.asarray(ins[0], dtype=np.float64)
        return fn(x, axis=normalize_axes(attrs.get("axes"), x.ndim), keepdims=bool(attrs.get("keepdims")))

    return forward


def _expand_back(g: Array, x: Array, attrs: Mapping[str, Any]) -> Array:
    axes = normalize_axes(attrs.get("axes"), x.ndim)
    if not attrs.get("keepdims"):
        g = np.expand_dims(g, axes)
    return g


def _mean_backward(g, ins, attrs, out):
    x = np.asarray(ins[0])
    axes = normalize_axes(attrs.get("axes"), x.ndim)
    count = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    return [np.broadcast_to(_expand_back(g, x, attrs) / count, x.shape).copy()]


def _sum_backward(g, ins, attrs, out):
    x = np.asarray(ins[0])
    return [np.broadcast_to(_expand_back(g, x, attrs), x.shape).copy()]


def _max_backward(g, ins, attrs, out):
    x = np.asarray(ins[0], dtype=np.float64)
    axes = normalize_axes(attrs.get("axes"), x.ndim)
    m = np.max(x, axis=axes, keepdims=True)
    hit = (x == m).astype(np.float64)
    if attrs.get("ties") == "first":  # torch.max(x, dim): the gradient goes to the one index it returns
        ax = axes[0]
        first = np.cumsum(hit, axis=ax) == 1
        hit = hit * first
    else:  # amax / a global max: shared equally between tied maxima
        hit = hit / hit.sum(axis=axes, keepdims=True)
    return [hit * _expand_back(g, x, attrs)]


def _axes_words(nm: OpNames) -> str:
    axes = nm.attrs.get("axes")
    return "every axis" if axes is None else f"axes {tuple(axes) if not isinstance(axes, int) else (axes,)}"


register(
    OpRule(
        "mean",
        _red_forward(np.mean),
        _mean_backward,
        lambda nm: f"{nm.out} = mean({nm.i(0)}) over {_axes_words(nm)}",
        lambda nm: "∂mean/∂x = 1/m for each of the m averaged entries",
        lambda nm, k: f"broadcast({nm.g})/m",
        roles=("x",),
        shapes="any; mean over the given axes (global average pooling is one)",
    )
)
register(
    OpRule(
        "sum",
        _red_forward(np.sum),
        _sum_backward,
        lambda nm: f"{nm.out} = Σ {nm.i(0)} over {_axes_words(nm)}",
        lambda nm: "∂Σ/∂x = 1 for each summed entry",
        lambda nm, k: f"broadcast({nm.g})",
        roles=("x",),
        shapes="any; sum over the given axes",
    )
)
register(
    OpRule(
        "max",
        _red_forward(np.max),
        _max_backward,
        lambda nm: f"{nm.out} = max({nm.i(0)}) over {_axes_words(nm)}",
        lambda nm: (
            "1 at the arg-max of each reduced group, 0 elsewhere (ties: "
            + ("the index returned)" if nm.attrs.get("ties") == "first" else "shared equally)")
        ),
        lambda nm, k: f"{nm.g} routed to the arg-max entries",
        roles=("x",),
        shapes="any; max over the given axes (global max pooling is one)",
    )
)
