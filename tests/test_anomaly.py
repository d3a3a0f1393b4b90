"""The anomaly trigger's bookkeeping (framework-free): the kept window minimum, and decisions against the rule."""

from __future__ import annotations

import math
import statistics
from collections import deque

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gradsight._anomaly import Anomalies, Past

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(st.integers(min_value=1, max_value=6), st.lists(finite, max_size=60))
def test_past_keeps_the_minimum_of_its_window(window, values):
    past, ref = Past(window), deque(maxlen=window)
    for v in values:
        past.push(v)
        ref.append(v)
        assert list(past) == list(ref)
        assert past.low == min(ref)


def _reference_hit(values, history, factor):
    """The module docstring's rule, written plainly: first non-finite signal, else the largest jump over the median."""
    best = None
    for name, value in values.items():
        past = history.get(name, [])
        if not math.isfinite(value):
            return "non-finite", name
        if past and value > factor * statistics.median(past) and statistics.median(past) > 0:
            ratio = value / statistics.median(past)
            if best is None or ratio > best[0]:
                best = (ratio, name)
    return None if best is None else ("jump", best[1])


signal = st.one_of(st.floats(min_value=0, max_value=50), st.sampled_from([math.nan, math.inf, 0.0, 1e3]))


@settings(max_examples=200)
@given(st.lists(st.fixed_dictionaries({"a": signal, "b": signal}), max_size=80))
@example([{"a": float(v), "b": float(20 - v)} for v in range(20)])  # each window's minimum leaves it, in turn
def test_anomalies_capture_exactly_where_the_rule_and_rate_limit_say(steps):
    window = 5
    a = Anomalies(window=window, steps=2, cooldown=3)
    history: dict[str, deque] = {}
    next_start, last, gap, suppressed = 0, -1, 3, 0
    for step, values in enumerate(steps):
        hit = _reference_hit(values, history, 10.0)
        for k, v in values.items():
            if math.isfinite(v):
                history.setdefault(k, deque(maxlen=window)).append(v)
        expected = None
        if hit is not None:
            if step < next_start or step <= last:
                suppressed += 1
            else:
                if last >= 0:
                    gap = gap * 2 if suppressed else 3
                expected, suppressed = hit, 0
                last = step + 2
                next_start = last + 1 + gap
        got = a.observe(step, values)
        for k, past in a._history.items():  # the kept minimum, which decides the common case, is the window's
            assert list(past) == list(history[k])
            assert past.low == min(past)
        assert (got is None) == (expected is None), (step, values, got, expected)
        if got is not None:
            assert (got["reason"], got["signal"]) == expected
