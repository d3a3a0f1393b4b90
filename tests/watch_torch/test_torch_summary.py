import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradsight import _kernels
from gradsight._packing import SummaryArrays
from gradsight.frameworks.torch import _summary as ts
from gradsight.frameworks.torch._summary import summarize_tensor, summarize_tensors
from gradsight.summary import TensorSummary, from_rows, summarize


@pytest.fixture(autouse=True)
def summarise_when():
    """These kernel tests choose their kernels themselves (below), not by the package's watch modes."""
    return "later"


@pytest.fixture(autouse=True, params=["compiled", "fast", "exact"])
def kernels(request, monkeypatch):
    """Every test here runs three times, once per CPU float32 kernel set.

    ``compiled``: the one-pass C kernel (gradsight._ckernels); ``fast``: the numpy/torch kernels that stand in
    for it when no C compiler was available; ``exact``: the kernels of accelerators (the fast ones decline).
    """
    if request.param == "compiled" and not _kernels.available():
        pytest.skip("the compiled kernel was not built (no C compiler at install time)")
    if request.param == "fast":
        monkeypatch.setattr(_kernels, "_C", None)
    if request.param == "exact":  # the compiled and fast kernels decline: the exact ones run
        monkeypatch.setattr(_kernels, "_C", None)
        monkeypatch.setattr(ts, "_rows_f32_cpu", lambda g: None)
    return request.param


SPECIAL = [0.0, -0.0, math.nan, math.inf, -math.inf, 1.0, -1.0, 2.0**-126, 2.0**-127, -(2.0**-149), 3.4e38, 1.5, 0.75]


def assert_matches(got: TensorSummary, ref: TensorSummary, rtol: float = 1e-9) -> None:
    for k in ("count", "zeros", "nan", "posinf", "neginf", "positive", "units_total"):
        assert getattr(got, k) == getattr(ref, k), k
    assert got.min == ref.min and got.max == ref.max
    np.testing.assert_array_equal(got.hist, ref.hist)
    if ref.units_active is None:
        assert got.units_active is None
    else:
        np.testing.assert_array_equal(got.units_active, ref.units_active)
    scale = math.sqrt(ref.sum_sq * max(ref.finite, 1)) if math.isfinite(ref.sum_sq) else math.inf
    assert math.isclose(got.sum, ref.sum, rel_tol=rtol, abs_tol=rtol * scale) or (
        math.isinf(scale) and math.isinf(got.sum_sq)
    )
    assert math.isclose(got.sum_sq, ref.sum_sq, rel_tol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_special_values_match_reference(dtype):
    x = torch.tensor(SPECIAL * 3, dtype=dtype)
    assert_matches(summarize_tensor(x), summarize(x.numpy()))


def test_float64_only_bins_0_and_255():
    x = torch.tensor([1e-310, -1e-300, 2.0**128, -(2.0**200), 2.0**127, 2.0**-126, 0.0], dtype=torch.float64)
    got, ref = summarize_tensor(x), summarize(x.numpy())
    assert_matches(got, ref)
    assert got.hist[0] == 2 and got.hist[255] == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_upcast_exactly(dtype):
    x = torch.tensor([*SPECIAL[:-3], 65504.0, 6e-8, -0.1], dtype=dtype)
    assert_matches(summarize_tensor(x), summarize(x.float().numpy()))


def test_batch_with_mixed_dtypes_shapes_empty_and_units():
    xs = [
        torch.randn(5, 7),
        torch.zeros(0, 3),
        torch.randn(4, 3, dtype=torch.float64),
        torch.relu(torch.randn(2, 3, 4, 4)),
        torch.randn(6).half(),
        torch.tensor(3.0),
        torch.zeros(4, 0),  # no units at all (the reference raised on it: regression)
    ]
    axes = [1, None, 0, 1, None, None, 1]
    got = summarize_tensors(xs, axes)
    for x, a, g in zip(xs, axes, got, strict=True):
        assert_matches(g, summarize(x.float().numpy() if x.dtype == torch.float16 else x.numpy(), unit_axis=a))


def test_chunking_gives_the_same_numbers(monkeypatch):
    xs = [torch.randn(100), torch.randn(30, 7), torch.randn(500)]
    whole = summarize_tensors(xs)
    monkeypatch.setattr(ts, "CHUNK_ELEMENTS", 128)
    for a, b in zip(whole, summarize_tensors(xs), strict=True):
        assert a.approx_equal(b, rtol=1e-12)


def test_minus_is_elementwise_difference():
    a, b = [torch.randn(3, 4), torch.randn(5)], [torch.randn(3, 4), torch.randn(5)]
    d = ts.Flat.of(a).minus(ts.Flat.of(b))
    got = ts.to_host(d.stats())()
    for g, x, y in zip(got, a, b, strict=True):
        assert_matches(g, summarize((x - y).numpy()))


def _arrays(dtype):
    return hnp.arrays(
        dtype,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
        elements=st.floats(
            allow_nan=True, allow_infinity=True, allow_subnormal=True, width=np.dtype(dtype).itemsize * 8
        ),
    )


@settings(max_examples=60, deadline=None)
@given(a=_arrays(np.float32), b=_arrays(np.float64), axis=st.integers(-1, 0))
def test_property_matches_numpy_reference(a, b, axis):
    got = summarize_tensors([torch.from_numpy(a.copy()), torch.from_numpy(b.copy())], [axis, None])
    with np.errstate(over="ignore"):
        assert_matches(got[0], summarize(a, unit_axis=axis), rtol=1e-7)
        assert_matches(got[1], summarize(b), rtol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("values", [[math.inf], [-math.inf], [math.nan], [math.inf, -math.inf, math.nan]])
def test_min_max_of_only_nonfinite_are_the_identities_regression(dtype, values):
    s = summarize_tensor(torch.tensor(values, dtype=dtype))
    assert (s.min, s.max) == (math.inf, -math.inf)


@pytest.mark.parametrize(
    "values",
    [
        [0.0, -0.0, 1.5, -2.0],  # zeros only: the fast kernels confirm them with one count
        [2.0**-130, -(2.0**-140), 0.0, 3.0],  # subnormals next to a zero: the fast kernels hand over to the exact
        [1e-45, 1.0, -1.0],  # the smallest subnormal, no zero
    ],
)
def test_zeros_and_subnormals_are_told_apart(values):
    x = torch.tensor(values * 5, dtype=torch.float32)
    y = torch.randn(1000)
    refs = [summarize(y.numpy()), summarize(x.numpy()), summarize(y.numpy())]
    for got, ref in zip(summarize_tensors([y, x, y]), refs, strict=True):
        assert_matches(got, ref)


def test_join_is_the_same_as_one_batch():
    a, b = [torch.randn(3, 4), torch.randn(7, dtype=torch.float64)], [torch.randn(5), torch.zeros(0), torch.randn(2)]
    joined = ts.to_host(ts.Flat.join([ts.Flat.of(a), ts.Flat.of(b)]).stats())()
    for g, x in zip(joined, a + b, strict=True):
        assert_matches(g, summarize(x.numpy()))


def test_rows_decode_like_unpack():
    xs = [torch.randn(4, 3), torch.relu(torch.randn(2, 5)), torch.zeros(0)]
    packed = ts.Flat.of(xs, [1, 1, None]).stats()
    rows = ts.to_host_rows(packed)()
    for i, (s, x) in enumerate(zip(ts.to_host(packed)(), xs, strict=True)):
        assert_matches(from_rows(rows)[i], s)
        assert_matches(s, summarize(x.numpy(), unit_axis=None if i == 2 else 1))


def test_pieces_split_large_tensors_and_give_the_same_numbers(monkeypatch):
    xs = [torch.randn(1000), torch.relu(torch.randn(10, 7)), torch.randn(3), torch.randn(300) * 1e-3]
    whole = summarize_tensors(xs)
    monkeypatch.setattr(ts, "_PIECE", 64)
    monkeypatch.setattr(ts, "_PLAN_CACHE", {})
    for a, b, x in zip(whole, summarize_tensors(xs), xs, strict=True):
        assert a.approx_equal(b, rtol=1e-12)
        assert_matches(b, summarize(x.numpy()))


def test_store_encoding_of_packed_rows_is_the_documented_record():
    from gradsight.store import _encode

    xs = [torch.randn(4, 3), torch.relu(torch.randn(2, 5)), torch.zeros(0), torch.zeros(3), torch.tensor([math.nan])]
    packed = ts.Flat.of(xs, [1, 1, None, None, None]).stats()
    rows = ts.to_host_rows(packed)()
    tids = [7, 3, 9, 1, 4]
    got = _encode(5, SummaryArrays(tids, rows))
    assert [repr(r) for r in got] == [repr(r) for r in _encode(5, zip(tids, from_rows(rows), strict=True))]
    for rec, tid, x in zip(got, tids, xs, strict=True):
        ref = summarize(x.numpy())
        nz = np.flatnonzero(ref.hist)
        hist_lo = int(nz[0]) if nz.size else None
        hist = ref.hist[nz[0] : nz[-1] + 1].astype("<i8").tobytes() if nz.size else None
        head = (5, tid, ref.count, ref.sum, ref.sum_sq, ref.min, ref.max, ref.zeros, ref.nan, ref.posinf)
        assert rec[:10] == pytest.approx(head, rel=1e-12, nan_ok=True)
        assert rec[10:14] == (ref.neginf, ref.positive, hist_lo, hist)


@settings(max_examples=40, deadline=None)
@given(
    a=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=7),
        elements=st.sampled_from([0.0, -0.0, 1.0, -2.5, math.nan, math.inf, 2.0**-130]),
    ),
    axis=st.integers(0, 3),
    piece=st.sampled_from([1, 2, 5, 16, 1 << 17]),
)
def test_unit_counts_in_blocks_match_reference(a, axis, piece):
    # The numpy unit counts walk the tensor in blocks of rows, or of units within a row, when it exceeds the
    # scratch (_PIECE elements): every block size, axis position and NaN/-0.0 entry counts like the reference.
    axis %= a.ndim
    old = ts._PIECE
    ts._PIECE = piece
    try:
        got = summarize_tensors([torch.from_numpy(a.copy())], [axis])[0]
    finally:
        ts._PIECE = old
    ref_active = np.count_nonzero(np.moveaxis(a != 0, axis, 0).reshape(a.shape[axis], -1), axis=1)
    np.testing.assert_array_equal(got.units_active, ref_active)
    assert got.units_total == a.size // a.shape[axis]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_batch_read_in_place_matches_the_copied_batch(monkeypatch, dtype, kernels):
    # copy=False reads large contiguous tensors in place (a group each) and copies the rest together (with the
    # compiled kernel, every contiguous float32 CPU tensor is read in place); the numbers are those of the copied
    # batch and of the reference.
    monkeypatch.setattr(ts, "_ALONE", 50)
    xs = [
        torch.relu(torch.randn(8, 16)).to(dtype),
        torch.randn(3, 4).to(dtype),
        torch.randn(20, 5).t().to(dtype),  # large but not contiguous: copied
        torch.randn(64).to(dtype),
    ]
    axes = [1, None, 0, None]
    flat = ts.Flat.of(xs, axes, copy=False)
    in_place = [g.index for g in flat.groups if g.flat.data_ptr() in {x.data_ptr() for x in xs}]
    expected = [[0], [3]] if dtype != torch.float16 else []  # float16 is upcast: a copy either way
    if kernels == "compiled" and dtype == torch.float32:
        expected = [[0], [1], [3]]  # the small contiguous one too; the transposed one is copied
    assert sorted(in_place) == expected
    copied = ts.to_host(ts.Flat.of(xs, axes).stats())()
    for got, ref, x, ax in zip(ts.to_host(flat.stats())(), copied, xs, axes, strict=True):
        assert_matches(got, ref)
        assert_matches(got, summarize(x.float().numpy() if dtype == torch.float16 else x.numpy(), unit_axis=ax))


def test_a_batch_read_in_place_by_the_compiled_kernel_in_one_call(kernels):
    """Every tensor a plain contiguous CPU float32 one: the compiled kernel summarises the whole batch, rows and
    unit counts, in one call. Its numbers are the reference's, its groups views of the tensors themselves (for
    ``minus``), and joined with a copied batch (summarised group by group) its unit counts stay right."""
    torch.manual_seed(3)
    xs = [
        torch.relu(torch.randn(16, 32)),  # a dense layer's output: units interleave
        torch.relu(torch.randn(2, 8, 6, 6)),  # a convolution's: row and counts in one pass
        torch.randn(()),
        torch.zeros(0, 4),
        torch.randn(5, requires_grad=True),  # a parameter: read through a detached view
    ]
    axes = [1, 1, 0, 1, None]
    flat = ts.Flat.of(xs, axes, copy=False)
    assert (flat.host is not None) == (kernels == "compiled")
    refs = [
        summarize(x.detach().numpy(), unit_axis=None if x.dim() == 0 else ax) for x, ax in zip(xs, axes, strict=True)
    ]
    for got, ref in zip(ts.to_host(flat.stats())(), refs, strict=True):
        assert_matches(got, ref)
    if kernels == "compiled":
        assert [g.index for g in flat.groups] == [[0], [1], [2], [4]]  # one per non-empty tensor
        assert all(g.flat.data_ptr() == xs[g.index[0]].data_ptr() for g in flat.groups)
    ys = [x.detach() * 0.5 - 1 for x in xs]
    diff = ts.Flat.of(ys, copy=False).minus(flat)
    for got, y, x in zip(ts.to_host(diff.stats())(), ys, xs, strict=True):
        assert_matches(got, summarize((y - x.detach()).numpy()))
    other = torch.randn(3, 7).double()
    copied, ref_other = ts.Flat.of([other], [0]), summarize(other.numpy(), unit_axis=0)
    for got, ref in zip(ts.to_host(ts.Flat.join([flat, copied]).stats())(), [*refs, ref_other], strict=True):
        assert_matches(got, ref)
    for got, ref in zip(ts.to_host(ts.Flat.join([copied, flat]).stats())(), [ref_other, *refs], strict=True):
        assert_matches(got, ref)
    both = ts.Flat.join([flat, ts.Flat.of(ys, axes, copy=False)])
    assert (both.host is not None) == (kernels == "compiled")
    ref_ys = [summarize(y.numpy(), unit_axis=None if y.dim() == 0 else ax) for y, ax in zip(ys, axes, strict=True)]
    for got, ref in zip(ts.to_host(both.stats())(), refs + ref_ys, strict=True):
        assert_matches(got, ref)
