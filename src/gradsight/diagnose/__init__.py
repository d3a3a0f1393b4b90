"""Diagnosis: rules that read a recorded run and name what is wrong, with evidence, explanation and advice.

``diagnose(run)`` runs every rule that applies and relates their findings into chains: the root causes first
(most severe first), then the symptoms they explain, each naming its causes (``Finding.caused_by``) with advice
that points to its root (see :mod:`gradsight.diagnose._chain`).
Rules read only the run store (never tensors, never a framework) and skip cleanly when their data was not
recorded (:func:`skipped_rules` says why). :class:`OnlineDiagnosis` evaluates the same rules during training.
Every threshold is a named field of :class:`Thresholds`, documented with its reasoning.
"""

from __future__ import annotations

from ._accumulate import GradientsAccumulatingRule
from ._base import Rule, RunData, Thresholds
from ._clip import GradientsClippedRule
from ._diagnose import DEFAULT_RULES, diagnose, skipped_rules, sort_findings
from ._finding import CODE_DESCRIPTIONS, CODES, SEVERITIES, Finding
from ._gradients import ExplodingGradientsRule, VanishingGradientsRule
from ._init import BadInitialisationRule
from ._logits import LogitsAsProbabilitiesRule
from ._loss import LossNotDecreasingRule
from ._lr import LearningRateTooHighRule
from ._nll import NllOnProbabilitiesRule
from ._nonfinite import NonFiniteRule
from ._online import GradsightWarning, OnlineDiagnosis, TrainingStopped
from ._params import NoGradientRule, NotOptimizedRule
from ._softmax import DoubleSoftmaxRule
from ._steps import NoStepsRule
from ._unbounded import LossUnboundedRule
from ._units import DeadUnitsRule, SaturatedUnitsRule
from ._update_ratio import UpdateRatioRule

__all__ = [
    "CODES",
    "CODE_DESCRIPTIONS",
    "DEFAULT_RULES",
    "SEVERITIES",
    "BadInitialisationRule",
    "DeadUnitsRule",
    "DoubleSoftmaxRule",
    "ExplodingGradientsRule",
    "Finding",
    "GradientsAccumulatingRule",
    "GradientsClippedRule",
    "GradsightWarning",
    "LearningRateTooHighRule",
    "LogitsAsProbabilitiesRule",
    "LossNotDecreasingRule",
    "LossUnboundedRule",
    "NllOnProbabilitiesRule",
    "NoGradientRule",
    "NoStepsRule",
    "NonFiniteRule",
    "NotOptimizedRule",
    "OnlineDiagnosis",
    "Rule",
    "RunData",
    "SaturatedUnitsRule",
    "Thresholds",
    "TrainingStopped",
    "UpdateRatioRule",
    "VanishingGradientsRule",
    "diagnose",
    "skipped_rules",
    "sort_findings",
]
