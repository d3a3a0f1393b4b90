"""The Explain pillar: derive backprop layer by layer in closed form and check it against autodiff.

Public surface (re-exported from :mod:`gradsight`): :func:`explain`, :class:`Trace`, :class:`Term`,
:func:`jacobian_vs_gradient`, :func:`check_loss`, :func:`depth_sweep`. Nothing here imports torch or
TensorFlow at import time; the framework adapters are imported lazily when a model of theirs arrives.
"""

from __future__ import annotations

from ._check_loss import LossFinding, LossReport, check_loss
from ._depth import DepthSweep, depth_sweep
from ._explain import explain
from ._jvg import JacobianVsGradient, jacobian_vs_gradient
from ._trace import FiniteDifference, LayerInfo, Term, Trace

__all__ = [
    "DepthSweep",
    "FiniteDifference",
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
