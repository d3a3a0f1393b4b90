"""On-device summary kernels for torch tensors: the same numbers as :func:`gradsight.summary.summarize`.

The work is batched across tensors: tensors are flattened and concatenated per dtype group (float32, and
float64; float16/bfloat16 are upcast to float32, which is exact), and each group is summarised by a handful of
whole-buffer kernels instead of a handful of kernels per tensor. Every tensor's result is one **row** of
``ROW = 266`` int64 words (float64 fields bit-cast)::

    [count, zeros, nan, posinf, neginf, positive, sum, sum_sq, min, max, hist[0] .. hist[255]]

Two kernel sets compute the rows; both are exact for every count, bin, min and max, and accumulate ``sum`` and
``sum_sq`` in float64 (so they agree with the numpy reference to float64 rounding, not just float32's):

* **exact, any device, no host sync** (:func:`_rows_exact`): one ``bincount`` over a 10-bit code read from the
  float32 bits (bit 9: mantissa is non-zero, bit 8: sign, bits 0-7: the biased exponent field
  ``bits >> 23 & 0xFF``) plus ``1024 * segment``. From those 1024 counts per tensor follow exactly: ``zeros``
  (exponent 0, mantissa 0), histogram bin 0 (subnormals), bins 1..254 (the exponent field), ``posinf``/
  ``neginf`` (exponent 255, mantissa 0), ``nan`` (exponent 255, mantissa non-zero) and ``positive``. float64
  tensors use ``torch.frexp`` and a 516-code layout (256 positive bins, 256 negative bins, zeros, nan, +inf,
  -inf) because their bins reach 0 and 255 differently. Sums over the finite elements (non-finite replaced by
  0) in float64, min/max per tensor with ``torch._foreach_max`` over the finite elements. The 1024 counts are
  folded into rows on the device.
* **compiled, CPU float32** (:func:`gradsight._kernels.rows_f32`, from :meth:`Flat.stats`): where the C
  kernel ``gradsight._ckernels`` was built at install time, one pass over each element gives everything (the 512
  sign-and-exponent codes, zeros and infinities that split their edge bins, float64 sums, min and max), ≈ 0.4–0.5
  ns per element with AVX2 against ≈ 2.5 ns for the numpy/torch kernels below, which stand in for it where it was
  not built. It takes every float32 group of a batch in one call, and ``Flat.of(copy=False)`` then reads every
  contiguous float32 tensor in place (no copy into a shared buffer). Where every tensor of such a batch is a
  plain contiguous CPU float32 tensor (a CPU model's case), the batch is only a list of numpy views, and one call
  of :func:`gradsight._kernels.summaries_f32` makes all of its rows and per-unit activity counts, with no Python
  work per tensor beyond the view; a channel-first output's row and counts come from one pass.
* **fast, CPU float32** (:func:`_rows_f32_cpu`), used where reading a result costs no device sync: a 9-bit code
  ``bits >> 23`` (sign and exponent field, two integer passes instead of eight) and ``bincount``. The bins it
  cannot split — exponent 0 (zeros vs subnormals) and 255 (infinities vs NaN) — are checked on the host right
  away: a tensor with exponent-0 elements gets one count of its non-zeros (numpy) to confirm they are all zeros; any
  exponent-255 element, or any subnormal, sends the group to the exact kernels (rare: a broken step). Min/max and
  the float64 sums then need no masking (every element is finite): numpy ``reduceat`` over the float32 data and
  over a float64 copy (``sum``, then squared in place for ``sum_sq``; a float32 squared is exact in float64).
  The batch is walked in pieces of at most ``_PIECE`` elements (whole small tensors together, large tensors
  split), through two per-thread scratch buffers: every pass runs in cache and no call allocates large
  temporaries — on CPU, fresh multi-megabyte buffers cost more in page faults than the kernels that fill them.

Everything a batch computes is packed into **one int64 device buffer** (the rows, then the per-unit activity
counts), so a logged step costs exactly one device→host copy (:class:`PackedStats`); on CUDA the copy goes to
pinned memory with ``non_blocking=True`` and the host waits for it on the run writer's thread, not on the training
thread. Decoding is plain numpy: :func:`to_host_rows` keeps the rows as one matrix (the watch's fast path, encoded
by the run writer with array operations), :func:`unpack` / :func:`to_host` build
:class:`~gradsight.summary.TensorSummary` objects.

Memory: a batch temporarily holds a copy of its tensors (the concatenation) plus a few same-sized buffers; large
batches are processed in chunks of at most ``CHUNK_ELEMENTS`` elements per kernel set to bound that.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ... import _kernels
from ..._packing import (
    COUNT,
    F32_EXP_MASK,
    F32_MANTISSA_BITS,
    FREXP_BIN_OFFSET,
    HIST,
    HIST_BINS,
    MAX,
    POSITIVE,
    ROW,
    SUM,
    ZEROS,
    Rows,
    empty_rows,
    rows_at,
)
from ...summary import TensorSummary, from_rows

__all__ = [
    "CHUNK_ELEMENTS",
    "ROW",
    "Flat",
    "PackedStats",
    "Rows",
    "compiled_in_place",
    "summarize_tensor",
    "summarize_tensors",
    "to_host",
    "to_host_rows",
    "unpack",
]

#: Upper bound on the number of elements one kernel set processes at once (bounds temporary memory).
CHUNK_ELEMENTS = 1 << 24
_W32 = 1024  # codes per tensor in the exact float32 layout
_W64 = 516  # codes per tensor in the float64 layout
_W9 = 512  # codes per tensor in the fast CPU float32 layout (sign, exponent field)
_LOW_PRECISION = (torch.float16, torch.bfloat16)

# Rows (``ROW`` int64 words per tensor, float64 fields bit-cast) follow the one layout of gradsight._packing.


def _group_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    if dtype == torch.float32 or dtype in _LOW_PRECISION:
        return torch.float32
    raise TypeError(f"cannot summarise a tensor of dtype {dtype}; expected a floating-point tensor.")


@dataclass
class _Group:
    """Tensors of one dtype group, concatenated: ``index`` are the positions of its tensors in the batch."""

    dtype: torch.dtype
    index: list[int]
    numels: list[int]
    flat: torch.Tensor
    rows: torch.Tensor | None = None  # its summary row, where the compiled kernel made it with the unit counts


@dataclass
class Flat:
    """Tensors flattened into one buffer per dtype group and chunk (a copy: later in-place changes don't show).

    ``Flat.of(tensors)`` makes the copy; ``after.minus(before)`` is the elementwise difference of two batches
    with the same layout (used for the update ``W_after - W_before``); ``Flat.join`` puts several batches into
    one, so that they are summarised by one kernel set.
    """

    _groups: list[_Group] | None  # None: a host batch's, made when first asked for (see ``groups``)
    numels: list[int]
    units: list[tuple[int, int] | None] = field(default_factory=list)  # (n_units, units_total) per tensor
    unit_counts: list[torch.Tensor] = field(default_factory=list)
    #: Every tensor of the batch read in place by the compiled kernel, which summarises them (rows and unit
    #: counts) in one call at ``stats()``; ``unit_counts`` is then empty (see :func:`_host_f32`).
    host: _HostF32 | None = None

    @property
    def groups(self) -> list[_Group]:
        """The batch's groups; a host batch has one per non-empty tensor (its flat view), made on first use."""
        if self._groups is None:
            assert self.host is not None
            self._groups = [
                _Group(torch.float32, [i], [n], torch.from_numpy(a.reshape(-1)))
                for i, (a, n) in enumerate(zip(self.host.arrays, self.numels, strict=True))
                if n
            ]
        return self._groups

    @classmethod
    def of(
        cls, tensors: Sequence[torch.Tensor], unit_axes: Sequence[int | None] | None = None, *, copy: bool = True
    ) -> Flat:
        """Copy ``tensors`` into per-dtype flat buffers; count per-unit activity where ``unit_axes`` says.

        Args:
            tensors: floating-point tensors on one device (any shapes, zero-size allowed).
            unit_axes: per tensor, the unit axis for activity counts, or ``None`` for none.
            copy: ``False`` when the batch is summarised at once and the tensors don't change before that: a
                contiguous tensor of at least ``_ALONE`` elements in its group's dtype then becomes a group of
                its own, read in place instead of copied (small tensors are still copied together, so that one
                kernel set summarises them). With the compiled kernel, a batch of plain contiguous CPU float32
                tensors is read in place whole, and summarised by one kernel call (:func:`_host_f32`).

        Returns:
            The batch.
        """
        if not copy and _kernels.available():
            host = _host_f32(tensors, unit_axes)
            if host is not None:
                return host
        numels = [t.numel() for t in tensors]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            if numels[i]:
                by_dtype.setdefault(_group_dtype(t.dtype), []).append(i)
        groups: list[_Group] = []
        own: dict[int, _Group] = {}  # tensors read in place, alone in their group
        for dtype, idx in by_dtype.items():
            if not copy:
                alone = [j for j in idx if _in_place(tensors[j], dtype)]
                for j in alone:
                    own[j] = _Group(dtype, [j], [numels[j]], tensors[j].detach().reshape(-1))
                    groups.append(own[j])
                if alone:
                    taken = set(alone)
                    idx = [j for j in idx if j not in taken]
            for chunk in _chunks(idx, numels):
                parts = [tensors[j].detach().reshape(-1) for j in chunk]
                flat = torch.cat([p.to(dtype) if p.dtype != dtype else p for p in parts])
                groups.append(_Group(dtype, chunk, [numels[j] for j in chunk], flat))
        units: list[tuple[int, int] | None] = []
        unit_counts: list[torch.Tensor] = []
        if unit_axes is not None:
            for i, (t, axis) in enumerate(zip(tensors, unit_axes, strict=True)):
                if axis is None or t.dim() == 0:
                    units.append(None)
                    continue
                n_units = int(t.shape[axis])
                units.append((n_units, numels[i] // n_units if n_units else 0))
                if not n_units:
                    continue
                g = own.get(i)
                if g is not None and _fused(g, t, axis % t.dim()):  # the row and the counts in one pass
                    fused = _kernels.rows_units_f32(t.detach().numpy(), axis % t.dim())
                    assert fused is not None  # _fused() said the kernel is there
                    g.rows = torch.from_numpy(fused[0]).reshape(1, -1)
                    unit_counts.append(torch.from_numpy(fused[1]))
                else:
                    unit_counts.append(_unit_counts(t.detach(), axis % t.dim()))
        else:
            units = [None] * len(tensors)
        return cls(groups, numels, units, unit_counts)

    @classmethod
    def join(cls, flats: Sequence[Flat]) -> Flat:
        """One batch holding the tensors of ``flats`` in order, summarised by one ``stats()``.

        No copy: the batches' buffers stay as they are, as groups of the joined batch.
        """
        flats = list(flats)
        if len(flats) == 1:
            return flats[0]
        hosts = [f.host for f in flats]
        if all(h is not None for h in hosts):  # still one call of the compiled kernel for all of them
            host = _HostF32([a for h in hosts for a in h.arrays], [x for h in hosts for x in h.axes])
            return cls(None, [n for f in flats for n in f.numels], [u for f in flats for u in f.units], [], host)
        flats = [f._counted() for f in flats]  # summarised group by group: a host batch counts its units now
        numels: list[int] = []
        units: list[tuple[int, int] | None] = []
        unit_counts: list[torch.Tensor] = []
        groups: list[_Group] = []
        for f in flats:
            off = len(numels)
            groups.extend(_Group(g.dtype, [i + off for i in g.index], g.numels, g.flat, g.rows) for g in f.groups)
            numels.extend(f.numels)
            units.extend(f.units if f.units else [None] * len(f.numels))
            unit_counts.extend(f.unit_counts)
        return cls(groups, numels, units, unit_counts)

    def _counted(self) -> Flat:
        """This batch with its unit counts computed, to be summarised group by group (not in one kernel call)."""
        if self.host is None:
            return self
        counts = [
            _unit_counts(torch.from_numpy(a), axis)
            for a, axis, u in zip(self.host.arrays, self.host.axes, self.units, strict=True)
            if axis is not None and u is not None and u[0]
        ]
        return Flat(self.groups, self.numels, self.units, counts)

    def minus(self, before: Flat, *, inplace: bool = False) -> Flat:
        """``self - before`` elementwise, for two batches made from tensors of the same shapes and dtypes.

        The two may group their tensors differently (one made with ``copy=False``, which reads some tensors in
        place, the other with ``copy=True``); the difference is then taken tensor by tensor, in each tensor's
        group dtype. With ``inplace=True`` the difference overwrites this batch's buffers where both group their
        tensors alike (this batch must not be used otherwise).
        """
        if [g.index for g in self.groups] == [g.index for g in before.groups]:
            groups = [
                _Group(a.dtype, a.index, a.numels, a.flat.sub_(b.flat) if inplace else a.flat - b.flat)
                for a, b in zip(self.groups, before.groups, strict=True)
            ]
            return Flat(groups, self.numels, [None] * len(self.numels), [])
        empty = torch.empty(0)
        diffs = [
            empty if a is None or b is None else a - b for a, b in zip(self._parts(), before._parts(), strict=True)
        ]
        return Flat.of(diffs, copy=False)

    def take(self, indices: Sequence[int]) -> Flat:
        """The batch of this batch's tensors at ``indices``, in that order (views of its buffers, no copy)."""
        parts = self._parts()
        empty = torch.empty(0)
        return Flat.of([empty if parts[i] is None else parts[i] for i in indices], copy=False)

    def _parts(self) -> list[torch.Tensor | None]:
        """Each tensor's elements, flat, in its group's dtype (``None`` for an empty tensor, which has no group)."""
        parts: list[torch.Tensor | None] = [None] * len(self.numels)
        for g in self.groups:
            offset = 0
            for i, n in zip(g.index, g.numels, strict=True):
                parts[i] = g.flat[offset : offset + n]
                offset += n
        return parts

    def stats(self) -> PackedStats:
        """Summarise the batch on its device; returns the packed (still on-device) result."""
        if self.host is not None:
            packed = _kernels.summaries_f32(self.host.arrays, self.host.axes)
            assert packed is not None  # the host batch was made because the kernel is there
            layout = [(False, [i]) for i, n in enumerate(self.numels) if n]
            return PackedStats(torch.from_numpy(packed), [_Layout(self.numels, layout, self.units)])
        device = self.groups[0].flat.device if self.groups else None
        if device is None and self.unit_counts:
            device = self.unit_counts[0].device
        n = len(self.numels)
        compiled: list[_Group] = []  # every one in one call of the compiled kernel
        parts = []
        for g in self.groups:
            if g.rows is not None:  # made with its unit counts (Flat.of)
                parts.append((g.index, g.rows))
            elif _compiled(g):
                compiled.append(g)
            else:
                parts.append((g.index, _group_rows(g)))
        if compiled:
            rows_c = _kernels.rows_f32([g.flat.numpy() for g in compiled], [g.numels for g in compiled])
            assert rows_c is not None  # _compiled() said the kernel is there
            parts.append(([i for g in compiled for i in g.index], torch.from_numpy(rows_c)))
        if len(parts) == 1 and parts[0][0] == list(range(n)):  # one part holding every tensor, in order
            rows = parts[0][1]
        else:
            rows = _empty_rows(self.numels, device)
            for index, r in parts:
                rows[torch.tensor(index, device=device)] = r
        buf = torch.cat([rows.reshape(-1), *self.unit_counts]) if self.unit_counts else rows.reshape(-1)
        layout = [(g.dtype == torch.float64, g.index) for g in self.groups]
        return PackedStats(buf, [_Layout(self.numels, layout, self.units)])


@dataclass
class _HostF32:
    """Tensors read in place by the compiled kernel: their numpy views and unit axes (``None``: no counts)."""

    arrays: list[np.ndarray]
    axes: list[int | None]


def _host_f32(tensors: Sequence[torch.Tensor], unit_axes: Sequence[int | None] | None) -> Flat | None:
    """``Flat.of(tensors, unit_axes, copy=False)`` where every tensor is a plain contiguous CPU float32 tensor.

    The common CPU case: the compiled kernel reads each tensor where it is, and summarises the whole batch, rows
    and unit counts, in one call (at ``stats()``), with no per-tensor work in Python beyond taking a view.
    ``None`` where some tensor is not such a tensor (the general path takes the batch).
    """
    if unit_axes is not None and len(unit_axes) != len(tensors):
        return None  # (the general path says what is wrong)
    arrays: list[np.ndarray] = []
    axes: list[int | None] = []
    numels: list[int] = []
    units: list[tuple[int, int] | None] = []
    for i, t in enumerate(tensors):
        if not (t.dtype == torch.float32 and _plain_cpu(t) and t.is_contiguous()):
            return None
        a = (t.detach() if t.requires_grad else t).numpy()
        n = a.size
        numels.append(n)
        arrays.append(a)
        axis = None if unit_axes is None or a.ndim == 0 else unit_axes[i]
        if axis is None:
            units.append(None)
        else:
            axis %= a.ndim
            n_units = a.shape[axis]
            units.append((n_units, n // n_units if n_units else 0))
        axes.append(axis)
    return Flat(None, numels, units, [], _HostF32(arrays, axes))


def _in_place(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``Flat.of(..., copy=False)`` reads ``t`` in place.

    It does when ``t`` is contiguous, already in ``dtype``, and large (``_ALONE`` elements) — or of any size where
    the compiled kernel reads it (CPU float32): that kernel takes any number of buffers in one call, so a copy
    into a shared buffer buys nothing.
    """
    if t.dtype != dtype or not t.is_contiguous():
        return False
    return t.numel() >= _ALONE or (dtype == torch.float32 and _plain_cpu(t) and _kernels.available())


def _plain_cpu(t: torch.Tensor) -> bool:
    """A plain strided CPU tensor (or parameter), whose memory numpy can read: not a subclass such as ``DTensor``."""
    return type(t) in (torch.Tensor, nn.Parameter) and t.is_cpu and t.layout == torch.strided


def compiled_in_place(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``Flat.of(tensors, copy=False)`` reads every one of ``tensors`` in place for the compiled kernel."""
    return _kernels.available() and all(
        t.dtype == torch.float32 and _plain_cpu(t) and t.is_contiguous() for t in tensors
    )


def f32_addresses(tensors: Sequence[torch.Tensor]) -> tuple[list[int], list[int]] | None:
    """Data pointers and sizes of ``tensors`` for :func:`gradsight._kernels.norms_at_f32`, if it reads them all.

    ``None`` unless :func:`compiled_in_place` holds: every tensor plain, C-contiguous, float32 and on the CPU.
    """
    if not compiled_in_place(tensors):
        return None
    return [t.data_ptr() for t in tensors], [t.numel() for t in tensors]


def _compiled(g: _Group) -> bool:
    """Whether the compiled kernel summarises group ``g`` (CPU float32, contiguous, the kernel built)."""
    return g.dtype == torch.float32 and _plain_cpu(g.flat) and _kernels.available() and g.flat.is_contiguous()


#: A unit's elements must lie together in runs of at least this many for the fused row-and-counts kernel to pay.
_FUSE_RUN = 32


def _fused(g: _Group, t: torch.Tensor, axis: int) -> bool:
    """Whether the compiled kernel makes ``t``'s summary row and its unit counts along ``axis`` in one pass.

    It does for a tensor read in place by the compiled kernel (group ``g``, of ``t`` alone) whose units' elements
    lie together in runs of ``_FUSE_RUN`` or more: a channel-first convolution output, not a dense layer's
    ``(N, F)`` output, whose units interleave element by element.
    """
    return math.prod(t.shape[axis + 1 :]) >= _FUSE_RUN and _compiled(g)


def _unit_counts(t: torch.Tensor, axis: int) -> torch.Tensor:
    """The number of non-zero entries of each unit (index along ``axis``) of ``t``, int64, on ``t``'s device.

    NaN != 0, so a unit emitting NaN counts as active, as in the reference. CPU float32 tensors are counted by the
    compiled kernel where it was built (:func:`gradsight._kernels.unit_counts_f32`), else, like float64 ones, by
    numpy (:func:`_unit_counts_np`; torch's ``count_nonzero`` over several dims is ~10x slower there).
    """
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        a = t.numpy()
        counts = _kernels.unit_counts_f32(a, axis) if a.dtype == np.float32 else None  # compiled, where built
        return torch.from_numpy(counts if counts is not None else _unit_counts_np(a, axis))
    dims = tuple(d for d in range(t.dim()) if d != axis)
    if dims:  # (count_nonzero reads an empty dim tuple as "all dims")
        return torch.count_nonzero(t, dim=dims).reshape(-1)
    return t.ne(0).to(torch.int64)


def _unit_counts_np(a: np.ndarray, axis: int) -> np.ndarray:
    """:func:`_unit_counts` of a C-contiguous array: ``!= 0`` into a reused bool scratch, block by block.

    The array is seen as ``(pre, units, post)``; blocks of whole ``(units, post)`` rows (or of units within one
    row, when a row is larger than the scratch) are compared and their bytes summed per unit.
    """
    pre = math.prod(a.shape[:axis])
    units = a.shape[axis]
    post = math.prod(a.shape[axis + 1 :])
    a3 = a.reshape(pre, units, post)
    counts = np.zeros(units, dtype=np.int64)
    ublock = units if units * post <= _PIECE else max(1, _PIECE // max(post, 1))
    rows = max(1, _PIECE // max(ublock * post, 1))
    scratch = _WS.bools(rows * ublock * post)
    inner = np.uint16 if post < (1 << 16) else np.int64  # per (row, unit) sums: no overflow
    for r in range(0, pre, rows):
        for u in range(0, units, ublock):
            x = a3[r : r + rows, u : u + ublock]
            m = scratch[: x.size].reshape(x.shape)
            np.not_equal(x, 0, out=m)
            b = m.view(np.uint8)
            if post == 1:
                counts[u : u + ublock] += np.add.reduce(b[:, :, 0], axis=0, dtype=np.int64)
            else:
                counts[u : u + ublock] += np.add.reduce(b, axis=2, dtype=inner).sum(0, dtype=np.int64)
    return counts


def _count_nonzero_np(a: np.ndarray) -> int:
    """Non-zero entries of a 1-d array (NaN counts), through the reused bool scratch, piece by piece."""
    scratch = _WS.bools(min(a.size, _PIECE))
    n = 0
    for lo in range(0, a.size, _PIECE):
        x = a[lo : lo + _PIECE]
        m = scratch[: x.size]
        np.not_equal(x, 0, out=m)
        n += int(np.count_nonzero(m))
    return n


def _chunks(idx: list[int], numels: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    chunk: list[int] = []
    size = 0
    for i in idx:
        if chunk and size + numels[i] > CHUNK_ELEMENTS:
            out.append(chunk)
            chunk, size = [], 0
        chunk.append(i)
        size += numels[i]
    if chunk:
        out.append(chunk)
    return out


def _empty_rows(numels: list[int], device: torch.device | None) -> torch.Tensor:
    """Rows for tensors not yet summarised (see :func:`gradsight._packing.empty_rows`), on ``device``."""
    t = torch.from_numpy(empty_rows(numels))
    return t if device is None or device.type == "cpu" else t.to(device)


_SEG_CACHE: dict[tuple[Any, ...], torch.Tensor] = {}
_SEG_CACHE_ELEMENTS = 1 << 21  # cache segment codes of batches up to this size (4 bytes per element)


def _seg_codes(numels: list[int], width: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    """``width * segment + offset`` for every element of a concatenation of segments of lengths ``numels`` (int32).

    Small layouts are cached (a few, keyed by device, width and lengths): a watch summarises the same
    parameter layout at every logged step.
    """
    total = sum(numels)
    key = (device, width, offset, tuple(numels))
    cached = _SEG_CACHE.get(key)
    if cached is not None:
        return cached
    base = torch.arange(len(numels), device=device, dtype=torch.int32) * width + offset
    seg = torch.repeat_interleave(base, torch.tensor(numels, device=device), output_size=total)
    if total <= _SEG_CACHE_ELEMENTS:
        if len(_SEG_CACHE) >= 16:
            _SEG_CACHE.pop(next(iter(_SEG_CACHE)))
        _SEG_CACHE[key] = seg
    return seg


_STARTS_CACHE: dict[tuple[int, ...], np.ndarray] = {}


def _starts(numels: list[int]) -> np.ndarray:
    """Offsets of the segments of lengths ``numels`` in their concatenation (cached per layout)."""
    key = tuple(numels)
    starts = _STARTS_CACHE.get(key)
    if starts is None:
        starts = np.zeros(len(numels), dtype=np.intp)
        np.cumsum(numels[:-1], out=starts[1:])
        if len(_STARTS_CACHE) >= 64:
            _STARTS_CACHE.pop(next(iter(_STARTS_CACHE)))
        _STARTS_CACHE[key] = starts
    return starts


def _group_rows(g: _Group) -> torch.Tensor:
    """``(n, ROW)`` int64 rows for one group's tensors, on the group's device."""
    if g.dtype == torch.float32 and g.flat.device.type == "cpu":
        rows = _rows_f32_cpu(g)
        if rows is not None:
            return rows
    return _rows_exact(g)


class _Workspace(threading.local):
    """Per-thread scratch buffers of the fast CPU kernels (``_PIECE`` elements: 1.5 MiB), reused across calls.

    The kernels walk a batch in pieces of at most ``_PIECE`` elements, so that every pass over a piece runs in
    cache and no call allocates (and page-faults) multi-megabyte temporaries.
    """

    def __init__(self) -> None:
        self.codes = torch.empty(0, dtype=torch.int32)
        self.f64 = torch.empty(0, dtype=torch.float64)
        self.bool = np.empty(0, dtype=bool)

    def bools(self, n: int) -> np.ndarray:
        """A bool scratch array of at least ``n`` elements (grown to at least ``_PIECE``, never shrunk)."""
        if self.bool.size < n:
            self.bool = np.empty(max(n, _PIECE), dtype=bool)
        return self.bool

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.codes.numel() < _PIECE:
            self.codes = torch.empty(_PIECE, dtype=torch.int32)
            self.f64 = torch.empty(_PIECE, dtype=torch.float64)
        return self.codes, self.f64


_PIECE = 1 << 17
_ALONE = _PIECE  # Flat.of(copy=False): tensors this large are read in place, in a group of their own
_WS = _Workspace()


@dataclass
class _Piece:
    """A range ``[lo, hi)`` of a batch: part of one tensor (``seg is None``) or several whole tensors."""

    lo: int
    hi: int
    index: np.ndarray  # the tensors (segments) in the piece
    starts: np.ndarray  # their starts, relative to lo
    seg: torch.Tensor | None  # 512 * (segment within the piece) + 256 per element, for several tensors


_PLAN_CACHE: dict[tuple[int, ...], list[_Piece]] = {}


def _plan(numels: list[int]) -> list[_Piece]:
    """Cut a batch of tensors of sizes ``numels`` into pieces of at most ``_PIECE`` elements (cached per layout)."""
    key = tuple(numels)
    plan = _PLAN_CACHE.get(key)
    if plan is not None:
        return plan
    plan = []
    group: list[int] = []
    lo = off = 0

    def close() -> None:
        if not group:
            return
        sizes = [numels[k] for k in group]
        starts = np.zeros(len(group), dtype=np.intp)
        np.cumsum(sizes[:-1], out=starts[1:])
        seg = None
        if len(group) > 1:
            base = torch.arange(len(group), dtype=torch.int32) * _W9 + 256
            seg = torch.repeat_interleave(base, torch.tensor(sizes), output_size=sum(sizes))
        plan.append(_Piece(lo, lo + sum(sizes), np.array(group, dtype=np.intp), starts, seg))
        group.clear()

    for k, m in enumerate(numels):
        if m > _PIECE:
            close()
            for a in range(0, m, _PIECE):
                plan.append(_Piece(off + a, off + min(m, a + _PIECE), np.array([k]), np.zeros(1, dtype=np.intp), None))
        else:
            if group and off + m - lo > _PIECE:
                close()
            if not group:
                lo = off
            group.append(k)
        off += m
    close()
    if len(_PLAN_CACHE) >= 32:
        _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
    _PLAN_CACHE[key] = plan
    return plan


def _rows_f32_cpu(g: _Group) -> torch.Tensor | None:
    """The fast CPU float32 kernels (see the module docstring); ``None`` when the exact kernels are needed."""
    flat, numels, n = g.flat, g.numels, len(g.numels)
    plan = _plan(numels)
    codes, f64 = _WS.get()
    bits = flat.view(torch.int32)
    c = np.zeros((n, _W9), dtype=np.int64)  # per tensor: [negative, positive] x exponent field
    for p in plan:
        cp = codes[: p.hi - p.lo]
        torch.bitwise_right_shift(bits[p.lo : p.hi], F32_MANTISSA_BITS, out=cp)  # sign and exponent, -256 .. 255
        if p.seg is None:
            cp.add_(256)
            c[p.index[0]] += torch.bincount(cp, minlength=_W9).numpy()
        else:
            cp.add_(p.seg)
            c[p.index] += torch.bincount(cp, minlength=len(p.index) * _W9).numpy().reshape(-1, _W9)
    c = c.reshape(n, 2, 256)
    if c[:, :, 255].any():  # an Inf or NaN: the exact kernels split them
        return None
    exp0 = c[:, 0, 0] + c[:, 1, 0]
    a = flat.numpy()
    if exp0.any():  # exponent-0 elements are zeros unless some are subnormals
        starts = _starts(numels)
        for k in np.flatnonzero(exp0).tolist():
            if numels[k] - _count_nonzero_np(a[starts[k] : starts[k] + numels[k]]) != exp0[k]:
                return None
    floats = np.zeros((n, 4), dtype=np.float64)
    floats[:, 2] = math.inf
    floats[:, 3] = -math.inf
    for p in plan:
        x = a[p.lo : p.hi]
        yt = f64[: p.hi - p.lo]
        yt.copy_(flat[p.lo : p.hi])
        y = yt.numpy()
        i = p.index
        floats[i, 2] = np.minimum(floats[i, 2], np.minimum.reduceat(x, p.starts))
        floats[i, 3] = np.maximum(floats[i, 3], np.maximum.reduceat(x, p.starts))
        floats[i, 0] += np.add.reduceat(y, p.starts)
        np.square(y, out=y)  # exact: a float32 squared fits a float64
        floats[i, 1] += np.add.reduceat(y, p.starts)
    rows = np.empty((n, ROW), dtype=np.int64)
    rows[:, COUNT] = numels
    rows[:, ZEROS] = exp0
    rows[:, ZEROS + 1 : POSITIVE] = 0  # nan, posinf, neginf
    hist = rows[:, HIST:]
    np.add(c[:, 0], c[:, 1], out=hist)
    hist[:, 0] = 0
    rows[:, POSITIVE] = c[:, 1, 1:255].sum(1)
    rows[:, SUM : MAX + 1] = floats.view(np.int64)
    return torch.from_numpy(rows)


def _rows_exact(g: _Group) -> torch.Tensor:
    """The exact kernels (any device, no host sync): rows folded on the device from the code counts."""
    flat, n = g.flat, len(g.numels)
    seg = _seg_codes(g.numels, _W32 if g.dtype == torch.float32 else _W64, flat.device)
    if g.dtype == torch.float32:
        bits = flat.view(torch.int32)
        code = bits >> F32_MANTISSA_BITS
        code &= (F32_EXP_MASK << 1) | 1  # sign and exponent field
        mant = bits & 0x7FFFFF
        mant += 0x7FFFFF  # >= 2**23 exactly when the mantissa is non-zero
        mant >>= 14
        mant &= 0x200
        code |= mant
        code += seg
        c = torch.bincount(code, minlength=n * _W32).view(n, 2, 2, 256)  # [mantissa non-zero, sign, exponent]
        hist = torch.zeros(n, HIST_BINS, dtype=torch.int64, device=flat.device)
        hist[:, 0] = c[:, 1, :, 0].sum(1)
        hist[:, 1:255] = c[:, :, :, 1:255].sum((1, 2))
        zeros = c[:, 0, :, 0].sum(1)
        posinf, neginf = c[:, 0, 0, 255], c[:, 0, 1, 255]
        nan = c[:, 1, :, 255].sum(1)
        positive = c[:, :, 0, 0:255].sum((1, 2)) - c[:, 0, 0, 0]
        fin0 = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0).to(torch.float64)
    else:
        _, e = torch.frexp(flat)
        code = (e.to(torch.int32) + FREXP_BIN_OFFSET).clamp_(0, HIST_BINS - 1)
        code += (flat < 0).to(torch.int32) << 8
        code = torch.where(flat == 0, 512, code)
        code = torch.where(torch.isnan(flat), 513, code)
        code = torch.where(flat == math.inf, 514, code)
        code = torch.where(flat == -math.inf, 515, code)
        code += seg
        c = torch.bincount(code, minlength=n * _W64).view(n, _W64)
        hist = c[:, :256] + c[:, 256:512]
        positive = c[:, :256].sum(1)
        zeros, nan, posinf, neginf = c[:, 512], c[:, 513], c[:, 514], c[:, 515]
        fin0 = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    views = list(fin0.split(g.numels))
    sums = torch.stack([v.sum() for v in views])
    sum_sq = torch.stack(torch._foreach_norm(views)).square_()
    hi = torch.nan_to_num(flat, nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    lo = torch.nan_to_num(flat, nan=math.inf, posinf=math.inf, neginf=math.inf).neg_()
    maxs = torch.stack(torch._foreach_max(list(hi.split(g.numels)))).to(torch.float64)
    mins = torch.stack(torch._foreach_max(list(lo.split(g.numels)))).to(torch.float64).neg_()
    count = torch.tensor(g.numels, dtype=torch.int64, device=flat.device)
    ints = torch.stack([count, zeros, nan, posinf, neginf, positive], 1)
    floats = torch.stack([sums, sum_sq, mins, maxs], 1).view(torch.int64)
    return torch.cat([ints, floats, hist], 1)


@dataclass
class _Layout:
    numels: list[int]
    groups: list[tuple[bool, list[int]]]  # (is_float64, tensor positions) per group, in kernel order
    units: list[tuple[int, int] | None]


class PackedStats:
    """Summaries of one or more batches in one int64 buffer, still on the device.

    Per batch (:class:`_Layout`): one row of ``ROW`` words per tensor, in the batch's tensor order, then the
    per-unit activity counts of the tensors that have them. ``PackedStats.concat`` joins several (so a logged
    step makes one copy); :func:`to_host` / :func:`to_host_rows` copy it.
    """

    def __init__(self, buf: torch.Tensor, layouts: list[_Layout]) -> None:
        self.buf = buf
        self.layouts = layouts

    @staticmethod
    def concat(packs: Sequence[PackedStats]) -> PackedStats:
        """One buffer holding every pack, in order."""
        packs = [p for p in packs if p.layouts]
        if not packs:
            return PackedStats(torch.zeros(0, dtype=torch.int64), [])
        bufs = [p.buf for p in packs]
        device = next((b.device for b in bufs if b.numel()), bufs[0].device)
        buf = torch.cat([b.to(device) for b in bufs]) if len(bufs) > 1 else bufs[0]
        return PackedStats(buf, [lay for p in packs for lay in p.layouts])


def _start_copy(buf: torch.Tensor) -> tuple[torch.Tensor, Callable[[], Any]]:
    """Start the device→host copy of ``buf``; returns the host tensor and a function that waits for it."""
    if buf.device.type == "cpu":
        return buf, lambda: None
    if buf.device.type == "cuda":
        host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
        host.copy_(buf, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event.synchronize
    return buf.to("cpu"), lambda: None  # other devices: a plain synchronous copy


def to_host(packed: PackedStats) -> Callable[[], list[TensorSummary]]:
    """Start the one device→host copy of ``packed``; returns a zero-argument function that unpacks it.

    On CUDA the copy is asynchronous (pinned memory, ``non_blocking=True``); the returned function waits for it,
    so calling it on another thread (the run writer's) keeps the wait off the training thread.
    """
    host, wait = _start_copy(packed.buf)
    layouts = packed.layouts

    def finish() -> list[TensorSummary]:
        wait()
        arr = host.numpy()
        out: list[TensorSummary] = []
        offset = 0
        for layout in layouts:
            summaries, offset = unpack(arr, layout, offset)
            out.extend(summaries)
        return out

    return finish


def _rows_at(arr: np.ndarray, layout: _Layout, offset: int) -> tuple[Rows, int]:
    return rows_at(arr, layout.units, offset)


def to_host_rows(packed: PackedStats) -> Callable[[], Rows]:
    """Like :func:`to_host`, but the returned function gives the summaries as one :class:`Rows` (no objects)."""
    host, wait = _start_copy(packed.buf)
    layouts = packed.layouts

    def finish() -> Rows:
        wait()
        arr = host.numpy()
        parts = []
        offset = 0
        for layout in layouts:
            rows, offset = _rows_at(arr, layout, offset)
            parts.append(rows)
        return Rows.concat(parts)

    return finish


def unpack(arr: np.ndarray, layout: _Layout, offset: int = 0) -> tuple[list[TensorSummary], int]:
    """Decode one batch's part of a host copy of a packed buffer, starting at ``offset``.

    Returns:
        The summaries in the batch's tensor order, and the offset just past the batch's part.
    """
    rows, offset = _rows_at(arr, layout, offset)
    return from_rows(rows), offset


def summarize_tensors(
    tensors: Sequence[torch.Tensor], unit_axes: Sequence[int | None] | None = None
) -> list[TensorSummary]:
    """Summaries of several tensors, computed in one batch on their device (one device→host copy).

    Args:
        tensors: floating-point tensors on one device.
        unit_axes: per tensor, the axis of units for activity counts (``None``: no unit counts).

    Returns:
        One :class:`~gradsight.summary.TensorSummary` per tensor, equal to ``summarize(t.cpu().numpy())``
        exactly for counts, bins, min and max, and to float64 rounding for the sums.
    """
    return to_host(Flat.of(tensors, unit_axes).stats())()


def summarize_tensor(t: torch.Tensor, *, unit_axis: int | None = None) -> TensorSummary:
    """The summary of one tensor (see :func:`summarize_tensors`)."""
    return summarize_tensors([t], [unit_axis])[0]
