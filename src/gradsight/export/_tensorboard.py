"""TensorBoard: export a run file as TensorBoard events, after the fact or live while training.

What is written, per logged step:

* the run's own scalars (``loss``, ``lr``, ...) under their own names;
* the headline scalars ``gradsight/grad_norm``, ``gradsight/update_ratio_max``, ``gradsight/nonfinite``,
  ``gradsight/dead_fraction`` and, per layer, ``<layer>/<kind>_rms``, ``<layer>/<kind>_nonfinite``,
  ``<layer>/<kind>_zero_fraction``, ``<layer>/update_ratio``, ``<layer>/output_active_rate`` and
  ``<layer>/output_dead_fraction`` (definitions in :mod:`gradsight.export._scalars`). TensorBoard groups tags by
  the part before the first ``/``, so every layer gets its own section;
* one histogram per tensor and kind, rebuilt from the stored 256 ``log2|x|`` bins.

**What the histograms show.** gradsight never stores values, only how many finite, non-zero elements fall in
each power-of-two band ``2**e <= |x| < 2**(e+1)``. The export draws exactly that and nothing invented:

* ``histograms="log2"`` (default), tag ``<layer>/<kind>_log2abs/<tensor>``: a histogram of ``log2|x|`` whose
  buckets are the unit intervals ``[e, e+1)``. This is the readable one on TensorBoard's linear axis: a
  gradient of magnitude ~1e-3 sits around -10, a vanishing one drifts left, an exploding one right.
  Bin 0 (``|x| < 2**-126``, subnormals) is drawn as ``[-127, -126)``, bin 255 (``|x| >= 2**128``, float64 only)
  as ``[128, 129)``.
* ``histograms="abs"``, tag ``<layer>/<kind>_abs/<tensor>``: a histogram of ``|x|`` with the bucket edges of
  :func:`gradsight.summary.hist_edges` (``[2**e, 2**(e+1))``); faithful, but on a linear axis the small
  magnitudes crowd into the leftmost pixel.
* ``histograms=None``: scalars only.

The sign of ``x`` is not in the bins (only the total count of positive elements is stored), so neither form is a
histogram of signed values. Zeros, NaNs and infinities are never in a histogram — they are exported as the
``_zero_fraction`` and ``_nonfinite`` scalars — so a NaN gradient cannot corrupt one. In each histogram ``num`` is
the exact count of finite non-zero elements and the bucket counts are exact; ``min``/``max`` are the outer edges
of the lowest/highest non-empty bucket; ``sum_squares`` is exact in ``abs`` mode (the stored ``sum_sq``), and
``sum`` (both modes) and ``sum_squares`` (``log2`` mode) are computed from bucket midpoints (TensorBoard does not
draw them). TensorBoard treats a bucket as ``(left, right]`` while gradsight's bins are ``[left, right)``; only
values exactly on a power of two differ, and they cannot be told apart in the picture.

**How it is written.** Events go to one ``events.out.tfevents.*.gradsight`` file per export in ``logdir`` (the
same layout as ``torch.utils.tensorboard.SummaryWriter(log_dir)``), as ``Event`` protocol buffers framed by
TensorBoard's own ``RecordWriter``. That path needs the ``tensorboard`` package only and — unlike TensorBoard's
``EventFileWriter`` — never imports TensorFlow, so a PyTorch user does not pay TensorFlow's import.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from itertools import groupby
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._cli_support import check_output
from .._errors import InputError, StoreError
from ..store import Run, TensorInfo, check_steps, load
from ..summary import HIST_BINS, TensorSummary, hist_edges
from ._scalars import headline_scalars, layer_label, layer_scalars
from ._tidy import check_path, require_steps

__all__ = [
    "HISTOGRAM_MODES",
    "LiveTensorBoard",
    "TensorBoardSink",
    "histogram_fields",
    "histogram_tag",
    "to_tensorboard",
]

HistogramMode = Literal["log2", "abs"]
#: The accepted values of ``histograms`` (``None`` turns histograms off).
HISTOGRAM_MODES = ("log2", "abs")
#: Every event file gradsight writes ends with this, so an export can recognise (and replace) its own files.
FILE_SUFFIX = ".gradsight"
_BIAS = 127  # bin f holds floor(log2|x|) == f - 127 (see gradsight.summary)

_INSTALL_HINT = (
    "The TensorBoard export needs the 'tensorboard' package, which is not installed. "
    "Install it with: pip install 'gradsight[tensorboard]'  (or: pip install tensorboard)"
)


def _tb() -> tuple[Any, Any, Any]:
    """Import TensorBoard's protos and record writer lazily (never TensorFlow)."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return event_pb2, summary_pb2, RecordWriter


def _check_mode(histograms: str | None) -> None:
    if histograms is not None and histograms not in HISTOGRAM_MODES:
        raise InputError(
            f"histograms must be 'log2' (histogram of log2|x|), 'abs' (histogram of |x|) or None (no "
            f"histograms), not {histograms!r}."
        )


def histogram_tag(info: TensorInfo | Any, mode: HistogramMode = "log2") -> str:
    """The tag of a tensor's histogram: ``<layer>/<kind>_log2abs/<tensor>`` (or ``_abs`` in ``abs`` mode)."""
    suffix = "log2abs" if mode == "log2" else "abs"
    return f"{layer_label(info.layer)}/{info.kind}_{suffix}/{info.name}"


def histogram_fields(summary: TensorSummary, mode: HistogramMode = "log2") -> dict[str, Any] | None:
    """The fields of a TensorBoard ``HistogramProto`` rebuilt from a summary's ``log2|x|`` bins.

    Only the span from the lowest to the highest non-empty bin is written (empty bins inside it included), with
    ``bucket_limit`` holding each bucket's right edge. See the module docstring for what is exact.

    Args:
        summary: the tensor summary.
        mode: ``"log2"`` for a histogram of ``log2|x|``, ``"abs"`` for one of ``|x|``.

    Returns:
        ``min``, ``max``, ``num``, ``sum``, ``sum_squares``, ``bucket_limit`` and ``bucket``; ``None`` when the
        tensor has no finite non-zero element (nothing to draw).
    """
    _check_mode(mode)
    nz = np.flatnonzero(summary.hist)
    if nz.size == 0:
        return None
    lo, hi = int(nz[0]), int(nz[-1])
    counts = np.asarray(summary.hist[lo : hi + 1], dtype=np.float64)
    f = np.arange(lo, hi + 1)
    if mode == "log2":
        left = (f - _BIAS).astype(np.float64)
        left[f == 0] = -float(_BIAS)  # bin 0 (subnormals) drawn as [-127, -126)
        right = left + 1.0
        right[f == 0] = 1.0 - _BIAS
        mid = left + 0.5
        sum_squares = float(np.dot(counts, mid * mid))
    else:
        edges = np.append(hist_edges(), math.ldexp(1.0, HIST_BINS - _BIAS))  # open last bin closed at 2**129
        left, right = edges[lo : hi + 1], edges[lo + 1 : hi + 2]
        mid = np.where(left > 0, np.sqrt(left * right), right / 2)  # geometric midpoints; bin 0 at half its edge
        sum_squares = float(summary.sum_sq)
    return {
        "min": float(left[0]),
        "max": float(right[-1]),
        "num": float(counts.sum()),
        "sum": float(np.dot(counts, mid)),
        "sum_squares": sum_squares,
        "bucket_limit": right.tolist(),
        "bucket": counts.tolist(),
    }


class TensorBoardSink:
    """Writes gradsight steps as TensorBoard events into one new event file in ``logdir``.

    The building block of :func:`to_tensorboard` and :class:`LiveTensorBoard`; use it directly to push steps
    from your own loop. Not thread-safe: call it from one thread. A context manager; :meth:`close` is idempotent.

    Args:
        logdir: the directory for the event file (created if missing); point ``tensorboard --logdir`` at it or at
            a parent of it.
        histograms: ``"log2"``, ``"abs"`` or ``None``; see the module docstring.

    Raises:
        ImportError: ``tensorboard`` is not installed (the message says how to install it).
        InputError: ``histograms`` is not one of the accepted values.
    """

    def __init__(self, logdir: str | os.PathLike[str], *, histograms: HistogramMode | None = "log2") -> None:
        _check_mode(histograms)
        self._event_pb2, self._summary_pb2, record_writer = _tb()
        self.histograms = histograms
        self.logdir = Path(logdir).expanduser().resolve()
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the TensorBoard log directory {str(self.logdir)!r}: {exc}. Pass a directory "
                "you can write to."
            ) from exc
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{id(self)}"
        self.path = self.logdir / (name + FILE_SUFFIX)
        n = 1
        while self.path.exists():  # an earlier sink of this process, in the same second, at the same address
            n += 1
            self.path = self.logdir / f"{name}-{n}{FILE_SUFFIX}"
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._writer = record_writer(self._file)
        self._closed = False
        self._add(self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    # ---- writing -------------------------------------------------------------------------------------------
    def _add(self, event: Any) -> None:
        if self._closed:
            raise StoreError(f"the TensorBoard sink writing {str(self.path)!r} is closed.")
        self._writer.write(event.SerializeToString())

    def add_scalars(self, step: int, values: Mapping[str, float], *, wall_time: float | None = None) -> None:
        """Write named scalars of one step (NaN and ±Inf are written as they are)."""
        if not values:
            return
        summary = self._summary_pb2.Summary(
            value=[self._summary_pb2.Summary.Value(tag=str(k), simple_value=float(v)) for k, v in values.items()]
        )
        self._add(self._event_pb2.Event(wall_time=_now(wall_time), step=int(step), summary=summary))

    def add_histogram(self, step: int, tag: str, summary: TensorSummary, *, wall_time: float | None = None) -> bool:
        """Write one tensor's histogram (in this sink's mode); returns False when there was nothing to draw."""
        fields = histogram_fields(summary, self.histograms or "log2")
        if fields is None:
            return False
        value = self._summary_pb2.Summary.Value(tag=tag, histo=self._summary_pb2.HistogramProto(**fields))
        event = self._event_pb2.Event(
            wall_time=_now(wall_time), step=int(step), summary=self._summary_pb2.Summary(value=[value])
        )
        self._add(event)
        return True

    def write_step(
        self,
        step: int,
        items: Iterable[tuple[TensorInfo | Any, TensorSummary]],
        scalars: Mapping[str, float] | None = None,
        *,
        wall_time: float | None = None,
    ) -> None:
        """Write one logged step: its scalars, the headline and per-layer scalars, and the histograms.

        Args:
            step: the step number.
            items: ``(info, summary)`` pairs of the step; ``info`` needs ``name``, ``layer`` and ``kind``
                (a :class:`gradsight.TensorInfo`).
            scalars: the step's own scalars (loss, lr, ...), written under their own names.
            wall_time: seconds since the epoch to stamp the events with (default: now).
        """
        items = list(items)
        values: dict[str, float] = dict(scalars or {})
        values.update(headline_scalars(items))
        values.update(layer_scalars(items))
        self.add_scalars(step, values, wall_time=wall_time)
        if self.histograms is not None:
            for info, s in items:
                self.add_histogram(step, histogram_tag(info, self.histograms), s, wall_time=wall_time)

    def flush(self) -> None:
        """Push everything written so far to the file (TensorBoard reads it from there)."""
        if not self._closed:
            self._file.flush()

    def close(self) -> None:
        """Flush and close the event file. Safe to call more than once."""
        if not self._closed:
            self._closed = True
            self._file.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> TensorBoardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorBoardSink({str(self.path)!r}, histograms={self.histograms!r}, closed={self._closed})"


def _now(wall_time: float | None) -> float:
    return time.time() if wall_time is None else float(wall_time)


def _run_path(run: Any) -> Run:
    """A Run from a path, a Run, or anything with a ``path`` attribute pointing at a run file (a watch)."""
    if isinstance(run, (str, os.PathLike, Run)):
        return load(run)
    path = getattr(run, "path", None)
    if isinstance(path, (str, os.PathLike)):
        return load(path)
    raise InputError(
        f"expected a run file path, a gradsight.Run or a watch (anything with a .path), got "
        f"{type(run).__name__} {run!r}."
    )


def _scalar_rows(run: Run, lo: int | None, hi: int | None) -> dict[int, dict[str, float]]:
    """The run's scalars by step, NaN kept (the store keeps a NaN loss as NULL; the wide table can't tell)."""
    out: dict[int, dict[str, float]] = {}
    for step, name, value in run.scalar_rows(steps=(lo, hi)):
        out.setdefault(step, {})[name] = value
    return out


def _export_range(sink: TensorBoardSink, run: Run, lo: int | None, hi: int | None) -> int:
    """Write the steps ``lo..hi`` (inclusive, either end open) of ``run`` to ``sink``; returns how many."""
    scalars = _scalar_rows(run, lo, hi)
    steps_done = 0
    by_step = groupby(run.summaries(steps=(lo, hi)), key=lambda r: r[0])
    seen: set[int] = set()
    for step, rows in by_step:
        sink.write_step(step, [(info, s) for _, info, s in rows], scalars.pop(step, None))
        seen.add(step)
        steps_done += 1
    for step in sorted(scalars):  # steps that have scalars but no summaries (e.g. loss logged every step)
        sink.add_scalars(step, scalars[step])
    return steps_done


def _previous(logdir: Path, overwrite: bool) -> list[Path]:
    """The event files of earlier gradsight exports in ``logdir``; refused unless ``overwrite``."""
    previous = sorted(logdir.glob(f"events.out.tfevents.*{FILE_SUFFIX}")) if logdir.is_dir() else []
    if previous and not overwrite:
        raise StoreError(
            f"{str(logdir)!r} already holds {len(previous)} gradsight event file(s) (e.g. {previous[0].name!r}); "
            "TensorBoard would show both exports on top of each other. Pass another --logdir, or "
            "overwrite=True (--overwrite) to replace them."
        )
    return previous


def to_tensorboard(
    run: str | os.PathLike[str] | Run,
    logdir: str | os.PathLike[str],
    *,
    histograms: HistogramMode | None = "log2",
    steps: tuple[int | None, int | None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a run file as TensorBoard events; see the module docstring for the tags and the histograms.

    Example::

        gradsight.export.to_tensorboard("run.db", "tb/run1")   # then: tensorboard --logdir tb

    Args:
        run: the run file (or a :class:`gradsight.Run`).
        logdir: the directory for the event file, created if missing.
        histograms: ``"log2"`` (histograms of ``log2|x|``, default), ``"abs"`` (of ``|x|``) or ``None``.
        steps: an inclusive ``(first, last)`` range of steps to export; either end may be ``None``. It must be
            well-formed (non-negative, ``first <= last``) and select at least one recorded step.
        overwrite: replace event files of an earlier gradsight export in ``logdir`` instead of refusing (they
            are removed once the new export is complete).

    Returns:
        The path of the event file written.

    Raises:
        ImportError: ``tensorboard`` is not installed.
        StoreError: the run file cannot be read, or ``logdir`` already holds a gradsight export (and
            ``overwrite`` is False).
        InputError: a malformed range, a range that selects no recorded step, or ``logdir`` is a run file.
    """
    _check_mode(histograms)
    lo, hi = check_steps(steps)
    _tb()
    out = check_path(logdir, "logdir", "'tb/run1'")
    r = _run_path(run)
    sink: TensorBoardSink | None = None
    try:
        check_output(out, inputs=[r.path], what="the log directory")
        if out.exists() and not out.is_dir():
            raise StoreError(f"the log directory {str(out)!r} is a file; pass a folder (created if missing).")
        require_steps(r, (lo, hi), scalars=True)
        previous = _previous(out, overwrite)
        sink = TensorBoardSink(out, histograms=histograms)
        with sink:
            _export_range(sink, r, lo, hi)
    except BaseException:
        if sink is not None:  # never leave a partial event file behind
            with contextlib.suppress(OSError):
                sink.path.unlink()
        raise
    finally:
        if r is not run:
            r.close()
    for p in previous:  # replaced only once the new export is complete (never the file just written)
        if p != sink.path:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return sink.path


class LiveTensorBoard:
    """Follows a run file while it is being written and mirrors every new step into TensorBoard events.

    A background thread polls the run file every ``interval`` seconds (the run writer commits at least every
    second), so it works with any watch — PyTorch or Keras, in this process or another — without touching the
    training loop. A step is written once a later step has appeared in the file (so it is complete); the last
    one is written by :meth:`close`, which first flushes the watch when given one. Scalars logged for a step
    after it was written are not re-exported.

    Example::

        with gradsight.watch(model, path="run.db") as w:
            with LiveTensorBoard(w, "tb/run1"):
                train(model)                   # meanwhile: tensorboard --logdir tb

    Args:
        run: the run file being written, or a watch (anything with a ``.path``).
        logdir: the directory for the event file.
        histograms: ``"log2"``, ``"abs"`` or ``None``.
        interval: seconds between polls.
        overwrite: as for :func:`to_tensorboard`.
    """

    def __init__(
        self,
        run: Any,
        logdir: str | os.PathLike[str],
        *,
        histograms: HistogramMode | None = "log2",
        interval: float = 2.0,
        overwrite: bool = False,
    ) -> None:
        if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval > 0):
            raise InputError(f"interval must be a positive number of seconds, got {interval!r}.")
        self._source = run
        self.interval = float(interval)
        logdir = Path(logdir).expanduser().resolve()
        _check_mode(histograms)
        _tb()
        if isinstance(run, (str, os.PathLike)):
            check_output(logdir, inputs=[run], what="the log directory")
        for previous in _previous(logdir, overwrite):  # live: the old export goes before the new one starts
            previous.unlink()
        self.sink = TensorBoardSink(logdir, histograms=histograms)
        self._done: int | None = None  # last step written
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="gradsight-tensorboard", daemon=True)
        self._thread.start()

    @property
    def path(self) -> Path:
        """The event file being written."""
        return self.sink.path

    def poll(self, *, final: bool = False) -> int:
        """Write the steps that are complete now (every step when ``final``); returns how many were written."""
        with self._lock:
            if self.sink.closed:
                return 0
            try:
                run = _run_path(self._source)
            except StoreError:
                return 0  # the run file does not exist yet
            try:
                steps = run.steps
                last = steps[-1] if steps else None
                if last is None:
                    return 0
                hi = last if final else last - 1
                lo = None if self._done is None else self._done + 1
                if hi is None or (lo is not None and hi < lo):
                    return 0
                n = _export_range(self.sink, run, lo, hi)
                self._done = hi
                self.sink.flush()
                return n
            finally:
                run.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as exc:  # reported by close()
                self._error = exc
                return

    def close(self) -> None:
        """Stop following, write the remaining steps and close the event file. Safe to call more than once.

        Close the watch first (or flush it) so that its last steps are in the file.
        """
        if self.sink.closed:
            return
        self._stop.set()
        self._thread.join()
        flush = getattr(self._source, "flush", None)
        if callable(flush):  # a watch: make its last steps visible in the file
            with contextlib.suppress(Exception):
                flush()
        try:
            if self._error is None:
                with contextlib.suppress(StoreError):
                    self.poll(final=True)
        finally:
            self.sink.close()
        if self._error is not None:
            err, self._error = self._error, None
            raise StoreError(f"following the run into TensorBoard failed: {err!r}") from err

    def __enter__(self) -> LiveTensorBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
