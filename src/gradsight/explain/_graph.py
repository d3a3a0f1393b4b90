"""The neutral description of a *graph* an adapter hands to the explainer: nodes in topological order.

A chain (``nn.Sequential``, ``keras.Sequential``) is described by :class:`~gradsight.explain._spec.LayerSpec`s;
any other traceable model by a :class:`GraphRun`: one :class:`GraphNode` per op, each naming the nodes it reads.
The model's input, every parameter and every op is a node, so a tensor read by several ops (a skip connection,
a shared module's weight, Q = K = V in self-attention) is one node with several consumers, and its gradient is
the sum of what each consumer sends back. Values are numpy float64 in the framework's own layout.

Node names are what the trace shows: the module path of a module's op (``blocks.0.ln1``), the module path of a
parameter's owner for parameters (``dJ/dW[blocks.0.attn.q_proj]``), and the op name, prefixed by the enclosing
module's path, for a functional op (``add_1``, ``blocks.0.add``). :func:`param_term` turns a framework's
parameter name into its term name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._spec import Conventions, LossSpec
from .rules import OP_RULES

__all__ = [
    "GraphNode",
    "GraphRun",
    "consumers",
    "downstream",
    "forward_node",
    "node_inputs",
    "param_term",
    "prune",
    "unique_name",
]

#: the last component of a parameter's name that makes it a "b" (a shift); everything else is a "W".
_BIAS_NAMES = frozenset({"bias", "beta", "in_proj_bias"})
#: ... and those that make it a "W" of its owner module (any other name keeps its full path).
_WEIGHT_NAMES = frozenset({"weight", "kernel", "gamma", "embeddings", "in_proj_weight", "scale"})


def param_term(key: str) -> tuple[str, str]:
    """``(term name, owner path)`` of a parameter from its framework name.

    ``"blocks.0.attn.q_proj.weight"`` → ``("dJ/dW[blocks.0.attn.q_proj]", "blocks.0.attn.q_proj")``;
    ``"attn.in_proj_bias"`` → ``("dJ/db[attn.in_proj]", "attn.in_proj")``; a parameter held directly by the
    root module (``"pos"``) keeps its own name (``"dJ/dW[pos]"``).
    """
    parts = key.replace("/", ".").split(".")
    last = parts[-1]
    sym = "b" if last in _BIAS_NAMES else "W"
    owner = parts[:-1] if last in _BIAS_NAMES | _WEIGHT_NAMES else parts
    if last.startswith("in_proj_"):
        owner = [*owner, "in_proj"]
    if not owner:
        owner = [last]
    path = ".".join(owner)
    return f"dJ/d{sym}[{path}]", path


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base#2``, ``base#3``... whichever is not in ``taken`` yet (added to it)."""
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}#{k}"
    taken.add(name)
    return name


@dataclass
class GraphNode:
    """One node of the graph: the model's input, a parameter, or one op.

    Attributes:
        name: the unique display name (module path, parameter owner, or op name).
        op: ``"input"``, ``"param"``, a registered op rule (see :data:`gradsight.explain.rules.OP_RULES`) or
            ``"opaque"`` (no rule: traced with autodiff values only).
        inputs: the names of the nodes it reads, one per input position; ``""`` where ``consts`` holds the value.
        consts: position → a constant (numpy array or number): a literal, a buffer, a mask.
        attrs: the op's configuration (axis, stride, eps, layouts...), read by its rule.
        type_name: what the framework calls it, e.g. ``"nn.Linear"``, ``"torch.matmul"``, ``"aten.addmm"``.
        reason: why a node is ``opaque``.
        term: the name of its gradient term: ``"dJ/dW[fc]"`` for a parameter, ``"dJ/dA[x]"`` for the input;
            ``""`` for an op (``dJ/dA[name]``).
        key: a parameter's name in the framework (``"fc.weight"``), matching ``GraphRun.param_grads``.
        frozen: a parameter that is frozen (``requires_grad=False`` / ``trainable=False``); derived anyway.
        layout: words for the value's layout, e.g. ``"torch Linear weight (out, in)"``.
        out: the framework's value of the node's output (the parameter's value for a parameter).
        grad: the framework's dJ/d(output) (None for a non-differentiable output such as integer ids).
        input_grads: for an opaque node only: the framework's vector-Jacobian product into each input
            position, given its own dJ/d(output); the closed-form backward borrows it (and says so).
    """

    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    consts: dict[int, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    type_name: str = ""
    reason: str = ""
    term: str = ""
    key: str = ""
    frozen: bool = False
    layout: str = ""
    out: np.ndarray | None = None
    grad: np.ndarray | None = None
    input_grads: list[np.ndarray | None] | None = None

    @property
    def grad_term(self) -> str:
        """The name of the term holding dJ/d(this node's output)."""
        return self.term or f"dJ/dA[{self.name}]"


@dataclass
class GraphRun:
    """What an adapter returns for a graph: the nodes, the loss, and the framework's autodiff values.

    Attributes:
        framework: ``"torch"`` or ``"keras"``.
        model_name: the model's class (and name).
        tracer: how the graph was obtained, e.g. ``"torch.fx.symbolic_trace"``, ``"torch.export"``,
            ``"Keras functional graph"``.
        nodes: every node, in a topological order (inputs before their consumers).
        output: the name of the node whose value is Ŷ.
        x: the input batch (float64, or integer ids).
        y: the targets.
        dtype: the dtype autodiff ran in.
        loss: the neutral loss (None for an arbitrary callable).
        loss_display: how the user's loss is shown.
        j: the framework's loss value.
        dj_dyhat: the framework's dJ/dŶ.
        param_grads: parameter key → the framework's gradient of J w.r.t. the whole parameter (all its uses).
        notes: remarks for the trace.
        rtol_floor: a documented minimum rtol (a framework kernel less accurate than its dtype).
        atol_floor: a documented minimum atol (part of the graph computed in a lower precision than the model's).
        model_dtype: the model's own dtype when autodiff ran on a float64 copy, else ``""``.
        conventions: the framework's :class:`~gradsight.explain._spec.Conventions`.
    """

    framework: str
    model_name: str
    tracer: str
    nodes: list[GraphNode]
    output: str
    x: np.ndarray
    y: np.ndarray
    dtype: str
    loss: LossSpec | None
    loss_display: str
    j: float
    dj_dyhat: np.ndarray | None
    param_grads: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rtol_floor: float = 0.0
    atol_floor: float = 0.0
    model_dtype: str = ""
    conventions: Conventions = field(default_factory=Conventions)

    def node(self, name: str) -> GraphNode:
        """The node called ``name``."""
        for nd in self.nodes:
            if nd.name == name:
                return nd
        raise KeyError(name)


# ------------------------------------------------------------------------------------------ evaluation
def node_inputs(nd: GraphNode, values: dict[str, Any]) -> list[Any]:
    """The values of ``nd``'s input positions: producers' values, constants where ``consts`` holds them."""
    return [nd.consts.get(k) if not src else values[src] for k, src in enumerate(nd.inputs)]


def forward_node(nd: GraphNode, values: dict[str, Any]) -> np.ndarray:
    """``nd``'s closed-form output from its inputs' values (raises KeyError for a node without a rule)."""
    return np.asarray(OP_RULES[nd.op].forward(node_inputs(nd, values), nd.attrs), dtype=np.float64)


def consumers(nodes: list[GraphNode]) -> dict[str, list[str]]:
    """Node name → the names of the nodes that read it (once each, in topological order)."""
    out: dict[str, list[str]] = {nd.name: [] for nd in nodes}
    for nd in nodes:
        for src in dict.fromkeys(s for s in nd.inputs if s):
            out.setdefault(src, []).append(nd.name)
    return out


def downstream(nodes: list[GraphNode], start: str) -> list[GraphNode]:
    """The nodes that depend on ``start`` (not ``start`` itself), in topological order."""
    reached = {start}
    out = []
    for nd in nodes:
        if any(s in reached for s in nd.inputs if s):
            reached.add(nd.name)
            out.append(nd)
    return out


def prune(nodes: list[GraphNode], output: str) -> tuple[list[GraphNode], list[str]]:
    """Keep the nodes the output depends on (and the input): ``(kept, names of the dropped op nodes)``.

    An op whose value never reaches J (the attention weights a ``MultiheadAttention`` also returns, a shape
    computation) has no gradient to explain.
    """
    need = {output}
    for nd in reversed(nodes):
        if nd.name in need:
            need.update(s for s in nd.inputs if s)
    kept = [nd for nd in nodes if nd.name in need or nd.op == "input"]
    dropped = [nd.name for nd in nodes if nd.name not in need and nd.op not in ("input", "param")]
    return kept, dropped
