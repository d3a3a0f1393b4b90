"""The one packed form of summaries: a row layout shared by every adapter's kernels, the watch core and the store.

A *row* holds one :class:`~gradsight.summary.TensorSummary` as ``ROW = 266`` int64 words (the four float64
fields bit-cast), columns in this order::

    [count, zeros, nan, posinf, neginf, positive, sum, sum_sq, min, max, hist[0] .. hist[255]]

Per-unit activity counts (``units_active``) vary in length, so they travel next to the rows, one array (or
``None``) per row, with ``units_total`` per row. :class:`Rows` is that pair on the host
(:func:`gradsight.summary.from_rows` / :func:`gradsight.summary.to_rows` convert to and from ``TensorSummary``
objects; this module imports nothing of gradsight, so that ``summary.py`` can take its constants from here).

Adapters produce rows on their device in one of two wire forms and turn them into :class:`Rows` here:

* **int64** (the torch kernels): ``n`` rows, then each row's unit counts (their lengths and totals are known
  when packing); :func:`rows_at` decodes a batch from an offset.
* **float64** (the TensorFlow kernels, which cannot bit-cast inside XLA graphs cheaply): ``n`` rows of ``ROW``
  float64 words in the same column order (counts exact up to ``2**53``), then ``[units_total, active...]`` per
  row with units; :func:`rows_from_float64` decodes it with a :class:`Layout`.

Then :func:`merge_rows` merges rows of the same tensor (micro-batches, a module called twice), following
:func:`gradsight.summary.merge` field by field with array operations, and :func:`encode_rows` turns rows into the
store's ``summaries`` records (the one encoder of :mod:`gradsight.store`).

The histogram bin of an element (see :mod:`gradsight.summary` for its definition) is defined here once:
``bin = clip(floor(log2|x|) + EXP_BIAS, 0, HIST_BINS - 1)``. :func:`hist_bins` is the numpy form (via
``frexp``); the kernels read the same bin from the IEEE-754 bits with the constants below (for float32 the
biased exponent field *is* the bin; for float64 it is the biased exponent minus ``F64_BIN_OFFSET``, clipped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "EXP_BIAS",
    "F32_EXP_MASK",
    "F32_MANTISSA_BITS",
    "F64_BIN_OFFSET",
    "F64_MANTISSA_BITS",
    "FREXP_BIN_OFFSET",
    "HIST_BINS",
    "ROW",
    "Layout",
    "Rows",
    "SummaryArrays",
    "encode_rows",
    "hist_bins",
    "merge_rows",
    "rows_at",
    "rows_from_float64",
]

# ---- the exponent-to-bin rule -----------------------------------------------------------------------------------
#: Number of ``log2|x|`` histogram bins.
HIST_BINS = 256
#: ``floor(log2|x|) + EXP_BIAS`` is the bin of ``x`` (clipped to ``0 .. HIST_BINS - 1``): float32's exponent bias.
EXP_BIAS = 127
#: float32: the bin is the biased exponent field, ``(bits >> F32_MANTISSA_BITS) & F32_EXP_MASK``.
F32_MANTISSA_BITS = 23
F32_EXP_MASK = 0xFF
#: float64: the bin is ``clip(((bits >> F64_MANTISSA_BITS) & 0x7FF) - F64_BIN_OFFSET, 0, HIST_BINS - 1)``.
F64_MANTISSA_BITS = 52
F64_BIN_OFFSET = 1023 - EXP_BIAS
#: ``frexp``: ``|x| = m * 2**e`` with ``m`` in ``[0.5, 1)``, so ``floor(log2|x|) = e - 1`` and the bin is
#: ``clip(e + FREXP_BIN_OFFSET, 0, HIST_BINS - 1)``.
FREXP_BIN_OFFSET = EXP_BIAS - 1


def hist_bins(abs_nonzero: np.ndarray) -> np.ndarray:
    """The histogram bin of each finite, non-zero magnitude (the numpy reference of the rule above).

    Args:
        abs_nonzero: finite, non-zero values (their sign is ignored), any float dtype.

    Returns:
        int64 bins in ``0 .. HIST_BINS - 1``.
    """
    _, e = np.frexp(np.abs(abs_nonzero))
    return np.clip(e.astype(np.int64) + FREXP_BIN_OFFSET, 0, HIST_BINS - 1)


# ---- the row layout -----------------------------------------------------------------------------------------------
COUNT, ZEROS, NAN, POSINF, NEGINF, POSITIVE = range(6)
SUM, SUM_SQ, MIN, MAX = range(6, 10)
HIST = 10
#: Width of one row (int64 words).
ROW = HIST + HIST_BINS
#: The integer fields, in column order (columns ``0 .. 5``), then the float fields (columns ``6 .. 9``).
INT_FIELDS = ("count", "zeros", "nan", "posinf", "neginf", "positive")
FLOAT_FIELDS = ("sum", "sum_sq", "min", "max")


@dataclass
class Rows:
    """Summaries on the host as one ``(n, ROW)`` int64 matrix, with per-row unit counts.

    Attributes:
        rows: ``rows[i]`` is row ``i`` (see the module docstring for its columns).
        units: per row, the per-unit activity counts (int64), or ``None`` when not recorded.
        units_total: per row, the entries per unit (0 without units).
    """

    rows: np.ndarray
    units: list[np.ndarray | None]
    units_total: list[int]

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def ints(self) -> np.ndarray:
        """``(n, 6)`` int64: count, zeros, nan, posinf, neginf, positive."""
        return self.rows[:, : POSITIVE + 1]

    @property
    def floats(self) -> np.ndarray:
        """``(n, 4)`` float64: sum, sum_sq, min, max."""
        return np.ascontiguousarray(self.rows[:, SUM : MAX + 1]).view(np.float64)

    @property
    def hist(self) -> np.ndarray:
        """``(n, 256)`` int64 histogram bins."""
        return self.rows[:, HIST:]

    @classmethod
    def concat(cls, parts: Sequence[Rows]) -> Rows:
        """The rows of ``parts``, in order."""
        if len(parts) == 1:
            return parts[0]
        rows = np.concatenate([p.rows for p in parts]) if parts else np.zeros((0, ROW), dtype=np.int64)
        return cls(rows, [u for p in parts for u in p.units], [t for p in parts for t in p.units_total])


def empty_rows(numels: Sequence[int]) -> np.ndarray:
    """Rows of tensors not yet summarised: ``count`` set, ``min``/``max`` the identities of min/max, the rest 0."""
    rows = np.zeros((len(numels), ROW), dtype=np.int64)
    rows[:, COUNT] = numels
    rows[:, MIN] = np.array(math.inf).view(np.int64)
    rows[:, MAX] = np.array(-math.inf).view(np.int64)
    return rows


# ---- wire forms -----------------------------------------------------------------------------------------------------
def rows_at(arr: np.ndarray, units: Sequence[tuple[int, int] | None], offset: int = 0) -> tuple[Rows, int]:
    """Decode one batch of the int64 wire form from ``arr`` at ``offset``.

    Args:
        arr: the host copy of a packed int64 buffer.
        units: per row, ``(n_units, units_total)`` or ``None`` (its length is the number of rows).
        offset: where the batch starts in ``arr``.

    Returns:
        The batch's rows (views into ``arr``) and the offset just past the batch.
    """
    n = len(units)
    rows = arr[offset : offset + n * ROW].reshape(n, ROW)
    offset += n * ROW
    active: list[np.ndarray | None] = []
    totals: list[int] = []
    for u in units:
        if u is None:
            active.append(None)
            totals.append(0)
            continue
        n_units, total = u
        active.append(arr[offset : offset + n_units])
        totals.append(total)
        offset += n_units
    return Rows(rows, active, totals), offset


@dataclass(frozen=True)
class Layout:
    """The float64 wire form of ``n`` rows: ``n x ROW`` words, then ``[units_total, active...]`` per unit row.

    Attributes:
        units: per row, the number of units counted, or ``None`` for no unit counts.
    """

    units: tuple[int | None, ...]

    @property
    def n(self) -> int:
        """Number of rows."""
        return len(self.units)

    @property
    def size(self) -> int:
        """Length of the packed float64 vector."""
        return self.n * ROW + sum(1 + u for u in self.units if u)


def rows_from_float64(vec: np.ndarray, layout: Layout) -> Rows:
    """Decode the float64 wire form (see :class:`Layout`) into :class:`Rows`.

    Args:
        vec: the packed float64 vector.
        layout: the layout it was packed with.

    Returns:
        The rows, in packing order.
    """
    n = layout.n
    f = np.asarray(vec, dtype=np.float64)[: n * ROW].reshape(n, ROW)
    rows = np.empty((n, ROW), dtype=np.int64)
    rows[:, :SUM] = f[:, :SUM]  # counts and bins: exact integers in float64 (the sums may be NaN/Inf: not cast)
    rows[:, HIST:] = f[:, HIST:]
    rows[:, SUM : MAX + 1] = np.ascontiguousarray(f[:, SUM : MAX + 1]).view(np.int64)
    pos = n * ROW
    units: list[np.ndarray | None] = []
    totals: list[int] = []
    for u in layout.units:
        if not u:
            units.append(None)
            totals.append(0)
            continue
        totals.append(int(vec[pos]))
        units.append(np.asarray(vec[pos + 1 : pos + 1 + u]).astype(np.int64))
        pos += 1 + u
    return Rows(rows, units, totals)


# ---- merge and encode -----------------------------------------------------------------------------------------------
def merge_rows(tensor_ids: Sequence[int], rows: Rows) -> tuple[list[int], Rows]:
    """Merge the rows of the same tensor id, in first-seen order.

    Follows :func:`gradsight.summary.merge` field by field with array operations: counts, bins and sums add (in
    row order), min/max take the extreme, per-unit counts add when every non-empty part has them with the same
    length (else none; the empty summary is the identity).

    Returns:
        The distinct tensor ids and their merged rows.
    """
    tids = list(tensor_ids)
    if len(set(tids)) == len(tids):
        return tids, rows
    order: dict[int, int] = {}
    for t in tids:
        order.setdefault(t, len(order))
    at = np.array([order[t] for t in tids], dtype=np.intp)
    n = len(order)
    src = rows.rows
    out = np.zeros((n, ROW), dtype=np.int64)
    np.add.at(out[:, : POSITIVE + 1], at, src[:, : POSITIVE + 1])
    np.add.at(out[:, HIST:], at, src[:, HIST:])
    floats = rows.floats
    m = np.zeros((n, 4), dtype=np.float64)
    np.add.at(m[:, 0], at, floats[:, 0])
    np.add.at(m[:, 1], at, floats[:, 1])
    m[:, 2] = math.inf
    m[:, 3] = -math.inf
    np.minimum.at(m[:, 2], at, floats[:, 2])
    np.maximum.at(m[:, 3], at, floats[:, 3])
    out[:, SUM : MAX + 1] = m.view(np.int64)
    parts: list[list[tuple[np.ndarray | None, int, int]]] = [[] for _ in range(n)]
    for k, j in enumerate(at.tolist()):
        parts[j].append((rows.units[k], rows.units_total[k], int(src[k, COUNT])))
    units: list[np.ndarray | None] = []
    totals: list[int] = []
    for ps in parts:
        ps = [p for p in ps if p[0] is not None or p[2]]  # the empty summary is the identity of merge
        if ps and all(p[0] is not None and p[0].shape == ps[0][0].shape for p in ps):
            units.append(np.sum([p[0] for p in ps], axis=0))
            totals.append(sum(p[1] for p in ps))
        else:
            units.append(None)
            totals.append(0)
    return list(order), Rows(out, units, totals)


@dataclass
class SummaryArrays:
    """One step's summaries for the run writer: ``rows`` row ``i`` describes tensor ``tensor_ids[i]``."""

    tensor_ids: list[int]
    rows: Rows


def encode_rows(step: int, tensor_ids: Sequence[int], rows: Rows) -> list[tuple[Any, ...]]:
    """The store's ``summaries`` records of ``rows`` (column-wise array operations, then one ``zip``).

    A record is ``(step, tensor_id, count, sum, sum_sq, min, max, zeros, nan, posinf, neginf, positive, hist_lo,
    hist, units_total, units)``: the histogram stored from its first to its last non-zero bin (``hist_lo`` and
    little-endian int64 bytes; both ``None`` when empty), per-unit counts as little-endian int64 bytes.
    """
    n = len(tensor_ids)
    if n == 0:
        return []
    hist = np.ascontiguousarray(rows.hist, dtype="<i8")
    nz = hist != 0
    has = nz.any(axis=1).tolist()
    lo = nz.argmax(axis=1).tolist()
    hi = (HIST_BINS - nz[:, ::-1].argmax(axis=1)).tolist()
    ints = np.asarray(rows.ints, dtype=np.int64).T.tolist()  # count, zeros, nan, posinf, neginf, positive
    floats = rows.floats.T.tolist()  # sum, sum_sq, min, max
    hist_lo = [lo[i] if has[i] else None for i in range(n)]
    blobs = [hist[i, lo[i] : hi[i]].tobytes() if has[i] else None for i in range(n)]
    totals = [None if u is None else int(t) for u, t in zip(rows.units, rows.units_total, strict=True)]
    units = [None if u is None else np.ascontiguousarray(u, dtype="<i8").tobytes() for u in rows.units]
    return list(
        zip(
            [int(step)] * n,
            [int(t) for t in tensor_ids],
            ints[0],
            *floats,
            *ints[1:],
            hist_lo,
            blobs,
            totals,
            units,
            strict=True,
        )
    )
