"""The framework-free core of every watch: what a torch watch and a Keras watch have in common.

:class:`WatchCore` holds the registry of open watches (one per model), the run writer and the metadata it starts
with, the :class:`~gradsight._schedule.Schedule`, the buffer of scalars (logged values and cheap checks) and its
flushing, events, the close semantics and the read API. An adapter subclasses it and only *captures*: it hooks
into its framework, computes packed statistics (:mod:`gradsight._packing`) and hands them to the writer.

The public API, identical for every adapter:

``current_step``
    the number of the step in progress (an int; it advances when a step closes).
``step()``
    closes a step by hand where the adapter needs it (a torch loop without a ``torch.optim`` optimizer, a Keras
    ``GradientTape`` loop); raises :class:`~gradsight.WatchError` where steps close by themselves.
``log(loss=None, *, step=None, **scalars)``
    records scalars; numbers or one-element tensors.
``log_event(step, kind, payload)``, ``flush()``, ``close()``, ``closed``
    events, commit, idempotent close.
the read API
    ``to_pandas``, ``summaries``, ``summary``, ``events``, ``snapshot``, ``steps``, ``layers``, ``scalars``,
    ``scalar_rows``, ``meta``, ``framework``, ``last_step``, ``tensors``: those of :class:`gradsight.store.Run`,
    on the file written so far (everything recorded is committed first).

A watch is a context manager; leaving the block with an exception records an event ``exception`` (its type and
message) before closing, in every framework.

This module also defines, once for every adapter, the per-step signals' scalars (:func:`signal_row`) and the unit
axis of layer outputs (:func:`unit_axis`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ._errors import InputError, WatchError
from ._schedule import Schedule
from .store import Run, RunWriter, TensorInfo, check_step, default_run_path
from .summary import TensorSummary

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["WatchCore", "anomaly_values", "check_step", "signal_row", "signal_scalars", "unit_axis"]

_LOCK = threading.Lock()
#: model -> its open watch (weak on both sides: a forgotten watch does not keep a model alive, nor vice versa).
_OPEN: weakref.WeakKeyDictionary[Any, weakref.ref[WatchCore]] = weakref.WeakKeyDictionary()


# ---- rules shared by every adapter ----------------------------------------------------------------------------------
#: Scalar names the watch records itself at every step (see :func:`signal_row`); ``log()`` refuses them.
RESERVED_SCALARS = frozenset({"grad_norm", "grad_nonfinite", "grad_norm_preclip", "clip_ratio", "lr", "step_skipped"})
#: Name prefixes of the watch's own per-tensor signals; ``log()`` refuses them.
RESERVED_PREFIXES = ("grad_norm/", "grad_nonfinite/", "grad_norm_preclip/", "weight_norm/", "update_norm/", "lr/")


def check_scalar_name(name: Any, *, lr_recorded: bool = True) -> str:
    """Check a scalar name passed to a watch's ``log(...)``: not one of the watch's own signals.

    Args:
        name: the name.
        lr_recorded: whether the watch records the learning rate itself (``lr``, ``lr/<group>``); a watch without
            an optimizer does not, and its user may log it.

    Raises:
        InputError: ``name`` is a signal the watch records itself (``grad_norm``, ``lr``, ``weight_norm/<t>``...).
    """
    if not lr_recorded and (name == "lr" or name.startswith("lr/")):
        return name
    if name in RESERVED_SCALARS or name.startswith(RESERVED_PREFIXES):
        raise InputError(
            f"log({name}=...): {name!r} is a signal the watch records itself at every step, so a value logged "
            f"under that name would replace the measured one. Log yours under another name, e.g. "
            f"log(my_{name.replace('/', '_')}=...)."
        )
    return name


def signal_row(
    grad_names: tuple[str, ...],
    grad: Sequence[float],
    counts: Sequence[float] | None,
    *,
    preclip: Sequence[float] | None = None,
    param_names: tuple[str, ...] = (),
    weight: Sequence[float] | None = None,
    update: Sequence[float] | None = None,
    lr: Mapping[str, float] | None = None,
    skipped: bool = False,
    totals: tuple[float, float] | None = None,
) -> tuple[tuple[str, ...], list[float], dict[str, float]]:
    """One step's per-step signals, the same names and meanings for every adapter (see :mod:`gradsight._schedule`).

    Args:
        grad_names: the parameters that have a gradient at this step.
        grad: the norm of each one's gradient as the optimizer receives it (after clipping, unscaled).
        counts: each one's non-finite entries, or ``None`` when known to be all 0.
        preclip: each one's gradient norm as backward left it (unscaled), ``None`` when nothing changed it.
        param_names: the parameters whose weight and update norms follow.
        weight: ‖W‖ of each, before the update (``None``: not measured).
        update: ‖W_after − W_before‖ of each (``None``: not measured, or the update was skipped).
        lr: the learning rates this step's update used, by scalar name (``lr`` or ``lr/<i>``).
        skipped: the optimizer skipped this step's update (mixed precision found non-finite gradients).
        totals: the global norms ``(grad_norm, grad_norm_preclip)`` where the adapter computed them itself (the
            Keras graph judges anomalies on its own sums, which may differ from ``hypot`` in the last bit).

    Returns:
        ``(names, values, sparse)``: the dense signals recorded at every step — ``grad_norm``, ``grad_nonfinite``,
        ``grad_norm_preclip``, ``grad_norm/<t>``, ``weight_norm/<t>``, ``update_norm/<t>``, the learning rates —
        as a names tuple (shared by every step with the same layout) and their values; and the sparse ones, only
        at steps that have them: ``grad_nonfinite/<t>``, ``grad_norm_preclip/<t>`` and ``clip_ratio`` where the
        gradient changed between backward and the step, ``step_skipped``.
    """
    lr = lr or {}
    has_w = weight is not None and bool(param_names)
    names = _signal_names(grad_names, param_names if has_w else (), has_w and update is not None, tuple(lr))
    values: list[float] = []
    sparse: dict[str, float] = {}
    if grad_names:
        g = _total(grad) if totals is None else totals[0]
        pre = g
        if preclip is not None and any(_differ(a, b) for a, b in zip(preclip, grad, strict=True)):
            pre = _total(preclip) if totals is None else totals[1]
            sparse.update(
                (f"grad_norm_preclip/{n}", float(a))
                for n, a, b in zip(grad_names, preclip, grad, strict=True)
                if _differ(a, b)
            )
            if _differ(pre, g) and math.isfinite(pre) and pre > 0:
                sparse["clip_ratio"] = g / pre
        bad = 0.0 if counts is None else float(sum(counts))
        values += [g, bad, pre, *map(float, grad)]
        if bad:
            sparse.update((f"grad_nonfinite/{n}", float(v)) for n, v in zip(grad_names, counts or (), strict=True))
    if has_w:
        values += map(float, weight)  # type: ignore[arg-type]
        if update is not None:
            values += map(float, update)
    values += map(float, lr.values())
    if skipped:
        sparse["step_skipped"] = 1.0
    return names, values, sparse


def signal_scalars(*args: Any, **kwargs: Any) -> dict[str, float]:
    """:func:`signal_row` as one ``{name: value}`` dict (dense and sparse together)."""
    names, values, sparse = signal_row(*args, **kwargs)
    return {**dict(zip(names, values, strict=True)), **sparse}


def _differ(a: float, b: float) -> bool:
    """Whether two norms differ (NaN equals NaN here: a NaN gradient clipped is still the same NaN gradient)."""
    return a != b and not (math.isnan(a) and math.isnan(b))


def _total(norms: Sequence[float]) -> float:
    """The norm of tensors together from their norms: NaN when any is NaN, else Inf when any is Inf."""
    t = math.hypot(*norms)
    if t == math.inf and any(math.isnan(v) for v in norms):  # hypot(inf, nan) is inf; the norm is NaN
        t = math.nan
    return t


@functools.lru_cache(maxsize=64)
def _signal_names(
    grad_names: tuple[str, ...], param_names: tuple[str, ...], update: bool, lr_keys: tuple[str, ...]
) -> tuple[str, ...]:
    """The dense signal names of one layout (cached: a watch has a few layouts, seen at every step)."""
    names = ["grad_norm", "grad_nonfinite", "grad_norm_preclip"] if grad_names else []
    names += [f"grad_norm/{n}" for n in grad_names]
    names += [f"weight_norm/{n}" for n in param_names]
    if update:
        names += [f"update_norm/{n}" for n in param_names]
    return (*names, *lr_keys)


def anomaly_values(scalars: Mapping[str, float], *, loss: bool = True) -> dict[str, float]:
    """The signals one step feeds the anomaly detector (:mod:`gradsight._anomaly`), from its scalars.

    A layer's update is judged by ``update_norm/<t>`` against its own recent updates. That is the update/weight
    ratio's jump whenever the weights change slowly (they do, between two steps), without the ratio's false
    alarms when a small tensor — a bias — passes through zero and its norm, the ratio's denominator, with it.

    Args:
        scalars: the step's scalars (:func:`signal_scalars`, plus ``loss`` when logged).
        loss: judge the loss too (not under data parallelism, where it differs between ranks).

    Returns:
        ``loss``, ``grad_norm_preclip``, ``grad_norm`` and every ``update_norm/<t>``, where present, in this
        order (upstream first).
    """
    out: dict[str, float] = {}
    if loss and "loss" in scalars:
        out["loss"] = scalars["loss"]
    for k in ("grad_norm_preclip", "grad_norm"):  # upstream first: the first non-finite one is named
        if k in scalars:
            out[k] = scalars[k]
    out.update((k, v) for k, v in scalars.items() if k.startswith("update_norm/"))
    return out


@functools.lru_cache(maxsize=64)
def judged_signals(names: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """:func:`anomaly_values`' signals among a signal row's dense ``names`` (:func:`signal_row`), with their indices.

    The same signals in the same order as :func:`anomaly_values` takes from the row's ``{name: value}`` dict (the
    loss, not part of the row, aside); cached per layout, so that a step's judge picks its values by index.
    """
    index = {n: i for i, n in enumerate(names)}
    out = [(k, index[k]) for k in ("grad_norm_preclip", "grad_norm") if k in index]
    out += [(n, i) for i, n in enumerate(names) if n.startswith("update_norm/")]
    return tuple(out)


def unit_axis(ndim: int, *, channel_first: bool = False, inherited: int | None = None) -> int | None:
    """The axis along which a layer output's per-unit activity is counted; the same rule for every adapter.

    Dim 1 for outputs with >= 3 dims of a channel-first layer (convolution, batch/instance/group norm, pooling,
    channel dropout in an NCHW-style layout); else the inherited axis of a parameter-free layer (activation,
    dropout) whose input is the same-shaped output of a recorded layer; else the last dim (a dense layer on
    ``(N, F)`` or ``(N, T, F)``, a channels-last convolution).

    Args:
        ndim: the output's number of dims.
        channel_first: whether the layer lays channels out on dim 1.
        inherited: the unit axis of the layer's input, when it applies (see above).

    Returns:
        The axis (non-negative), or ``None`` for a 0-d output.
    """
    if ndim == 0:
        return None
    if ndim >= 3 and channel_first:
        return 1
    if inherited is not None:
        return inherited
    return ndim - 1


def _gradsight_version() -> str:
    from ._version import __version__

    return __version__


# ---- the core -----------------------------------------------------------------------------------------------------
class WatchCore:
    """The framework-free part of a watch; see the module docstring. Adapters subclass it.

    Subclasses set :attr:`framework`, call :meth:`_open` once their model is introspected, and implement
    :meth:`_versions`; they may override :meth:`_open_writer`, :meth:`_scalar_value`, :meth:`_host_scalars`,
    :meth:`_default_log_step`, :meth:`_before_close`, :meth:`_release` and :meth:`step`.

    Attributes:
        path: the run file.
        schedule: the resolved :class:`~gradsight._schedule.Schedule`.
    """

    #: The framework's name, stored in the run's metadata.
    framework: ClassVar[str] = "?"

    path: Path
    schedule: Schedule

    def _open(
        self,
        model: Any,
        *,
        path: str | os.PathLike[str] | None,
        sched: Schedule,
        config: Mapping[str, Any] | None,
        meta: Mapping[str, Any],
    ) -> None:
        """Register the watch on ``model`` (refusing a second one), open the run file, set the step counter.

        Args:
            model: the watched object (``None``: no model, nothing registered).
            path: the run file; default ``./gradsight-runs/run-<time>.db``.
            sched: the schedule.
            config: the user's configuration, stored as ``user_config``.
            meta: the adapter's own metadata (model structure, ...), added to the common fields.

        Raises:
            InputError: ``config`` is not a mapping.
            WatchError: ``model`` already has an open watch.
        """
        if config is not None and not isinstance(config, Mapping):
            raise InputError(
                f"config=... expects a mapping of your settings (stored with the run), got {type(config).__name__} "
                f"{config!r:.80}. Pass a dict, e.g. config={{'lr': 0.1, 'batch_size': 32}}, or leave it out."
            )
        self._closed = True  # until fully set up, so that a failed set-up leaves nothing to close
        self.schedule = sched
        self._anomalies = sched.anomalies()
        #: Whether the loss is one of the anomaly signals (not under data parallelism: it differs between ranks).
        self._anomaly_loss = getattr(self, "_anomaly_loss", True)
        self._run: Run | None = None
        self._notes: list[str] = getattr(self, "_notes", [])
        # (step, name, value): values are floats or framework tensors, copied to the host in one batch
        self._scalars: list[tuple[int, str, Any]] = []
        #: (step, names, values): dense per-step signals (see signal_row), one row per step
        self._signal_rows: list[tuple[int, tuple[str, ...], list[float]]] = []
        self._scalars_flushed_at = time.monotonic()
        self._clip_noted = False
        with _LOCK:
            if model is not None:
                ref = _OPEN.get(model)
                other = ref() if ref is not None else None
                if other is not None and not other._closed:
                    raise WatchError(
                        f"this {type(model).__name__} is already watched, recording to {str(other.path)!r}. A model "
                        "can have one open watch at a time: close that one first (watch.close()), or use "
                        "`with gradsight.watch(model) as run:` so it closes itself."
                    )
            if path is None:
                path = default_run_path()
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            full = {
                "framework": self.framework,
                "versions": {
                    **self._versions(),
                    "python": platform.python_version(),
                    "gradsight": _gradsight_version(),
                },
                **meta,
                "config": sched.as_dict(),
                "user_config": dict(config or {}),
                "started": datetime.now(timezone.utc).isoformat(),
                "notes": list(self._notes),
            }
            # The metadata goes into the file's first transaction: a kill at any moment leaves a run that says
            # which framework wrote it.
            self._writer = self._open_writer(path, full)
            if model is not None:
                _OPEN[model] = weakref.ref(self)
        self.path = self._writer.path
        self._registered = weakref.ref(model) if model is not None else None
        last = self._writer.last_step
        self._step = 0 if last is None else last + 1

    # ---- extension points -------------------------------------------------------------------------------------
    def _versions(self) -> dict[str, str]:
        """The framework's versions for the metadata (``python`` and ``gradsight`` are added)."""
        return {}

    def _open_writer(self, path: str | os.PathLike[str], meta: dict[str, Any]) -> Any:
        """Open the run file (the DDP watch gives ranks that write nothing a writer without a file)."""
        s = self.schedule
        return RunWriter(path, meta=meta, if_exists=s.if_exists, commit_every=s.commit_every)

    def _scalar_value(self, name: str, value: Any) -> Any:
        """A value passed to :meth:`log`, checked: a float, or a one-element framework tensor kept for later.

        Raises:
            InputError: neither a number nor a one-element array or tensor.
        """
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            import numpy as np

            arr = np.asarray(value)
            ok = arr.size == 1 and arr.dtype.kind in "biuf" and not isinstance(value, bool)
        except (TypeError, ValueError, RuntimeError):
            ok = False
        if not ok:
            raise InputError(
                f"log({name}=...) expects a number or a one-element tensor, got {type(value).__name__} "
                f"{value!r:.80}. Reduce it first, e.g. log({name}=loss.mean())."
            )
        return float(arr.reshape(()))

    def _host_scalars(self, pending: list[tuple[int, str, Any]]) -> dict[int, dict[str, float]]:
        """Buffered scalars as ``{step: {name: value}}`` on the host (adapters copy device values in one batch)."""
        rows: dict[int, dict[str, float]] = {}
        for s, k, v in pending:
            rows.setdefault(s, {})[k] = float(v)
        return rows

    def _records_lr(self) -> bool:
        """Whether this watch records the learning rate itself (then ``log(lr=...)`` is refused)."""
        return True

    def _default_log_step(self) -> int:
        """The step :meth:`log` records at when none is given."""
        return self._step

    def _before_close(self) -> None:
        """Last words before closing (may raise; the watch closes anyway)."""

    def _release(self) -> None:
        """Remove the adapter's hooks and free what it holds (the writer is closed after this)."""

    # ---- full summaries: by schedule, or around anomalies ---------------------------------------------------------
    def _full_step(self, step: int) -> bool:
        """Whether ``step`` gets full summaries: by the ``every`` rule, or inside an anomaly capture window."""
        a = self._anomalies
        return self.schedule.is_logged(step) or (a is not None and a.capturing(step))

    def _judge(self, step: int, scalars: Mapping[str, float]) -> bool:
        """Feed one closed step's per-step signals to the anomaly detector (see :mod:`gradsight._anomaly`).

        Returns:
            Whether a capture starts at ``step``; its event ``anomaly`` is recorded then.
        """
        if self._anomalies is None:
            return False
        return self._judge_values(step, anomaly_values(scalars, loss=self._anomaly_loss))

    def _judge_values(self, step: int, values: Mapping[str, float]) -> bool:
        """:meth:`_judge` given the judged signals themselves (:func:`anomaly_values`' selection, in its order)."""
        a = self._anomalies
        if a is None:
            return False
        payload = a.observe(step, values)
        if payload is None:
            return False
        self._writer.log_event(step, "anomaly", payload)
        return True

    # ---- scalars ------------------------------------------------------------------------------------------------
    def _buffer_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Buffer already-checked scalars of one step (cheap checks, learning rates, ...)."""
        self._scalars.extend((step, k, v) for k, v in values.items())

    def _buffer_signals(
        self, step: int, names: tuple[str, ...], values: list[float], sparse: Mapping[str, float]
    ) -> None:
        """Buffer one step's per-step signals (:func:`signal_row`): the dense ones as one row, the sparse as scalars."""
        self._signal_rows.append((step, names, values))
        if sparse:
            self._scalars.extend((step, k, v) for k, v in sparse.items())

    def _maybe_flush_scalars(self, pending: int = 0) -> None:
        """Hand buffered scalars to the writer every ``cheap_flush`` items, and at least every ``commit_every`` s.

        Slow steps therefore keep them in memory no longer than a crash is allowed to lose.
        """
        if (
            len(self._scalars) + len(self._signal_rows) + pending >= self.schedule.cheap_flush
            or time.monotonic() - self._scalars_flushed_at >= self.schedule.commit_every
        ):
            self._flush_scalars()

    def _flush_scalars(self) -> None:
        """Copy the buffered scalars to the host and hand them to the writer as one item."""
        self._scalars_flushed_at = time.monotonic()
        pending, self._scalars = self._scalars, []
        rows = self._host_scalars(pending)  # may add signal rows (device values copied now)
        signals, self._signal_rows = self._signal_rows, []
        if signals:
            self._writer.log_signals(signals)
        if not rows:
            return
        if not self._clip_noted:
            first = next((s for s in sorted(rows) if "clip_ratio" in rows[s]), None)
            if first is not None:  # gradients differ between backward and the optimizer: say so in the meta
                self._clip_noted = True
                self._writer.set_meta("clipping", {"first_step": first})
        many = getattr(self._writer, "log_scalars_many", None)
        if many is not None:  # one writer item for the whole flush
            many({step: rows[step] for step in sorted(rows)})
        else:
            for step in sorted(rows):
                self._writer.log_scalars(step, rows[step])

    # ---- the user's API -----------------------------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """The number of the step in progress (it advances when the step closes)."""
        return self._step

    @property
    def closed(self) -> bool:
        """Whether the watch is closed (its hooks removed, its file complete)."""
        return self._closed

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise WatchError(
                f"cannot {what}: the watch recording to {str(self.path)!r} is closed. Open a new one with "
                "gradsight.watch(model, path=..., if_exists='append') to continue the run."
            )

    def step(self) -> None:
        """Close the current step by hand (see the adapter); the base watch closes steps by itself.

        Raises:
            WatchError: this watch closes steps by itself.
        """
        raise WatchError(f"{type(self).__name__} closes its steps by itself; remove the watch.step() call.")

    def log(self, loss: Any = None, *, step: int | None = None, **scalars: Any) -> None:
        """Record scalars (e.g. the loss) for a step; tensors are copied to the host in batches, later.

        Args:
            loss: the loss, a number or a one-element tensor (recorded as ``loss``).
            step: the step to record at; by default the adapter's current one (the step whose forward ran last
                for torch, the last step recorded for Keras).
            **scalars: more named scalars (numbers or one-element tensors).

        Raises:
            InputError: a value is neither a number nor a one-element tensor, ``step`` is not an int >= 0, or a
                name is one of the watch's own signals (``grad_norm``, ``lr``, ``weight_norm/<t>``...).
            WatchError: the watch is closed.
        """
        self._check_open("log")
        s = self._default_log_step() if step is None else check_step(step)
        values = dict(scalars)
        if loss is not None:
            values["loss"] = loss
        lr_recorded = self._records_lr()
        checked = {check_scalar_name(k, lr_recorded=lr_recorded): self._scalar_value(k, v) for k, v in values.items()}
        self._buffer_scalars(s, checked)
        self._maybe_flush_scalars()

    def log_event(self, step: int | None, kind: str, payload: Mapping[str, Any]) -> None:
        """Record an event (e.g. an online finding) with a JSON payload in the run file.

        Raises:
            WatchError: the watch is closed.
        """
        self._check_open("log_event")
        self._writer.log_event(step, kind, payload)

    def flush(self) -> None:
        """Commit everything recorded so far to the run file (blocks until it is written)."""
        if not self._closed:
            self._flush_scalars()
            self._writer.flush()

    def close(self) -> None:
        """Remove every hook, commit and close the run file. Safe to call more than once."""
        if self._closed:
            return
        try:
            self._before_close()  # may raise: a StoreError, or a warning under an "error" warnings filter
        finally:
            self._closed = True
            try:
                self._flush_scalars()
            finally:
                try:
                    self._release()
                finally:
                    self._unregister()
                    if self._run is not None:  # the last connection to close removes the -wal/-shm files
                        self._run.close()
                        self._run = None
                    self._writer.close()

    def _unregister(self) -> None:
        model = None if self._registered is None else self._registered()
        with _LOCK:
            if model is not None:
                ref = _OPEN.get(model)
                if ref is not None and ref() is self:
                    del _OPEN[model]

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and not self._closed:
            with contextlib.suppress(Exception):  # never mask the user's exception
                self._writer.log_event(self._step, "exception", {"type": exc_type.__name__, "message": str(exc)})
        self.close()

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self._step}"
        return f"{type(self).__name__}({str(self.path)!r}, {state}, every={self.schedule.every})"

    # ---- the read API: a Run on the same file, everything recorded committed first ---------------------------------
    def _reader(self) -> Run:
        self.flush()
        if self._run is None:
            self._run = Run(self.path)
        return self._run

    def to_pandas(self, **kwargs: Any) -> pd.DataFrame:
        """See :meth:`gradsight.store.Run.to_pandas`."""
        return self._reader().to_pandas(**kwargs)

    def summaries(self, **kwargs: Any) -> Iterator[tuple[int, TensorInfo, TensorSummary]]:
        """See :meth:`gradsight.store.Run.summaries`."""
        return self._reader().summaries(**kwargs)

    def summary(self, tensor: str, kind: str, step: int) -> TensorSummary:
        """See :meth:`gradsight.store.Run.summary`."""
        return self._reader().summary(tensor, kind, step)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """See :meth:`gradsight.store.Run.events`."""
        return self._reader().events(kind)

    def scalar_rows(self, *args: Any, **kwargs: Any) -> Any:
        """See :meth:`gradsight.store.Run.scalar_rows`."""
        return self._reader().scalar_rows(*args, **kwargs)

    def snapshot(self, dest: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """See :meth:`gradsight.store.Run.snapshot`: a consistent copy of the run so far (safe while training)."""
        return self._reader().snapshot(dest, overwrite=overwrite)

    @property
    def steps(self) -> list[int]:
        """See :attr:`gradsight.store.Run.steps`."""
        return self._reader().steps

    @property
    def last_step(self) -> int | None:
        """See :attr:`gradsight.store.Run.last_step`."""
        return self._reader().last_step

    @property
    def layers(self) -> list[str]:
        """See :attr:`gradsight.store.Run.layers`."""
        return self._reader().layers

    @property
    def scalars(self) -> pd.DataFrame:
        """See :attr:`gradsight.store.Run.scalars`."""
        return self._reader().scalars

    @property
    def meta(self) -> dict[str, Any]:
        """See :attr:`gradsight.store.Run.meta`."""
        return self._reader().meta

    @property
    def tensors(self) -> list[TensorInfo]:
        """See :attr:`gradsight.store.Run.tensors`."""
        return self._reader().tensors
