"""The Keras 3 (TensorFlow backend) watch: per-step summaries recorded inside the compiled train step.

How it works (public Keras/TF APIs only, tested with Keras 3.15.1 on TensorFlow 2.21):

* :func:`watch_keras` sets ``model.train_step`` **on the instance** to a step that follows Keras' documented
  ``train_step`` contract — forward under ``tf.GradientTape``, ``model.compute_loss``, the ``"loss"`` metric,
  ``optimizer.scale_loss`` (mixed precision), ``optimizer.apply``, ``model.compute_metrics`` — and records into
  ``tf.Variable`` buffers on the way. Keras compiles it with ``tf.function`` as usual (``run_eagerly`` is not
  needed; ``jit_compile=True`` works). It also wraps ``model.fit`` on the instance to add the watch's callback,
  so ``model.fit(...)`` needs no change; ``callbacks=[watch.callback]`` is equivalent.
* Layer outputs and output gradients: for Functional models (and Sequential models with an ``Input``) a tap
  model ``keras.Model(model.input, [model outputs..., every layer's output...])`` shares the model's layers and
  exposes the intermediates, whose gradients come from the same ``tape.gradient`` call as the weights'. A
  Sequential model without an ``Input`` calls its layers in sequence inside the tape. Subclassed models (and
  models that override ``call``) record weights, gradients and updates only; the run's meta says so. A
  softmax/sigmoid output trained with a Keras cross-entropy (``from_logits=False``) has no ``output_grad``: the
  loss reads the logits cached on it, so no gradient reaches the output itself (the run's notes and a warning
  say so; see :meth:`KerasWatch._settle_output_grads`).
* Every step (``cheap=True``), in the graph, the per-step signals of :mod:`gradsight._schedule`'s table, with
  the same names and meanings as for torch: ``loss``; ``lr``, read *before* ``optimizer.apply`` (under a
  ``LearningRateSchedule`` the rate this step's update uses); ``grad_norm`` and ``grad_norm/<variable>`` of the
  gradients as the optimizer receives them — unscaled, and after its ``clipnorm`` / ``global_clipnorm`` /
  ``clipvalue``, which Keras 3 applies inside ``apply`` and the watch computes from the same settings the same
  way (:func:`._summary.clipped_norms`); ``grad_norm_preclip`` (the tape's gradients, unscaled), and where
  clipping changed them ``grad_norm_preclip/<variable>`` and ``clip_ratio``; ``grad_nonfinite[/<variable>]``;
  ``weight_norm/<variable>`` (‖W‖ before the update) and ``update_norm/<variable>`` (‖W_after − W_before‖);
  ``step_skipped`` at a step whose update the optimizer skipped (its ``iterations`` did not advance: a
  ``LossScaleOptimizer`` that found non-finite gradients), which then has no ``update_norm``. W_before is a read
  of each variable taken before ``apply``: TensorFlow copies a variable's buffer before updating it in place
  while a read of it is alive, so the read stays W_before (no persistent snapshot variables).
* Anomaly capture (the default preset; off for ``every=1``, ``"cheap"``, ``anomaly=False``): the rule of
  :mod:`gradsight._anomaly`, fed :func:`gradsight._watch_core.anomaly_values`' signals (``loss``,
  ``grad_norm_preclip``, ``grad_norm``, ``update_norm/<variable>``), runs in the graph
  (:class:`._summary.GraphAnomalies`: a ring buffer per signal for the running median, the capture window and
  rate limit in one int64 variable), after ``apply``. A triggering step is therefore captured itself, in full:
  its W_before, gradients, updates, layer outputs and output gradients are still at hand. Its event ``anomaly``
  is written by the host from the fields the graph left in the step's buffer row.
* On a step with full summaries (``step % every == 0``, or an anomaly capture) one ``tf.cond`` after ``apply``
  packs all summaries into one float64 vector (see :mod:`._summary`) and the updates ``ΔW = W_after - W_before``
  into a second. The buffers have one row per step (``step % rows``, written with a scatter whose index XLA
  takes at run time), and each row carries its step: with one step per ``train_function`` call, 32 rows (fewer
  where a row is large, see :func:`_ring_rows`), which the callback reads every 32 steps, at the end of each
  epoch and of ``fit``, at ``flush()`` or a read of the run, and after ``commit_every`` seconds (one host copy;
  the step count advances at every call all the same); with ``steps_per_execution > 1``, one row per step of a
  call, read after every call.
* Cost per step, on top of Keras' own step (``cheap=True``, no full summaries): per trainable variable one fused
  square-sum of its gradient (under mixed precision after one multiplication by ``1 / loss_scale``), one of
  W_before, and a subtraction and a square-sum for ΔW; the non-finite counts (a pass over every gradient
  element) only at steps where a gradient norm is non-finite; the clipping rule's few scalar ops
  (``clipvalue``: one clip and square-sum more per gradient); the optimizer's in-place update writes to a fresh
  buffer while W_before is alive (one copy of the weights); the anomaly judge's ~50 small ops on
  ``(3 + variables) x window`` values, whatever the model's size; one row of ``14 + 5 x variables`` float64
  values into the buffer. On the host, per step: a row of the buffer read (every 32 steps) into the scalars'
  bookkeeping. ``benchmarks/bench_watch_keras.py`` (MLP 784-128-64-10, batch 32, CPU) measures it as
  ``ratio_default``: side by side with the watch before these signals it did not grow (the non-finite count,
  now conditional, pays for them).
* Gradients are recorded unscaled: under a ``LossScaleOptimizer`` they are multiplied by ``1 / loss_scale``.
  The ``grad`` summaries are of the gradients as the optimizer applies them, as ``grad_norm`` is: clipped by its
  ``clipnorm`` / ``global_clipnorm`` / ``clipvalue`` with Keras' own operations
  (:func:`._summary.applied_gradients`; an embedding's ``IndexedSlices`` gradient is measured and clipped by its
  values, as Keras does).
  NaN/Inf gradients are counted (``nan``/``posinf``/``neginf`` and the ``grad_nonfinite`` scalar), never dropped.
* Steps are numbered from 0 (or after the last stored step with ``if_exists="append"``) and keep counting across
  ``fit`` calls with the same watch. Weights are recorded *before* the step's update.
* Not modelled: Keras' ``gradient_accumulation_steps`` (the signals are per ``train_step``, i.e. per
  micro-batch, and ``grad_norm`` is not the accumulated, clipped gradient); ``use_ema`` (the weights are the
  trained ones, not their moving average).

JAX and torch backends are refused with :class:`~gradsight.UnsupportedError`: the watch relies on
``tf.GradientTape`` inside the TensorFlow train step.

For plain ``tf.GradientTape`` loops use :func:`watch_tape` (no model needed) or a model watch's
:meth:`KerasWatch.record_step`: the same per-step signals (pass ``optimizer=`` for its clipping, loss scale,
learning rate and skipped steps), judged on the host by :class:`gradsight._anomaly.Anomalies`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import threading
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from ..._errors import InputError, UnsupportedError, WatchError
from ..._packing import Layout, Rows, SummaryArrays, rows_from_float64
from ..._schedule import Schedule, schedule_from
from ..._watch_core import WatchCore, signal_row, signal_scalars, unit_axis
from ...diagnose import GradsightWarning
from ...diagnose._logits import PROBABILITY_LOSSES
from ._summary import (
    GraphAnomalies,
    applied_gradients,
    clip_rule,
    clipped_norms,
    global_norm,
    nonfinite_counts,
    norms,
    pack_summaries,
    rare_cond,
)

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack

    from ..._schedule import ScheduleSettings

__all__ = ["GradsightKerasCallback", "KerasWatch", "watch_keras", "watch_tape"]

#: The head of a step's row in the per-step buffer (float64), before the per-variable blocks.
HEAD = (
    "loss",
    "lr",
    "grad_norm",  # global, after clipping, unscaled
    "grad_norm_preclip",  # global, as the tape left it, unscaled
    "skipped",  # 1: the optimizer skipped the update (a LossScaleOptimizer found non-finite gradients)
    "record",  # 1: full summaries were packed at this step (``every`` or an anomaly capture)
    "anomaly",  # 1: an anomaly capture starts at this step; the event's fields follow
    "anomaly_signal",
    "anomaly_reason",  # 1: non-finite, 0: jump
    "anomaly_value",
    "anomaly_baseline",  # NaN: none
    "anomaly_suppressed",
    "anomaly_last",
    "step",  # the row's step (-1: no step written yet), so that the host learns the step count from this one read
)
_H = {name: i for i, name in enumerate(HEAD)}
#: The per-variable blocks that follow the head when ``cheap``, each one value per trainable variable.
BLOCKS = ("grad_norm", "grad_norm_preclip", "grad_nonfinite", "weight_norm", "update_norm")
#: The anomaly signals judged every step, then ``update_norm/<variable>`` for each variable (none at a skipped
#: step): :func:`gradsight._watch_core.anomaly_values`' signals, in its order.
ANOMALY_SIGNALS = ("loss", "grad_norm_preclip", "grad_norm")


def _check_backend() -> None:
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise UnsupportedError(
            f"gradsight's Keras watch needs the TensorFlow backend, but Keras runs on {backend!r}. It records "
            "inside the compiled TensorFlow train step with tf.GradientTape, which the JAX and torch backends do "
            "not have. Set KERAS_BACKEND=tensorflow before importing keras (or, on the torch backend, use the "
            "model with gradsight's PyTorch watch)."
        )


# ---- tensor bookkeeping --------------------------------------------------------------------------------------
@dataclass
class _Entry:
    name: str
    layer: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    units: int | None = None
    tid: int = 0
    axis: int | None = None  # the unit axis where it is not the last (a channels-first layer's output)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(-1 if d is None else int(d) for d in x.shape)


def _batch_shape(x: Any) -> tuple[int, ...]:
    """A layer output's shape with the batch dimension as -1 (it varies from batch to batch)."""
    shape = _shape(x)
    return (-1, *shape[1:]) if shape else shape


def _dtype_name(x: Any) -> str:
    d = x.dtype
    return d if isinstance(d, str) else getattr(d, "name", str(d))


def _is_float(x: Any) -> bool:
    name = _dtype_name(x)
    return name.startswith("float") or name == "bfloat16"


def _var_name(v: Any, taken: set[str]) -> str:
    name = getattr(v, "path", None) or getattr(v, "name", None) or "variable"
    name = name[:-2] if name.endswith(":0") else name
    base, i = name, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def _flatten_named(name: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        out = []
        for k in sorted(value):
            out.extend(_flatten_named(f"{name}/{k}", value[k]))
        return out
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return _flatten_named(name, value[0])
        out = []
        for i, v in enumerate(value):
            out.extend(_flatten_named(f"{name}/{i}", v))
        return out
    return [(name, value)]


def _is_keras_own(method: Any) -> bool:
    return (getattr(method, "__module__", "") or "").startswith("keras.")


# ---- the watch -----------------------------------------------------------------------------------------------
class KerasWatch(WatchCore):
    r"""A watch on a Keras model (or on plain ``tf.Variable``\s for GradientTape loops).

    Created by :func:`gradsight.watch` / :func:`watch_keras` or :func:`watch_tape`. The public API
    (``current_step``, ``step()``, ``log``, ``log_event``, ``flush``, ``close``, the context manager and the read
    API of :class:`gradsight.Run`) is :class:`gradsight._watch_core.WatchCore`'s; this class captures: a
    recording ``train_step`` for ``fit``, :meth:`record_step` for tape loops. Leaving ``with gradsight.watch(model)
    as w: model.fit(...)`` restores the model and closes the run file, also on exceptions (Ctrl-C included).

    Attributes:
        path: the run file.
        schedule: the resolved :class:`gradsight._schedule.Schedule` (shared with the PyTorch watch).
        model: the watched model, or ``None`` for a tape watch.
    """

    framework = "keras"

    def __init__(
        self,
        model: Any | None,
        *,
        path: str | os.PathLike[str] | None,
        sched: Schedule,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self._model_ref = None if model is None else weakref.ref(model)
        self._notes: list[str] = []
        self._installed = False
        self._open(
            model,
            path=path,
            sched=sched,
            config=config,
            meta={"source": "fit" if model is not None else "tape", "backend": keras.backend.backend()},
        )
        # graph state, built on the first fit (the model is built by then)
        self._ready = False
        self._slots = 0  # steps per train_function call (the model's steps_per_execution)
        self._ring = 1  # rows of the device buffers: one per step, indexed by step % ring (see _ring_rows)
        self._undrained = 0  # steps run since the host last read the buffers (an upper bound when slots > 1)
        self._drained_at = 0.0  # time.monotonic() of that read
        self._drain_lock = threading.Lock()  # flush() may come from another thread than fit's callback
        self._vars: list[Any] = []
        self._var_names: tuple[str, ...] = ()
        self._post_vars: list[Any] = []
        self._clip: tuple[str, float] | None = None
        self._graph_anomalies: GraphAnomalies | None = None
        self._signal_names: list[str] = []
        self._pending: _StepRecord | None = None  # a record_step whose step is not closed yet
        self._fit_flushed = False  # whether the callback committed at the end of the current fit
        self._discovered = False
        self._structure = "unknown"
        self._out_names: list[tuple[str, str]] = []
        self._out_axes: list[int | None] | None = None  # per tapped output: 1 for a channels-first one
        self._out_mask: list[bool] = []
        self._no_output_grad: set[str] = set()  # outputs whose loss reads their cached logits (no dJ/dA)
        self._tap: Any = None
        self._tap_n_out = 0
        self._seq_layers: list[Any] | None = None
        self._pre: list[_Entry] = []
        self._post: list[_Entry] = []
        self._pre_layout = Layout(())
        self._post_layout = Layout(())
        self._seen = 0
        self._callback: _WatchCallback | None = None
        self._closed = False
        self._by_callback = False  # created by a GradsightKerasCallback (closed by a newer one on the model)

    def _versions(self) -> dict[str, str]:
        return {"tensorflow": tf.__version__, "keras": keras.__version__}

    # ---- public API ----------------------------------------------------------------------------------------
    @property
    def model(self) -> Any | None:
        """The watched model (``None`` for a tape watch or when it was garbage-collected)."""
        return None if self._model_ref is None else self._model_ref()

    @property
    def callback(self) -> keras.callbacks.Callback:
        """The Keras callback that moves each step's buffers to the run file (added to ``fit`` automatically)."""
        if self._callback is None:
            self._callback = _WatchCallback(self)
        return self._callback

    def step(self) -> None:
        """Close the current step of a ``GradientTape`` loop without recording more for it.

        :meth:`record_step` closes the step it records already; call ``step()`` for a step that records nothing
        (e.g. skipped by a loss scaler), so that the next one keeps its number.

        Raises:
            WatchError: the watch is on a model trained with ``fit``, which closes steps itself; or it is closed.
        """
        self._check_open("step")
        if self._installed:
            raise WatchError(
                "watch.step() is for GradientTape loops; this watch is on a model trained with fit, whose train "
                "step closes each step itself. Remove the watch.step() call (or use gradsight.watch_tape(path) "
                "with record_step(...) for a hand-written loop)."
            )
        self._close_pending()
        self._step += 1

    def _default_log_step(self) -> int:
        """The last recorded step."""
        return max(self._step - 1, 0)

    def _release(self) -> None:
        """Restore the model (``train_step``, ``fit``)."""
        self._uninstall()

    def record_step(
        self,
        gradients: Sequence[Any | None],
        variables: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        outputs: Mapping[str, Any] | None = None,
        output_grads: Mapping[str, Any] | None = None,
        loss: Any = None,
        lr: float | Any = None,
        step: int | None = None,
        optimizer: Any = None,
    ) -> _StepRecord:
        """Record one step of a plain ``tf.GradientTape`` loop (eager), given the tape's gradients.

        Call it after ``tape.gradient`` and before the optimizer's update; use the returned object as a context
        manager around the update to also record it (``update_norm/<variable>`` every step, ``ΔW`` summaries on
        logged steps). The step closes when that block exits (or at the next ``record_step``, ``step()``,
        ``flush()``, read or ``close()`` when there is none): its scalars are recorded every step, tensor
        summaries (weights as they were at this call, gradients, outputs, output gradients, updates) at logged
        steps and at steps an anomaly captures (see :mod:`gradsight._anomaly`).

        Example::

            grads = tape.gradient(loss, [W1, W2, Z1])
            with watch.record_step(grads[:2], {"W1": W1, "W2": W2}, outputs={"Z1": Z1},
                                   output_grads={"Z1": grads[2]}, loss=loss, optimizer=optimizer):
                optimizer.apply(grads[:2], [W1, W2])

        Args:
            gradients: one gradient per variable (``None`` for an unconnected one, recorded as zeros).
            variables: the variables, as a sequence (named by ``.path`` or ``.name``) or a ``{name: variable}``
                mapping; default: the watched model's trainable variables.
            outputs: intermediate tensors by layer name (unit axis: the last).
            output_grads: their gradients ``dJ/dA`` by the same names; ``None`` records none (``tape.gradient``
                gives ``None`` for a softmax/sigmoid output whose Keras cross-entropy reads its cached logits).
            loss: the step's loss (a scalar).
            lr: the learning rate (a number, a variable, or an optimizer's ``learning_rate``); default: the
                ``optimizer``'s, read now (before its update).
            step: the step number; default: one after the last recorded step.
            optimizer: the Keras optimizer that applies ``gradients``, if any: its clipping (``clipnorm``,
                ``global_clipnorm``, ``clipvalue``) defines ``grad_norm`` (``grad_norm_preclip`` is then the
                gradients as given), a ``LossScaleOptimizer``'s scale is divided out of the gradients, and a
                step whose update it skipped is recorded as ``step_skipped``. Without it the gradients as
                given are what the optimizer receives.

        Returns:
            A :class:`_StepRecord`; use it as a context manager to also record updates.

        Raises:
            InputError: gradients or variables are no lists, differ in number, a gradient's shape is not its
                variable's, a variable is no ``tf.Variable``/``keras.Variable``, ``loss``/``lr`` is no scalar, or
                an output gradient names no output.
            WatchError: the watch is closed.
        """
        self._check_open("record_step")
        self._close_pending()
        names, var_list = self._tape_variables(variables)
        grads = _tape_gradients(gradients, var_list)
        outputs = dict(outputs or {})
        output_grads = dict(output_grads or {})
        extra = sorted(set(output_grads) - set(outputs))
        if extra:
            raise InputError(
                f"record_step: output_grads has names {extra!r} that are not in outputs {sorted(outputs)!r}; "
                "pass each intermediate tensor in outputs= and its gradient under the same name in output_grads=."
            )
        s = self._step if step is None else int(step)
        rec = _StepRecord(self, s, names, var_list, grads=grads, outputs=outputs, output_grads=output_grads)
        rec.start(loss, lr, optimizer)  # checks loss and lr: a bad one leaves the step count as it was
        self._step = s + 1
        self._pending = rec
        return rec

    def flush(self) -> None:
        """Commit everything recorded so far (see WatchCore).

        First it closes a pending ``record_step`` step and reads the steps ``fit`` left in the device buffers.
        """
        if not self._closed:
            self._close_pending()
            self._drain()
        super().flush()

    def _before_close(self) -> None:
        self._close_pending()
        self._drain()

    def _close_pending(self) -> None:
        rec, self._pending = self._pending, None
        if rec is not None and not rec.closed:
            self._close_tape_step(rec)

    def _close_tape_step(self, rec: _StepRecord) -> None:
        """Record a ``record_step`` step: its scalars, the anomaly judge, and its summaries when it is full."""
        rec.closed = True
        if self._pending is rec:
            self._pending = None
        s, scal = rec.step, dict(rec.scalars)
        skipped = rec.skipped()
        if self.schedule.cheap:
            pre = norms(rec.grads, rec.scale)
            post = clipped_norms(pre, rec.grads, rec.scale, rec.rule)
            update = norms(rec.deltas).numpy().tolist() if rec.deltas is not None else None
            scal.update(
                _signal_scalars(
                    tuple(rec.names),
                    post=post.numpy().tolist(),
                    pre=pre.numpy().tolist(),
                    bad=nonfinite_counts(rec.grads, pre).numpy().tolist(),
                    g=float(global_norm(post)),
                    g_pre=float(global_norm(pre)),
                    weight=norms(rec.before).numpy().tolist(),
                    update=update,
                    clipping=rec.rule is not None,
                )
            )
        if skipped:
            scal["step_skipped"] = 1.0
            for n in rec.names:
                scal.pop(f"update_norm/{n}", None)
        self._buffer_scalars(s, scal)
        self._maybe_flush_scalars()
        if self._judge(s, scal) or self._full_step(s):  # the judge first: it opens a capture at s
            grads = applied_gradients(rec.grads, rec.scale, rec.rule)  # unscaled, and clipped where it clips
            self._record_tensors(s, rec.names, rec.before, grads, rec.outputs, rec.output_grads)
            if rec.deltas is not None and "update" in self.schedule.kinds:
                entries = [
                    _Entry(n, n.rsplit("/", 1)[0], "update", _shape(d), _dtype_name(d))
                    for n, d in zip(rec.names, rec.deltas, strict=True)
                ]
                self._log_packed(s, entries, rec.deltas)

    def _record_tensors(
        self,
        s: int,
        names: list[str],
        var_list: list[Any],
        grads: list[Any],
        outputs: Mapping[str, Any],
        output_grads: Mapping[str, Any],
    ) -> None:
        """Summaries of a tape step's weights, gradients, outputs and output gradients (the kinds asked for)."""
        kinds = self.schedule.kinds
        entries: list[_Entry] = []
        tensors: list[Any] = []

        def add(name: str, layer: str, kind: str, t: Any, units: bool = False) -> None:
            t = tf.convert_to_tensor(t)
            if not _is_float(t):
                return
            u = _units(t) if units and self.schedule.units else None
            entries.append(_Entry(name, layer, kind, _shape(t), _dtype_name(t), u))
            tensors.append(t)

        for kind, vals in (("weight", var_list), ("grad", grads)):
            if kind in kinds:
                for n, v in zip(names, vals, strict=True):
                    add(n, n.rsplit("/", 1)[0], kind, v)
        for n, t in outputs.items():
            if "output" in kinds:
                add(n, n, "output", t, units=True)
        for n, t in output_grads.items():
            if "output_grad" in kinds and t is not None:
                add(n, n, "output_grad", t, units=True)
        self._log_packed(s, entries, tensors)

    # ---- internals: tape path ------------------------------------------------------------------------------
    def _tape_variables(self, variables: Sequence[Any] | Mapping[str, Any] | None) -> tuple[list[str], list[Any]]:
        if variables is None:
            model = self.model
            if model is None:
                raise InputError(
                    "record_step: variables=None needs a watched model; this watch has none. Pass the variables "
                    "the gradients belong to, e.g. record_step(grads, [W1, W2]) or {'W1': W1, 'W2': W2}."
                )
            variables = list(model.trainable_variables)
        example = "Pass the variables the gradients belong to, e.g. [W1, W2] or {'W1': W1, 'W2': W2}."
        if isinstance(variables, Mapping):
            names, var_list = [str(k) for k in variables], list(variables.values())
        else:
            var_list = _sequence("variables", variables, example)
            taken: set[str] = set()
            names = [_var_name(v, taken) for v in var_list]
        for n, v in zip(names, var_list, strict=True):
            why = _not_tf(v) or (None if isinstance(v, (tf.Variable, keras.Variable)) else type(v).__name__)
            if why is not None:
                raise InputError(
                    f"record_step: variable {n!r} must be a tf.Variable or keras.Variable, got {why}. {example}"
                )
        return names, var_list

    def _log_packed(self, step: int, entries: list[_Entry], tensors: list[Any]) -> None:
        if not entries:
            return
        for e in entries:
            e.tid = self._writer.tensor_id(e.name, e.layer, e.kind, e.shape, e.dtype)
        layout = Layout(tuple(e.units for e in entries))
        vec = pack_summaries(tensors, layout).numpy()  # eagerly: tape loops vary shapes, tracing would not pay
        tids = [e.tid for e in entries]
        self._writer.log_summaries(step, lambda: SummaryArrays(tids, rows_from_float64(vec, layout)))

    # ---- internals: fit path -------------------------------------------------------------------------------
    def _install(self) -> None:
        """Put the recording train_step and the fit wrapper on the model instance."""
        model = self.model
        if model is None or self._installed:
            return
        watch = self
        original_fit = model.fit

        def fit(*args: Any, **kwargs: Any) -> Any:
            cbs = kwargs.get("callbacks")
            cbs = [] if cbs is None else list(cbs) if isinstance(cbs, (list, tuple)) else cbs
            if isinstance(cbs, list) and not any(c is watch._callback for c in cbs if watch._callback is not None):
                cbs.insert(0, watch.callback)
                kwargs["callbacks"] = cbs
            watch._fit_flushed = False
            try:
                result = original_fit(*args, **kwargs)
            except BaseException:
                with contextlib.suppress(Exception):  # never mask the exception that stopped fit
                    watch.flush()
                raise
            if not watch._fit_flushed:  # the callback's on_train_end commits (and raises a writer failure) already
                watch.flush()  # a writer failure (StoreError) reaches the user here, not later
            return result

        fit.__doc__ = original_fit.__doc__
        model.train_step = self._train_step
        model.fit = fit
        model.train_function = None  # rebuilt by the next fit with this train_step
        self._installed = True

    def _uninstall(self) -> None:
        model = self.model
        if model is None or not self._installed:
            return
        for attr in ("train_step", "fit"):
            if attr in vars(model):
                with contextlib.suppress(AttributeError):
                    delattr(model, attr)
        model.train_function = None
        self._installed = False

    def _setup(self) -> bool:
        """At each fit's start (eagerly): choose how to tap outputs, size the buffers. Returns whether it changed.

        A model whose trainable variables changed since the last fit (a layer frozen or unfrozen, then
        ``compile``) is discovered again: the step differentiates and updates exactly the variables Keras' own
        step would (``model.trainable_variables`` now), and the run records theirs from this step on.
        """
        model = self.model
        assert model is not None
        slots = max(int(getattr(model, "steps_per_execution", 1) or 1), 1)
        retrain = self._discovered and [id(v) for v in model.trainable_variables] != [id(v) for v in self._vars]
        if self._ready and slots == self._slots and not retrain:
            return False
        first = not self._ready
        self._slots = slots
        if first:
            self._prepare_forward(model)
            self._step_var = tf.Variable(self._step, dtype=tf.int64, trainable=False)
        if first or retrain:
            if retrain:
                self._drain()  # the rows in the old layout (fit's end read them already; this is cheap)
                self._discovered = False
                self._graph_anomalies = None  # its signals are per variable: judged afresh
            specs = self._output_specs(model)
            if specs is not None:  # discover now, eagerly: no variable is then created while tracing the step
                self._discover(model, specs)
        elif self._discovered:
            self._make_buffers()
        self._seen = int(self._step_var.numpy())
        self._undrained, self._drained_at = 0, time.monotonic()
        self._ready = True
        return True

    def _make_buffers(self) -> None:
        width = len(HEAD) + (len(BLOCKS) * len(self._vars) if self.schedule.cheap else 0)
        self._ring = _ring_rows(self._slots, 8 * (width + self._pre_layout.size + self._post_layout.size))
        init = np.zeros([self._ring, width])
        init[:, _H["step"]] = -1.0
        self._scal_buf = tf.Variable(tf.constant(init, tf.float64), trainable=False)
        self._pre_buf = tf.Variable(tf.zeros([self._ring, self._pre_layout.size], tf.float64), trainable=False)
        self._post_buf = tf.Variable(tf.zeros([self._ring, self._post_layout.size], tf.float64), trainable=False)
        rule = self.schedule.anomalies()
        if rule is not None and self._graph_anomalies is None:  # its state outlives a change of buffer size
            self._signal_names = [*ANOMALY_SIGNALS, *(f"update_norm/{n}" for n in self._var_names)]
            self._graph_anomalies = GraphAnomalies(rule, len(self._signal_names))

    def _prepare_forward(self, model: Any) -> None:
        """Decide how the train step exposes layer outputs: a tap model, a layer loop, or not at all."""
        kinds = self.schedule.kinds
        want_outputs = "output" in kinds or "output_grad" in kinds
        own_call = _is_keras_own(type(model).call)
        self._structure = (
            "sequential" if isinstance(model, keras.Sequential) else "functional" if own_call else "subclassed"
        )
        skipped: list[str] = []
        if want_outputs and own_call:
            try:
                model_input, model_output = model.input, model.output
            except (AttributeError, ValueError):
                model_input = model_output = None
            if model_input is not None:
                outs: list[tuple[str, str, Any]] = []
                for layer in model.layers:
                    if isinstance(layer, keras.layers.InputLayer):
                        continue
                    if len(getattr(layer, "_inbound_nodes", ())) > 1:  # called more than once: layer.output
                        skipped.append(layer.name)  # would be its first call's alone
                        continue
                    try:
                        out = layer.output
                    except (AttributeError, ValueError, RuntimeError):
                        skipped.append(layer.name)
                        continue
                    outs.extend((n, layer.name, t) for n, t in _flatten_named(layer.name, out))
                flat_out = keras.tree.flatten(model_output)
                self._tap = keras.Model(model_input, [*flat_out, *(t for _, _, t in outs)])
                self._tap_n_out = len(flat_out)
                self._model_output_struct = model_output
                self._out_names = [(n, lay) for n, lay, _ in outs]
                self._out_axes = _channel_axes(model, [(lay, t) for _, lay, t in outs])
            elif isinstance(model, keras.Sequential):
                self._seq_layers = list(model.layers)
                self._out_names = [(layer.name, layer.name) for layer in self._seq_layers]
        elif want_outputs:
            self._notes.append(
                f"layer outputs and output gradients are not recorded: {type(model).__name__} is a subclassed "
                "model (its call() is user code, so gradsight cannot tap intermediate tensors in the graph); "
                "weights, gradients and updates are recorded."
            )
        if skipped:
            self._notes.append(f"outputs of layers called more than once (shared layers) are not recorded: {skipped!r}")

    def _output_specs(self, model: Any) -> list[tf.TensorSpec] | None:
        r"""The tapped layer outputs' specs, known before any trace, or ``None`` when only a trace can tell.

        ``fit`` builds the model (and its optimizer) before its callbacks' ``on_train_begin``, so the weights
        exist by then; a tap model's outputs are symbolic tensors with their dtypes and shapes. A Sequential
        model's layers (called in a loop) have an output each once the model is built. Models that are not
        built yet and outputs with an unknown non-batch dimension (whose traced shape the run's metadata
        records) are discovered at the first trace instead.

        Discovering before the trace matters for start-up: the watch creates its buffers (``tf.Variable``\s)
        at discovery, and a ``tf.function`` whose first trace creates variables is traced a second time.
        """
        if not getattr(model, "built", False):
            return None
        if self._seq_layers is not None:
            try:  # a built Sequential model's layers were called once, on its symbolic input
                outs = [layer.output for layer in self._seq_layers]
            except (AttributeError, ValueError, RuntimeError):
                return None
        elif self._tap is not None:
            outs = list(self._tap.outputs[self._tap_n_out :])
        else:
            return []
        specs = []
        for t in outs:
            if not isinstance(t, keras.KerasTensor):
                return None
            shape = tuple(t.shape)
            if any(d is None for d in shape[1:]):
                return None
            specs.append(tf.TensorSpec(shape, tf.as_dtype(_dtype_name(t))))
        return specs

    def _discover(self, model: Any, inter: list[Any]) -> None:
        """Once: the variables, the recorded tensors, the buffers; before the first trace or during it."""
        kinds = self.schedule.kinds
        self._vars = list(model.trainable_variables)
        if not self._vars:
            raise UnsupportedError(
                f"the model {model.name!r} has no trainable weights, so there are no gradients to record. "
                "Unfreeze a layer (layer.trainable = True) before training it with a watch."
            )
        owner: dict[int, str] = {}
        for layer in getattr(model, "layers", []):
            for v in layer.trainable_variables:
                owner.setdefault(id(v), layer.name)
        taken: set[str] = set()
        names = self._var_names = tuple(_var_name(v, taken) for v in self._vars)
        layers = [owner.get(id(v), n.rsplit("/", 1)[0]) for v, n in zip(self._vars, names, strict=True)]
        pre: list[_Entry] = []
        for kind in ("weight", "grad"):
            if kind in kinds:
                pre += [
                    _Entry(n, lay, kind, _shape(v), _dtype_name(v))
                    for n, lay, v in zip(names, layers, self._vars, strict=False)
                ]
        self._out_mask = [t.dtype.is_floating for t in inter]
        self._no_output_grad = set()  # judged again at the next trace (the loss may have changed)
        if self._out_axes is None:  # a Sequential model's layers, called in a loop: built by now
            self._out_axes = _channel_axes(
                model, [(layer.name, _output_or_none(layer)) for layer in self._seq_layers or []]
            )
        axes = self._out_axes or [None] * len(inter)
        for (name, layer), t, ok, axis in zip(self._out_names, inter, self._out_mask, axes, strict=True):
            if not ok:
                continue
            u = _units(t, axis) if self.schedule.units else None
            axis = axis if u else None
            if "output" in kinds:
                pre.append(_Entry(name, layer, "output", _batch_shape(t), t.dtype.name, u, axis=axis))
            if "output_grad" in kinds:
                pre.append(_Entry(name, layer, "output_grad", _batch_shape(t), t.dtype.name, u, axis=axis))
        self._pre = pre
        self._post_vars = self._vars if "update" in kinds else []
        self._post = [
            _Entry(n, lay, "update", _shape(v), _dtype_name(v))
            for n, lay, v in zip(names, layers, self._post_vars, strict=False)
        ]
        for e in self._pre + self._post:
            if e.kind != "output_grad":  # those at the first trace, which tells which ones have a gradient
                e.tid = self._writer.tensor_id(e.name, e.layer, e.kind, e.shape, e.dtype)
        self._pre_layout = Layout(tuple(e.units for e in self._pre))
        self._post_layout = Layout(tuple(e.units for e in self._post))
        with tf.init_scope():  # variables are created eagerly, outside the function being traced
            self._make_buffers()
        self._write_model_meta(model)
        self._discovered = True

    def _write_model_meta(self, model: Any) -> None:
        layers = []
        for layer in getattr(model, "layers", []):
            params = {_var_name(v, set()): list(_shape(v)) for v in layer.weights}
            entry: dict[str, Any] = {"name": layer.name, "type": type(layer).__name__, "params": params}
            activation = getattr(layer, "activation", None)
            if activation is not None:  # e.g. Dense(activation="tanh"): lets diagnosis judge saturation
                entry["activation"] = getattr(activation, "__name__", str(activation))
            layers.append(entry)
        meta = {"name": model.name, "type": type(model).__name__, "structure": self._structure, "layers": layers}
        meta["output_layers"] = _output_layers(model)
        self._writer.set_meta("model", meta)
        self._loss_meta = _loss_meta(getattr(model, "loss", None))
        self._writer.set_meta("loss", self._loss_meta)
        self._writer.set_meta("notes", self._notes)

    def _note_new_loss(self, model: Any) -> None:
        """At a trace after the first: a model compiled again with another loss gets it recorded, and a note.

        ``meta["loss"]`` then says the loss the latest steps trained with (what the diagnosis reads); the note
        says from which step, and what it was before.
        """
        now = _loss_meta(getattr(model, "loss", None))
        if now == self._loss_meta:
            return
        with tf.init_scope():  # a trace: read the step counter's value eagerly
            step = int(self._step_var.numpy())
        note = (
            f"the model was compiled again with another loss: {now!r} from step {step} on (before: {self._loss_meta!r})"
        )
        self._loss_meta = now
        self._notes.append(note)
        self._writer.set_meta("loss", now)
        self._writer.set_meta("notes", self._notes)

    def _forward(self, model: Any, x: Any, y: Any, sample_weight: Any) -> tuple[Any, list[Any], Any]:
        """The forward pass inside the train step's tape: predictions, tapped layer outputs, the loss."""
        inter: list[Any] = []
        if self._tap is not None:
            flat = self._tap(x, training=True)
            y_pred = keras.tree.pack_sequence_as(self._model_output_struct, flat[: self._tap_n_out])
            inter = list(flat[self._tap_n_out :])
        elif self._seq_layers is not None:
            h = x
            for layer in self._seq_layers:
                h = layer(h, training=True)
                inter.append(h)
            y_pred = h
        else:
            y_pred = model(x, training=True) if _has_training_arg(model) else model(x)
        if "training" in inspect.signature(model.compute_loss).parameters:
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
        else:
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        batch = tf.shape(next(t for t in keras.tree.flatten(x) if t is not None))[0]
        for m in model.metrics:
            if m.name == "loss":
                m.update_state(loss, sample_weight=batch)
                break
        return y_pred, inter, loss

    # The recording train step (traced by Keras' make_train_function into a tf.function).
    def _train_step(self, data: Any) -> Any:
        model = self.model
        assert model is not None
        if not self._ready:
            raise WatchError(
                "the gradsight watch's train step ran before its callback set it up: the model was trained "
                "without model.fit (e.g. train_on_batch). Use model.fit, or pass callbacks=[watch.callback]."
            )
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        opt = model.optimizer
        with tf.GradientTape() as tape:
            y_pred, inter, loss = self._forward(model, x, y, sample_weight)
            scaled = opt.scale_loss(loss) if opt is not None else loss
        if not self._discovered:
            self._discover(model, inter)
        else:
            self._note_new_loss(model)
        inter = [t for t, ok in zip(inter, self._out_mask, strict=True) if ok]
        need_inter = bool(inter) and "output_grad" in self.schedule.kinds
        all_grads = tape.gradient(scaled, self._vars + (inter if need_inter else []))
        grads = list(all_grads[: len(self._vars)])
        inter_grads = list(all_grads[len(self._vars) :]) if need_inter else [None] * len(inter)
        if need_inter:
            self._settle_output_grads(inter, inter_grads)
        inv = _unscale(opt)
        safe_grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, self._vars, strict=True)]
        self._clip = clip_rule(opt)

        step = self._step_var.read_value()
        # W_before: reads, which the optimizer's in-place updates leave intact (TensorFlow copies a variable's
        # buffer before updating it while a read of it is alive): one copy of the weights per step.
        before = [tf.identity(v.value) for v in self._vars]
        lr = _learning_rate(opt)  # before apply: a schedule reads the iteration this update uses
        iterations = _iterations(opt)
        opt.apply(grads, self._vars)
        skipped = tf.constant(False) if iterations is None else tf.equal(_iterations(opt), iterations)
        deltas = self._deltas(before) if self.schedule.cheap else None  # else only where packed

        head = dict.fromkeys(HEAD, tf.constant(0.0, tf.float64))
        head.update(
            loss=tf.cast(loss, tf.float64), lr=lr, skipped=tf.cast(skipped, tf.float64), step=tf.cast(step, tf.float64)
        )
        record = tf.equal(step % self.schedule.every, 0) if self.schedule.every > 0 else tf.constant(False)
        blocks: list[Any] = []
        if self.schedule.cheap:
            record, blocks = self._signals(step, head, record, safe_grads, inv, before, deltas, skipped)
        head["record"] = tf.cast(record, tf.float64)
        slot = tf.cast(step % self._ring, tf.int32)
        packed = (safe_grads, inv, before, deltas, inter, inter_grads)
        xla = bool(getattr(model, "jit_compile", False))
        rare_cond(record, lambda: self._pack(slot, *packed, xla=xla), lambda: tf.constant(False), xla=xla)
        _write_slot(self._scal_buf, slot, tf.concat([tf.stack([head[k] for k in HEAD]), *blocks], 0))
        self._step_var.assign_add(1)
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _inter_names(self) -> list[str]:
        """The names of the tapped floating-point outputs (``inter`` after the dtype mask), in their order."""
        return [n for (n, _), ok in zip(self._out_names, self._out_mask, strict=True) if ok]

    def _settle_output_grads(self, inter: list[Any], inter_grads: list[Any]) -> None:
        """At a trace: drop the output gradients the tape cannot give, register the others' tensors.

        Keras' cross-entropies with ``from_logits=False`` (TensorFlow backend) do not read a softmax / sigmoid
        output: they read the logits the activation cached on it (``output._keras_logits``) and apply the fused,
        stable formula. The activation's output is then off the differentiated path, and ``tape.gradient`` returns
        ``None`` for it although the loss depends on it. That is not a zero gradient, and dJ/dA of the
        probabilities cannot be recovered from the logits' gradient (the softmax Jacobian is singular), nor
        computed without evaluating the loss a second time in a form Keras does not train with. So the watch
        records no ``output_grad`` for such an output (the run's notes and a warning say why), rather than
        zeros that would read as a dead or disconnected layer. A ``None`` for any other output means the loss
        does not depend on it: its gradient is zero, and recorded so.
        """
        names = self._inter_names()
        shortcut = [
            n
            for n, t, g in zip(names, inter, inter_grads, strict=True)
            if g is None and getattr(t, "_keras_logits", None) is not None and n not in self._no_output_grad
        ]
        if shortcut:
            self._no_output_grad.update(shortcut)
            note = (
                f"output gradients (dJ/dA) of {shortcut!r} are not recorded: the loss (a Keras cross-entropy with "
                "from_logits=False) reads the logits cached by their softmax/sigmoid, not their output, so the "
                "gradient through them is never computed. Their logits' layer has its output gradient; for theirs, "
                "end the model with the logits and use from_logits=True."
            )
            self._notes.append(note)
            self._writer.set_meta("notes", self._notes)
            warnings.warn(f"gradsight: {note}", GradsightWarning, stacklevel=2)
            self._pre = [e for e in self._pre if not (e.kind == "output_grad" and e.name in self._no_output_grad)]
            self._pre_layout = Layout(tuple(e.units for e in self._pre))
            with tf.init_scope():  # the first trace of this step: a new variable is allowed (it traces again)
                self._pre_buf = tf.Variable(tf.zeros([self._ring, self._pre_layout.size], tf.float64), trainable=False)
        for e in self._pre:
            if not e.tid:  # 0: not registered yet (the writer's ids start at 1)
                e.tid = self._writer.tensor_id(e.name, e.layer, e.kind, e.shape, e.dtype)

    def _deltas(self, before: list[Any]) -> list[Any]:
        """``W_after - W_before`` of every variable (after ``apply``)."""
        return [tf.identity(v.value) - b for v, b in zip(self._vars, before, strict=True)]

    def _signals(
        self,
        step: tf.Tensor,
        head: dict[str, Any],
        record: tf.Tensor,
        grads: list[Any],
        inv: tf.Tensor | None,
        before: list[Any],
        deltas: list[Any],
        skipped: tf.Tensor,
    ) -> tuple[tf.Tensor, list[Any]]:
        """The per-step signals (in graph) and the anomaly judge; returns ``(record, per-variable blocks)``."""
        pre = norms(grads, inv)
        post = clipped_norms(pre, grads, inv, self._clip)
        weight, update = norms(before), norms(deltas)
        head["grad_norm_preclip"] = global_norm(pre)
        head["grad_norm"] = head["grad_norm_preclip"] if self._clip is None else global_norm(post)
        judge = self._graph_anomalies
        if judge is not None:
            values = tf.concat([tf.stack([head["loss"], head["grad_norm_preclip"], head["grad_norm"]]), update], 0)
            has_update = tf.fill([len(self._vars)], tf.logical_not(skipped))  # no update_norm at a skipped step
            present = tf.concat([tf.ones([len(ANOMALY_SIGNALS)], tf.bool), has_update], 0)
            a = judge.observe(step, values, present)
            record = tf.logical_or(record, a["captured"])
            head.update(
                anomaly=tf.cast(a["start"], tf.float64),
                anomaly_signal=tf.cast(a["signal"], tf.float64),
                anomaly_reason=tf.cast(a["reason"], tf.float64),
                anomaly_value=a["value"],
                anomaly_baseline=a["baseline"],
                anomaly_suppressed=tf.cast(a["suppressed"], tf.float64),
                anomaly_last=tf.cast(a["last"], tf.float64),
            )
        return record, [post, pre, nonfinite_counts(grads, pre), weight, update]

    def _pack(
        self,
        slot: tf.Tensor,
        grads: list[Any],
        inv: tf.Tensor | None,
        before: list[Any],
        deltas: list[Any] | None,
        inter: list[Any],
        inter_grads: list[Any],
        *,
        xla: bool,
    ) -> tf.Tensor:
        """Full summaries of this step into its buffer slot (after the update: W_before is a read taken before)."""
        kinds = self.schedule.kinds
        tensors: list[Any] = []
        scales: list[Any] = []
        if "weight" in kinds:
            tensors += before
            scales += [None] * len(before)
        if "grad" in kinds:  # as the optimizer applies them: unscaled, and clipped where it clips
            if self._clip is None:
                tensors += grads
                scales += [inv] * len(grads)
            else:
                tensors += applied_gradients(grads, inv, self._clip)
                scales += [None] * len(grads)
        for t, g, name in zip(inter, inter_grads, self._inter_names(), strict=True):
            if "output" in kinds:
                tensors.append(t)
                scales.append(None)
            if "output_grad" in kinds and name not in self._no_output_grad:
                # None: an output the loss does not depend on (dJ/dA = 0); the logits shortcut is excluded above
                tensors.append(tf.zeros_like(t) if g is None else g)
                scales.append(inv)
        if self._pre_layout.size:
            axes = [e.axis for e in self._pre]
            _write_slot(self._pre_buf, slot, pack_summaries(tensors, self._pre_layout, scales, xla=xla, axes=axes))
        if self._post_layout.size:
            deltas = self._deltas(before) if deltas is None else deltas
            _write_slot(self._post_buf, slot, pack_summaries(deltas, self._post_layout, xla=xla))
        return tf.constant(True)

    # Host side: called by the callback after each train_function call.
    def _ran(self) -> None:
        """After a ``train_function`` call: read the buffers when they are full, or have waited long enough.

        With one step per call the buffers hold ``_ring`` steps, so most calls read nothing (the step count
        advances all the same); with several steps per call every call reads them (``_ring`` is then the
        number of steps per call). A read is also due after ``commit_every`` seconds, so that slow steps keep
        their signals on the device no longer than a crash is allowed to lose.
        """
        if not self._ready or not self._discovered:
            return
        self._undrained += self._slots
        if self._slots == 1:
            self._step = max(self._step, self._seen + self._undrained)
        if (
            self._undrained + self._slots > self._ring
            or time.monotonic() - self._drained_at >= self.schedule.commit_every
        ):
            self._drain()

    def _drain(self) -> None:
        """Read the per-step buffers (one device read: the rows carry their step) and record the steps not read."""
        if not self._ready or not self._discovered:  # not discovered: the train step has not run yet
            return
        with self._drain_lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        scal = self._scal_buf.numpy()
        self._undrained, self._drained_at = 0, time.monotonic()
        now = max(self._seen, int(scal[:, _H["step"]].max()) + 1)
        first = max(self._seen, now - self._ring)
        if first > self._seen:  # cannot happen while _ran reads in time; say so rather than lose steps quietly
            warnings.warn(
                f"gradsight: the per-step signals of steps {self._seen}..{first - 1} were overwritten on the "
                f"device before they were read, and are missing from {str(self.path)!r}. Please report this.",
                GradsightWarning,
                stacklevel=2,
            )
        self._seen = now
        self._step = max(self._step, now)
        full: list[int] = []
        for s in range(first, now):
            row = scal[s % self._ring]
            self._buffer_row(s, row)
            if row[_H["anomaly"]]:
                self._writer.log_event(s, "anomaly", self._anomaly_event(s, row))
            if row[_H["record"]]:
                full.append(s)
        self._maybe_flush_scalars()
        if full:
            self._drain_summaries(full)

    def _buffer_row(self, s: int, row: Any) -> None:
        """Buffer one step's scalars from its buffer row (see :data:`HEAD`, :data:`BLOCKS`, the schedule's table).

        The per-step signals go as one dense row (:func:`gradsight._watch_core.signal_row`, with the graph's own
        global norms, which its anomaly judge used); the loss as a scalar.
        """
        skipped = bool(row[_H["skipped"]])
        lr = float(row[_H["lr"]])
        self._scalars.append((s, "loss", float(row[_H["loss"]])))
        n = len(self._var_names)
        if self.schedule.cheap and n:
            k = len(HEAD)
            post, pre, bad, weight, update = (row[k + i * n : k + (i + 1) * n].tolist() for i in range(len(BLOCKS)))
            names, values, sparse = signal_row(
                self._var_names,
                post,
                bad,
                preclip=pre if self._clip is not None else None,
                param_names=self._var_names,
                weight=weight,
                update=None if skipped else update,
                lr={"lr": lr},
                skipped=skipped,
                totals=(float(row[_H["grad_norm"]]), float(row[_H["grad_norm_preclip"]])),
            )
            self._buffer_signals(s, names, values, sparse)
            return
        self._scalars.append((s, "lr", lr))
        if skipped:
            self._scalars.append((s, "step_skipped", 1.0))

    def _anomaly_event(self, s: int, row: Any) -> dict[str, Any]:
        """The ``anomaly`` event's payload of a capture the graph started at step ``s`` (as ``Anomalies``')."""
        base = float(row[_H["anomaly_baseline"]])
        return {
            "step": s,
            "reason": "non-finite" if row[_H["anomaly_reason"]] else "jump",
            "signal": self._signal_names[int(row[_H["anomaly_signal"]])],
            "value": _json_float(float(row[_H["anomaly_value"]])),
            "baseline": None if math.isnan(base) else base,
            "factor": self.schedule.anomaly_factor,
            "captured": [s, int(row[_H["anomaly_last"]])],
            "suppressed": int(row[_H["anomaly_suppressed"]]),
        }

    def _drain_summaries(self, logged: list[int]) -> None:
        """Hand the logged steps' packed buffers to the writer, unpacked on its thread into the one row layout."""
        pre = self._pre_buf.numpy() if self._pre_layout.size else None
        post = self._post_buf.numpy() if self._post_layout.size else None
        tids = [e.tid for e in self._pre if pre is not None] + [e.tid for e in self._post if post is not None]
        pre_layout, post_layout = self._pre_layout, self._post_layout
        for s in logged:
            slot = s % self._ring
            a = None if pre is None else pre[slot].copy()
            b = None if post is None else post[slot].copy()

            def items(a: Any = a, b: Any = b) -> SummaryArrays:
                parts = []
                if a is not None:
                    parts.append(rows_from_float64(a, pre_layout))
                if b is not None:
                    parts.append(rows_from_float64(b, post_layout))
                return SummaryArrays(tids, Rows.concat(parts))

            self._writer.log_summaries(s, items)


def _not_tf(x: Any) -> str | None:
    """Why ``x`` is no TensorFlow value ``record_step`` can read (``None`` when it is one, or may be)."""
    module = type(x).__module__ or ""
    if module.split(".")[0] == "torch":
        return (
            f"a PyTorch {type(x).__name__}; record_step is for TensorFlow GradientTape loops (for a torch model "
            "use gradsight.watch(model), whose hooks record the gradients)"
        )
    if isinstance(x, keras.layers.Layer):
        return f"a Keras {type(x).__name__} ({x.name!r}); pass its variables: model.trainable_variables"
    return None


def _describe(x: Any) -> str:
    """A short description of a value for an error message: its type, and its shape or value."""
    shape = getattr(x, "shape", None)
    if x is None:
        return "None"
    if shape is not None:
        return f"a {type(x).__name__} of shape {list(shape)}"
    return f"{type(x).__name__} {x!r:.60}"


def _sequence(what: str, value: Any, example: str) -> list[Any]:
    """``value`` as a list, or an InputError when it is no sequence of values (None, a tensor, a mapping...)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    why = _not_tf(value)
    if why is None and (value is None or isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence)):
        why = _describe(value)
    if why is not None:
        raise InputError(f"record_step: {what} must be a list with one entry per variable, got {why}. {example}")
    return list(value)


def _tape_gradients(gradients: Sequence[Any | None], variables: list[Any]) -> list[Any]:
    """``record_step``'s gradients as tensors, one per variable (zeros for ``None``: an unconnected variable).

    An ``IndexedSlices`` gradient (an embedding's) is checked against its variable and made dense.

    Raises:
        InputError: no list, not one gradient per variable, or a gradient that is no tensor of its variable's shape.
    """
    grads = _sequence("gradients", gradients, "Pass grads = tape.gradient(loss, variables).")
    if len(grads) != len(variables):
        raise InputError(
            f"record_step: got {len(grads)} gradients for {len(variables)} variables; pass one gradient per "
            "variable, in the same order (grads = tape.gradient(loss, variables))."
        )
    out = []
    for i, (g, v) in enumerate(zip(grads, variables, strict=True)):
        want = _shape(v)
        if g is None:
            out.append(tf.zeros_like(v))
            continue
        why = _not_tf(g)
        if isinstance(g, tf.IndexedSlices):
            dense = None if g.dense_shape is None else tf.get_static_value(g.dense_shape)
            got = tuple(int(d) for d in dense) if dense is not None else (None, *_shape(g.values)[1:])
            ok = got[1:] == want[1:] and got[0] in (None, want[0])
        else:
            try:
                g = tf.convert_to_tensor(g) if why is None else g
            except (TypeError, ValueError) as e:
                why = f"{type(g).__name__} ({e})"
            got = _shape(g) if why is None else ()
            ok = got == want
        if why is not None or not ok:
            raise InputError(
                f"record_step: gradient {i} does not fit variable {i} ({_var_name(v, set())!r}, shape {list(want)}): "
                f"got {why or f'shape {list(got)}'}. Pass the gradients of grads = tape.gradient(loss, variables) "
                "in the order of the variables."
            )
        out.append(tf.convert_to_tensor(g))
    return out


def _scalar(what: str, value: Any) -> float:
    """A number from a scalar (Python number, NumPy or TensorFlow scalar, variable), or an InputError."""
    why = _not_tf(value)
    if why is None:
        try:
            a = np.asarray(value)
            if a.size == 1 and a.dtype.kind in "biuf":
                return float(a.reshape(()))
            why = _describe(value) if a.dtype.kind in "biufc" else f"{type(value).__name__} {value!r:.60}"
        except (TypeError, ValueError) as e:
            why = f"{type(value).__name__} ({e})"
    raise InputError(f"record_step: {what} must be a number or a scalar tensor, got {why}. Pass e.g. {what}=loss.")


#: Rows of the device buffers when ``fit`` runs one step per call: the host reads them every this many steps.
RING_STEPS = 32
#: The most memory the buffers' extra rows may take (they hold a logged step's packed summaries each).
RING_BYTES = 8 << 20


def _ring_rows(slots: int, row_bytes: int) -> int:
    """The rows of the device buffers: ``RING_STEPS`` with one step per call (fewer for large rows), else ``slots``.

    With several steps per ``train_function`` call the host reads after every call, as the number of steps a
    call ran is known only from the buffers.
    """
    if slots > 1:
        return slots
    return max(1, min(RING_STEPS, RING_BYTES // max(row_bytes, 1)))


def _write_slot(buf: tf.Variable, slot: tf.Tensor, row: tf.Tensor) -> None:
    """``buf[slot] = row`` with a scatter, whose index XLA takes at run time.

    (``buf[slot].assign`` is a strided slice, whose bounds XLA needs as compile-time constants: under
    ``jit_compile=True`` it recompiled the train step at every step, the slot being computed from the step.)
    """
    buf.scatter_nd_update(tf.reshape(slot, [1, 1]), row[None, :])


def _unscale(opt: Any) -> tf.Tensor | None:
    """``1 / loss_scale`` as a float64 scalar for an optimizer that scales the loss, else ``None`` (nothing to undo).

    A ``LossScaleOptimizer`` (its dynamic scale) or any optimizer with a ``loss_scale_factor``.
    """
    if opt is None:
        return None
    if getattr(opt, "inner_optimizer", None) is None and getattr(opt, "loss_scale_factor", None) is None:
        return None
    return tf.math.reciprocal(tf.cast(opt.scale_loss(tf.constant(1.0, tf.float32)), tf.float64))


def _learning_rate(opt: Any) -> tf.Tensor:
    """The optimizer's current learning rate as a float64 scalar (NaN when it has none)."""
    if opt is not None:
        with contextlib.suppress(Exception):
            return tf.cast(tf.convert_to_tensor(opt.learning_rate), tf.float64)
    return tf.constant(math.nan, tf.float64)


def _iterations(opt: Any) -> tf.Tensor | None:
    """A read of the optimizer's update counter (a ``LossScaleOptimizer``'s: its inner optimizer's), or ``None``.

    It does not advance at a step whose update was skipped.
    """
    it = getattr(opt, "iterations", None)
    if it is None:
        return None
    return tf.identity(getattr(it, "value", it))


def _signal_scalars(
    names: tuple[str, ...],
    *,
    post: list[float],
    pre: list[float],
    bad: list[float],
    g: float,
    g_pre: float,
    weight: list[float],
    update: list[float] | None,
    clipping: bool,
) -> dict[str, float]:
    """One step's per-step signals by the table of :mod:`gradsight._schedule`, from its norms (both paths).

    :func:`gradsight._watch_core.signal_scalars`, given the graph's own global sums (``g``, ``g_pre``), which its
    anomaly judge used.
    """
    return signal_scalars(
        names,
        post,
        bad,
        preclip=pre if clipping else None,
        param_names=names,
        weight=weight,
        update=update,
        totals=(g, g_pre),
    )


def _json_float(v: float) -> float | str:
    """A float for a JSON payload: non-finite values as ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has none)."""
    return v if math.isfinite(v) else str(v)


def _units(t: Any, axis: int | None = None) -> int | None:
    """The number of units of a layer output: along ``axis`` (1: a channels-first layer's), else the last."""
    rank = t.shape.rank or 0
    axis = unit_axis(rank, channel_first=axis == 1)
    if axis is None or not t.shape[axis]:
        return None
    return int(t.shape[axis])


def _output_or_none(layer: Any) -> Any:
    try:
        return layer.output
    except (AttributeError, ValueError, RuntimeError):
        return None


def _channel_axes(model: Any, outputs: Sequence[tuple[str, Any]]) -> list[int | None]:
    """Per ``(layer name, symbolic output)`` in call order: 1 where the output's units lie on axis 1, else None.

    The shared unit-axis rule (:func:`gradsight._watch_core.unit_axis`) for Keras: Keras layers are channels-last
    unless told otherwise, so the last axis, except for outputs of 3 or more dims of a layer with
    ``data_format="channels_first"`` (convolutions, pooling), a batch or group normalization over ``axis=1``,
    and a layer without weights (an activation, dropout) whose input is such an output of the same shape.
    """
    layers = {layer.name: layer for layer in getattr(model, "layers", [])}
    first: dict[int, bool] = {}  # id(symbolic tensor) -> channels-first
    axes: list[int | None] = []
    for name, out in outputs:
        layer = layers.get(name)
        shape = tuple(getattr(out, "shape", ()) or ())
        cf = False
        if layer is not None and len(shape) >= 3:
            norm_axis = (
                getattr(layer, "axis", None)
                if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.GroupNormalization))
                else None
            )
            cf = getattr(layer, "data_format", None) == "channels_first" or norm_axis in (1, [1], (1,))
            if not cf and not layer.weights:
                inp = getattr(layer, "_inbound_nodes", None) and layer._inbound_nodes[0].input_tensors
                inp = inp[0] if inp and len(inp) == 1 else None
                cf = inp is not None and first.get(id(inp), False) and tuple(inp.shape) == shape
        if out is not None:
            first[id(out)] = cf
        axes.append(1 if cf else None)
    return axes


def _one_element(v: Any) -> bool:
    """Whether ``v`` is a one-element array or tensor (numpy, TensorFlow, Keras)."""
    try:
        return int(np.size(np.asarray(v))) == 1 and np.asarray(v).dtype.kind in "biuf"
    except (TypeError, ValueError):
        return False


def _output_layers(model: Any) -> list[str] | None:
    """The names of the layers whose outputs are the model's outputs, in order; ``None`` where that is not known.

    Known for a built ``Sequential`` or functional model. An output made by an operation that is not a layer
    (``keras.ops.softmax(x)`` in a functional model) or a subclassed model's ``call()`` gives ``None``: the last
    layer's output is then not what the loss reads.
    """
    try:
        outputs = keras.tree.flatten(model.outputs)
    except (AttributeError, ValueError, TypeError):  # subclassed or not built: no symbolic outputs
        return None
    layers = {id(layer) for layer in getattr(model, "layers", [])}
    names = []
    for out in outputs:
        op = (getattr(out, "_keras_history", None) or (None,))[0]
        if op is None or id(op) not in layers:
            return None
        names.append(op.name)
    return names or None


def _loss_meta(loss: Any) -> list[dict[str, Any]] | None:
    """What the compiled loss is, one entry per loss: ``{"name": ..., "from_logits": True | False | None}``.

    ``name`` is the loss function's name (``"sparse_categorical_crossentropy"`` for the string, the function and
    ``keras.losses.SparseCategoricalCrossentropy(...)`` alike); ``from_logits`` is what the loss was configured
    with, the functions' default (``False``) for a string or a built-in function, ``None`` where it is not known.
    ``None`` for no loss (the watch records a loss the train step computes however it is made).
    """
    if loss is None:
        return None
    items = (
        list(loss.values()) if isinstance(loss, Mapping) else list(loss) if isinstance(loss, list | tuple) else [loss]
    )
    out = []
    for item in items:
        try:
            fn = keras.losses.get(item) if isinstance(item, str) else item
        except (ValueError, TypeError):  # a name Keras does not know: its own error comes from compile()
            fn = None
        wrapped = getattr(fn, "fn", None)  # a LossFunctionWrapper's function
        name = getattr(wrapped, "__name__", None) or getattr(fn, "__name__", None) or type(fn).__name__
        name = str(item) if fn is None else name
        try:
            config = fn.get_config() if isinstance(fn, keras.losses.Loss) else {}
        except (NotImplementedError, TypeError, ValueError, AttributeError):  # a custom Loss's own get_config()
            config = {}
        if "from_logits" in (config or {}):
            from_logits = config["from_logits"]
        elif callable(fn) and name in PROBABILITY_LOSSES and getattr(fn, "__module__", "").startswith("keras"):
            from_logits = False  # Keras' own loss function, called with its default
        else:
            from_logits = None
        out.append({"name": str(name), "from_logits": from_logits if isinstance(from_logits, bool) else None})
    return out


def _has_training_arg(model: Any) -> bool:
    try:
        return "training" in inspect.signature(model.call).parameters
    except (TypeError, ValueError):
        return True


@dataclass
class _StepRecord:
    """Returned by :meth:`KerasWatch.record_step`; as a context manager it records the step's update.

    It holds the step until it closes: at the block's exit (with ``ΔW = W_after - W_before``), or without an
    update when the watch moves on (the next ``record_step``, ``step()``, ``flush()``, a read, ``close()``).
    """

    watch: KerasWatch
    step: int
    names: list[str]
    variables: list[Any]
    grads: list[Any] = field(default_factory=list)
    scale: Any = None
    rule: tuple[str, float] | None = None
    before: list[Any] = field(default_factory=list)
    iterations: Any = None
    optimizer: Any = None
    outputs: Mapping[str, Any] = field(default_factory=dict)
    output_grads: Mapping[str, Any] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    deltas: list[Any] | None = None
    closed: bool = False

    def start(self, loss: Any, lr: Any, optimizer: Any) -> None:
        """Read what the step starts from: W_before, the loss, the learning rate, the optimizer's state."""
        self.before = [tf.identity(tf.convert_to_tensor(v)) for v in self.variables]  # updates leave a read intact
        if loss is not None:
            self.scalars["loss"] = _scalar("loss", loss)
        if lr is None and optimizer is not None:
            lr = _learning_rate(optimizer)  # now, before the update: the rate this update uses
        if lr is not None:
            self.scalars["lr"] = _scalar("lr", lr.value if hasattr(lr, "value") and not callable(lr) else lr)
        if optimizer is not None:
            self.optimizer = optimizer
            self.scale = _unscale(optimizer)
            self.rule = clip_rule(optimizer)
            self.iterations = _iterations(optimizer)

    def skipped(self) -> bool:
        """Whether the optimizer skipped this step's update (its update counter did not advance)."""
        if self.deltas is None or self.iterations is None:
            return False
        return bool(tf.equal(_iterations(self.optimizer), self.iterations))

    def __enter__(self) -> _StepRecord:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.closed:
            return
        if exc_type is None:
            self.deltas = [tf.convert_to_tensor(v) - b for v, b in zip(self.variables, self.before, strict=True)]
        if not self.watch.closed:
            self.watch._close_tape_step(self)


# ---- the callback ---------------------------------------------------------------------------------------------
class _WatchCallback(keras.callbacks.Callback):
    """Sets the watch up when training begins and moves each execution's buffers to the run file."""

    def __init__(self, watch: KerasWatch) -> None:
        super().__init__()
        self._watch = weakref.ref(watch)

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        w = self._watch()
        if w is None or w._closed:
            return
        if w.model is not self.model:
            raise WatchError(
                f"this gradsight callback belongs to a watch on model {getattr(w.model, 'name', None)!r}, but fit "
                f"was called on {self.model.name!r}. Create a watch per model: gradsight.watch(model)."
            )
        w._install()
        changed = w._setup()
        if changed or getattr(self.model, "train_function", None) is None:
            self.model.make_train_function(force=True)

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        w = self._watch()
        if w is not None and not w._closed:
            w._ran()

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        w = self._watch()
        if w is not None and not w._closed:
            w._drain()

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        w = self._watch()
        if w is not None and not w._closed:
            w._drain()
            w.flush()
            w._fit_flushed = True


def _close_earlier_callback(model: Any) -> None:
    """Close the watch an earlier :class:`GradsightKerasCallback` left open on ``model``, with a warning.

    A callback keeps its watch open between ``fit`` calls (later fits with it append to its run). A new callback
    on the same model means a new run: the earlier one is complete, so it is closed (which releases its file's
    lock) rather than refusing the new callback with advice about a watch the user never created. A watch from
    ``gradsight.watch(model)`` is left alone: the new callback is refused with its own message.
    """
    owner = getattr(vars(model).get("train_step"), "__self__", None)
    if isinstance(owner, KerasWatch) and getattr(owner, "_by_callback", False) and not owner.closed:
        warnings.warn(
            f"gradsight: a new GradsightKerasCallback on model {model.name!r}; the earlier one's run "
            f"{str(owner.path)!r} is closed now (complete). To append later fits to one run, pass the same callback "
            "to each fit.",
            GradsightWarning,
            stacklevel=3,
        )
        owner.close()


class GradsightKerasCallback(keras.callbacks.Callback):
    """A Keras callback that watches the model it is given to: ``model.fit(..., callbacks=[GradsightKerasCallback()])``.

    The watch is created on the first ``fit`` (the model is built by then) and kept across later ``fit`` calls
    with the same callback, which continue the step count and append to its run. Call :meth:`close` (or use it as
    a context manager) to restore the model and close the run file (its ``-lock`` file goes with it); until then
    everything is committed at the end of each ``fit``. A *new* ``GradsightKerasCallback`` on the same model starts
    a new run: it closes the earlier callback's watch first (with a warning), and the earlier callback then
    refuses to record another fit.

    Args:
        path: the run file (default: ``./gradsight-runs/run-<timestamp>.db``).
        **kwargs: as for :func:`watch_keras` (``preset``, ``config`` and the schedule settings: ``every``,
            ``kinds``, ``cheap``, ``units``, ``cheap_flush``, ``if_exists``, ``commit_every``, ``anomaly``...).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        super().__init__()
        settings = {k: v for k, v in kwargs.items() if k not in ("preset", "config")}
        schedule_from(kwargs.get("preset", "default"), settings, where="GradsightKerasCallback")  # fail early
        self._path = path
        self._kwargs = kwargs
        self.watch: KerasWatch | None = None

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        if self.watch is None:
            _close_earlier_callback(self.model)
            self.watch = watch_keras(self.model, path=self._path, **self._kwargs)
            self.watch._by_callback = True
        elif self.watch.closed:
            raise WatchError(
                f"this GradsightKerasCallback is closed (its run {str(self.watch.path)!r} is complete), so it cannot "
                "record this fit. Pass a new GradsightKerasCallback(path) — with if_exists='append' and the same "
                "path to continue that run."
            )
        cb = self.watch.callback
        cb.set_model(self.model)
        cb.on_train_begin(logs)

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self.watch is not None:
            self.watch.callback.on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self.watch is not None:
            self.watch.callback.on_epoch_end(epoch, logs)

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        if self.watch is not None:
            self.watch.callback.on_train_end(logs)

    def close(self) -> None:
        """Restore the model and close the run file."""
        if self.watch is not None:
            self.watch.close()

    def __enter__(self) -> GradsightKerasCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- entry points ---------------------------------------------------------------------------------------------
def watch_keras(
    model: Any,
    *,
    path: str | os.PathLike[str] | None = None,
    preset: str | Schedule = "default",
    config: dict[str, Any] | None = None,
    **settings: Unpack[ScheduleSettings],
) -> KerasWatch:
    """Watch a Keras 3 model (TensorFlow backend) during ``model.fit``; see the module docstring for how.

    The keyword arguments are the PyTorch watch's (see :mod:`gradsight._schedule`), except ``optimizer``:
    Keras' is the compiled one.

    Args:
        model: a ``keras.Model`` (Functional, Sequential or subclassed; built or not, compiled or not).
        path: the run file (default: ``./gradsight-runs/run-<timestamp>.db``).
        preset: ``"cheap"``, ``"default"`` (summaries every 100 steps) or ``"full"`` (every step), or a Schedule.
        config: your own run configuration (JSON-serialisable), stored in the metadata as ``user_config``.
        **settings: the schedule settings, the same for every framework: ``every``, ``kinds``, ``cheap``,
            ``units``, ``cheap_flush``, ``if_exists``, ``commit_every``, ``anomaly``, ``anomaly_factor``,
            ``anomaly_window``, ``anomaly_steps``, ``anomaly_cooldown`` (see :func:`gradsight._schedule.schedule`).
            The per-step scalars reach the host through the watch's callback every 32 steps (after every
            ``train_function`` call with ``steps_per_execution > 1``), at the end of each epoch, at ``flush()``
            and after ``commit_every`` seconds; the writer every ``cheap_flush`` of them.

    Returns:
        A :class:`KerasWatch`: a context manager with ``close()``, ``log(...)``, ``record_step(...)``,
        ``callback`` and the read API of :class:`gradsight.Run`.

    Raises:
        UnsupportedError: not a Keras model, not the TensorFlow backend, or a model with its own ``train_step``.
        WatchError: the model is already watched.
        InputError: a bad setting.
        StoreError: the run file cannot be created.
    """
    _check_backend()
    if not isinstance(model, keras.Model):
        hint = (
            " A single layer is not trainable with fit; wrap it: keras.Sequential([keras.Input(shape), layer])."
            if isinstance(model, keras.layers.Layer)
            else ""
        )
        raise UnsupportedError(
            f"watch_keras expects a keras.Model, got {type(model).__name__} ({type(model).__module__}).{hint} "
            "For raw tf.Variables in a GradientTape loop use watch_tape(path) and record_step(...)."
        )
    if not _is_keras_own(type(model).train_step):
        raise UnsupportedError(
            f"{type(model).__name__} overrides train_step ({type(model).train_step.__qualname__}); gradsight's "
            "Keras watch records by supplying its own train_step, which would silently replace yours, so "
            "gradsight.watch(model) cannot watch this model. Record from your train_step instead: create "
            "w = gradsight.watch_tape(path) (no model), compile with model.compile(..., run_eagerly=True), and in "
            "your train_step, after grads = tape.gradient(loss, self.trainable_variables), call "
            "w.record_step(grads, self.trainable_variables, loss=loss) (use `with w.record_step(...):` around "
            "self.optimizer.apply(grads, self.trainable_variables) to record updates too); close w after fit."
        )
    owner = getattr(vars(model).get("train_step"), "__self__", None)
    if isinstance(owner, KerasWatch) and getattr(owner, "_by_callback", False) and not owner.closed:
        raise WatchError(
            f"model {model.name!r} is already watched by a GradsightKerasCallback, recording to "
            f"{str(owner.path)!r} (a callback keeps its watch open across fits). Call that callback's close() "
            "first, or keep training with the callback alone."
        )
    if "train_step" in vars(model):
        raise WatchError(
            f"model {model.name!r} is already watched (or has a train_step set on the instance). Close the first "
            "watch (watch.close(), or use `with gradsight.watch(model) as w:`) before watching it again."
        )
    sched = schedule_from(preset, settings)
    w = KerasWatch(model, path=path, sched=sched, config=config)
    w._install()
    return w


def watch_tape(
    path: str | os.PathLike[str] | None = None,
    *,
    preset: str | Schedule = "full",
    config: dict[str, Any] | None = None,
    **settings: Unpack[ScheduleSettings],
) -> KerasWatch:
    """A watch for a plain ``tf.GradientTape`` loop on raw variables; record with :meth:`KerasWatch.record_step`.

    Same settings as :func:`watch_keras`, except that the preset defaults to ``"full"`` (every step): tape loops
    are usually small experiments.
    """
    _check_backend()
    sched = schedule_from(preset, settings, where="watch_tape")
    return KerasWatch(None, path=path, sched=sched, config=config)
