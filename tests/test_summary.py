import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradsight import InputError
from gradsight.summary import HIST_BINS, TensorSummary, hist_edges, merge, merge_all, summarize

finite64 = st.floats(-1e30, 1e30, allow_subnormal=True, width=64)
arrays = hnp.arrays(np.float64, st.integers(0, 40), elements=finite64 | st.sampled_from([0.0, math.nan, math.inf]))


def close(a: TensorSummary, b: TensorSummary) -> bool:
    scale = math.sqrt(max(a.sum_sq, b.sum_sq) * max(a.finite, 1))
    return a.approx_equal(b, rtol=1e-9, atol=1e-9 * scale + 1e-300)


@settings(max_examples=80, deadline=None)
@given(a=arrays, b=arrays, c=arrays)
def test_merge_is_associative_and_commutative(a, b, c):
    sa, sb, sc = summarize(a), summarize(b), summarize(c)
    assert close(merge(merge(sa, sb), sc), merge(sa, merge(sb, sc)))
    assert close(merge(sa, sb), merge(sb, sa))
    assert merge(TensorSummary(), sa) == sa == merge(sa, TensorSummary())


@settings(max_examples=80, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 5)), elements=st.floats(width=32)),
    cut=st.integers(0, 8),
)
def test_halves_merge_to_the_whole_including_units(x, cut):
    cut = min(cut, x.shape[0])
    whole = summarize(x, unit_axis=1)
    parts = merge(summarize(x[:cut], unit_axis=1), summarize(x[cut:], unit_axis=1))
    assert close(parts, whole)


@settings(max_examples=80, deadline=None)
@given(x=hnp.arrays(np.float64, st.integers(1, 60), elements=st.floats(-1e6, 1e6)), q=st.floats(0, 1))
def test_quantile_error_bound_sqrt2(x, q):
    s = summarize(x)
    a = np.sort(np.abs(x))
    true = a[max(1, math.ceil(q * a.size)) - 1]
    est = s.quantile_abs(q)
    assume(true == 0 or true >= 2.0**-126)
    if true == 0:
        assert est == 0
    else:
        assert true / math.sqrt(2) <= est <= true * math.sqrt(2) * (1 + 1e-12)


def test_edge_cases():
    s = summarize(np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 2.0**-130, 1.0, -3.0]))
    assert (s.count, s.zeros, s.nan, s.posinf, s.neginf, s.positive, s.finite) == (8, 2, 1, 1, 1, 2, 5)
    assert s.hist[0] == 1 and s.hist[127] == 1 and s.hist[128] == 1 and s.hist.sum() == 3
    assert (s.min, s.max, s.sum) == (-3.0, 1.0, -2.0 + 2.0**-130)
    e = summarize(np.zeros(0, dtype=np.float32))
    assert (
        (e.min, e.max, e.count) == (math.inf, -math.inf, 0) and math.isnan(e.mean) and math.isnan(e.quantile_abs(0.5))
    )
    big = summarize(np.array([2.0**200, -(2.0**130)]))
    assert big.hist[255] == 2
    assert hist_edges()[128] == 2.0 and hist_edges()[0] == 0 and hist_edges().size == HIST_BINS
    assert merge_all([]) == TensorSummary()
    with pytest.raises(InputError, match="expected a floating-point array"):
        summarize(np.arange(3))
    with pytest.raises(InputError, match="unit_axis=2 is out of range"):
        summarize(np.ones((2, 2)), unit_axis=2)
    with pytest.raises(InputError, match="q must be in"):
        s.quantile_abs(1.5)
    with pytest.raises(InputError, match="cannot merge per-unit counts"):
        merge(summarize(np.ones((2, 3)), unit_axis=1), summarize(np.ones((2, 4)), unit_axis=1))


def test_units_count_nan_as_active_and_zero_as_dead():
    x = np.array([[0.0, np.nan, 1.0], [0.0, 0.0, -2.0]], dtype=np.float32)
    s = summarize(x, unit_axis=1)
    assert s.units_active.tolist() == [0, 1, 2] and s.units_total == 2
    assert s.active_rate.tolist() == [0.0, 0.5, 1.0]


def test_float64_wire_rows_with_nonfinite_sums_decode_without_casting_them():
    """Regression: the Keras wire form cast NaN/Inf sums and min/max to int64 (an invalid-cast warning)."""
    import warnings

    from gradsight._packing import Layout, rows_from_float64
    from gradsight.summary import from_rows

    ref = summarize(np.array([np.inf, 1.5, np.nan], np.float32), unit_axis=0)
    empty = summarize(np.array([np.nan], np.float32))
    ref.sum_sq = np.inf  # a square that overflowed
    vec = []
    for s in (ref, empty):
        vec += [s.count, s.zeros, s.nan, s.posinf, s.neginf, s.positive, s.sum, s.sum_sq, s.min, s.max, *s.hist]
    vec += [ref.units_total, *ref.units_active]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = from_rows(rows_from_float64(np.array(vec, np.float64), Layout((3, None))))
    assert got[0] == ref and got[1] == empty
