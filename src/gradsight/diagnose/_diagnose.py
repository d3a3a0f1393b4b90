"""``diagnose(run)``: run every rule that applies and return the findings, most severe first."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .._errors import InputError
from ..store import Run
from ._base import Rule, RunData, Thresholds
from ._finding import CODES, Finding
from ._gradients import ExplodingGradientsRule, VanishingGradientsRule
from ._loss import LossNotDecreasingRule
from ._nonfinite import NonFiniteRule
from ._steps import NoStepsRule
from ._units import DeadUnitsRule, SaturatedUnitsRule
from ._update_ratio import UpdateRatioRule

__all__ = ["DEFAULT_RULES", "diagnose", "skipped_rules", "sort_findings"]

#: The rules :func:`diagnose` runs by default, cheapest first.
DEFAULT_RULES: tuple[Rule, ...] = (
    NoStepsRule(),
    NonFiniteRule(),
    ExplodingGradientsRule(),
    VanishingGradientsRule(),
    DeadUnitsRule(),
    SaturatedUnitsRule(),
    UpdateRatioRule(),
    LossNotDecreasingRule(),
)


def sort_findings(findings: Sequence[Finding]) -> list[Finding]:
    """Most severe first, then causes before symptoms, then by first step (none last), then by code.

    "Causes before symptoms" follows the order of :data:`CODES`: a non-finite value or a gradient pathology
    usually explains a bad update ratio, which in turn explains a loss that does not decrease. Codes added later
    come after the known ones.
    """

    def cause(code: str) -> int:
        return CODES.index(code) if code in CODES else len(CODES)

    return sorted(
        findings,
        key=lambda f: (
            -f.rank,
            cause(f.code),
            f.first_step if f.first_step is not None else float("inf"),
            f.code,
        ),
    )


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
        steps: an optional inclusive ``(first, last)`` window of steps to judge.

    Returns:
        The findings, most severe first, then by first step.

    Raises:
        StoreError: ``run`` is not a readable run file.
        InputError: unknown thresholds or rules that are not :class:`Rule` instances.
    """
    th = Thresholds.coerce(thresholds)
    chosen = _rules(rules)
    data = run if isinstance(run, RunData) else RunData(run, steps=steps)
    findings: list[Finding] = []
    for rule in chosen:
        if rule.missing(data):
            continue
        findings.extend(rule.check(data, th))
    return sort_findings(findings)


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
