"""The compiled kernels (gradsight._ckernels, through gradsight._kernels) against the numpy reference.

The summary kernel walks each tensor in blocks of 4096 elements, counts long tensors into four sub-histograms,
and takes one of three paths through a block's floats by what its codes show (only normal numbers; zeros or
subnormals but no Inf/NaN; anything), then folds the counts into summary rows: these tests put zeros,
subnormals, infinities and NaN in some blocks and not others, the extremes in every lane of each path, and use
sizes around every boundary, so that each path and each hand-over between them is compared with
:func:`gradsight.summarize`. The unit counts and the
fused norms are checked the same way (against the reference's per-unit counts, and float64 norms).
"""

from __future__ import annotations

import math
import shutil
import sysconfig

import numpy as np
import pytest

from gradsight import _kernels
from gradsight._packing import Rows
from gradsight.summary import from_rows, summarize

needs_kernel = pytest.mark.skipif(not _kernels.available(), reason="the compiled kernel was not built")


def _levels() -> list[str]:
    """The instruction sets the kernel's float passes can use here: its own, and SSE2 too where it chose AVX2."""
    here = _kernels.simd()
    if here is None:
        return ["none"]
    return [here, "sse2"] if here == "avx2" else [here]


@pytest.fixture(autouse=True, params=_levels())
def simd_level(request):
    """Every test runs with each instruction set the float passes can use on this machine."""
    if request.param == "none":
        yield None
        return
    before = _kernels.simd()
    _kernels._C.simd(request.param)
    yield request.param
    _kernels._C.simd(before)


SPECIALS = np.array(
    [0.0, -0.0, np.nan, np.inf, -np.inf, 2.0**-130, -(2.0**-140), 1e-45, 3.4e38, -3.4e38], dtype=np.float32
)


def assert_same(got, ref, where):
    for k in ("count", "zeros", "nan", "posinf", "neginf", "positive"):
        assert getattr(got, k) == getattr(ref, k), (where, k, getattr(got, k), getattr(ref, k))
    np.testing.assert_array_equal(got.hist, ref.hist, err_msg=where)
    assert (got.min, got.max) == (ref.min, ref.max), where
    # float64 accumulation of float32 data: error of the order of count * eps64 * the scale
    big = max(abs(ref.min), abs(ref.max)) if ref.finite else 0.0
    assert abs(got.sum - ref.sum) <= 1e-12 * ref.count * big + 1e-300, (where, got.sum, ref.sum)
    assert abs(got.sum_sq - ref.sum_sq) <= 1e-12 * ref.count * big * big + 1e-300, (where, got.sum_sq, ref.sum_sq)


def summaries(data, numels):
    rows = _kernels.rows_f32([data], [numels])
    return from_rows(Rows(rows, [None] * len(numels), [0] * len(numels)))


def check(arrays, where):
    data = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float32)
    for i, (got, a) in enumerate(zip(summaries(data, [a.size for a in arrays]), arrays, strict=True)):
        with np.errstate(over="ignore", invalid="ignore"):
            assert_same(got, summarize(a), f"{where}, tensor {i} of size {a.size}")


@needs_kernel
@pytest.mark.parametrize("size", [1, 3, 4, 7, 8, 9, 4095, 4096, 4097, 8191, 8192, 8200, 3 * 4096 + 5])
@pytest.mark.parametrize("specials", ["none", "one block", "scattered"])
def test_sizes_around_the_block_and_lane_boundaries(size, specials):
    rng = np.random.default_rng(size)
    a = (rng.standard_normal(size) * 10.0 ** rng.uniform(-30, 30)).astype(np.float32)
    if specials == "one block" and size > 4096:  # only the second block has specials: the first and third go clean
        at = rng.integers(4096, min(size, 8192), 20)
        a[at] = rng.choice(SPECIALS, 20)
    elif specials != "none":
        at = rng.integers(0, size, max(1, size // 50))
        a[at] = rng.choice(SPECIALS, at.size)
    check([a], f"size {size}, specials {specials}")


@needs_kernel
def test_many_segments_of_mixed_sizes_in_one_call():
    rng = np.random.default_rng(0)
    arrays = []
    for k, size in enumerate([5, 0, 4096, 1, 10_000, 33, 0, 70_000, 8, 4097]):
        a = (rng.standard_normal(size) * 3.0**k).astype(np.float32)
        if k % 3 == 0 and size:
            a[rng.integers(0, size, 1 + size // 100)] = rng.choice(SPECIALS, 1 + size // 100)
        if k == 4:
            a = np.maximum(a, 0)  # a ReLU output: half zeros
        arrays.append(a)
    check(arrays, "mixed segments")


@needs_kernel
@pytest.mark.parametrize("path", ["normal numbers", "zeros", "subnormals", "infinities"])
@pytest.mark.parametrize("lane", range(16))
def test_each_lane_of_each_block_path_sees_its_extremes(path, lane):
    """A block's floats take one of three paths by what its codes show: only normal numbers, zeros or subnormals
    but nothing non-finite, anything. In a block of each kind, the minimum and the maximum sit in one of the 16
    positions of a round of the unrolled loops, so that a lane left out of the extremes or sums of a path shows."""
    rng = np.random.default_rng(lane)
    a = rng.uniform(1.0, 2.0, 3 * 4096).astype(np.float32)  # three blocks: the middle one is the case
    block = a[4096:8192]
    if path == "zeros":
        block[rng.integers(0, 4096, 500)] = rng.choice(np.array([0.0, -0.0], np.float32), 500)
    elif path == "subnormals":
        block[rng.integers(0, 4096, 500)] = np.float32(2.0**-140)
    elif path == "infinities":
        block[rng.integers(0, 4096, 5)] = np.float32(np.inf)
    at = 16 * rng.integers(10, 250) + lane
    block[at], block[at + 16] = -7.5, 9.25  # the block's extremes (a finite maximum beside the infinities)
    check([a], f"{path}, extremes in lane {lane}")


@needs_kernel
@pytest.mark.parametrize("value", [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 1.0])
def test_a_long_tensor_of_one_value(value):
    check([np.full(10_000, value, dtype=np.float32)], f"all {value}")


@needs_kernel
def test_extremes_of_float32_sum_in_float64_without_overflow():
    a = np.full(5000, np.finfo(np.float32).max, dtype=np.float32)
    rows = summaries(a, [a.size])[0]
    assert rows.sum == pytest.approx(5000 * float(np.finfo(np.float32).max), rel=1e-15)
    assert math.isfinite(rows.sum_sq)


@needs_kernel
def test_bad_input_is_refused_with_what_was_given():
    with pytest.raises(ValueError, match="buffer 0 is float64"):
        _kernels.rows_f32([np.zeros(4, dtype=np.float64)], [[4]])
    with pytest.raises(ValueError, match="sizes add up to 3, but it has 4"):
        _kernels.rows_f32([np.zeros(4, dtype=np.float32)], [[1, 2]])
    with pytest.raises(ValueError, match="sizes add up to 5, but it has 4"):
        _kernels.rows_f32([np.zeros(4, dtype=np.float32)], [[5]])
    with pytest.raises(ValueError, match="C-contiguous"):
        _kernels.rows_f32([np.zeros(8, dtype=np.float32)[::2]], [[4]])
    with pytest.raises(ValueError, match="buffer 1 is float64"):
        _kernels.rows_f32([np.zeros(4, np.float32), np.zeros(4)], [[4], [4]])
    with pytest.raises(ValueError, match="buffer 0 is float16"):
        _kernels.rows_f32([np.zeros(4, np.float16)], [[2, 2]])
    c = _kernels._C
    data, offsets = np.zeros(4, np.float32), np.array([0, 4], np.int64)
    with pytest.raises(ValueError, match="rows has 24 bytes; expected 2128"):
        c.rows_f32([data], [offsets], np.empty(3, np.int64))
    for bad in ([0, 5], [1, 4], [0, 3, 2, 4]):
        with pytest.raises(ValueError, match="buffer 0: its offsets must"):
            c.rows_f32([data], [np.array(bad, np.int64)], np.empty((3, _kernels.ROW), np.int64))
    with pytest.raises(ValueError, match="1 buffers but 2 offset arrays"):
        c.rows_f32([data], [offsets, offsets], np.empty((1, _kernels.ROW), np.int64))


@needs_kernel
def test_several_buffers_in_one_call_equal_one_buffer_each():
    rng = np.random.default_rng(5)
    datas = [rng.standard_normal(n).astype(np.float32) for n in (5, 4100, 1, 300)]
    datas[1][::9] = 0.0
    sizes = [[5], [4000, 0, 100], [1], [100, 200]]
    many = _kernels.rows_f32(datas, sizes)
    one = np.concatenate([_kernels.rows_f32([d], [s]) for d, s in zip(datas, sizes, strict=True)])
    np.testing.assert_array_equal(many, one)
    assert many.shape[0] == 7


def test_the_kernel_is_built_where_a_compiler_is():
    """A C compiler was there at install time, so the kernel must have been built (a failing build is skipped
    quietly by setuptools: this catches it)."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}) here: gradsight runs on its numpy/torch kernels")
    assert _kernels.available(), "gradsight._ckernels is missing: reinstall (pip install -e .) and read the build log"


@needs_kernel
@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 6, 9), (2, 3, 4, 5), (1, 1), (0, 3), (3, 0, 2), (64, 8, 33)])
def test_unit_counts_match_the_reference_on_every_axis(shape):
    rng = np.random.default_rng(len(shape))
    a = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)  # half zeros
    flat = a.reshape(-1)
    flat[::7] = np.nan  # counts as active
    flat[::11] = -0.0  # does not
    for axis in range(a.ndim):
        ref = summarize(a, unit_axis=axis).units_active
        np.testing.assert_array_equal(_kernels.unit_counts_f32(a, axis), ref, err_msg=f"axis {axis}")


@needs_kernel
@pytest.mark.parametrize("shape", [(64, 8, 33), (2, 3, 4, 5), (4, 6, 4096 + 7), (1, 1), (0, 3, 40), (3, 0, 2), (5, 9)])
def test_rows_with_unit_counts_match_the_separate_kernels(shape):
    """The fused kernel reads each unit's run of elements once for the whole row and the unit's count: its counts
    and bins must equal the reference's, its sums agree to float64 rounding, on every axis."""
    rng = np.random.default_rng(sum(shape))
    a = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)  # half zeros
    flat = a.reshape(-1)
    flat[::7] = np.nan  # counts as active
    flat[::11] = -0.0  # does not
    flat[::13] = rng.choice(SPECIALS, flat[::13].size)
    for axis in range(a.ndim):
        row, counts = _kernels.rows_units_f32(a, axis)
        ref = summarize(a, unit_axis=axis)
        np.testing.assert_array_equal(counts, ref.units_active, err_msg=f"axis {axis}")
        (got,) = from_rows(Rows(row[None, :], [None], [0]))
        with np.errstate(over="ignore", invalid="ignore"):
            assert_same(got, summarize(a), f"shape {shape}, axis {axis}")


@needs_kernel
def test_rows_with_unit_counts_refuse_bad_input():
    with pytest.raises(ValueError, match="axis in"):
        _kernels.rows_units_f32(np.zeros((2, 3), np.float32), 2)
    with pytest.raises(ValueError, match="float64"):
        _kernels.rows_units_f32(np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="counts has 16 bytes; expected 24"):
        _kernels._C.rows_units_f32(
            np.zeros(6, np.float32), 2, 3, 1, np.empty(_kernels.ROW, np.int64), np.zeros(2, np.int64)
        )
    with pytest.raises(ValueError, match="data has 24 bytes"):
        _kernels._C.rows_units_f32(
            np.zeros(6, np.float32), 2, 3, 2, np.empty(_kernels.ROW, np.int64), np.zeros(3, np.int64)
        )


@needs_kernel
def test_a_batch_in_one_call_matches_the_reference_and_the_separate_kernels():
    """summaries_f32 takes a whole batch (dense and channel-first outputs, vectors, 0-d and empty arrays) in one
    call: each row must equal the reference (counts and bins exactly, sums to float64 rounding), each unit count
    the reference's, in the packed order (the rows, then the counts of the arrays with a unit axis)."""
    rng = np.random.default_rng(7)
    shapes = [(32, 128), (4, 16, 8, 8), (6, 3, 40), (4096 + 9,), (), (0, 5), (3, 0), (2, 3), (5, 2, 31)]
    axes = [1, 1, 2, 0, None, 1, 1, None, 1]
    arrays = []
    for shape in shapes:
        a = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)  # half zeros
        flat = a.reshape(-1)
        flat[::7] = np.nan
        flat[::11] = -0.0
        flat[::13] = rng.choice(SPECIALS, flat[::13].size)
        arrays.append(a)
    packed = _kernels.summaries_f32(arrays, axes)
    n = len(arrays) * _kernels.ROW
    rows = packed[:n].reshape(len(arrays), _kernels.ROW)
    offset = n
    for i, (a, axis) in enumerate(zip(arrays, axes, strict=True)):
        (got,) = from_rows(Rows(rows[i][None, :], [None], [0]))
        with np.errstate(over="ignore", invalid="ignore"):
            ref = summarize(a, unit_axis=axis)
            assert_same(got, summarize(a), f"array {i} of shape {a.shape}")
        if axis is not None:
            units = a.shape[axis]
            np.testing.assert_array_equal(packed[offset : offset + units], ref.units_active, err_msg=f"array {i}")
            offset += units
    assert offset == packed.size
    # a channel-first array is read once for its row and its counts, like rows_units_f32 reads it
    row, _ = _kernels.rows_units_f32(arrays[1], 1)
    np.testing.assert_array_equal(rows[1], row)
    assert _kernels.summaries_f32([], []).size == 0


@needs_kernel
def test_a_batch_refuses_bad_input_with_what_was_given():
    with pytest.raises(ValueError, match=r"array 1 has shape \(2, 3\); its unit axis 2 is not in \[0, 2\)"):
        _kernels.summaries_f32([np.zeros(3, np.float32), np.zeros((2, 3), np.float32)], [None, 2])
    with pytest.raises(ValueError, match="2 arrays but 1 unit axes"):
        _kernels.summaries_f32([np.zeros(3, np.float32)] * 2, [None])
    with pytest.raises(ValueError, match="buffer 0 is float64"):
        _kernels.summaries_f32([np.zeros(3)], [None])
    with pytest.raises(ValueError, match="not C-contiguous"):
        _kernels.summaries_f32([np.zeros((4, 3), np.float32).T], [None])
    with pytest.raises(ValueError, match=r"counts 8; expected .* \(3 units\)"):
        _kernels._C.summaries_f32(
            [np.zeros((2, 3), np.float32)], [1], np.empty(_kernels.ROW, np.int64), np.empty(1, np.int64)
        )
    with pytest.raises(ValueError, match="unit axis -1 is not in"):
        _kernels._C.summaries_f32(
            [np.zeros((2, 3), np.float32)], [-1], np.empty(_kernels.ROW, np.int64), np.empty(3, np.int64)
        )


@needs_kernel
def test_unit_counts_refuse_bad_input():
    with pytest.raises(ValueError, match="axis in"):
        _kernels.unit_counts_f32(np.zeros((2, 3), np.float32), 2)
    with pytest.raises(ValueError, match="C-contiguous: False"):
        _kernels.unit_counts_f32(np.zeros((4, 3), np.float32).T, 0)
    with pytest.raises(ValueError, match="data has 8 bytes"):
        _kernels._C.units_f32(np.zeros(2, np.float32), 1, 3, 1, np.zeros(3, np.int64))


@needs_kernel
def test_copy_and_difference_norms_match_float64_references():
    rng = np.random.default_rng(3)
    sizes = [1, 7, 15, 16, 17, 31, 32, 33, 1000, 4096 + 3]
    src = [rng.standard_normal(n).astype(np.float32) * 10.0 ** rng.uniform(-20, 20) for n in sizes]
    src[2][3] = np.inf
    src[4][5] = np.nan
    dst = [np.empty_like(a) for a in src]
    got = _kernels.copy_norms_f32(src, dst)
    for a, b, g in zip(src, dst, got, strict=True):
        np.testing.assert_array_equal(a, b)  # the copy is exact (NaN in the same places)
        ref = float(np.sqrt(np.sum(a.astype(np.float64) ** 2)))
        assert g == pytest.approx(ref, rel=1e-14, nan_ok=True)
    after = [a + np.float32(1e-3) * rng.standard_normal(a.size).astype(np.float32) for a in dst]
    got = _kernels.diff_norms_f32(after, dst)
    for a, b, g in zip(after, dst, got, strict=True):
        with np.errstate(invalid="ignore"):  # inf - inf
            d = (a - b).astype(np.float64)  # the float32 difference, as torch's subtraction rounds it
        assert g == pytest.approx(float(np.sqrt(np.sum(d * d))), rel=1e-14, nan_ok=True)
    at = _kernels.norms_at_f32([a.ctypes.data for a in after], [a.size for a in after])  # the same, by address
    np.testing.assert_array_equal(at, _kernels.norms_f32(after))
    for a, g in zip(after, at, strict=True):
        assert g == pytest.approx(float(np.sqrt(np.sum(a.astype(np.float64) ** 2))), rel=1e-14, nan_ok=True)
    out = [np.full_like(a, 7.0) for a in after]
    stored = _kernels.diff_into_norms_f32(after, dst, out)
    np.testing.assert_array_equal(stored, got)  # the same norms, summed the same way (NaN where it was)
    for a, b, o in zip(after, dst, out, strict=True):
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(o, a - b)  # every element written, rounded as float32 rounds it


@needs_kernel
def test_norm_kernels_refuse_mismatched_lists():
    a, b = [np.zeros(4, np.float32)], [np.zeros(5, np.float32)]
    with pytest.raises(ValueError, match="array 0 of the second list is not a float32 array of the size"):
        _kernels.copy_norms_f32(a, b)
    with pytest.raises(ValueError, match="lists of 1 and 2 arrays"):
        _kernels.diff_norms_f32(a, [*a, *a])
    with pytest.raises(ValueError, match="array 0 of the first list is not a float32"):
        _kernels.diff_norms_f32([np.zeros(4)], a)
    with pytest.raises(ValueError, match=r"read-only|writable"):
        ro = np.zeros(4, np.float32)
        ro.flags.writeable = False
        _kernels.copy_norms_f32(a, [ro])
    with pytest.raises(ValueError, match="lists of 1, 1 and 2 arrays"):
        _kernels.diff_into_norms_f32(a, a, [*a, *a])
    with pytest.raises(ValueError, match="array 0 of the third list is not a float32 array of the size"):
        _kernels.diff_into_norms_f32(a, a, b)
    with pytest.raises(ValueError, match="1 addresses and 2 counts"):
        _kernels.norms_at_f32([a[0].ctypes.data], [4, 4])
    with pytest.raises(ValueError, match="entry 0 has a null address or a negative count"):
        _kernels.norms_at_f32([0], [4])
    with pytest.raises(ValueError, match="entry 0 has a null address or a negative count"):
        _kernels.norms_at_f32([a[0].ctypes.data], [-1])
    assert _kernels.norms_at_f32([0], [0]) == [0.0]  # an empty tensor's null pointer


@needs_kernel
def test_the_instruction_set_is_one_the_build_and_cpu_can_use(simd_level):
    assert _kernels.simd() == simd_level
    with pytest.raises(ValueError, match="avx512 is not available here"):
        _kernels._C.simd("avx512")
    assert _kernels.simd() == simd_level  # unchanged by the refusal
