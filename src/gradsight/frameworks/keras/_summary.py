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

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from ..._anomaly import MIN_HISTORY, Anomalies
from ..._packing import F32_MANTISSA_BITS, F64_BIN_OFFSET, F64_MANTISSA_BITS, HIST_BINS, Layout

__all__ = [
    "CLIP_KINDS",
    "GraphAnomalies",
    "Layout",
    "clip_rule",
    "clipped_norms",
    "global_norm",
    "nonfinite_counts",
    "norms",
    "pack_summaries",
]


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


def _tensor_stats(flat: tf.Tensor, scale: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """One tensor's reductions ``[count, sum, sum_sq, min, max, positive]`` (float64) and its class codes."""
    x, code, neg = _classify(flat, scale)
    fin = tf.less(code, _NAN)  # bins and zeros
    xf = tf.where(fin, x, tf.zeros_like(x))
    inf = tf.constant(np.inf, tf.float64)
    # per-tensor reductions: multi-threaded and vectorised (segmented reductions are not, on CPU)
    row = tf.stack(
        [
            tf.cast(tf.size(x), tf.float64),
            tf.reduce_sum(xf),
            tf.reduce_sum(tf.square(xf)),
            tf.reduce_min(tf.where(fin, x, tf.fill(tf.shape(x), inf))),  # +inf when no finite element
            tf.reduce_max(tf.where(fin, x, tf.fill(tf.shape(x), -inf))),
            tf.reduce_sum(tf.cast(tf.logical_and(tf.less(code, _ZERO), tf.logical_not(neg)), tf.float64)),
        ]
    )
    return row, code


#: One traced :func:`_tensor_stats` per (dtype, scaled), shared by every graph that summarises tensors.
_STATS_FNS: dict[tuple[tf.DType, bool], Any] = {}


def _stats_fn(dtype: tf.DType, scaled: bool) -> Any:
    """:func:`_tensor_stats` as a ``tf.function`` over flat tensors of any length (``input_signature [None]``).

    Inside a train step each tensor's summary is then one call op instead of ~40 ops: the step's graph is
    traced, optimised and (under ``jit_compile``) compiled faster, and the function body is traced once per
    dtype per process. It is not inlined (``_noinline``): the runtime optimises and instantiates the body once
    and runs it per call, instead of optimising one inlined copy per tensor at the step's first call.
    """
    key = (dtype, scaled)
    fn = _STATS_FNS.get(key)
    if fn is None:
        sig = [tf.TensorSpec([None], dtype)] + ([tf.TensorSpec([], tf.float64)] if scaled else [])
        fn = tf.function(
            _tensor_stats, input_signature=sig, autograph=False, experimental_attributes={"_noinline": True}
        )
        _STATS_FNS[key] = fn
    return fn


def pack_summaries(
    tensors: Sequence[tf.Tensor],
    layout: Layout,
    scales: Sequence[tf.Tensor | None] | None = None,
    xla: bool = False,
    axes: Sequence[int | None] | None = None,
) -> tf.Tensor:
    """Summaries of ``tensors`` packed into one float64 vector (see the module docstring).

    Args:
        tensors: floating-point tensors of any shape and dtype.
        layout: the packing layout; ``layout.units[i]`` must equal the static size of ``tensors[i]``'s unit axis
            (``axes[i]``, the last by default) when not ``None``.
        scales: optional float64 scalar per tensor that multiplies its values (``1 / loss_scale`` for gradients
            under mixed precision: a power of two, applied in float32/float64 before anything is read, so
            exact).
        xla: build XLA-compatible ops (for ``jit_compile=True``): a segment sum instead of ``bincount``, which
            XLA lacks (and which is ~3x faster on CPU otherwise).
        axes: per tensor, the axis its units lie on where it is not the last (``None``: the last).

    Returns:
        A float64 vector of length ``layout.size``.
    """
    n = len(tensors)
    if n == 0:
        return tf.zeros([0], tf.float64)
    scales = scales if scales is not None else [None] * n
    axes = axes if axes is not None else [None] * n
    graph = tf.inside_function()
    rows, codes, unit_parts = [], [], []
    for i, (t, s, u, axis) in enumerate(zip(tensors, scales, layout.units, axes, strict=True)):
        flat = tf.reshape(t, [-1])
        if not graph:  # eagerly (tape loops, whose shapes vary): the ops themselves
            row, code = _tensor_stats(flat, s)
        elif s is None:
            row, code = _stats_fn(flat.dtype, False)(flat)
        else:
            row, code = _stats_fn(flat.dtype, True)(flat, tf.cast(s, tf.float64))
        rows.append(row)
        codes.append(code + i * _NCODES)
        if u:
            active = tf.cast(tf.not_equal(code, _ZERO), tf.float64)  # NaN counts as active
            rank = t.shape.rank
            if axis is None or axis == rank - 1:
                active = tf.reshape(active, [-1, u])
            else:  # (pre, units, post) around the axis
                active = tf.reshape(active, [tf.reduce_prod(tf.shape(t)[:axis]), u, -1])
                active = tf.reshape(tf.transpose(active, [0, 2, 1]), [-1, u])
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


try:  # TensorFlow's cond as one If op whose taken branch runs as a function (internal API; tf.cond without it)
    from tensorflow.python.ops.cond_v2 import fast_cond_v2 as _fast_cond
except ImportError:  # pragma: no cover - another TensorFlow version
    _fast_cond = None


@tf.autograph.experimental.do_not_convert  # (autograph would convert TensorFlow's own cond code, and fail)
def rare_cond(pred: tf.Tensor, true_fn: Any, false_fn: Any, *, xla: bool = False) -> Any:
    """``tf.cond(pred, true_fn, false_fn)`` for a branch that runs at few steps, at less cost at the others.

    Inside a ``tf.function``, ``tf.cond`` is lowered into the step's graph: every op of the branch not taken is
    still visited by the executor at each step (as a dead op), which costs time in proportion to the branch's
    size (a watched step's full-summary branch holds hundreds of ops). Here it stays one ``If`` op that calls only
    the taken branch, as a function. The branches must not be differentiated, and must return their results
    (their side effects, variable writes, run: a function keeps its stateful ops; they are not ordered among
    themselves, so a branch must not read a variable it writes). Outside a function, where this TensorFlow lacks
    the op, and with ``xla=True`` (the watch's full-summary branch in a ``jit_compile`` model, as before), it is
    ``tf.cond``.
    """
    if _fast_cond is None or xla or not tf.inside_function():
        return tf.cond(pred, true_fn, false_fn)
    out = _fast_cond(pred, true_fn, false_fn)
    return tuple(out) if isinstance(out, (list, tuple)) else out


def norms(tensors: Sequence[tf.Tensor], scale: tf.Tensor | None = None) -> tf.Tensor:
    """The L2 norm of each tensor as a float64 vector (NaN/Inf when it has non-finite entries).

    One fused square-sum per tensor, accumulated in float32 (float64 for float64 tensors, which keep their
    precision), and again in float64 at a step where one overflowed (a finite norm above ~1.8e19, which float32
    would give as Inf; a ±Inf entry gives Inf again); the square root in float64. ``scale`` (a float64 scalar,
    e.g. ``1 / loss_scale``) multiplies the values *before* they are squared: a loss-scaled gradient's square-sum
    would overflow float32 from a scale of about ``2**64`` on (``LossScaleOptimizer`` starts at ``2**15`` but
    grows), so it costs one multiplication per element under mixed precision.
    """
    if not tensors:
        return tf.zeros([0], tf.float64)
    sq = []
    for t in tensors:
        t = t if t.dtype == tf.float64 else tf.cast(t, tf.float32)
        if scale is not None:
            t = t * tf.cast(scale, t.dtype)
        sq.append(tf.reduce_sum(tf.square(t)))
    sq64 = tf.stack([tf.cast(v, tf.float64) for v in sq])

    def exact() -> tf.Tensor:  # float32 square-sums overflow from entries of ~1.8e19 on: again, in float64
        out = []
        for t in tensors:
            t = tf.cast(t, tf.float64)
            if scale is not None:
                t = t * tf.cast(scale, tf.float64)
            out.append(tf.reduce_sum(tf.square(t)))
        return tf.stack(out)

    if all(t.dtype == tf.float64 for t in tensors):
        return tf.sqrt(sq64)
    return tf.sqrt(rare_cond(tf.reduce_any(tf.math.is_inf(sq64)), exact, lambda: sq64))


def nonfinite_counts(tensors: Sequence[tf.Tensor], norms64: tf.Tensor | None = None) -> tf.Tensor:
    """The number of NaN/±Inf entries of each tensor, as a float64 vector.

    With ``norms64`` (the tensors' norms, :func:`norms`) the counting — a pass over every element, the dearest
    of the per-step checks — runs only at steps where some norm is non-finite: finite norms mean no NaN/Inf
    entry (a non-finite norm without one, a float32 square-sum that overflowed, counts 0).
    """
    if not tensors:
        return tf.zeros([0], tf.float64)

    def count() -> tf.Tensor:
        return tf.stack([tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(t)), tf.float64)) for t in tensors])

    if norms64 is None:
        return count()
    return rare_cond(tf.reduce_all(tf.math.is_finite(norms64)), lambda: tf.zeros([len(tensors)], tf.float64), count)


# ---- gradient clipping, as the Keras optimizer does it -------------------------------------------------------
#: The clipping arguments of a Keras optimizer, in the order ``BaseOptimizer._clip_gradients`` checks them.
CLIP_KINDS = ("clipnorm", "global_clipnorm", "clipvalue")


def clip_rule(optimizer: Any) -> tuple[str, float] | None:
    """The clipping a Keras optimizer applies to the gradients it receives: ``(kind, value)`` or ``None``.

    Keras 3 clips inside ``optimizer.apply`` (after unscaling), with the first of ``clipnorm``,
    ``global_clipnorm``, ``clipvalue`` that is set and positive. A ``LossScaleOptimizer`` refuses them itself;
    its ``inner_optimizer`` clips.
    """
    inner = getattr(optimizer, "inner_optimizer", None)
    opt = inner if inner is not None else optimizer
    for kind in CLIP_KINDS:
        value = getattr(opt, kind, None)
        if value is not None and not isinstance(value, bool) and value > 0:
            return kind, float(value)
    return None


def global_norm(norms64: tf.Tensor) -> tf.Tensor:
    """The norm of several tensors together from their norms (NaN when any is NaN, else Inf when any is Inf)."""
    return tf.sqrt(tf.reduce_sum(tf.square(norms64)))


def clipped_norms(
    pre: tf.Tensor,
    grads: Sequence[tf.Tensor],
    scale: tf.Tensor | None,
    rule: tuple[str, float] | None,
) -> tf.Tensor:
    """The norm of each gradient as the optimizer receives it, after its clipping (``rule``), as float64.

    Computed the way ``keras.optimizers.Optimizer`` clips (``_clip_gradients``), from the unclipped norms
    ``pre`` where that is exact: where clipping does not bite the result *is* ``pre`` (so the two compare
    equal), where it bites it is

    * ``clipnorm=c``: ``c`` (each gradient is rescaled to norm ``c``); NaN for a non-finite gradient, which
      Keras' rescaling turns into NaN;
    * ``global_clipnorm=c``: ``pre * c / G`` with ``G`` the global norm, when ``G > c``; NaN for every gradient
      when ``G`` is non-finite (Keras' scale is then NaN);
    * ``clipvalue=v``: the norm of ``clip(g, -v, v)`` where some entry exceeds ``v`` in magnitude (one more
      fused reduction per gradient, only with this rule).

    Keras measures an ``IndexedSlices`` gradient (an embedding's) by its ``.values`` (:func:`clip_input_norms`):
    under ``clipnorm`` it is rescaled by ``c / max(‖values‖, c)``, and so is its norm here; its values' norm also
    enters ``G``.
    """
    if rule is None or not grads:
        return pre
    kind, c = rule
    nan = tf.constant(math.nan, tf.float64)
    c64 = tf.constant(c, tf.float64)
    measured = clip_input_norms(pre, grads, scale)  # pre, except for IndexedSlices gradients
    if kind == "clipnorm":
        clipped = tf.minimum(pre, c64)  # a dense gradient longer than c is rescaled to norm c
        if measured is not pre:  # an IndexedSlices gradient is rescaled by c / max(‖values‖, c)
            sparse = tf.constant([isinstance(g, tf.IndexedSlices) for g in grads])
            by_values = tf.where(tf.greater(measured, c64), pre * (c64 / measured), pre)
            clipped = tf.where(sparse, by_values, clipped)
        return tf.where(tf.math.is_finite(measured), clipped, nan)
    if kind == "global_clipnorm":
        g = global_norm(measured)
        clipped = tf.where(tf.greater(g, c64), pre * (c64 / g), pre)
        return tf.where(tf.math.is_finite(g), clipped, tf.fill(tf.shape(pre), nan))
    out = []
    for t, p in zip(grads, tf.unstack(pre), strict=True):
        if scale is not None:
            t = t * tf.cast(scale, t.dtype)
        bites = tf.reduce_any(tf.greater(tf.abs(t), tf.cast(c, t.dtype)))
        out.append(tf.where(bites, norms([tf.clip_by_value(t, -c, c)])[0], p))
    return tf.stack(out)


def _values(g: Any) -> tf.Tensor:
    """A gradient's stored values: ``.values`` of an ``IndexedSlices`` (an embedding's rows), else the tensor."""
    return g.values if isinstance(g, tf.IndexedSlices) else g


def _with_values(g: Any, values: tf.Tensor) -> Any:
    return tf.IndexedSlices(values, g.indices, g.dense_shape) if isinstance(g, tf.IndexedSlices) else values


def clip_input_norms(pre: tf.Tensor, grads: Sequence[Any], scale: tf.Tensor | None) -> tf.Tensor:
    """The norm Keras' clipping measures for each gradient, as float64.

    That is ``pre`` (the gradient's own norm), but for an ``IndexedSlices`` gradient the norm of its ``.values``,
    which Keras clips by without summing the rows of repeated indices (so it differs from the gradient's norm
    where a batch repeats an index).
    """
    if not any(isinstance(g, tf.IndexedSlices) for g in grads):
        return pre
    out = tf.unstack(pre)
    for i, g in enumerate(grads):
        if isinstance(g, tf.IndexedSlices):
            out[i] = norms([g.values], scale)[0]
    return tf.stack(out)


def applied_gradients(grads: Sequence[Any], scale: tf.Tensor | None, rule: tuple[str, float] | None) -> list[Any]:
    """The gradients as the optimizer applies them, dense.

    Multiplied by ``scale`` (``1 / loss_scale``), then clipped by ``rule`` with the operations of Keras 3's
    ``BaseOptimizer._clip_gradients`` (an ``IndexedSlices`` gradient's values clipped as Keras clips them).
    """
    gs = [g if scale is None else _with_values(g, _values(g) * tf.cast(scale, _values(g).dtype)) for g in grads]
    if rule is not None:
        kind, c = rule
        if kind == "clipnorm":
            gs = [_with_values(g, _clip_by_norm(_values(g), c)) for g in gs]
        elif kind == "global_clipnorm":
            use = tf.sqrt(tf.reduce_sum(tf.stack([tf.reduce_sum(tf.square(_values(g))) for g in gs])))
            factor = c * tf.minimum(1.0 / use, 1.0 / c) + (use - use)  # NaN for a non-finite norm, as Keras
            gs = [_with_values(g, _values(g) * tf.cast(factor, _values(g).dtype)) for g in gs]
        else:
            gs = [_with_values(g, tf.clip_by_value(_values(g), -c, c)) for g in gs]
    return [tf.convert_to_tensor(g) for g in gs]


def _clip_by_norm(values: tf.Tensor, c: float) -> tf.Tensor:
    """``values * c / max(‖values‖, c)``, as ``BaseOptimizer._clip_by_norm`` computes it (NaN-safe at 0)."""
    l2sum = tf.reduce_sum(tf.square(values), keepdims=True)
    pred = l2sum > 0
    l2norm = tf.where(pred, tf.sqrt(tf.where(pred, l2sum, tf.ones_like(l2sum))), l2sum)
    return (values * tf.cast(c, values.dtype)) / tf.maximum(l2norm, tf.cast(c, values.dtype))


# ---- anomaly capture, decided in the graph -------------------------------------------------------------------
class GraphAnomalies:
    """The rule of :class:`gradsight._anomaly.Anomalies`, evaluated inside the compiled train step.

    The same decisions from the same values: each signal's last ``window`` finite values live in a ring buffer
    (a ``[signals, window]`` float64 variable), whose median (sorted, the middle value or the mean of the two
    middle ones, as :func:`statistics.median`) is the baseline; the capture window, the next allowed start, the
    gap and the suppressed count are one int64 variable. All signals are judged together with vectorised ops: a
    sort of ``signals x window`` values and a few dozen scalar ops per step, whatever the model's size.

    Deciding in the graph lets a capture include its triggering step: its weights (before the update),
    gradients, updates, layer outputs and output gradients are all still at hand when the decision is taken,
    after ``optimizer.apply``.

    Create it eagerly (its variables); call :meth:`observe` once per step inside the graph.
    """

    def __init__(self, rule: Anomalies, n_signals: int) -> None:
        self.factor, self.window, self.steps, self.cooldown = rule.factor, rule.window, rule.steps, rule.cooldown
        self.hist = tf.Variable(tf.zeros([n_signals, self.window], tf.float64), trainable=False)
        self.count = tf.Variable(tf.zeros([n_signals], tf.int64), trainable=False)
        # first, last (the capture window), next (first step a capture may start), gap, suppressed
        self.state = tf.Variable([-1, -1, 0, self.cooldown, 0], dtype=tf.int64, trainable=False)

    #: The fields :meth:`observe` returns, in the order of its ``tf.cond`` branches' outputs.
    FIELDS = ("captured", "start", "signal", "reason", "value", "baseline", "suppressed", "last")

    def observe(self, step: tf.Tensor, values: tf.Tensor, present: tf.Tensor) -> dict[str, tf.Tensor]:
        """Judge one step's signals, as :meth:`gradsight._anomaly.Anomalies.observe` does, and update the state.

        Most steps cannot trigger: no signal is non-finite and none exceeds ``factor`` times the *smallest* of
        its past values (a jump must exceed ``factor`` times their median, which is no smaller). Those steps
        cost a minimum and a few comparisons; the median (a sort), the trigger and the rate limit run in a
        ``tf.cond`` branch only at the others, with the same result as if they ran at every step (the state
        changes only at a trigger).

        Args:
            step: the step (int64 scalar).
            values: float64 ``[signals]``, this step's values (non-finite allowed).
            present: bool ``[signals]``, which signals the step has (absent ones are neither judged nor kept).

        Returns:
            ``captured`` (the step lies in a capture window, the one it may have started included), ``start``
            (a capture starts at this step), and the event's fields for a start: ``signal`` (index), ``reason``
            (1: non-finite, 0: jump), ``value``, ``baseline`` (NaN for none), ``suppressed``, ``last``.
        """
        w = self.window
        hist, count, state = self.hist.read_value(), self.count.read_value(), self.state.read_value()
        n = tf.minimum(count, w)
        col = tf.range(w, dtype=tf.int64)
        past = tf.where(col[None, :] < n[:, None], hist, tf.constant(math.inf, tf.float64))  # +inf: no value
        finite = tf.math.is_finite(values)
        keep = present & finite
        factor = tf.constant(self.factor, tf.float64)
        maybe = tf.reduce_any(present & tf.logical_not(finite)) | tf.reduce_any(
            keep & tf.greater_equal(n, MIN_HISTORY) & tf.greater(values, factor * tf.reduce_min(past, axis=1))
        )

        def quiet() -> tuple[tf.Tensor, ...]:
            first, last, sup = state[0], state[1], state[4]
            zero, nan = tf.constant(0, tf.int64), tf.constant(math.nan, tf.float64)
            captured = tf.logical_and(tf.less_equal(first, step), tf.less_equal(step, last))
            return captured, tf.constant(False), zero, zero, nan, nan, sup, last

        out = rare_cond(maybe, lambda: self._judge(step, values, present, finite, past, n, state), quiet)
        # keep this step's finite values (after judging it, as the host rule does)
        slot = tf.logical_and(tf.equal(col[None, :], (count % w)[:, None]), keep[:, None])
        self.hist.assign(tf.where(slot, values[:, None], hist))
        self.count.assign(count + tf.cast(keep, tf.int64))
        return dict(zip(self.FIELDS, out, strict=True))

    def _judge(
        self,
        step: tf.Tensor,
        values: tf.Tensor,
        present: tf.Tensor,
        finite: tf.Tensor,
        past: tf.Tensor,
        n: tf.Tensor,
        state: tf.Tensor,
    ) -> tuple[tf.Tensor, ...]:
        """The trigger (:func:`gradsight._anomaly.trigger`) and the rate limit, at a step that may trigger."""
        srt = tf.sort(past, axis=1)  # the past values first, then +inf
        lo = tf.gather(srt, tf.maximum(n - 1, 0)[:, None] // 2, batch_dims=1)[:, 0]
        hi = tf.gather(srt, (n // 2)[:, None], batch_dims=1)[:, 0]
        median = tf.where(tf.equal(n % 2, 1), hi, (lo + hi) / 2)
        has_base = tf.greater_equal(n, MIN_HISTORY)
        nonfinite = tf.logical_and(present, tf.logical_not(finite))
        factor = tf.constant(self.factor, tf.float64)
        jump = present & finite & has_base & tf.greater(median, 0) & tf.greater(values, factor * median)
        any_nonfinite = tf.reduce_any(nonfinite)
        hit = any_nonfinite | tf.reduce_any(jump)
        ratio = tf.where(jump, values / tf.where(jump, median, tf.ones_like(median)), -math.inf)
        signal = tf.where(
            any_nonfinite,
            tf.argmax(tf.cast(nonfinite, tf.int32), output_type=tf.int64),
            tf.argmax(ratio, output_type=tf.int64),
        )
        # the capture window and its rate limit
        first, last, nxt, gap, sup = tf.unstack(state)
        suppress = hit & (tf.less(step, nxt) | tf.less_equal(step, last))
        start = hit & tf.logical_not(suppress)
        grown = tf.where(tf.greater_equal(last, 0), tf.where(tf.greater(sup, 0), gap * 2, self.cooldown), gap)
        gap2 = tf.where(start, grown, gap)
        first2 = tf.where(start, step, first)
        last2 = tf.where(start, step + self.steps, last)
        next2 = tf.where(start, last2 + 1 + gap2, nxt)
        sup2 = tf.where(start, tf.zeros_like(sup), tf.where(suppress, sup + 1, sup))
        self.state.assign(tf.stack([first2, last2, next2, gap2, sup2]))
        baseline = tf.where(tf.gather(has_base, signal), tf.gather(median, signal), tf.constant(math.nan, tf.float64))
        captured = tf.logical_and(tf.less_equal(first2, step), tf.less_equal(step, last2))
        return (
            captured,
            start,
            signal,
            tf.cast(any_nonfinite, tf.int64),
            tf.gather(values, signal),
            baseline,
            sup,
            last2,
        )
