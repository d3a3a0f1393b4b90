"""The rule table of explain: one entry per layer kind, activation and loss.

Each entry holds its forward, its local derivative / backward, its formula text (plain and LaTeX) and the
shapes it accepts, side by side; the derive loop (:mod:`gradsight.explain._derive`) walks a model's layer
specs and looks each one up here. A name without an entry is traced with autodiff values only, never handled
by another rule.

* :mod:`._table` — the entry types (:class:`LayerRule`, :class:`ActivationRule`, :class:`LossRule`), the
  registries and :func:`register`;
* :mod:`._layers` — dense, conv2d, activation (a lone activation layer), flatten, dropout;
* :mod:`._activations` — identity, relu, leaky_relu, elu, gelu, gelu_tanh, sigmoid, tanh, softplus, silu,
  softmax;
* :mod:`._losses` — mse, mae, bce(_logits), cce(_logits), sparse_cce(_logits), output_mean, output_sum, and
  :func:`evaluate_loss`, which applies a framework's loss convention (data) around an entry (class weights,
  label smoothing and ``ignore_index`` of a softmax cross-entropy included);
* graph ops (:class:`OpRule`, walked by :mod:`gradsight.explain._derive_graph` for models that are not a
  chain): :mod:`._ops` — add, sub, mul, div, pow, unary functions, act (any elementwise activation),
  masked_fill, identity, detach, reshape, permute, index, concat, expand, mean, sum, max; :mod:`._nn_ops` —
  linear, conv (1-D/2-D, stride, padding, dilation, groups), batch_norm (training and inference), layer_norm,
  rms_norm, embedding, pool (max/avg); :mod:`._attention` — matmul, softmax, log_softmax, sdpa, mha.

Importing this package registers every built-in entry.
"""

from __future__ import annotations

from . import _attention, _nn_ops, _ops  # noqa: F401  (registers the graph-op rules)
from ._activations import (
    JACOBIAN_LIMIT_BYTES,
    fmt_bytes,
    jacobian_too_big,
    softmax_backward,
    softmax_forward,
    softmax_jacobian,
    softmax_probe,
    softmax_vjp,
)
from ._layers import conv2d_backward, conv2d_forward, dense_backward, dense_forward, same_padding
from ._losses import LOSS_KINDS, LossResult, evaluate_loss, logits_variant
from ._table import (
    ACTIVATION_RULES,
    LAYER_RULES,
    LOSS_RULES,
    OP_RULES,
    Activation,
    ActivationRule,
    LayerRule,
    LossRule,
    OpNames,
    OpRule,
    activation_rule,
    forward_layer,
    layer_rule,
    op_rule,
    register,
    resolve,
)

#: names of the elementwise activation rules (softmax, whose S is a full Jacobian, is not among them).
ELEMENTWISE = tuple(name for name, rule in ACTIVATION_RULES.items() if rule.elementwise)

__all__ = [
    "ACTIVATION_RULES",
    "ELEMENTWISE",
    "JACOBIAN_LIMIT_BYTES",
    "LAYER_RULES",
    "LOSS_KINDS",
    "LOSS_RULES",
    "OP_RULES",
    "Activation",
    "ActivationRule",
    "LayerRule",
    "LossResult",
    "LossRule",
    "OpNames",
    "OpRule",
    "activation_rule",
    "conv2d_backward",
    "conv2d_forward",
    "dense_backward",
    "dense_forward",
    "evaluate_loss",
    "fmt_bytes",
    "forward_layer",
    "jacobian_too_big",
    "layer_rule",
    "logits_variant",
    "op_rule",
    "register",
    "resolve",
    "same_padding",
    "softmax_backward",
    "softmax_forward",
    "softmax_jacobian",
    "softmax_probe",
    "softmax_vjp",
]
