"""``diagnose(run)``: run every rule that applies and return the findings, most severe first."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .._errors import InputError
from ..export._tidy import require_steps
from ..store import Run, check_steps
from ._accumulate import GradientsAccumulatingRule
from ._base import Rule, RunData, Thresholds
from ._chain import link, sort_chain
from ._clip import GradientsClippedRule
from ._finding import Finding
from ._gradients import ExplodingGradientsRule, VanishingGradientsRule
from ._init import BadInitialisationRule
from ._logits import LogitsAsProbabilitiesRule
from ._loss import LossNotDecreasingRule
from ._lr import LearningRateTooHighRule
from ._nll import NllOnProbabilitiesRule
from ._nonfinite import NonFiniteRule
from ._params import NoGradientRule, NotOptimizedRule
from ._softmax import DoubleSoftmaxRule
from ._steps import NoStepsRule
from ._unbounded import LossUnboundedRule
from ._units import DeadUnitsRule, SaturatedUnitsRule
from ._update_ratio import UpdateRatioRule

__all__ = ["DEFAULT_RULES", "diagnose", "evaluate", "skipped_rules", "sort_findings"]

#: The rules :func:`diagnose` runs by default, cheapest first.
DEFAULT_RULES: tuple[Rule, ...] = (
    NoStepsRule(),
    NonFiniteRule(),
    GradientsAccumulatingRule(),
    NoGradientRule(),
    NotOptimizedRule(),
    DoubleSoftmaxRule(),
    LogitsAsProbabilitiesRule(),
    NllOnProbabilitiesRule(),
    LossUnboundedRule(),
    BadInitialisationRule(),
    LearningRateTooHighRule(),
    GradientsClippedRule(),
    ExplodingGradientsRule(),
    VanishingGradientsRule(),
    DeadUnitsRule(),
    SaturatedUnitsRule(),
    UpdateRatioRule(),
    LossNotDecreasingRule(),
)


def sort_findings(findings: Sequence[Finding]) -> list[Finding]:
    """Root causes first (most severe first), then the symptoms in causal order.

    Roots are ordered by severity, then by :data:`gradsight.diagnose._chain.CAUSAL_ORDER` (a bad initialisation
    before the dead units it causes), then by first step; symptoms by their distance from a root, then in causal
    order, then by first step. Findings made outside a diagnosis are all roots, so they sort most severe first,
    causes before symptoms, as before. Codes added later come after the known ones.
    """
    return sort_chain(findings)


def _rules(rules: Sequence[Rule] | None) -> Sequence[Rule]:
    if rules is None:
        return DEFAULT_RULES
    bad = [r for r in rules if not isinstance(r, Rule)]
    if bad:
        raise InputError(
            f"rules must be gradsight.diagnose.Rule instances, got {bad!r}; "
            "e.g. rules=[NonFiniteRule(), VanishingGradientsRule()]."
        )
    return rules


def diagnose(
    run: Run | str | os.PathLike[str] | RunData,
    *,
    rules: Sequence[Rule] | None = None,
    thresholds: Thresholds | Mapping[str, Any] | None = None,
    steps: tuple[int | None, int | None] | None = None,
) -> list[Finding]:
    """Read a recorded run and name what is wrong with it.

    Each rule reads only the run store; a rule whose data was not recorded is skipped (see
    :func:`skipped_rules` for which and why).

    Args:
        run: a :class:`gradsight.Run`, a watch's run, or the path of a run file.
        rules: the rules to evaluate; default :data:`DEFAULT_RULES`.
        thresholds: a :class:`Thresholds`, or a dict of overrides such as ``{"vanish_ratio": 1e-4}``.
        steps: an optional inclusive ``(first, last)`` window of steps to judge; either end may be ``None``. It
            must be well-formed (non-negative ints, ``first <= last``) and hold at least one recorded step.

    Returns:
        The findings: root causes first (most severe first), then the symptoms they explain, in causal order;
        each symptom's ``caused_by`` names its causes and its advice points to its root.

    Raises:
        StoreError: ``run`` is not a readable run file.
        InputError: unknown thresholds, rules that are not :class:`Rule` instances, or a malformed ``steps``
            window or one that holds no recorded step.
    """
    th = Thresholds.coerce(thresholds)
    chosen = _rules(rules)
    window = None if steps is None else check_steps(steps)
    data = run if isinstance(run, RunData) else RunData(run, steps=window)
    if window is not None:
        require_steps(data.run, window, scalars=True, fix="diagnose every step")
    return evaluate(data, chosen, th)


def evaluate(data: RunData, rules: Sequence[Rule], th: Thresholds) -> list[Finding]:
    """Run the rules that apply on ``data`` and relate their findings.

    :func:`gradsight.diagnose._chain.link` puts the root causes first, the symptoms pointing at them; the one place
    :func:`diagnose` and online diagnosis share.
    """
    findings: list[Finding] = []
    for rule in rules:
        if rule.missing(data):
            continue
        findings.extend(rule.check(data, th))
    return link(findings, data)


def skipped_rules(
    run: Run | str | os.PathLike[str] | RunData, *, rules: Sequence[Rule] | None = None
) -> dict[str, list[str]]:
    """Which rules would be skipped on this run, each with the data it lacks."""
    data = run if isinstance(run, RunData) else RunData(run)
    out = {}
    for rule in _rules(rules):
        missing = rule.missing(data)
        if missing:
            out[rule.name] = missing
    return out
