"""The Explain pillar: derive backprop in closed form and check it against autodiff.

A chain (``nn.Sequential``, ``keras.Sequential``) is derived layer by layer (:mod:`._derive`, terms ``Z1``,
``dJ/dW1``); any other traceable model as a graph, node by node in topological order, a tensor read by several
nodes receiving the sum of their gradients (:mod:`._derive_graph`, terms ``A[node]``, ``dJ/dW[module]``). Both
walk the rule table (:mod:`.rules`), numpy only; the adapters under ``gradsight.frameworks`` only extract the
model, its parameters and the autodiff reference values.

Public surface (re-exported from :mod:`gradsight`): :func:`explain`, :class:`Trace`, :class:`Term`,
:func:`jacobian_vs_gradient`, :func:`check_loss`, :func:`depth_sweep`. Nothing here imports torch or
TensorFlow at import time; the framework adapters are imported lazily when a model of theirs arrives.
"""

from __future__ import annotations

from ._check_loss import LossFinding, LossReport, check_loss
from ._depth import DepthSweep, depth_sweep
from ._explain import explain
from ._jvg import JacobianVsGradient, jacobian_vs_gradient
from ._trace import FiniteDifference, GraphNodeInfo, LayerInfo, Term, Trace

__all__ = [
    "DepthSweep",
    "FiniteDifference",
    "GraphNodeInfo",
    "JacobianVsGradient",
    "LayerInfo",
    "LossFinding",
    "LossReport",
    "Term",
    "Trace",
    "check_loss",
    "depth_sweep",
    "explain",
    "jacobian_vs_gradient",
]
