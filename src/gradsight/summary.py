"""TensorSummary: the one definition of every statistic gradsight records, with its numpy reference.

A :class:`TensorSummary` describes one tensor at one step with a fixed set of *additive* sufficient statistics
(counts, sums, sums of squares, histogram bin counts) plus ``min``/``max``. Everything else (mean, std, RMS, L2
norm, quantiles of ``|x|``, active rates) is derived from them. Because the stored fields are additive (or
min/max), summaries are **mergeable**: the summary of a concatenation equals ``merge`` of the parts' summaries,
and ``merge`` is associative and commutative. That is what makes statistics correct across data-parallel ranks,
across windows of steps, and across the halves of a tensor.

This module is the reference implementation, in numpy. Framework adapters compute the same fields on the
tensor's own device and must agree with :func:`summarize`: exactly for every count and histogram bin, to
floating-point tolerance for ``sum`` and ``sum_sq``.

Definitions (``x`` is the tensor, flattened):

* ``count``: number of elements, non-finite ones included.
* ``nan``, ``posinf``, ``neginf``: elements that are NaN, +Inf, -Inf. ``finite = count - nan - posinf - neginf``.
* ``sum``, ``sum_sq``: sum of ``x`` and of ``x**2`` over the finite elements, accumulated in float64. Non-finite
  values are counted above and never poison the sums.
* ``min``, ``max``: over the finite elements; ``+inf``/``-inf`` (the identities of min/max) when there are none.
* ``zeros``: elements exactly equal to 0 (either sign). ``positive``: finite elements > 0.
* ``hist``: 256 bin counts of ``log2|x|`` over the finite, non-zero elements. Bin ``f`` holds

  - ``f = 0``: ``0 < |x| < 2**-126`` (float32's subnormal range; smaller float64 magnitudes land here too);
  - ``f = 1 .. 254``: ``2**(f-127) <= |x| < 2**(f-126)``, i.e. ``floor(log2|x|) == f - 127``. For float32 ``f``
    is exactly the biased exponent field of the IEEE-754 bits, so a device kernel can read it from the bits;
  - ``f = 255``: ``|x| >= 2**128`` (reachable by float64 tensors only).

  Zeros, NaNs and infinities are not in ``hist``; they have their own counts.
* ``units_active`` (optional, layer outputs only): for each unit (a feature of a dense output, a channel of a
  conv output) how many entries — samples times positions — were active, i.e. ``!= 0`` (NaN counts as active:
  a unit emitting NaN is broken, not dead). ``units_total`` is the number of entries per unit.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._errors import InputError
from ._frameworks import framework_of
from ._packing import EXP_BIAS, FLOAT_FIELDS, HIST, HIST_BINS, INT_FIELDS, MAX, ROW, SUM, Rows, hist_bins

__all__ = [
    "HIST_BINS",
    "TensorSummary",
    "from_rows",
    "hist_edges",
    "merge",
    "merge_all",
    "summarize",
    "to_rows",
]

# The bin rule (``floor(log2|x|) + EXP_BIAS``, clipped to 0 .. 255) and its constants live in ._packing, the
# one place the device kernels take them from too.
_EXP_BIAS = EXP_BIAS
_SQRT2 = math.sqrt(2.0)


def hist_edges() -> np.ndarray:
    """The lower edges of the 256 ``log2|x|`` bins: ``0`` for bin 0, then ``2**(f-127)``.

    Returns:
        A float64 array of length 256; bin ``f`` spans ``[edges[f], edges[f+1])``, the last bin is open above.
    """
    edges = np.ldexp(1.0, np.arange(HIST_BINS) - _EXP_BIAS)
    edges[0] = 0.0
    return edges


@dataclass(eq=False)
class TensorSummary:
    """Mergeable statistics of one tensor at one step.

    Build one with :func:`summarize` (numpy) or a framework adapter; combine with :func:`merge`. Every field but
    ``min`` and ``max`` is additive, so the summary of a concatenation is the merge of its parts' summaries.

    Attributes:
        count: number of elements, non-finite ones included.
        sum: sum of the finite elements, accumulated in float64.
        sum_sq: sum of the squares of the finite elements, accumulated in float64.
        min: smallest finite element (``+inf`` when there is none).
        max: largest finite element (``-inf`` when there is none).
        zeros: elements exactly equal to 0 (either sign).
        nan: NaN elements.
        posinf: +Inf elements.
        neginf: -Inf elements.
        positive: finite elements > 0.
        hist: 256 bin counts of ``log2|x|`` over the finite, non-zero elements: bin ``f`` (1 to 254) counts
            ``2**(f-127) <= |x| < 2**(f-126)``; bin 0 counts ``0 < |x| < 2**-126``, bin 255 ``|x| >= 2**128``.
        units_active: layer outputs only: for each unit (feature or channel), the entries that were ``!= 0``
            (NaN counts as active); ``None`` when not recorded.
        units_total: layer outputs only: the entries per unit (samples times positions); 0 when not recorded.
    """

    count: int = 0
    sum: float = 0.0
    sum_sq: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    zeros: int = 0
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    positive: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, dtype=np.int64))
    units_active: np.ndarray | None = None
    units_total: int = 0

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def nonfinite(self) -> int:
        """Elements that are NaN or infinite."""
        return self.nan + self.posinf + self.neginf

    @property
    def finite(self) -> int:
        """Elements that are finite (the population of ``sum``, ``sum_sq``, ``min``, ``max``)."""
        return self.count - self.nonfinite

    @property
    def mean(self) -> float:
        """Mean of the finite elements (NaN when there are none)."""
        return self.sum / self.finite if self.finite else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation of the finite elements, from ``sum`` and ``sum_sq``.

        Computed as ``sqrt(max(sum_sq/finite - mean**2, 0))`` in float64; its relative error grows like
        ``eps64 * mean**2 / var``, negligible unless the mean dwarfs the spread by ~1e6.
        """
        if not self.finite:
            return math.nan
        if math.isinf(self.sum_sq):
            return math.inf
        m = self.sum / self.finite
        return math.sqrt(max(self.sum_sq / self.finite - m * m, 0.0))

    @property
    def rms(self) -> float:
        """Root mean square of the finite elements."""
        return math.sqrt(self.sum_sq / self.finite) if self.finite else math.nan

    @property
    def l2(self) -> float:
        """L2 norm of the finite elements."""
        return math.sqrt(self.sum_sq)

    @property
    def units(self) -> int:
        """Number of units with activity counts (0 when none were recorded)."""
        return 0 if self.units_active is None else int(self.units_active.size)

    @property
    def active_rate(self) -> np.ndarray | None:
        """Per-unit fraction of entries that were active (``!= 0``), or ``None`` when not recorded."""
        if self.units_active is None or self.units_total == 0:
            return None
        return self.units_active / self.units_total

    def quantile_abs(self, q: float) -> float:
        """Approximate ``q``-quantile of ``|x|`` over the finite elements, from ``zeros`` and ``hist``.

        The element of rank ``ceil(q * finite)`` (1-based; rank 1 for ``q = 0``) is located in its bin and the
        bin's geometric midpoint ``2**(f - 126.5)`` is returned, clipped to ``max(|min|, |max|)``.
        Error bound: for bins 1..254 the true quantile lies within a factor ``sqrt(2)`` of the estimate
        (``estimate / sqrt(2) <= true < estimate * sqrt(2)``); a quantile falling among the zeros is exact (0);
        bin 0 returns ``2**-127`` (true value in ``(0, 2**-126)``), bin 255 returns ``2**128`` (a lower bound).

        Args:
            q: the quantile, in ``[0, 1]``.

        Returns:
            The estimate, or NaN when there are no finite elements.
        """
        if not 0.0 <= q <= 1.0:
            raise InputError(f"quantile_abs: q must be in [0, 1], got {q!r}.")
        finite = self.finite
        if finite == 0:
            return math.nan
        rank = max(1, math.ceil(q * finite))
        if rank <= self.zeros:
            return 0.0
        cum = np.cumsum(self.hist) + self.zeros
        f = int(np.searchsorted(cum, rank, side="left"))
        f = min(f, HIST_BINS - 1)
        estimate = math.ldexp(_SQRT2, f - _EXP_BIAS)  # geometric midpoint 2**(f - 126.5)
        if f == 0:
            estimate = math.ldexp(1.0, -_EXP_BIAS)
        elif f == HIST_BINS - 1:
            estimate = math.ldexp(1.0, HIST_BINS - 1 - _EXP_BIAS)
        max_abs = max(abs(self.min), abs(self.max))
        return min(estimate, max_abs)

    # ---- representation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form of the stored fields (arrays as lists), JSON-serialisable except for ±inf."""
        out: dict[str, Any] = {
            "count": self.count,
            "sum": self.sum,
            "sum_sq": self.sum_sq,
            "min": self.min,
            "max": self.max,
            "zeros": self.zeros,
            "nan": self.nan,
            "posinf": self.posinf,
            "neginf": self.neginf,
            "positive": self.positive,
            "hist": self.hist.tolist(),
        }
        if self.units_active is not None:
            out["units_active"] = self.units_active.tolist()
            out["units_total"] = self.units_total
        return out

    def __eq__(self, other: object) -> bool:
        """Exact equality of every stored field (use ``approx_equal`` for sums computed elsewhere)."""
        if not isinstance(other, TensorSummary):
            return NotImplemented
        return self.approx_equal(other, rtol=0.0, atol=0.0)

    __hash__ = None  # type: ignore[assignment]

    def approx_equal(self, other: TensorSummary, *, rtol: float = 1e-7, atol: float = 0.0) -> bool:
        """Whether counts, bins, min/max and units agree exactly and the sums agree to ``rtol``/``atol``."""
        exact = ("count", "zeros", "nan", "posinf", "neginf", "positive", "units_total", "min", "max")
        if any(getattr(self, k) != getattr(other, k) for k in exact):
            return False
        if not np.array_equal(self.hist, other.hist):
            return False
        if (self.units_active is None) != (other.units_active is None):
            return False
        if self.units_active is not None and not np.array_equal(self.units_active, other.units_active):
            return False
        return all(
            math.isclose(getattr(self, k), getattr(other, k), rel_tol=rtol, abs_tol=atol) for k in ("sum", "sum_sq")
        )

    def __repr__(self) -> str:
        parts = [f"count={self.count}", f"mean={self.mean:.4g}", f"std={self.std:.4g}", f"rms={self.rms:.4g}"]
        parts.append(f"min={self.min:.4g}")
        parts.append(f"max={self.max:.4g}")
        parts.append(f"zeros={self.zeros}")
        if self.nonfinite:
            parts.append(f"nan={self.nan}, posinf={self.posinf}, neginf={self.neginf}")
        if self.units_active is not None:
            parts.append(f"units={self.units}")
        return f"TensorSummary({', '.join(parts)})"


def _check_unit_axis(unit_axis: Any) -> int | None:
    """``unit_axis`` as an int or ``None``.

    Raises:
        InputError: neither an int nor ``None``.
    """
    if unit_axis is None:
        return None
    try:
        axis = None if isinstance(unit_axis, bool) else operator.index(unit_axis)
    except TypeError:
        axis = None
    if axis is None:
        raise InputError(
            f"summarize: unit_axis must be an int (the axis of units) or None, got {type(unit_axis).__name__} "
            f"{unit_axis!r:.40}; e.g. unit_axis=1 for a dense output of shape (batch, features)."
        )
    return axis


def _torch_array(t: Any) -> np.ndarray:
    """A torch tensor's values as numpy, exactly: detached, on the CPU, dense.

    bfloat16 (and the other floats numpy lacks) are upcast to float32, which represents each of their values exactly.

    Raises:
        InputError: a meta tensor (it has a shape but no values).
    """
    if getattr(t, "is_meta", False):
        raise InputError(
            f"summarize: got a meta tensor of shape {tuple(t.shape)} — it has a shape but no values to summarize. "
            "Summarize the materialized tensor instead (e.g. after model.to_empty(device='cpu') and initialisation)."
        )
    t = t.detach()
    if str(getattr(t, "layout", "torch.strided")) != "torch.strided":  # sparse (COO, CSR, ...): every entry counts
        t = t.to_dense()
    t = t.cpu()
    if t.is_floating_point() and str(t.dtype) not in ("torch.float16", "torch.float32", "torch.float64"):
        t = t.float()
    return t.numpy()


def summarize(x: Any, *, unit_axis: int | None = None) -> TensorSummary:
    """The reference summary of an array, in numpy.

    Args:
        x: anything ``numpy.asarray`` accepts with a floating dtype (float16, bfloat16 via ml_dtypes, float32,
            float64), or a torch tensor: one that requires grad is detached, a sparse one summarized densely (its
            zeros count), a bfloat16 one upcast to float32 (exact). Integer and boolean arrays are refused: their
            gradients do not exist.
        unit_axis: when given, also count per-unit activity along this axis (the feature axis of a dense
            output, the channel axis of a conv output); every other axis counts as samples/positions.

    Returns:
        The :class:`TensorSummary` of ``x``.

    Raises:
        InputError: ``x`` is not floating point, is a torch meta tensor (no values), or ``unit_axis`` is not an int
            in range.
    """
    unit_axis = _check_unit_axis(unit_axis)
    a = _torch_array(x) if framework_of(x) == "torch" and hasattr(x, "detach") else np.asarray(x)
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise InputError(
            f"summarize: expected a floating-point array, got dtype {a.dtype.name!r} with shape {a.shape}. "
            "Statistics of weights/gradients/activations are only defined for float tensors; "
            "convert with a.astype(np.float32) if the values are really real numbers."
        )
    a64 = a.astype(np.float64, copy=False).reshape(-1)
    nan = np.isnan(a64)
    posinf = a64 == np.inf
    neginf = a64 == -np.inf
    fin = a64[~(nan | posinf | neginf)]
    nz = fin[fin != 0.0]
    hist = np.zeros(HIST_BINS, dtype=np.int64)
    if nz.size:
        hist += np.bincount(hist_bins(nz), minlength=HIST_BINS)
    with np.errstate(over="ignore"):  # |x| > 1.3e154 squares to inf, as it would on the device
        sum_sq = float(np.dot(fin, fin)) if fin.size else 0.0
    s = TensorSummary(
        count=int(a64.size),
        sum=float(fin.sum()) if fin.size else 0.0,
        sum_sq=sum_sq,
        min=float(fin.min()) if fin.size else math.inf,
        max=float(fin.max()) if fin.size else -math.inf,
        zeros=int(fin.size - nz.size),
        nan=int(nan.sum()),
        posinf=int(posinf.sum()),
        neginf=int(neginf.sum()),
        positive=int((nz > 0).sum()),
        hist=hist,
    )
    if unit_axis is not None:
        if a.ndim == 0 or not -a.ndim <= unit_axis < a.ndim:
            raise InputError(
                f"summarize: unit_axis={unit_axis!r} is out of range for an array of shape {a.shape}; "
                f"expected an axis in [{-a.ndim}, {a.ndim - 1}]."
            )
        active = np.moveaxis(a.astype(np.float64, copy=False) != 0.0, unit_axis, -1)
        n_units = active.shape[-1]
        s.units_active = active.reshape(-1, n_units).sum(axis=0).astype(np.int64) if n_units else np.zeros(0, np.int64)
        s.units_total = int(a.size // n_units) if n_units else 0
    return s


def merge(a: TensorSummary, b: TensorSummary) -> TensorSummary:
    """The summary of the concatenation of two tensors, from their summaries.

    Associative and commutative (exactly for every count, bin and min/max; up to float rounding for the sums).
    Per-unit counts merge only when both sides have the same number of units; a side without units is taken
    to mean "not recorded", and the merge then keeps none — except the empty summary ``TensorSummary()``,
    which is the identity of ``merge``.

    Args:
        a: a summary.
        b: another summary.

    Returns:
        A new :class:`TensorSummary`; neither input is modified.

    Raises:
        InputError: ``a`` or ``b`` is not a :class:`TensorSummary`.
    """
    for arg, value in (("a", a), ("b", b)):
        if not isinstance(value, TensorSummary):
            raise InputError(
                f"merge: {arg} must be a TensorSummary, got {type(value).__name__} {value!r:.60}. Summarize an "
                "array first: merge(summarize(x), summarize(y)); merge_all([]) is the empty summary."
            )
    units_active: np.ndarray | None = None
    units_total = 0
    if a.count == 0 and a.units_active is None:  # the empty summary is the identity
        a, b = b, a
    if b.count == 0 and b.units_active is None:
        units_active = None if a.units_active is None else a.units_active.copy()
        units_total = a.units_total
    elif a.units_active is not None and b.units_active is not None:
        if a.units_active.shape != b.units_active.shape:
            raise InputError(
                f"merge: cannot merge per-unit counts of {a.units} and {b.units} units; summaries of the same "
                "layer output always have the same number of units — are these two different layers?"
            )
        units_active = a.units_active + b.units_active
        units_total = a.units_total + b.units_total
    return TensorSummary(
        count=a.count + b.count,
        sum=a.sum + b.sum,
        sum_sq=a.sum_sq + b.sum_sq,
        min=min(a.min, b.min),
        max=max(a.max, b.max),
        zeros=a.zeros + b.zeros,
        nan=a.nan + b.nan,
        posinf=a.posinf + b.posinf,
        neginf=a.neginf + b.neginf,
        positive=a.positive + b.positive,
        hist=a.hist + b.hist,
        units_active=units_active,
        units_total=units_total,
    )


def merge_all(summaries: Iterable[TensorSummary]) -> TensorSummary:
    """Merge any number of summaries; the empty summary (the identity of :func:`merge`) when there are none."""
    return functools.reduce(merge, summaries, TensorSummary())


def from_rows(rows: Rows) -> list[TensorSummary]:
    """The :class:`TensorSummary` of every row of packed rows (see :mod:`gradsight._packing`), in order."""
    out = []
    for i in range(len(rows)):
        r = rows.rows[i]
        s, s2, mn, mx = (float(v) for v in r[SUM : MAX + 1].view(np.float64))
        ints = dict(zip(INT_FIELDS, (int(v) for v in r[: len(INT_FIELDS)]), strict=True))
        u = rows.units[i]
        out.append(
            TensorSummary(
                **ints,
                sum=s,
                sum_sq=s2,
                min=mn,
                max=mx,
                hist=r[HIST:].copy(),
                units_active=None if u is None else np.asarray(u, dtype=np.int64).copy(),
                units_total=rows.units_total[i] if u is not None else 0,
            )
        )
    return out


def to_rows(summaries: Iterable[TensorSummary]) -> Rows:
    """Packed rows (see :mod:`gradsight._packing`) of some summaries, in order."""
    ss = list(summaries)
    rows = np.zeros((len(ss), ROW), dtype=np.int64)
    if ss:
        rows[:, : len(INT_FIELDS)] = [[getattr(s, f) for f in INT_FIELDS] for s in ss]
        floats = np.array([[getattr(s, f) for f in FLOAT_FIELDS] for s in ss], dtype=np.float64)
        rows[:, SUM : MAX + 1] = floats.view(np.int64)
        rows[:, HIST:] = np.stack([np.asarray(s.hist, dtype=np.int64) for s in ss])
    units = [None if s.units_active is None else np.asarray(s.units_active, dtype=np.int64) for s in ss]
    totals = [int(s.units_total) if s.units_active is not None else 0 for s in ss]
    return Rows(rows, units, totals)
