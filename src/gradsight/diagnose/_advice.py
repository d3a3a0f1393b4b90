"""Advice that changes the learning rate: one place that knows which way an advice item points.

Two findings of one diagnosis must never pull the learning rate in opposite directions. Rules write such advice
with :func:`lower_lr` / :func:`raise_lr`, which put a fixed lead phrase first; :func:`lr_direction` reads the
direction of any advice item (also one written by hand) from those phrases, and
:func:`gradsight.diagnose._chain.link` withholds the raising items of a diagnosis in which any finding advises
lowering it (see there for why lowering wins).
"""

from __future__ import annotations

import re

__all__ = ["LOWER", "RAISE", "lower_lr", "lr_direction", "raise_lr"]

#: The lead phrase of every item that advises lowering the learning rate.
LOWER = "Lower the learning rate"
#: The lead phrase of every item that advises raising it.
RAISE = "Raise the learning rate"

_NEGATED_RE = re.compile(
    r"\b(do not|don't|never|avoid|not)\s+(\w+\s+)?(raise|raising|increase|increasing|lower|lowering|reduce|"
    r"reducing|decrease|decreasing)\b",
    re.IGNORECASE,
)
_LOWER_RE = re.compile(r"\b(lower|reduce|decrease|smaller)\b[^.;]*\blearning rate\b", re.IGNORECASE)
_RAISE_RE = re.compile(r"\b(raise|increase|larger|higher)\b[^.;]*\blearning rate\b", re.IGNORECASE)


def lower_lr(rest: str) -> str:
    """An advice item that lowers the learning rate: ``"Lower the learning rate" + rest``."""
    return LOWER + rest


def raise_lr(rest: str) -> str:
    """An advice item that raises the learning rate: ``"Raise the learning rate" + rest``."""
    return RAISE + rest


def lr_direction(advice: str) -> int:
    """-1 when an advice item says to lower the learning rate, +1 to raise it, 0 otherwise.

    Reads the lead phrases of :func:`lower_lr` / :func:`raise_lr` and, for items written otherwise, a verb of
    lowering or raising followed by "learning rate" in the same clause ("Sweep the learning rate" is neither; a
    negated verb, "Do not raise the learning rate", points nowhere).
    """
    text = _NEGATED_RE.sub(" ", advice.strip())  # "Do not raise the learning rate" points nowhere
    if text.startswith(LOWER):
        return -1
    if text.startswith(RAISE):
        return 1
    lower, higher = bool(_LOWER_RE.search(text)), bool(_RAISE_RE.search(text))
    if lower and not higher:
        return -1
    if higher and not lower:
        return 1
    return 0
