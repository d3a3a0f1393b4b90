"""The rule table: one entry per layer kind, activation and loss, and the registries that hold them.

An entry holds its forward, its local derivative / backward and its formula text side by side (micrograd's
``_backward`` next to its forward). The derive loop (:mod:`gradsight.explain._derive`) looks entries up by the
names an adapter writes into a :class:`~gradsight.explain._spec.LayerSpec`; a name without an entry is never
handled by another rule: the layer is traced with its autodiff values only, and marked so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._spec import Conventions, FrameworkRun, LayerSpec

__all__ = [
    "ACTIVATION_RULES",
    "LAYER_RULES",
    "LOSS_RULES",
    "OP_RULES",
    "Activation",
    "ActivationRule",
    "LayerRule",
    "LossRule",
    "OpNames",
    "OpRule",
    "activation_rule",
    "forward_layer",
    "layer_rule",
    "op_rule",
    "register",
    "resolve",
]

Array = np.ndarray


def _elementwise_dz_text(l: int) -> str:
    return f"dJ/dZ{l} = dJ/dA{l} ⊙ S{l}"


@dataclass(frozen=True)
class ActivationRule:
    """One activation: ``A = f(Z)``, its local derivative S, dJ/dZ and formula text, side by side.

    Every callable takes the activation's parameters as keywords (``defaults`` filled in by :meth:`bind`).

    Attributes:
        name: the name adapters write into ``LayerSpec.activation``, e.g. ``"relu"``.
        forward: ``(z, **p) -> a``.
        derivative: ``(z, **p) -> ∂a/∂z`` elementwise (the diagonal of S); None when S is a full per-sample
            Jacobian (then ``backward`` and ``local`` are required).
        text: ``(**p) -> "A = …, S = …"``.
        latex: ``(**p) -> LaTeX`` of the same.
        defaults: parameter defaults, e.g. ``{"slope": 0.01}``.
        backward: ``(z, g, **p) -> dJ/dZ`` given ``g = dJ/dA``; default ``g ⊙ derivative(z)``.
        local: ``(z, **p) -> (S value, text, latex, layout)`` for the S term; default the elementwise diagonal.
        dz_text: ``l -> formula`` of dJ/dZ_l.
        shapes: words for the shapes it accepts (elementwise: any; softmax: last axis of 2-D).
    """

    name: str
    forward: Callable[..., Array]
    derivative: Callable[..., Array] | None
    text: Callable[..., str]
    latex: Callable[..., str]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    backward: Callable[..., Array] | None = None
    local: Callable[..., tuple[Array, str, str, str]] | None = None
    dz_text: Callable[[int], str] = _elementwise_dz_text
    shapes: str = "elementwise, any shape"

    @property
    def elementwise(self) -> bool:
        """S is diagonal (the derivative is elementwise)."""
        return self.derivative is not None

    def bind(self, **params: Any) -> Activation:
        """The rule with its parameters fixed (unknown parameters, e.g. a softmax ``dim``, are ignored)."""
        p = {k: params.get(k, v) for k, v in self.defaults.items()}
        return Activation(self, p)


@dataclass(frozen=True)
class Activation:
    """An :class:`ActivationRule` bound to its parameters: what the derive loop calls.

    Attributes:
        rule: the rule.
        params: its parameters (defaults filled in).
    """

    rule: ActivationRule
    params: Mapping[str, Any]

    @property
    def name(self) -> str:
        """The rule's name."""
        return self.rule.name

    @property
    def text(self) -> str:
        """Plain-text formula of ``A = f(Z)`` and S."""
        return self.rule.text(**self.params)

    @property
    def latex(self) -> str:
        """LaTeX of the same."""
        return self.rule.latex(**self.params)

    def forward(self, z: Array) -> Array:
        """``A = f(Z)``."""
        return self.rule.forward(z, **self.params)

    def derivative(self, z: Array) -> Array:
        """The diagonal of S (elementwise rules only)."""
        if self.rule.derivative is None:
            raise TypeError(f"activation {self.name!r} has a full Jacobian, not an elementwise derivative")
        return self.rule.derivative(z, **self.params)

    def backward(self, z: Array, g: Array) -> Array:
        """``dJ/dZ`` from ``g = dJ/dA``."""
        if self.rule.backward is not None:
            return self.rule.backward(z, g, **self.params)
        return g * self.derivative(z)

    def local(self, z: Array) -> tuple[Array, str, str, str]:
        """``(S value, text, latex, layout)`` of the local-derivative term S."""
        if self.rule.local is not None:
            return self.rule.local(z, **self.params)
        return self.derivative(z), self.text, self.latex, "diagonal of S, same shape as Z (elementwise activation)"


@dataclass(frozen=True)
class LayerRule:
    """One layer kind: its forward, backward and formula text, in the rules' own weight layout.

    Weights arrive in the framework's layout; ``to_rule``/``from_rule`` convert using the adapter's
    :class:`~gradsight.explain._spec.Conventions` (data, not a framework name).

    Attributes:
        kind: the name adapters write into ``LayerSpec.kind``, e.g. ``"dense"``.
        forward: ``(ls, a_prev, w, b, conv) -> out``: Z when ``pre_activation``, else A.
        backward: ``(ls, d_out, a_prev, w, conv) -> (dJ/dW, dJ/db, dJ/dA_prev)`` in the framework's layout
            (``None`` for a parameter-free layer).
        text: ``(ls, l, conv) -> (text, latex)`` of the forward formula (of Z_l, or of A_l).
        grad_text: ``(ls, l, conv) -> (text, latex)`` of dJ/dW_l, for a layer with parameters.
        pre_activation: the output is a pre-activation Z followed by the layer's activation (terms Z, S, A,
            dJ/dZ); otherwise the output is A itself (terms A and dJ/dA only).
        weighted: the layer has a weight (and maybe a bias).
        act_layout: ``ls -> words`` for the activation layout; None: ``(n, features)`` or "N-D".
        shapes: words for the shapes it accepts.
    """

    kind: str
    forward: Callable[[LayerSpec, Array, Array | None, Array | None, Conventions], Array]
    backward: Callable[[LayerSpec, Array, Array, Array | None, Conventions], tuple[Array | None, Array | None, Array]]
    text: Callable[[LayerSpec, int, Conventions], tuple[str, str]]
    grad_text: Callable[[LayerSpec, int, Conventions], tuple[str, str]] | None = None
    pre_activation: bool = True
    weighted: bool = False
    act_layout: Callable[[LayerSpec], str] | None = None
    shapes: str = ""


@dataclass(frozen=True)
class LossRule:
    """One loss: per-element (or per-sample) value, dJ/dŶ before reduction, and formula text.

    Attributes:
        kind: the name in a :class:`~gradsight.explain._spec.LossSpec`, e.g. ``"mse"``.
        pointwise: ``(ŷ, t, spec) -> (values, grad, text, latex, grad_text)`` before reduction: per element
            for a per-element loss, per sample for a cross-entropy. None for a direct rule.
        per_element: reduced over elements (mse, mae, bce) rather than over samples (cross-entropies).
        logits: the ``from_logits`` twin of a probability loss (``"bce"`` → ``"bce_logits"``), else "".
        sparse: targets are class indices (one-hot encoded before ``pointwise``).
        direct: ``ŷ -> (value, grad, text, latex, scale)`` for a loss that is a plain function of ŷ (no target,
            no reduction convention), e.g. ``mean(Ŷ)``.
    """

    kind: str
    pointwise: Callable[..., tuple[Array, Array, str, str, str]] | None = None
    per_element: bool = False
    logits: str = ""
    sparse: bool = False
    direct: Callable[[Array], tuple[float, Array, str, str, str]] | None = None


@dataclass(frozen=True)
class OpNames:
    """The names a graph op's formula text is written with.

    Attributes:
        out: the op's output, e.g. ``"A[attn.q_proj]"``.
        g: the gradient arriving at its output, e.g. ``"dJ/dA[attn.q_proj]"``.
        ins: one display name per input position: ``"A[ln1]"`` for an activation, ``"W[attn.q_proj]"`` for a
            parameter, the value for a scalar constant.
        attrs: the op's configuration.
    """

    out: str
    g: str
    ins: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def i(self, k: int) -> str:
        """The display name of input position ``k`` (``"?"`` when absent)."""
        return self.ins[k] if k < len(self.ins) else "?"


def _default_contrib(nm: OpNames, k: int) -> str:
    return f"(∂{nm.out}/∂{nm.i(k)})ᵀ·{nm.g}"


@dataclass(frozen=True)
class OpRule:
    """One graph op: forward, backward (a vector-Jacobian product per input), local derivative and text.

    Inputs are positional: activations, parameters and constants alike (a Linear reads ``[x, W, b]``), so a
    parameter is a node like any other and a tensor read twice receives the sum of its consumers' gradients.

    Attributes:
        kind: the name adapters write into ``GraphNode.op``, e.g. ``"layer_norm"``.
        forward: ``(inputs, attrs) -> output``.
        backward: ``(g, inputs, attrs, output) -> [dJ/d(input k) or None]`` given ``g = dJ/d(output)``; never
            builds a Jacobian.
        text: ``OpNames -> "A[n] = …"``, the forward formula.
        local: ``OpNames -> words``: the local derivative in its natural compact form and how backward applies
            it (e.g. softmax: ``S ⊙ (g − Σ g⊙S)``).
        contrib: ``(OpNames, k) -> words`` for what this op sends back to input ``k`` (the parts of a fan-in
            sum, and the formula of a parameter's gradient); default ``(∂out/∂in_k)ᵀ·g``.
        latex: ``OpNames -> LaTeX`` of the forward formula (default: the text).
        identity: input positions whose vector-Jacobian product is the identity (written bare in sums).
        roles: names of the input positions, e.g. ``("x", "W", "b")``.
        shapes: words for the shapes it accepts.
    """

    kind: str
    forward: Callable[[list[Array], Mapping[str, Any]], Array]
    backward: Callable[[Array, list[Array], Mapping[str, Any], Array], list[Array | None]]
    text: Callable[[OpNames], str]
    local: Callable[[OpNames], str]
    contrib: Callable[[OpNames, int], str] = _default_contrib
    latex: Callable[[OpNames], str] | None = None
    identity: tuple[int, ...] = ()
    roles: tuple[str, ...] = ()
    shapes: str = ""


#: registered rules, by name, in registration order.
LAYER_RULES: dict[str, LayerRule] = {}
ACTIVATION_RULES: dict[str, ActivationRule] = {}
LOSS_RULES: dict[str, LossRule] = {}
OP_RULES: dict[str, OpRule] = {}

_TABLES: dict[type, dict[str, Any]] = {
    LayerRule: LAYER_RULES,
    ActivationRule: ACTIVATION_RULES,
    LossRule: LOSS_RULES,
    OpRule: OP_RULES,
}


def register(
    rule: LayerRule | ActivationRule | LossRule | OpRule,
) -> LayerRule | ActivationRule | LossRule | OpRule:
    """Add ``rule`` to its table (a layer, activation, loss or graph-op rule); a name can be registered once."""
    table = _TABLES[type(rule)]
    name = rule.kind if isinstance(rule, (LayerRule, LossRule, OpRule)) else rule.name
    if name in table:
        raise ValueError(f"a {type(rule).__name__} named {name!r} is already registered")
    table[name] = rule
    return rule


def layer_rule(kind: str) -> LayerRule | None:
    """The layer rule of ``kind``, or None (no rule: the layer is traced with autodiff values only)."""
    return LAYER_RULES.get(kind)


def op_rule(kind: str) -> OpRule | None:
    """The graph-op rule of ``kind``, or None (no rule: the node is traced with autodiff values only)."""
    return OP_RULES.get(kind)


def activation_rule(name: str, **params: Any) -> Activation:
    """The activation rule ``name`` bound to ``params``.

    Raises:
        KeyError: no rule of that name (callers turn this into an "autodiff only" layer or an InputError).
    """
    return ACTIVATION_RULES[name].bind(**params)


# --------------------------------------------------------------------------------------------- lookup
def resolve(ls: LayerSpec) -> tuple[LayerRule | None, Activation | None, str]:
    """The layer's rule and bound activation, or ``(None, None, reason)`` when it has no rule.

    Unknown kinds and unknown activations are explicit: they are never handled by another rule.
    """
    if ls.kind == "opaque":
        return None, None, ls.reason
    rule = layer_rule(ls.kind)
    if rule is None:
        return None, None, ls.reason or f"no rule registered for layer kind {ls.kind!r}"
    if not rule.pre_activation:
        return rule, None, ""
    try:
        return rule, activation_rule(ls.activation, **ls.activation_params), ""
    except KeyError:
        return None, None, ls.reason or f"no rule registered for activation {ls.activation!r}"


def forward_layer(
    run: FrameworkRun, ls: LayerSpec, a_prev: np.ndarray, w: np.ndarray | None, b: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray]:
    """Closed-form (Z, A) of one layer from A_{l-1} (framework layout); a layer without a rule gives the
    framework's A and Z = None.
    """  # noqa: D205
    rule, act, _ = resolve(ls)
    if rule is None:
        return None, ls.a
    out = rule.forward(ls, a_prev, w, b, run.conventions)
    return (out, act.forward(out)) if act is not None else (None, out)
