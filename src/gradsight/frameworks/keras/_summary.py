"""In-graph TensorFlow kernels that compute :class:`gradsight.summary.TensorSummary` fields, and their unpacking.

One call of :func:`pack_summaries` turns a list of tensors into **one** float64 vector, so a logged step costs a
single host transfer. The kernels follow the numpy reference :func:`gradsight.summary.summarize` exactly:

* every tensor is cast to float64 (exact for float16, bfloat16 and float32) for its sums, min and max (plain
  per-tensor reductions: multi-threaded, unlike TensorFlow's CPU segment reductions); counts and histogram bins
  of all tensors come from **one** ``bincount`` over per-element class codes read from the bits;
* ``hist`` reads the biased exponent field: for float32 (and float16/bfloat16, widened exactly to float32) it is
  the bin itself; for float64 the bin is ``clip(E - 1023 + 127, 0, 255)`` — identical to the reference's
  ``np.frexp`` (subnormals in bin 0);
* sums and sums of squares accumulate in float64 over the finite elements; ``min``/``max`` over the finite
  elements, ``+inf``/``-inf`` when there are none;
* per-unit activity (``!= 0``, NaN counts as active) along the last axis (channels_last) for layer outputs.

Models compiled with ``jit_compile=True`` work (tested).

Packed layout: the float64 wire form of the one row layout of :mod:`gradsight._packing` — ``n`` rows of
``ROW`` words (``count, zeros, nan, posinf, neginf, positive, sum, sum_sq, min, max, hist[0..255]``), then
``[units_total, units_active...]`` per tensor with units. :class:`gradsight._packing.Layout` knows the offsets;
:func:`gradsight._packing.rows_from_float64` unpacks it on the host. The bin constants come from there too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from ..._packing import F32_MANTISSA_BITS, F64_BIN_OFFSET, F64_MANTISSA_BITS, HIST_BINS, Layout

__all__ = ["Layout", "cheap_grad_scalars", "pack_summaries"]


#: Per-element class codes: 0..255 the histogram bin of a finite non-zero value, then these.
_ZERO, _NAN, _POSINF, _NEGINF = 256, 257, 258, 259
_NCODES = 260


def _classify(t: tf.Tensor, scale: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Flatten ``t`` into (float64 values, int64 class codes, negative-sign flags).

    Codes come from the bits of the tensor's own float format (float32 for float16/bfloat16/float32, float64
    otherwise), never from float compares: TensorFlow's CPU kernels flush subnormals to zero (FTZ/DAZ), which
    would count a subnormal as zero and put it in the wrong bin; the reference counts and bins it.
    """
    if t.dtype in (tf.float16, tf.bfloat16):
        t = tf.cast(t, tf.float32)
    flat = tf.reshape(t, [-1])
    if flat.dtype not in (tf.float32, tf.float64):
        flat = tf.cast(flat, tf.float32)
    if scale is not None:  # a power of two: exact, and the bins shift with it
        flat = flat * tf.cast(scale, flat.dtype)
    if flat.dtype == tf.float64:
        bits = tf.bitcast(flat, tf.int64)
        mag = tf.bitwise.bitwise_and(bits, tf.constant(0x7FFFFFFFFFFFFFFF, tf.int64))
        inf_bits = tf.constant(0x7FF0000000000000, tf.int64)
        expo = tf.bitwise.right_shift(mag, tf.constant(F64_MANTISSA_BITS, tf.int64))
        bins = tf.clip_by_value(expo - F64_BIN_OFFSET, 0, HIST_BINS - 1)
    else:
        flat = tf.cast(flat, tf.float32)
        bits = tf.bitcast(flat, tf.int32)
        mag = tf.bitwise.bitwise_and(bits, tf.constant(0x7FFFFFFF, tf.int32))
        inf_bits = tf.constant(0x7F800000, tf.int32)
        bins = tf.bitwise.right_shift(mag, tf.constant(F32_MANTISSA_BITS, tf.int32))  # the biased exponent: the bin
    negative = tf.less(bits, 0)
    code = tf.where(
        tf.equal(mag, 0),
        tf.constant(_ZERO, bins.dtype),
        tf.where(
            tf.greater(mag, inf_bits),
            tf.constant(_NAN, bins.dtype),
            tf.where(
                tf.equal(mag, inf_bits),
                tf.where(negative, tf.constant(_NEGINF, bins.dtype), tf.constant(_POSINF, bins.dtype)),
                bins,
            ),
        ),
    )
    return tf.cast(flat, tf.float64), tf.cast(code, tf.int32), negative


def pack_summaries(
    tensors: Sequence[tf.Tensor],
    layout: Layout,
    scales: Sequence[tf.Tensor | None] | None = None,
    xla: bool = False,
) -> tf.Tensor:
    """Summaries of ``tensors`` packed into one float64 vector (see the module docstring).

    Args:
        tensors: floating-point tensors of any shape and dtype.
        layout: the packing layout; ``layout.units[i]`` must equal the static last dimension of ``tensors[i]``
            when not ``None``.
        scales: optional float64 scalar per tensor that multiplies its values (``1 / loss_scale`` for gradients
            under mixed precision: a power of two, applied in float32/float64 before anything is read, so
            exact).
        xla: build XLA-compatible ops (for ``jit_compile=True``): a segment sum instead of ``bincount``, which
            XLA lacks (and which is ~3x faster on CPU otherwise).

    Returns:
        A float64 vector of length ``layout.size``.
    """
    n = len(tensors)
    if n == 0:
        return tf.zeros([0], tf.float64)
    scales = scales if scales is not None else [None] * n
    inf = tf.constant(np.inf, tf.float64)
    rows, codes, unit_parts = [], [], []
    for i, (t, s, u) in enumerate(zip(tensors, scales, layout.units, strict=True)):
        x, code, neg = _classify(t, s)
        fin = tf.less(code, _NAN)  # bins and zeros
        xf = tf.where(fin, x, tf.zeros_like(x))
        # per-tensor reductions: multi-threaded and vectorised (segmented reductions are not, on CPU)
        rows.append(
            tf.stack(
                [
                    tf.cast(tf.size(x), tf.float64),
                    tf.reduce_sum(xf),
                    tf.reduce_sum(tf.square(xf)),
                    tf.reduce_min(tf.where(fin, x, tf.fill(tf.shape(x), inf))),  # +inf when no finite element
                    tf.reduce_max(tf.where(fin, x, tf.fill(tf.shape(x), -inf))),
                    tf.reduce_sum(tf.cast(tf.logical_and(tf.less(code, _ZERO), tf.logical_not(neg)), tf.float64)),
                ]
            )
        )
        codes.append(code + i * _NCODES)
        if u:
            active = tf.reshape(tf.cast(tf.not_equal(code, _ZERO), tf.float64), [-1, u])  # NaN counts as active
            unit_parts.append(tf.reshape(tf.cast(tf.shape(active)[0], tf.float64), [1]))
            unit_parts.append(tf.reduce_sum(active, axis=0))
    # Histogram bins and the zero/NaN/±Inf counts of all tensors in one bincount.
    allcodes = tf.concat(codes, 0)
    if xla:
        flat_counts = tf.math.unsorted_segment_sum(tf.ones_like(allcodes, tf.float64), allcodes, n * _NCODES)
    else:
        flat_counts = tf.math.bincount(allcodes, minlength=n * _NCODES, maxlength=n * _NCODES, dtype=tf.float64)
    counts = tf.reshape(flat_counts, [n, _NCODES])
    r = tf.stack(rows)  # [n, 6]: count, sum, sum_sq, min, max, positive
    packed = tf.concat(  # the one row layout: count, zeros, nan, posinf, neginf, positive, sum, sum_sq, min, max, hist
        [
            r[:, 0:1],
            counts[:, _ZERO : _NEGINF + 1],
            r[:, 5:6],
            r[:, 1:5],
            counts[:, :HIST_BINS],
        ],
        axis=1,
    )
    return tf.concat([tf.reshape(packed, [-1]), *unit_parts], 0)


def cheap_grad_scalars(grads: Sequence[tf.Tensor], scale: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-gradient L2 norms and numbers of non-finite elements, as float64 vectors (one entry per gradient).

    Cheap enough for every step: one fused square-sum and one count per gradient, no float64 copies. A
    non-finite gradient makes its norm NaN or Inf; the count says how many elements were. The host turns them
    into the cheap-check scalars with :func:`gradsight._watch_core.cheap_scalars` (the same as torch's).
    """
    if not grads:
        zero = tf.zeros([0], tf.float64)
        return zero, zero
    sq = tf.stack([tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in grads])
    norms = tf.sqrt(tf.cast(sq, tf.float64))
    if scale is not None:
        norms = norms * scale
    bad = tf.stack([tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(g)), tf.float64)) for g in grads])
    return norms, bad
