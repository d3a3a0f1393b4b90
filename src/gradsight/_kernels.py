"""The compiled CPU kernels for float32 data (``gradsight._ckernels``), with their numpy-side wrappers.

``_ckernels.c`` is built at install time where a C compiler is available. It holds:

* **summaries** (:func:`rows_f32`): each element read once for the counts of the 512
  (sign, exponent field) codes ``bits >> 23``, the zeros, positive zeros and signed infinities, and the float64
  sum, sum of squares, min and max of the finite elements, folded by the kernel into the rows of
  :mod:`gradsight._packing`:
  every count and bin exact, the sums accumulated in float64 in eight interleaved lanes (so they agree with the
  numpy reference, :func:`gradsight.summary.summarize`, to float64 rounding, like the other kernels);
* **per-unit activity counts** (:func:`unit_counts_f32`), or both at once (:func:`rows_units_f32`), where a
  unit's elements lie together (a convolution's channels); and a whole batch of tensors' rows and unit counts in
  one call (:func:`summaries_f32`);
* **per-step norms** (:func:`copy_norms_f32`, :func:`diff_norms_f32`, :func:`diff_into_norms_f32`): a copy
  with its norm, and the norm of a difference, without storing it or stored.

The float passes (the summaries' sums and extremes, the norms) use AVX2 where the CPU has it, else the build's
SSE2 (or plain C); the counts are the same either way, the float64 sums may differ in the last bits (another
order of additions). Without the compiled module each function returns ``None`` (:func:`available` says so up
front) and the callers use their numpy/torch kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ._packing import HIST, ROW

try:
    from . import _ckernels as _C
except ImportError:  # built without a C compiler: the numpy/torch kernels stand in
    _C = None

if _C is not None and (_C.ROW, _C.HIST) != (ROW, HIST):  # a build from another version of the row layout
    raise ImportError(
        f"gradsight._ckernels was built for rows of {_C.ROW} words (histogram at {_C.HIST}), but this gradsight "
        f"writes {ROW} (at {HIST}): the compiled module is stale. Rebuild it: pip install -e . (or reinstall)."
    )

__all__ = [
    "available",
    "copy_norms_f32",
    "diff_into_norms_f32",
    "diff_norms_f32",
    "norms_f32",
    "rows_f32",
    "rows_units_f32",
    "simd",
    "summaries_f32",
    "unit_counts_f32",
]


def available() -> bool:
    """Whether the compiled kernel was built (a C compiler was available at install time)."""
    return _C is not None


def simd() -> str | None:
    """The instruction set of the compiled kernel's float passes, or ``None`` without the compiled kernel.

    ``"avx2"`` (chosen at import where the CPU has it), else the build's own: ``"sse2"`` or ``"scalar"``.
    """
    return None if _C is None else str(_C.simd())


_OFFSETS: dict[tuple[int, ...], np.ndarray] = {}


def _offsets(numels: Sequence[int]) -> np.ndarray:
    """``[0, n0, n0 + n1, ...]`` as int64 (cached for a few layouts: a watch summarises the same ones each step)."""
    key = tuple(numels)
    offsets = _OFFSETS.get(key)
    if offsets is None:
        offsets = np.zeros(len(key) + 1, dtype=np.int64)
        np.cumsum(key, out=offsets[1:])
        offsets.flags.writeable = False
        if len(_OFFSETS) >= 64:
            _OFFSETS.pop(next(iter(_OFFSETS)))
        _OFFSETS[key] = offsets
    return offsets


def rows_f32(datas: Sequence[np.ndarray], numels: Sequence[Sequence[int]]) -> np.ndarray | None:
    """Summary rows of the consecutive segments of float32 buffers, or ``None`` without the compiled kernel.

    Any number of buffers in one call: tensors read where they are, one buffer each, need no copy into a shared
    buffer, and one call folds the rows of all of them.

    Args:
        datas: C-contiguous float32 arrays (read flat), each holding one or more tensors, flattened and
            concatenated.
        numels: per buffer, its tensors' sizes, in order; they add up to the buffer's size.

    Returns:
        ``(n, ROW)`` int64 rows (float64 fields bit-cast), buffer after buffer, as
        :func:`gradsight._packing.empty_rows` lays them out.

    Raises:
        ValueError: a buffer is not C-contiguous float32, or its sizes do not add up to its size.
    """
    if _C is None:
        return None
    offsets: list[np.ndarray | None] = []
    n = 0
    for k, (data, sizes) in enumerate(zip(datas, numels, strict=True)):
        if len(sizes) == 1:  # the common case, a tensor read in place: no offsets to make
            if sizes[0] != data.size:
                raise ValueError(f"rows_f32: buffer {k}'s sizes add up to {sizes[0]}, but it has {data.size} elements.")
            offsets.append(None)
            n += 1
            continue
        off = _offsets(sizes)
        if off[-1] != data.size:
            raise ValueError(f"rows_f32: buffer {k}'s sizes add up to {int(off[-1])}, but it has {data.size} elements.")
        offsets.append(off)
        n += len(sizes)
    rows = np.empty((n, ROW), dtype=np.int64)
    _C.rows_f32(datas, offsets, rows)
    return rows


def summaries_f32(arrays: Sequence[np.ndarray], axes: Sequence[int | None]) -> np.ndarray | None:
    """The summary rows of whole float32 arrays and their per-unit activity counts, in one call.

    A watch's batch of tensors, each read where it is: the row of each array is :func:`rows_f32`'s, and the
    counts of an array with a unit axis are :func:`unit_counts_f32`'s (from the same pass where a unit's
    elements lie together, as :func:`rows_units_f32` reads them). ``None`` without the compiled kernel.

    Args:
        arrays: C-contiguous float32 arrays of any shapes.
        axes: per array, ``None`` (no unit counts) or its unit axis in ``[0, ndim)``.

    Returns:
        One int64 buffer: the ``n`` rows of ``ROW`` words, array after array, then the unit counts of the arrays
        with a unit axis, one after the other (the packed form of :func:`gradsight._packing.rows_at`).

    Raises:
        ValueError: an array is not C-contiguous float32, or an axis is not in ``[0, ndim)``.
    """
    if _C is None:
        return None
    if len(arrays) != len(axes):
        raise ValueError(f"summaries_f32: {len(arrays)} arrays but {len(axes)} unit axes; expected one axis per array.")
    units = 0
    for k, (a, ax) in enumerate(zip(arrays, axes, strict=True)):
        if ax is not None:
            if not 0 <= ax < a.ndim:
                raise ValueError(
                    f"summaries_f32: array {k} has shape {a.shape}; its unit axis {ax} is not in [0, {a.ndim})."
                )
            units += a.shape[ax]
    n = len(arrays) * ROW
    packed = np.empty(n + units, dtype=np.int64)
    _C.summaries_f32(arrays, axes, packed[:n], packed[n:])
    return packed


def unit_counts_f32(a: np.ndarray, axis: int) -> np.ndarray | None:
    """Non-zero entries per index along ``axis`` of a float32 array (NaN counts, ``-0.0`` does not), int64.

    ``None`` without the compiled kernel. ``a`` must be C-contiguous and ``0 <= axis < a.ndim``.
    """
    if _C is None:
        return None
    pre, units, post = _units_view(a, axis, "unit_counts_f32")
    counts = np.zeros(units, dtype=np.int64)
    _C.units_f32(a.reshape(-1), pre, units, post, counts)
    return counts


def _units_view(a: np.ndarray, axis: int, name: str) -> tuple[int, int, int]:
    """``a`` seen as ``(pre, units, post)`` around ``axis``, for the unit kernels.

    Raises:
        ValueError: ``a`` is not a C-contiguous float32 array, or ``axis`` not in ``[0, a.ndim)``.
    """
    if a.dtype != np.float32 or not a.flags.c_contiguous or not 0 <= axis < a.ndim:
        raise ValueError(
            f"{name} takes a C-contiguous float32 array and an axis in [0, ndim); got {a.dtype} of shape "
            f"{a.shape} (C-contiguous: {a.flags.c_contiguous}) and axis {axis}."
        )
    return math.prod(a.shape[:axis]), a.shape[axis], math.prod(a.shape[axis + 1 :])


def rows_units_f32(a: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The summary row of a float32 array and its per-unit activity counts along ``axis``, in one pass.

    The row is :func:`rows_f32`'s for the whole array; the counts are :func:`unit_counts_f32`'s. Each (leading
    index, unit) plane of the elements after ``axis`` is read once for both, which pays where those planes are
    long (a convolution's channels); ``None`` without the compiled kernel.

    Raises:
        ValueError: ``a`` is not a C-contiguous float32 array, or ``axis`` not in ``[0, a.ndim)``.
    """
    if _C is None:
        return None
    pre, units, post = _units_view(a, axis, "rows_units_f32")
    row = np.empty(ROW, dtype=np.int64)
    counts = np.zeros(units, dtype=np.int64)
    _C.rows_units_f32(a, pre, units, post, row, counts)
    return row, counts


# ---- per-step norms (the watch's every-step signals) -----------------------------------------------------------
# L2 norms of float32 arrays, accumulated in float64 (torch's float32 norms agree to float32 rounding), each fused
# with the copy or the difference the signals need: one pass over the inputs, no temporaries.


def norms_f32(arrays: Sequence[np.ndarray]) -> list[float] | None:
    """The norm of each float32 array, accumulated in float64, in one call."""
    if _C is None:
        return None
    return [math.sqrt(v) for v in _C.sumsq_f32(arrays)]


def norms_at_f32(addresses: Sequence[int], counts: Sequence[int]) -> list[float] | None:
    """:func:`norms_f32` of memory given by address: ``counts[k]`` float32 values at ``addresses[k]``.

    For framework tensors, whose data pointer costs less to read than a numpy view to make. The caller holds the
    memory during the call and has checked that it is contiguous float32 host memory of that many values.
    """
    if _C is None:
        return None
    return [math.sqrt(v) for v in _C.sumsq_at_f32(addresses, counts)]


def copy_norms_f32(src: Sequence[np.ndarray], dst: Sequence[np.ndarray]) -> list[float] | None:
    """Copy each ``src[k]`` into ``dst[k]`` (same size) and return the copies' norms, in one pass."""
    if _C is None:
        return None
    return [math.sqrt(v) for v in _C.copy_sumsq_f32(src, dst)]


def diff_into_norms_f32(
    a: Sequence[np.ndarray], b: Sequence[np.ndarray], out: Sequence[np.ndarray]
) -> list[float] | None:
    """Write each float32 difference ``a[k] - b[k]`` into ``out[k]`` and return its norm, in one pass.

    The difference is rounded to float32 as torch's float32 subtraction rounds it; its norm is accumulated in
    float64, as :func:`diff_norms_f32` takes it.
    """
    if _C is None:
        return None
    return [math.sqrt(v) for v in _C.diff_into_sumsq_f32(a, b, out)]


def diff_norms_f32(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[float] | None:
    """The norm of each float32 difference ``a[k] - b[k]``, in one pass, without storing the difference.

    Each difference is rounded to float32, as torch's float32 subtraction rounds it, then squared in float64.
    """
    if _C is None:
        return None
    return [math.sqrt(v) for v in _C.diff_sumsq_f32(a, b)]
