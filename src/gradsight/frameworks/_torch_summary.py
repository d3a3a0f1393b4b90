"""On-device summary kernels for torch tensors: the same numbers as :func:`gradsight.summary.summarize`.

The work is batched across tensors: tensors are flattened and concatenated per dtype group (float32, and
float64; float16/bfloat16 are upcast to float32, which is exact), and each group is summarised by a handful of
whole-buffer kernels instead of a handful of kernels per tensor:

* **counts and histogram** — one ``bincount`` over a 10-bit code read from the float32 bits (bit 9: mantissa is
  non-zero, bit 8: sign, bits 0-7: the biased exponent field ``bits >> 23 & 0xFF``) plus ``1024 * segment``.
  From those 1024 counts per tensor follow exactly: ``zeros`` (exponent 0, mantissa 0), histogram bin 0
  (subnormals), bins 1..254 (the exponent field), ``posinf``/``neginf`` (exponent 255, mantissa 0), ``nan``
  (exponent 255, mantissa non-zero) and ``positive``. float64 tensors use ``torch.frexp`` and a 516-code layout
  (256 positive bins, 256 negative bins, zeros, nan, +inf, -inf) because their bins reach 0 and 255 differently.
* **sums** — ``sum`` and ``sum_sq`` over the finite elements, **accumulated in float64 on the device** (the float32
  buffer is upcast once; non-finite values are replaced by 0 first), so they agree with the numpy reference to
  about float64 rounding, not just float32's.
* **min/max** — over the finite elements (non-finite replaced by the identity ``∓inf``), per tensor with
  ``torch._foreach_max``; exact, since float32 values are exactly representable in float64.
* **per-unit activity** — ``(x != 0)`` summed over every axis except the unit axis, per tensor.

Everything a batch computes is packed into **one int64 device buffer** (float64 fields bit-cast), so a logged
step costs exactly one device→host copy (:class:`PackedStats`); on CUDA the copy goes to pinned memory with
``non_blocking=True`` and the host waits for it on the run writer's thread, not on the training thread. Unpacking
into :class:`~gradsight.summary.TensorSummary` objects is plain numpy (:func:`unpack`).

Memory: a batch temporarily holds a copy of its tensors (the concatenation) plus a few same-sized buffers; large
batches are processed in chunks of at most ``CHUNK_ELEMENTS`` elements per kernel set to bound that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..summary import HIST_BINS, TensorSummary

__all__ = [
    "CHUNK_ELEMENTS",
    "Flat",
    "PackedStats",
    "summarize_tensor",
    "summarize_tensors",
    "to_host",
    "unpack",
]

#: Upper bound on the number of elements one kernel set processes at once (bounds temporary memory).
CHUNK_ELEMENTS = 1 << 24
_W32 = 1024  # codes per tensor in the float32 layout
_W64 = 516  # codes per tensor in the float64 layout
_LOW_PRECISION = (torch.float16, torch.bfloat16)


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


@dataclass
class Flat:
    """Tensors flattened into one buffer per dtype group and chunk (a copy: later in-place changes don't show).

    ``Flat.of(tensors)`` makes the copy; ``after.minus(before)`` is the elementwise difference of two batches
    with the same layout (used for the update ``W_after - W_before``).
    """

    groups: list[_Group]
    numels: list[int]
    units: list[tuple[int, int] | None] = field(default_factory=list)  # (n_units, units_total) per tensor
    unit_counts: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor], unit_axes: Sequence[int | None] | None = None) -> Flat:
        """Copy ``tensors`` into per-dtype flat buffers; count per-unit activity where ``unit_axes`` says.

        Args:
            tensors: floating-point tensors on one device (any shapes, zero-size allowed).
            unit_axes: per tensor, the unit axis for activity counts, or ``None`` for none.

        Returns:
            The batch.
        """
        numels = [int(t.numel()) for t in tensors]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            if numels[i]:
                by_dtype.setdefault(_group_dtype(t.dtype), []).append(i)
        groups: list[_Group] = []
        for dtype, idx in by_dtype.items():
            chunk: list[int] = []
            size = 0
            for i in [*idx, -1]:
                if i == -1 or (chunk and size + numels[i] > CHUNK_ELEMENTS):
                    parts = [tensors[j].detach().reshape(-1) for j in chunk]
                    flat = torch.cat([p.to(dtype) if p.dtype != dtype else p for p in parts])
                    groups.append(_Group(dtype, chunk, [numels[j] for j in chunk], flat))
                    chunk, size = [], 0
                if i != -1:
                    chunk.append(i)
                    size += numels[i]
        units: list[tuple[int, int] | None] = []
        unit_counts: list[torch.Tensor] = []
        if unit_axes is not None:
            for i, (t, axis) in enumerate(zip(tensors, unit_axes, strict=True)):
                if axis is None or t.dim() == 0:
                    units.append(None)
                    continue
                n_units = int(t.shape[axis])
                units.append((n_units, numels[i] // n_units if n_units else 0))
                if n_units:
                    moved = t.detach().movedim(axis, -1).reshape(-1, n_units)
                    unit_counts.append(moved.ne(0).sum(0, dtype=torch.int64))
        else:
            units = [None] * len(tensors)
        return cls(groups, numels, units, unit_counts)

    def minus(self, before: Flat) -> Flat:
        """``self - before`` elementwise, for two batches made from tensors of the same shapes and dtypes."""
        groups = [
            _Group(a.dtype, a.index, a.numels, a.flat - b.flat) for a, b in zip(self.groups, before.groups, strict=True)
        ]
        return Flat(groups, self.numels, [None] * len(self.numels), [])

    def stats(self) -> PackedStats:
        """Summarise the batch on its device; returns the packed (still on-device) result."""
        parts: list[torch.Tensor] = []
        for g in self.groups:
            parts.extend(_group_stats(g))
        parts.extend(self.unit_counts)
        device = self.groups[0].flat.device if self.groups else None
        if device is None and self.unit_counts:
            device = self.unit_counts[0].device
        buf = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        layout = [(g.dtype == torch.float64, g.index) for g in self.groups]
        return PackedStats(buf, [_Layout(self.numels, layout, self.units)])


_SEG_CACHE: dict[tuple[Any, ...], torch.Tensor] = {}
_SEG_CACHE_ELEMENTS = 1 << 21  # cache segment codes of batches up to this size (4 bytes per element)


def _seg_codes(numels: list[int], width: int, device: torch.device) -> torch.Tensor:
    """``width * segment`` for every element of a concatenation of segments of lengths ``numels`` (int32).

    Small layouts are cached (a few, keyed by device, width and lengths): a watch summarises the same
    parameter layout at every logged step.
    """
    total = sum(numels)
    key = (device, width, tuple(numels))
    cached = _SEG_CACHE.get(key)
    if cached is not None:
        return cached
    base = torch.arange(len(numels), device=device, dtype=torch.int32) * width
    seg = torch.repeat_interleave(base, torch.tensor(numels, device=device), output_size=total)
    if total <= _SEG_CACHE_ELEMENTS:
        if len(_SEG_CACHE) >= 16:
            _SEG_CACHE.pop(next(iter(_SEG_CACHE)))
        _SEG_CACHE[key] = seg
    return seg


def _group_stats(g: _Group) -> list[torch.Tensor]:
    """Packed int64 parts for one group: codes counts, then sum, sum_sq, min, max (float64 bit-cast)."""
    flat, n = g.flat, len(g.numels)
    seg = _seg_codes(g.numels, _W32 if g.dtype == torch.float32 else _W64, flat.device)
    if g.dtype == torch.float32:
        bits = flat.view(torch.int32)
        code = bits >> 23
        code &= 0x1FF  # sign and exponent field
        mant = bits & 0x7FFFFF
        mant += 0x7FFFFF  # >= 2**23 exactly when the mantissa is non-zero
        mant >>= 14
        mant &= 0x200
        code |= mant
        code += seg
        counts = torch.bincount(code, minlength=n * _W32)
        fin0 = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0).to(torch.float64)
    else:
        _, e = torch.frexp(flat)
        code = (e.to(torch.int32) + 126).clamp_(0, HIST_BINS - 1)
        code += (flat < 0).to(torch.int32) << 8
        code = torch.where(flat == 0, 512, code)
        code = torch.where(torch.isnan(flat), 513, code)
        code = torch.where(flat == math.inf, 514, code)
        code = torch.where(flat == -math.inf, 515, code)
        code += seg
        counts = torch.bincount(code, minlength=n * _W64)
        fin0 = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    views = list(fin0.split(g.numels))
    sums = torch.stack([v.sum() for v in views])
    sum_sq = torch.stack(torch._foreach_norm(views)).square_()
    hi = torch.nan_to_num(flat, nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    lo = torch.nan_to_num(flat, nan=math.inf, posinf=math.inf, neginf=math.inf).neg_()
    maxs = torch.stack(torch._foreach_max(list(hi.split(g.numels)))).to(torch.float64)
    mins = torch.stack(torch._foreach_max(list(lo.split(g.numels)))).to(torch.float64).neg_()
    floats = torch.stack([sums, sum_sq, mins, maxs]).reshape(-1)
    return [counts, floats.view(torch.int64)]


@dataclass
class _Layout:
    numels: list[int]
    groups: list[tuple[bool, list[int]]]  # (is_float64, tensor positions) per group, in buffer order
    units: list[tuple[int, int] | None]


class PackedStats:
    """Summaries of one or more batches in one int64 buffer, still on the device.

    ``PackedStats.concat`` joins several (so a logged step makes one copy); :func:`to_host` copies it.
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


def to_host(packed: PackedStats) -> Callable[[], list[TensorSummary]]:
    """Start the one device→host copy of ``packed``; returns a zero-argument function that unpacks it.

    On CUDA the copy is asynchronous (pinned memory, ``non_blocking=True``); the returned function waits for it,
    so calling it on another thread (the run writer's) keeps the wait off the training thread.
    """
    buf = packed.buf
    layouts = packed.layouts
    if buf.device.type == "cpu":
        host = buf

        def wait() -> None:
            return None

    elif buf.device.type == "cuda":
        host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
        host.copy_(buf, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        wait = event.synchronize
    else:  # other devices: a plain synchronous copy
        host = buf.to("cpu")

        def wait() -> None:
            return None

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


def unpack(arr: np.ndarray, layout: _Layout, offset: int = 0) -> tuple[list[TensorSummary], int]:
    """Decode one batch's part of a host copy of a packed buffer, starting at ``offset``.

    Returns:
        The summaries in the batch's tensor order, and the offset just past the batch's part.
    """
    out = [TensorSummary(count=n) for n in layout.numels]
    for is64, index in layout.groups:
        n = len(index)
        width = _W64 if is64 else _W32
        counts = arr[offset : offset + n * width].reshape(n, width)
        offset += n * width
        floats = arr[offset : offset + 4 * n].view(np.float64).reshape(4, n)
        offset += 4 * n
        if is64:
            hist = counts[:, :256] + counts[:, 256:512]
            positive = counts[:, :256].sum(1)
            zeros, nan, posinf, neginf = (counts[:, k] for k in range(512, 516))
        else:
            c = counts.reshape(n, 2, 2, 256)  # [mantissa non-zero, sign, exponent field]
            hist = np.zeros((n, HIST_BINS), dtype=np.int64)
            hist[:, 0] = c[:, 1, :, 0].sum(1)
            hist[:, 1:255] = c[:, :, :, 1:255].sum((1, 2))
            zeros = c[:, 0, :, 0].sum(1)
            posinf, neginf = c[:, 0, 0, 255], c[:, 0, 1, 255]
            nan = c[:, 1, :, 255].sum(1)
            positive = c[:, :, 0, 0:255].sum((1, 2)) - c[:, 0, 0, 0]
        for k, i in enumerate(index):
            s = out[i]
            s.sum, s.sum_sq, s.min, s.max = (float(floats[r, k]) for r in range(4))
            s.zeros, s.nan, s.posinf, s.neginf = int(zeros[k]), int(nan[k]), int(posinf[k]), int(neginf[k])
            s.positive = int(positive[k])
            s.hist = hist[k].astype(np.int64, copy=True)
    for s, u in zip(out, layout.units, strict=True):
        if u is None:
            continue
        n_units, total = u
        s.units_active = arr[offset : offset + n_units].astype(np.int64, copy=True)
        s.units_total = total
        offset += n_units
    return out, offset


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
