"""Anomaly-triggered capture: when a per-step signal jumps, record everything around it (no framework code).

Every adapter feeds :class:`Anomalies` the per-step signals of each closed step (see :mod:`gradsight._schedule`
for their names and meaning) and asks it which steps to capture in full. The rule, in one place:

Triggers
    A step *triggers* when one of its signals is **non-finite** (NaN or ±Inf; for ``grad_norm`` that means some
    gradient entry is), or **jumps**: it exceeds ``factor`` (default 10) times the median of the same signal over
    the last ``window`` (default 20) steps where it was finite, once at least ``MIN_HISTORY`` such steps exist and
    that median is positive. The median is robust: one earlier spike does not move it, so a spike cannot hide in
    its own baseline. Signals fed by the adapters (:func:`gradsight._watch_core.anomaly_values`): ``grad_norm``
    (what the optimizer receives), ``grad_norm_preclip`` (as backward left it), ``loss`` (when it is logged in
    time; not under DDP, where it differs between ranks) and ``update_norm/<tensor>`` (‖ΔW‖ of one parameter
    tensor: a jump of the update/weight ratio, as weights change slowly, without the ratio's false alarms when
    a bias passes through zero).
    When several signals trigger, the event names a non-finite one first, else the largest jump.

Captures
    A triggering step ``s`` is captured: full summaries of the kinds still available at ``s`` (weights, gradients
    and updates: the step has just ended) and of every kind at the next ``steps`` (default 5) steps (layer outputs
    and output gradients need a forward pass), whatever ``every`` says. An event ``anomaly`` records
    ``{step, reason, signal, value, baseline, factor, captured: [first, last], suppressed}`` (a non-finite
    ``value`` as the string ``"nan"``, ``"inf"`` or ``"-inf"``). Steps that are
    logged anyway (``every``) are not summarised twice.

Rate limit
    After a capture window ends at step ``e``, the next capture may start at ``e + 1 + gap``; ``gap`` starts at
    ``cooldown`` (default 20) and doubles each time triggers were suppressed during the previous gap (the
    anomaly persists), back to ``cooldown`` after a quiet gap. A run anomalous at every step of ``T`` therefore
    gets at most ``1 + log2(1 + T / cooldown)`` captures of ``steps + 1`` steps each (e.g. 9 captures, 54 steps,
    in 10 000 steps with the defaults): it never turns into ``preset="full"``. Suppressed triggers are counted in
    the next event's ``suppressed``.

Decisions depend only on the values fed in, so ranks that feed identical values (gradient norms after DDP's
all-reduce, weights and updates of replicated parameters) decide identically, without a collective.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

__all__ = ["MIN_HISTORY", "Anomalies", "Past", "trigger"]

#: Finite past values a signal needs before a jump can be judged against their median. One: the most common
#: failure, a learning rate that blows the weights up, shows at step 1, with step 0 as the only reference
#: (judged against a median of one or two values, a jump must still be ``factor`` times that value).
MIN_HISTORY = 1


class Past(deque):
    """A signal's last ``maxlen`` finite values, with their minimum (``low``) kept as values come and go.

    The minimum decides the common case of :func:`trigger` (no jump: the value is at most ``factor`` times it);
    kept here, judging a step costs one comparison per signal instead of a scan of its window.
    """

    def __init__(self, maxlen: int) -> None:
        super().__init__((), maxlen)
        self.low = math.inf

    def push(self, value: float) -> None:
        """Append a finite value (the oldest leaves a full window); the minimum follows."""
        leaving = self[0] if len(self) == self.maxlen else None
        self.append(value)
        if leaving is not None and leaving <= self.low and value > leaving:  # the minimum left: find the new one
            self.low = min(self)
        elif value < self.low:
            self.low = value


def trigger(
    values: Mapping[str, float], history: Mapping[str, Past], factor: float
) -> tuple[str, str, float, float | None] | None:
    """The trigger of one step, if any: ``(reason, signal, value, baseline)``; see the module docstring.

    Args:
        values: this step's signals.
        history: each signal's finite past values (not including this step).
        factor: how many times the median a value must exceed to be a jump.

    Returns:
        ``("non-finite", name, value, baseline)`` for the first non-finite signal, else ``("jump", ...)`` for the
        largest jump, else ``None``.
    """
    best: tuple[float, str, float, float] | None = None
    for name, value in values.items():
        past = history.get(name)
        if not math.isfinite(value):
            base = statistics.median(past) if past and len(past) >= MIN_HISTORY else None
            return "non-finite", name, value, base
        if not past or len(past) < MIN_HISTORY or value <= factor * past.low:
            continue  # the median is at least the minimum: no jump (and no median to compute, the common case)
        base = statistics.median(past)
        if base > 0 and value > factor * base:
            ratio = value / base
            if best is None or ratio > best[0]:
                best = (ratio, name, value, base)
    if best is None:
        return None
    return "jump", best[1], best[2], best[3]


class Anomalies:
    """Watches per-step signals and says which steps to capture; see the module docstring.

    Args:
        factor: a value above ``factor`` times its running median is a jump.
        window: the number of past finite values the median is taken over.
        steps: steps captured in full after a triggering step.
        cooldown: the first gap between two capture windows (it doubles while the anomaly persists).
    """

    def __init__(self, *, factor: float = 10.0, window: int = 20, steps: int = 5, cooldown: int = 20) -> None:
        self.factor, self.window, self.steps, self.cooldown = float(factor), int(window), int(steps), int(cooldown)
        self._history: dict[str, Past] = {}
        self._first = -1  # the current (or last) capture window is [_first, _last]
        self._last = -1
        self._next = 0  # the first step at which a new capture may start
        self._gap = self.cooldown
        self._suppressed = 0  # triggers not captured since the last window started

    def capturing(self, step: int) -> bool:
        """Whether ``step`` lies in a capture window after its triggering step (its outputs are to be recorded)."""
        return self._first < step <= self._last

    def observe(self, step: int, values: Mapping[str, float]) -> dict[str, Any] | None:
        """Feed one closed step's signals; returns the event payload when a capture starts at this step.

        Args:
            step: the step the values belong to (steps are fed in increasing order).
            values: signal name -> value (non-finite allowed; missing signals are simply not judged).

        Returns:
            The ``anomaly`` event's payload when ``step`` starts a capture, else ``None``.
        """
        hit = trigger(values, self._history, self.factor)
        history = self._history
        for name, value in values.items():
            if math.isfinite(value):
                past = history.get(name)
                if past is None:
                    past = history[name] = Past(self.window)
                past.push(float(value))
        if hit is None:
            return None
        if step < self._next or step <= self._last:
            self._suppressed += 1
            return None
        reason, signal, value, base = hit
        if self._last >= 0:  # not the first capture: the gap grows while the anomaly persists
            self._gap = self._gap * 2 if self._suppressed else self.cooldown
        suppressed, self._suppressed = self._suppressed, 0
        self._first, self._last = step, step + self.steps
        self._next = self._last + 1 + self._gap
        return {
            "step": step,
            "reason": reason,
            "signal": signal,
            "value": value if math.isfinite(value) else str(value),  # "nan", "inf", "-inf": JSON has no NaN
            "baseline": base,
            "factor": self.factor,
            "captured": [step, self._last],
            "suppressed": suppressed,
        }
