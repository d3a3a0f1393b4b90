"""The run store: one embedded SQLite file per training run (stdlib ``sqlite3``, WAL mode, no server).

Writing happens on a background thread: the training thread only enqueues plain Python/numpy objects, and the
writer thread inserts them and commits at least every ``commit_every`` seconds (default 1 s) — also while the
training thread is busy or stalled — so a process killed at any moment leaves a readable file that has lost at
most the last interval. Readers open the file read-only and can read while training is still writing. Nothing is
ever pickled: numbers are SQLite numbers, arrays are little-endian int64 blobs, metadata is JSON.

Guarantees
    *Created whole.* A new run file is built under a hidden temporary name — schema, ``PRAGMA user_version`` and
    the initial metadata (``framework``, ``model``, ...) in one transaction — and then linked into place, so at
    any moment the path either does not exist or is a run file that :func:`load` opens (0 steps if need be).
    *Self-contained when closed.* :meth:`RunWriter.flush` and :meth:`RunWriter.close` commit and then run
    ``PRAGMA wal_checkpoint(TRUNCATE)`` (waiting briefly for readers), so after ``close`` the ``.db`` file alone
    holds the whole run and can be copied. Readers never keep a read transaction open between calls, so they do
    not hold the checkpoint back. Where no reader holds the file at ``close``, it is also switched back to a
    rollback journal (``journal_mode=DELETE``): a plain one-file SQLite database beside which later readers
    create no ``-wal``/``-shm`` files (``if_exists="append"`` switches it to WAL again). A run still being
    written is copied with :meth:`Run.snapshot` (SQLite's backup API), never by copying the ``.db`` alone: the
    last commits live in its ``-wal`` file until the next flush.
    *One writer.* A writer holds an exclusive lock (``flock`` on the sidecar ``<run file>-lock``, removed at
    close and released by the OS if the process dies) — another writer, in this process or another, is refused.
    ``if_exists="overwrite"`` replaces only a gradsight run file (or an empty file), ``"append"`` only a run of
    the same model (same parameter shapes and dtypes).
    *Failures are never silent.* An error on the writer thread (disk full, I/O error) is kept and raised as
    :class:`~gradsight.StoreError` from the training thread's next call into the writer (or from ``close``),
    naming the cause, the file and what it holds. A record that cannot be stored (e.g. a step that is already
    stored) is dropped and reported the same way, once; a storage failure stops the writer and is reported by
    every later call. Unreadable files and records raise :class:`~gradsight.StoreError`, never a raw
    ``sqlite3``/``json`` error.

Schema, version 2 (``PRAGMA user_version = 2``; version 1 files, without the two ``signal`` tables, are read and
appended to — appending adds the tables)::

    meta(key TEXT PRIMARY KEY, value TEXT)            -- JSON values: framework, versions, model, config, ...
    tensors(id INTEGER PRIMARY KEY, name TEXT, layer TEXT, kind TEXT, shape TEXT, dtype TEXT, UNIQUE(name, kind))
        -- kind is one of weight, grad, update, output, output_grad; shape is a JSON list
    summaries(step INTEGER, tensor_id INTEGER, count, sum, sum_sq, min, max, zeros, nan, posinf, neginf, positive,
              hist_lo INTEGER, hist BLOB, units_total INTEGER, units BLOB, PRIMARY KEY(step, tensor_id))
        -- the TensorSummary fields; hist is the span hist[hist_lo : hist_lo + len] of non-zero bins as '<i8'
        -- (NULL/empty when all bins are zero); units is units_active as '<i8' (NULL when not recorded)
    scalars(step INTEGER, name TEXT, value REAL, PRIMARY KEY(step, name))   -- loss, lr, ...; last write wins
    events(id INTEGER PRIMARY KEY, step INTEGER, kind TEXT, payload TEXT)   -- JSON payloads (findings, notes)
    signal_layouts(id INTEGER PRIMARY KEY, names TEXT UNIQUE)  -- a JSON list of scalar names
    signals(step INTEGER PRIMARY KEY, layout INTEGER, data BLOB)
        -- the dense per-step signals of one step (grad_norm, weight_norm/<t>, ...) as '<f8' values in the order
        -- of its layout's names: one row per step instead of one per name. Readers merge them with ``scalars``
        -- (Run.scalars, Run.scalar_rows): to a reader they are scalars like any other.

``min``/``max`` of a summary with no finite element are stored as +Inf/-Inf, which SQLite keeps as REAL.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import operator
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._errors import InputError, StoreError
from ._packing import SummaryArrays, encode_rows
from .summary import HIST_BINS, TensorSummary, to_rows

try:  # POSIX: the writer lock; elsewhere only writers in this process are kept apart
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["KINDS", "SCHEMA_VERSION", "Run", "RunWriter", "TensorInfo", "default_run_path", "is_run_file", "load"]

SCHEMA_VERSION = 2
#: The kinds of tensor a run records, in the order they are produced in a step.
KINDS = ("weight", "grad", "update", "output", "output_grad")
#: Summary columns stored per (step, tensor), in table order.
_FIELDS = ("count", "sum", "sum_sq", "min", "max", "zeros", "nan", "posinf", "neginf", "positive")
#: Columns ``Run.to_pandas`` derives from the stored fields.
DERIVED = ("finite", "nonfinite", "mean", "std", "rms", "l2")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tensors (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, layer TEXT NOT NULL, kind TEXT NOT NULL,
    shape TEXT NOT NULL, dtype TEXT NOT NULL, UNIQUE (name, kind));
CREATE TABLE IF NOT EXISTS summaries (
    step INTEGER NOT NULL, tensor_id INTEGER NOT NULL,
    count INTEGER NOT NULL, sum REAL, sum_sq REAL, min REAL, max REAL, zeros INTEGER NOT NULL,
    nan INTEGER NOT NULL, posinf INTEGER NOT NULL, neginf INTEGER NOT NULL, positive INTEGER NOT NULL,
    hist_lo INTEGER, hist BLOB, units_total INTEGER, units BLOB,
    PRIMARY KEY (step, tensor_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scalars (
    step INTEGER NOT NULL, name TEXT NOT NULL, value REAL, PRIMARY KEY (step, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, step INTEGER, kind TEXT NOT NULL, payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS signal_layouts (id INTEGER PRIMARY KEY, names TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS signals (
    step INTEGER PRIMARY KEY, layout INTEGER NOT NULL, data BLOB NOT NULL);
"""
#: The tables added by schema version 2 (absent from version 1 files).
_V2_TABLES = ("signal_layouts", "signals")
#: Every step that holds data (the last step of a run is its maximum).
_STEPS_SQL = "SELECT step FROM summaries UNION ALL SELECT step FROM scalars UNION ALL SELECT step FROM signals"


#: The tables every run file has (all created in the file's first transaction).
_TABLES = ("meta", "tensors", "summaries", "scalars", "events")
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: Kinds whose shape and dtype are the model's (fixed for a model); outputs change shape with the batch.
_PARAM_KINDS = ("weight", "grad", "update")
#: How long a checkpoint waits for readers to finish their current read: at flush, and at close.
_FLUSH_CHECKPOINT_WAIT = 0.25
_CLOSE_CHECKPOINT_WAIT = 2.0
#: The busy timeout of the writer's connection otherwise (readers never block a WAL writer; this is slack).
_BUSY_TIMEOUT_MS = 5000
#: Page size of new run files. A step's summaries are rows of 0.1-1.2 kB (histograms and per-unit counts); on
#: 8 kB pages the writer thread inserts them in ~30% less time than on SQLite's default 4 kB (MLP full preset, 28
#: rows per step: 111 -> 74 us), and time on that thread is time taken from training on a small machine.
_PAGE_SIZE = 8192
#: After emptying its queue the writer thread waits this long (never past a due commit; a flush or close wakes
#: it at once) so that it works in bursts: it then takes Python's GIL a few times per second instead of at every
#: step, which the training thread's hooks would otherwise wait for. Measured on the MLP benchmark with
#: ``preset="full"`` (every step logged): about 9% of its step time.
_BURST_S = 0.05


def _as_path(path: Any, what: str) -> Path:
    """``path`` (str, bytes or os.PathLike; bytes are decoded as the OS does) as an absolute ``Path``."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)  # undecodable bytes become surrogates, which os and sqlite3 encode back
    if not isinstance(path, str):
        raise InputError(f"{what} expects a path (str, bytes or os.PathLike), got {type(path).__name__} {path!r}.")
    if not path or "\x00" in path:
        raise InputError(f"{what} expects a path to a run file, got {path!r}.")
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:
        raise StoreError(f"cannot resolve the path {path!r} ({exc}). Pass an existing directory's file.") from exc


def check_step(step: Any, call: str = "log(step=...)") -> int:
    """Check a step number: a non-negative int (numpy ints and 0-d integer tensors accepted, bool refused).

    Args:
        step: the value given.
        call: how the message names the argument, e.g. ``"log(step=...)"`` or ``"RunWriter.log_scalars(step, ...)"``.

    Raises:
        InputError: not an integer, or negative.
    """
    try:
        value = -1 if isinstance(step, bool) else operator.index(step)
    except (TypeError, RuntimeError):
        value = None
    fix = "Leave it out to record at the current step, or pass" if call.startswith("log(") else "Pass"
    if value is None or isinstance(step, bool):
        raise InputError(
            f"{call} expects a step number, a non-negative int, got {type(step).__name__} {step!r:.80}. "
            f"{fix} a step number such as step=0."
        )
    if value < 0:
        raise InputError(
            f"{call} expects a non-negative step number, got {value!r}; steps count from 0. {fix} a step number "
            "such as step=0."
        )
    return value


def check_steps(steps: Any) -> tuple[int | None, int | None]:
    """Validate an inclusive step range ``(first, last)``; either end may be ``None`` (open).

    Args:
        steps: ``None`` (every step) or a pair of non-negative ints or ``None``, with ``first <= last``.

    Returns:
        ``(first, last)``, ``(None, None)`` for ``None``.

    Raises:
        InputError: not a pair, an end that is not a non-negative int, or ``first > last`` (an empty range).
    """
    if steps is None:
        return (None, None)
    if not isinstance(steps, (tuple, list)) or len(steps) != 2:
        raise InputError(
            f"steps must be an inclusive (first, last) pair, either end None for open, got {steps!r}; "
            "e.g. steps=(10, 50) or steps=(10, None)."
        )
    lo, hi = steps
    for end, value in (("first", lo), ("last", hi)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InputError(f"steps: the {end} step must be an int or None, got {value!r} in {steps!r}.")
        if value < 0:
            raise InputError(f"steps: the {end} step is {value!r}, but steps count from 0; pass a range like (0, 10).")
    lo = None if lo is None else int(lo)
    hi = None if hi is None else int(hi)
    if lo is not None and hi is not None and lo > hi:
        raise InputError(
            f"steps ({lo}, {hi}) is an empty range: the first step {lo} comes after the last step {hi}. "
            f"The range is inclusive first-to-last; did you mean ({hi}, {lo})?"
        )
    return (lo, hi)


def _scalar_rows(step: Any, values: Any, call: str) -> list[tuple[int, str, float | None]]:
    """``(step, name, value)`` rows of one step's scalars, checked (a NaN value is stored as NULL).

    Raises:
        InputError: a bad step, ``values`` not a mapping of names to numbers.
    """
    s = check_step(step, f"{call}(step, ...)")
    if not isinstance(values, Mapping):
        raise InputError(
            f"{call}(step, values) expects values as a mapping of names to numbers, got {type(values).__name__} "
            f"{values!r:.80}; e.g. {call}(0, {{'loss': 0.5}})."
        )
    rows = []
    for k, v in values.items():
        try:
            value = None if v is None else float(v) if not isinstance(v, (str, bytes)) else None
            ok = isinstance(k, str) and (v is None or value is not None)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(
                f"{call}(step, values) expects names (str) mapped to numbers, got {k!r:.40}: {v!r:.60}; "
                f"e.g. {call}(0, {{'loss': 0.5}})."
            )
        rows.append((s, k, None if value is None or math.isnan(value) else value))
    return rows


def _summary_pairs(items: Any) -> list[tuple[int, TensorSummary]]:
    """``log_summaries``' pairs as a list, checked now (not on the writer thread, where a failure surfaces late).

    Raises:
        InputError: not an iterable of ``(tensor_id, TensorSummary)`` pairs.
    """
    pairs = None
    if not isinstance(items, (str, bytes, Mapping)):
        try:
            pairs = list(items)
        except TypeError:
            pairs = None
    ok = pairs is not None and all(
        isinstance(p, tuple)
        and len(p) == 2
        and isinstance(p[0], (int, np.integer))
        and not isinstance(p[0], bool)
        and isinstance(p[1], TensorSummary)
        for p in pairs
    )
    if not ok:
        raise InputError(
            f"RunWriter.log_summaries(step, items) expects (tensor_id, TensorSummary) pairs (or a callable "
            f"returning them), got {type(items).__name__} {items!r:.80}; e.g. "
            "log_summaries(0, [(tid, summarize(g))]) with tid = writer.tensor_id(name, layer, kind, shape, dtype)."
        )
    return pairs


def _run_files_in(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.glob("*.db") if is_run_file(p))
    except OSError:
        return []


def _directory_error(path: Path, action: str) -> StoreError:
    """The error for a directory given where a run file was expected, pointing at the run files inside."""
    runs = _run_files_in(path)
    if len(runs) == 1:
        hint = f"It holds one run file; did you mean {str(runs[0])!r}?"
    elif runs:
        names = ", ".join(repr(p.name) for p in runs[:5]) + (", ..." if len(runs) > 5 else "")
        hint = f"It holds {len(runs)} run files ({names}); pass one of them."
    else:
        hint = f"A run is one file: pass a file path such as {str(path / 'run.db')!r}."
    return StoreError(f"cannot {action} {str(path)!r}: it is a directory, not a run file. {hint}")


def _sidecars(path: Path) -> list[Path]:
    return [Path(str(path) + suffix) for suffix in ("-wal", "-shm")]


def _unlink_quietly(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _temp_sibling(path: Path) -> Path:
    """A hidden, unique name next to ``path``, for building a file that is then renamed into place."""
    return path.with_name(f".{path.name[:200]}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _place(tmp: Path, path: Path, *, replace: bool) -> None:
    """Move the finished file ``tmp`` to ``path`` atomically; without ``replace`` never over an existing file."""
    if replace:
        _unlink_quietly(*_sidecars(path))  # a stale WAL next to a new file would be replayed into it
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: two creators cannot both win
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)
    else:
        tmp.unlink()


_HELD: set[str] = set()  # run files locked by writers of this process
_HELD_GUARD = threading.Lock()


class _WriterLock:
    """The exclusive lock of a run file's writer: ``flock`` on ``<run file>-lock`` plus a per-process registry.

    The sidecar file (not the database file: closing another descriptor of it would drop SQLite's own POSIX
    locks) holds the writer's process id. The OS releases the lock when the process dies; :meth:`release` also
    removes the file. Where ``fcntl`` is missing, only writers in this process are kept apart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = Path(str(path) + "-lock")
        self._fd: int | None = None
        self._held = False

    def acquire(self) -> str | None:
        """Take the lock; returns ``None``, or who holds it (``"this process"``, ``"process 123"``)."""
        key = str(self.path)
        with _HELD_GUARD:
            if key in _HELD:
                return "this process"
            _HELD.add(key)
        self._held = True
        if fcntl is None:  # pragma: no cover - Windows
            return None
        for _ in range(20):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError:  # e.g. a read-only directory: no lock file, the in-process registry still applies
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._owner(fd)
                os.close(fd)
                self.release()
                return owner
            except OSError:  # a file system without flock
                os.close(fd)
                return None
            try:
                current = os.stat(self.lock_path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is None or (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)  # the holder removed the file as we opened it: lock the new one
                continue
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return None
        return None  # pragma: no cover - never in practice

    @staticmethod
    def _owner(fd: int) -> str:
        try:
            pid = int(os.pread(fd, 32, 0).decode().strip())
        except (OSError, ValueError):
            return "another process"
        return "this process" if pid == os.getpid() else f"process {pid}"

    def release(self) -> None:
        """Give the lock back (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                current, mine = os.stat(self.lock_path), os.fstat(fd)
                if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                    self.lock_path.unlink()
            os.close(fd)
        if self._held:
            self._held = False
            with _HELD_GUARD:
                _HELD.discard(str(self.path))


def _busy_error(path: Path, owner: str, action: str) -> StoreError:
    return StoreError(
        f"cannot {action} the run file {str(path)!r}: another gradsight watch is writing it ({owner}); two writers "
        "would mix their steps. Close that watch first (watch.close()), or pass another path."
    )


def _missing_tables(con: sqlite3.Connection) -> list[str]:
    have = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()}
    return [t for t in _TABLES if t not in have]


def _check_header(path: Path, action: str) -> None:
    """Refuse an empty file or one that is not SQLite, before SQLite gets to misread it."""
    try:
        with path.open("rb") as fh:
            head = fh.read(100)
    except OSError as exc:
        raise StoreError(f"cannot {action} {str(path)!r}: {exc.strerror or exc}.") from exc
    if not head:
        raise StoreError(
            f"cannot {action} {str(path)!r}: the file is empty (0 bytes), not a gradsight run file. It holds no "
            "data; delete it or pass another path."
        )
    if head[:16] != _SQLITE_MAGIC:
        raise StoreError(
            f"cannot {action} {str(path)!r}: it is not a gradsight run file (not even an SQLite file; it starts "
            f"with {head[:16]!r}). Pass the .db file that gradsight.watch(...) wrote."
        )
    if len(head) < 100:
        raise StoreError(
            f"cannot {action} {str(path)!r}: the file is truncated ({len(head)} bytes, shorter than an SQLite "
            "header). It was probably cut short while copying; copy it again (Run.snapshot for a live run)."
        )


def _model_signature(model: Any) -> list[tuple[str, str, list[Any]]] | None:
    """(name, type, parameter shapes) per declared layer of a ``meta['model']`` description, or ``None`` (none)."""
    if not isinstance(model, Mapping) or not isinstance(model.get("layers"), list):
        return None
    sig = []
    for layer in model["layers"]:
        if not isinstance(layer, Mapping):
            return None
        if "shares" in layer:  # a shared module's further record (torch: ``act#2``), added once the forward ran
            continue
        params = layer.get("params")
        shapes = list(params.values()) if isinstance(params, Mapping) else []
        sig.append((str(layer.get("name")), str(layer.get("type")), json.loads(json.dumps(shapes, default=list))))
    return sig


def _in_call_order(names: list[str], called: list[str]) -> list[str]:
    """``names`` (declaration order) and ``called`` merged into the order of the forward pass.

    A layer the forward did not call itself goes right before the first of its sub-modules it called (a
    ``MultiheadAttention`` holding its input projection, whose ``out_proj`` is called), or else after every called
    layer, in declaration order: a module defined but never used must not sit between two layers of the forward.
    ``called`` may hold names that were not declared (``act#2``: a shared module's second record): they take
    their place in the call order too.
    """
    pos: dict[str, int] = {}
    for n in called:
        pos.setdefault(n, len(pos))
    keyed: list[tuple[tuple[int, int, int], str]] = []
    for seq, n in enumerate(names):
        if n in pos:
            keyed.append(((pos[n], 0, seq), n))
            continue
        # ("model" is the name a torch watch gives the root module, which holds every other one)
        inside = [i for c, i in pos.items() if n == "model" or c.startswith(n + ".")]
        keyed.append(((min(inside), -1, seq), n) if inside else ((len(pos), 1, seq), n))
    declared = set(names)
    keyed += [((i, 0, -1), n) for n, i in pos.items() if n not in declared]
    return [n for _, n in sorted(keyed)]


def _model_mismatch(stored: Any, given: Any) -> str | None:
    """Why model description ``given`` is another architecture than ``stored`` (``None``: same, or unknown)."""
    a, b = _model_signature(stored), _model_signature(given)
    if a is None or b is None or not b:
        return None
    a_arch, b_arch = [(t, s) for _, t, s in a], [(t, s) for _, t, s in b]
    if a_arch == b_arch:  # names may differ (Keras numbers its layers per process); the architecture is the same
        return None
    if len(a) != len(b):
        return f"the stored model has {len(a)} layers with parameters, this one {len(b)}"
    for (name, t0, s0), (_, t1, s1) in zip(a, b, strict=True):
        if (t0, s0) != (t1, s1):
            return f"layer {name!r} was stored as {t0} with parameter shapes {s0}, now {t1} with {s1}"
    return None  # pragma: no cover - unreachable


@dataclass(frozen=True)
class TensorInfo:
    """One recorded tensor: its name (e.g. ``0.weight`` or ``dense_1/kernel``), layer, kind, shape and dtype."""

    id: int
    name: str
    layer: str
    kind: str
    shape: tuple[int, ...]
    dtype: str


def default_run_path() -> Path:
    """Where a run goes when no path is given: ``./gradsight-runs/run-YYYYmmdd-HHMMSS-ffffff.db``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    return Path.cwd() / "gradsight-runs" / f"run-{stamp}.db"


def is_run_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an existing gradsight run file (an SQLite file with gradsight's ``meta`` table).

    Reads only the file's header and schema, never writes; any file that cannot be read as SQLite is not a run
    file. Commands that write outputs use this to refuse replacing a run with, say, a CSV.
    """
    p = Path(os.fsdecode(path)).expanduser()
    if not p.is_file():
        return False
    try:
        with p.open("rb") as fh:
            if fh.read(16) != _SQLITE_MAGIC:
                return False
        con = sqlite3.connect(p.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            row = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        finally:
            con.close()
    except (OSError, sqlite3.DatabaseError):
        return False
    return row is not None


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InputError(f"unknown tensor kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}.")


def _names(arg: str, values: Any) -> list[str]:
    """A ``kind`` / ``layer`` / ``tensor`` filter as a list of names: one name or an iterable of names.

    Raises:
        InputError: neither a string nor an iterable of strings.
    """
    items = [values] if isinstance(values, str) else values
    try:
        items = list(items)
    except TypeError:
        items = None
    if items is None or not all(isinstance(v, str) for v in items):
        raise InputError(
            f"{arg}=... expects a name or a list of names, got {type(values).__name__} {values!r:.80}; "
            f"e.g. {arg}={'grad' if arg == 'kind' else 'fc1'!r} or {arg}=[...], or leave it out to keep every {arg}."
        )
    return items


def _encode(step: int, items: SummaryArrays | Iterable[tuple[int, TensorSummary]]) -> list[tuple[Any, ...]]:
    """The ``summaries`` records of one step: the one encoder, :func:`gradsight._packing.encode_rows`.

    ``items`` are the adapters' packed rows (:class:`SummaryArrays`) or ``(tensor_id, TensorSummary)`` pairs,
    which are packed into rows first.
    """
    if not isinstance(items, SummaryArrays):
        pairs = list(items)
        items = SummaryArrays([tid for tid, _ in pairs], to_rows([s for _, s in pairs]))
    return encode_rows(step, items.tensor_ids, items.rows)


def _corrupt(where: tuple[Any, ...], what: str) -> StoreError:
    path, tensor, kind, step = where
    return StoreError(
        f"the run file {str(path)!r} is damaged: the {what} of tensor {tensor!r} ({kind}) at step {step} is corrupt. "
        "Nothing can be read from that record; the file was probably altered or cut short while copying — copy it "
        "again (Run.snapshot for a live run), or read the other steps with run.summaries(steps=...)."
    )


def _decode_hist(hist_lo: Any, blob: Any, where: tuple[Any, ...] = ("?", "?", "?", "?")) -> np.ndarray:
    hist = np.zeros(HIST_BINS, dtype=np.int64)
    if hist_lo is not None and blob:
        if not isinstance(blob, bytes) or len(blob) % 8:
            size = len(blob) if isinstance(blob, (bytes, str)) else type(blob).__name__
            raise _corrupt(where, f"histogram ({size} bytes, expected a multiple of 8)")
        span = np.frombuffer(blob, dtype="<i8")
        if not isinstance(hist_lo, int) or hist_lo < 0 or hist_lo + span.size > HIST_BINS:
            raise _corrupt(where, f"histogram ({span.size} bins from bin {hist_lo!r}, past the {HIST_BINS} bins)")
        hist[hist_lo : hist_lo + span.size] = span
    return hist


def _decode_units(blob: Any, where: tuple[Any, ...] = ("?", "?", "?", "?")) -> np.ndarray | None:
    if blob is None:
        return None
    if not isinstance(blob, bytes) or len(blob) % 8:
        size = len(blob) if isinstance(blob, (bytes, str)) else type(blob).__name__
        raise _corrupt(where, f"per-unit counts ({size} bytes, expected a multiple of 8)")
    return np.frombuffer(blob, dtype="<i8").copy()


def _decode(row: tuple[Any, ...], where: tuple[Any, ...] = ("?", "?", "?", "?")) -> TensorSummary:
    """Decode the columns ``count .. units`` of a summaries row (``where``: path, tensor, kind, step for errors)."""
    count, s, s2, mn, mx, zeros, nan, pinf, ninf, pos, hist_lo, hist, units_total, units = row
    return TensorSummary(
        count=count,
        sum=math.nan if s is None else s,
        sum_sq=math.nan if s2 is None else s2,
        min=math.nan if mn is None else mn,
        max=math.nan if mx is None else mx,
        zeros=zeros,
        nan=nan,
        posinf=pinf,
        neginf=ninf,
        positive=pos,
        hist=_decode_hist(hist_lo, hist, where),
        units_active=_decode_units(units, where),
        units_total=units_total or 0,
    )


class RunWriter:
    """Writes one run file from a background thread; see the module docstring for the guarantees.

    Args:
        path: the run file to create (str, bytes or os.PathLike). Its directory must exist and be writable.
        meta: initial metadata (JSON-serialisable values), e.g. framework, versions, model structure, config;
            written in the file's first transaction together with the schema.
        if_exists: what to do when ``path`` exists: ``"error"`` (default: refuse, never silently overwrite),
            ``"append"`` (continue the run; new steps must not repeat stored ones — see :attr:`last_step` — and
            the model must be the same: parameter tensors keep their shape and dtype), or ``"overwrite"``
            (replace it; only when asked for explicitly, and only a gradsight run file or an empty file).
        commit_every: the longest time, in seconds, between a write being enqueued and its commit.

    Raises:
        StoreError: the file exists (with ``if_exists="error"``), its directory is missing or unwritable, it is
            not a gradsight run file, another writer is writing it, or (append) it holds another model.
    """

    def __init__(
        self,
        path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
        *,
        meta: Mapping[str, Any] | None = None,
        if_exists: Literal["error", "append", "overwrite"] = "error",
        commit_every: float = 1.0,
    ) -> None:
        if if_exists not in ("error", "append", "overwrite"):
            raise InputError(f"if_exists must be 'error', 'append' or 'overwrite', not {if_exists!r}.")
        if not (isinstance(commit_every, (int, float)) and math.isfinite(commit_every) and commit_every > 0):
            raise InputError(f"commit_every must be a positive number of seconds, got {commit_every!r}.")
        self.path = _as_path(path, "RunWriter")
        self.commit_every = float(commit_every)
        self._tensors: dict[tuple[str, str], int] = {}
        self._layouts: dict[tuple[str, ...], int] = {}  # signal layouts (names) -> id, on the writer thread
        self._stored_shapes: dict[tuple[str, str], tuple[list[int], str]] = {}
        self._stored_model: Any = None
        self._appending = False
        self.last_step: int | None = None
        self._error: BaseException | None = None  # a dropped record: reported once
        self._fatal: BaseException | None = None  # the writer thread stopped: reported by every call
        self._fatal_message = ""
        self._committed_step: int | None = None
        self._pending_step: int | None = None
        self._closed = False
        if meta is not None and not isinstance(meta, Mapping):
            raise InputError(
                f"RunWriter(meta=...) expects a mapping of JSON-serialisable values, got {type(meta).__name__} "
                f"{meta!r:.80}; e.g. meta={{'framework': 'custom'}}, or leave it out."
            )
        rows = [(str(key), _dumps(value)) for key, value in (meta or {}).items()]
        if self.path.is_dir():
            raise _directory_error(self.path, "write the run file")
        parent = self.path.parent
        if not parent.is_dir():
            raise StoreError(
                f"cannot create the run file {str(self.path)!r}: its directory {str(parent)!r} does not exist. "
                f"Create it first (os.makedirs({str(parent)!r}, exist_ok=True)) or pass another path."
            )
        if not os.access(parent, os.W_OK):
            raise StoreError(
                f"cannot create the run file {str(self.path)!r}: the directory {str(parent)!r} is not writable. "
                "Pass a path in a directory you can write to."
            )
        self._lock = _WriterLock(self.path)
        owner = self._lock.acquire()
        if owner is not None:
            raise _busy_error(self.path, owner, "open")
        try:
            self._open_file(rows, if_exists)
        except BaseException:
            self._lock.release()
            raise
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._urgent = threading.Event()  # set by flush and close: the writer stops waiting for a burst
        self._burst = _BURST_S
        self._thread = threading.Thread(target=self._loop, name=f"gradsight-writer:{self.path.name}", daemon=True)
        self._thread.start()

    # ---- set-up --------------------------------------------------------------------------------------------
    def _open_file(self, rows: list[tuple[str, str]], if_exists: str) -> None:
        """Create, replace or open the file (the lock is held); see the class docstring."""
        path = self.path
        exists = path.exists()
        empty = exists and path.stat().st_size == 0
        if exists and if_exists == "error":
            if not empty and not is_run_file(path):  # neither append nor overwrite applies to another file
                raise StoreError(
                    f"{str(path)!r} already exists and is not a gradsight run file; gradsight never overwrites other "
                    "files. Pass another path, or delete that file yourself if it is not needed."
                )
            raise StoreError(
                f"the run file {str(path)!r} already exists and gradsight never overwrites silently. "
                "Pass another path, if_exists='append' to continue that run, or if_exists='overwrite' to replace it."
            )
        if exists and if_exists == "overwrite" and not empty and not is_run_file(path):
            raise StoreError(
                f"refusing to overwrite {str(path)!r}: it is not a gradsight run file, and if_exists='overwrite' "
                "only replaces run files. Pass another path, or delete that file yourself if it is not needed."
            )
        if exists and if_exists == "append" and not empty:
            self._appending = True
            self._open_existing(rows)
        else:
            self._create(rows, replace=exists)

    def _create(self, rows: list[tuple[str, str]], *, replace: bool) -> None:
        """Build the file under a temporary name (schema and metadata in one transaction), then move it to path."""
        if not replace:
            _unlink_quietly(*_sidecars(self.path))  # orphans of a deleted run would be replayed into the new one
        tmp = _temp_sibling(self.path)
        created = json.dumps(datetime.now(timezone.utc).isoformat())
        head = [("schema_version", json.dumps(SCHEMA_VERSION)), ("created", created)]
        try:
            con = sqlite3.connect(tmp, isolation_level=None)
            try:
                con.execute(f"PRAGMA page_size={_PAGE_SIZE}")  # before WAL, which fixes it
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=NORMAL")
                con.execute("BEGIN")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        con.execute(statement)
                con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [*head, *rows])
                con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                con.execute("COMMIT")
            finally:
                con.close()  # the last connection: SQLite checkpoints and removes the temporary WAL
            _place(tmp, self.path, replace=replace)
        except FileExistsError:
            raise StoreError(
                f"the run file {str(self.path)!r} was created by someone else while this writer was opening it; "
                "gradsight never overwrites silently. Pass another path."
            ) from None
        except (OSError, sqlite3.Error) as exc:  # e.g. a read-only file system, where os.access cannot tell
            raise StoreError(
                f"cannot create the run file {str(self.path)!r} ({type(exc).__name__}: {exc}); its directory is "
                "probably not writable (or the disk is full). Pass a path in a directory you can write to."
            ) from exc
        finally:
            _unlink_quietly(tmp, *_sidecars(tmp), Path(str(tmp) + "-journal"))

    def _open_existing(self, rows: list[tuple[str, str]]) -> None:
        """Check an existing run file for appending, read its bookkeeping, and store the new metadata."""
        path = self.path
        _check_header(path, "append to")
        try:
            con = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {str(path)!r} to append to it (SQLite said: {exc}).") from exc
        try:
            missing = _missing_tables(con)
            if missing:
                raise StoreError(
                    f"cannot append to {str(path)!r}: it is an SQLite file but not a gradsight run file (no "
                    f"{', '.join(map(repr, missing))} table). Pass another path."
                )
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{str(path)!r} has run-file schema version {version}, newer than this gradsight's "
                    f"{SCHEMA_VERSION}; upgrade gradsight to append to it."
                )
            stored = dict(con.execute("SELECT key, value FROM meta WHERE key = 'model'").fetchall())
            if "model" in stored:
                self._stored_model = _loads(stored["model"], f"the 'model' entry of the metadata of {str(path)!r}")
            given = dict(rows)
            if "model" in given:
                self._check_model(json.loads(given["model"]))
            for tid, name, kind, shape, dtype in con.execute("SELECT id, name, kind, shape, dtype FROM tensors"):
                self._tensors[(name, kind)] = tid
                if kind in _PARAM_KINDS:
                    dims = _loads(shape, f"the shape of tensor {name!r} ({kind}) in {str(path)!r}")
                    self._stored_shapes[(name, kind)] = (dims, dtype)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("BEGIN")
            for statement in _SCHEMA.split(";"):  # a version 1 file gains the version 2 tables
                if statement.strip():
                    con.execute(statement)
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.last_step = con.execute(f"SELECT max(step) FROM ({_STEPS_SQL})").fetchone()[0]
            for lid, names in con.execute("SELECT id, names FROM signal_layouts"):
                self._layouts[tuple(_loads(names, f"a signal layout of {str(path)!r}"))] = lid
            con.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?), ('created', ?)",
                (json.dumps(SCHEMA_VERSION), json.dumps(datetime.now(timezone.utc).isoformat())),
            )
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)
            con.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot append to {str(path)!r}: it is not a readable gradsight run file (SQLite said: {exc}). "
                "Pass another path."
            ) from exc
        finally:
            con.close()

    def _check_model(self, model: Any) -> None:
        why = _model_mismatch(self._stored_model, model) if self._appending else None
        if why is not None:
            raise StoreError(
                f"cannot append to the run file {str(self.path)!r}: it was recorded from another model ({why}). "
                "A run holds one model: pass another path, or if_exists='overwrite' to replace the old run."
            )

    # ---- the training thread's API -------------------------------------------------------------------------
    def tensor_id(self, name: str, layer: str, kind: str, shape: Iterable[int], dtype: str) -> int:
        """The id of a tensor, registering it on first use (name and kind identify it).

        Raises:
            StoreError: appending, and a parameter tensor (weight, grad, update) stored in the file has another
                shape or dtype — the run was recorded from another model.
        """
        self._raise_if_failed()
        _check_kind(kind)
        key = (name, kind)
        tid = self._tensors.get(key)
        if tid is not None:
            stored = self._stored_shapes.get(key)
            if stored is not None:
                dims = [int(d) for d in shape]
                if (dims, str(dtype)) != stored:
                    raise StoreError(
                        f"cannot append to the run file {str(self.path)!r}: tensor {name!r} ({kind}) was stored "
                        f"with shape {stored[0]} {stored[1]}, now given {dims} {dtype} — another model. A run holds "
                        "one model: pass another path, or if_exists='overwrite' to replace the old run."
                    )
                del self._stored_shapes[key]  # checked once
            return tid
        tid = len(self._tensors) + 1
        while tid in self._tensors.values():
            tid += 1
        self._put(
            (
                "INSERT INTO tensors VALUES (?, ?, ?, ?, ?, ?)",
                [(tid, name, layer, kind, json.dumps([int(d) for d in shape]), str(dtype))],
            )
        )
        self._tensors[key] = tid
        return tid

    def log_summaries(
        self,
        step: int,
        items: Iterable[tuple[int, TensorSummary]] | Callable[[], Iterable[tuple[int, TensorSummary]]],
    ) -> None:
        """Record summaries of one step: ``(tensor_id, TensorSummary)`` pairs.

        ``items`` may also be a zero-argument callable returning them; it is then called on the writer thread,
        which keeps unpacking work off the training thread. The callable may also return a
        :class:`gradsight._packing.SummaryArrays` (the adapters' packed rows, encoded with array operations).

        Raises:
            InputError: ``step`` is not an int >= 0, or ``items`` is not a callable nor ``(tensor_id,
                TensorSummary)`` pairs.
        """
        s = check_step(step, "RunWriter.log_summaries(step, ...)")
        if not callable(items) and not isinstance(items, SummaryArrays):
            items = _summary_pairs(items)
        self._put(("summaries", s, items))

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Record named scalars (loss, learning rate, ...) of one step; a repeated name in a step replaces it.

        Raises:
            InputError: ``step`` is not an int >= 0, or ``values`` is not a mapping of names (str) to numbers.
        """
        rows = _scalar_rows(step, values, "RunWriter.log_scalars")
        self._put(("INSERT OR REPLACE INTO scalars VALUES (?, ?, ?)", rows))

    def log_scalars_many(self, values: Mapping[int, Mapping[str, float]]) -> None:
        """:meth:`log_scalars` for several steps at once (``{step: {name: value}}``), as one write.

        Raises:
            InputError: as :meth:`log_scalars`, or ``values`` is not a mapping of steps.
        """
        if not isinstance(values, Mapping):
            raise InputError(
                f"RunWriter.log_scalars_many expects a mapping {{step: {{name: value}}}}, got {type(values).__name__} "
                f"{values!r:.80}; e.g. log_scalars_many({{0: {{'loss': 0.5}}}})."
            )
        rows = [row for step, vs in values.items() for row in _scalar_rows(step, vs, "RunWriter.log_scalars_many")]
        self._put(("INSERT OR REPLACE INTO scalars VALUES (?, ?, ?)", rows))

    def log_signals(self, rows: list[tuple[int, tuple[str, ...], Any]]) -> None:
        """Record the dense per-step signals of several steps: ``(step, names, values)``, values in names' order.

        Stored one row per step (table ``signals``); readers see them as scalars. A step recorded again replaces
        its row.
        """
        if rows:
            self._put(("signals", [(int(step), tuple(names), values) for step, names, values in rows]))

    def log_event(self, step: int | None, kind: str, payload: Mapping[str, Any]) -> None:
        """Record an event (a finding, a note) with a JSON payload."""
        self._put(("INSERT INTO events (step, kind, payload) VALUES (?, ?, ?)", [(step, kind, _dumps(payload))]))

    def set_meta(self, key: str, value: Any) -> None:
        """Set one metadata entry (a JSON-serialisable value); written synchronously before the thread starts.

        Raises:
            StoreError: appending, and ``key`` is ``"model"`` with another architecture than the stored one.
        """
        row = [(str(key), _dumps(value))]
        if key == "model":
            self._check_model(json.loads(row[0][1]))
        if getattr(self, "_thread", None) is None:
            with contextlib.closing(sqlite3.connect(self.path)) as con:
                con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", row)
                con.commit()
        else:
            self._put(("INSERT OR REPLACE INTO meta VALUES (?, ?)", row))

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until everything enqueued so far is committed, and checkpoint the file (see the module docstring).

        Raises:
            StoreError: the writer failed (the message says why and what the file holds), or did not commit
                within ``timeout`` seconds.
        """
        if self._closed:
            return
        done = threading.Event()
        self._put(("flush", done))
        self._urgent.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))):
            if not self._thread.is_alive():
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreError(f"the run writer for {str(self.path)!r} did not commit within {timeout} s.")
        self._raise_if_failed()
        if not done.is_set():  # pragma: no cover - the thread records why it stops
            raise StoreError(f"the run writer for {str(self.path)!r} stopped; its last records were not saved.")

    def close(self) -> None:
        """Commit everything, checkpoint, stop the writer thread and release the file. Safe to call more than once.

        Raises:
            StoreError: the writer failed, or a record was dropped since the last call (said once).
        """
        if self._closed:
            return
        self._closed = True
        self._queue.put(("stop", None))
        self._urgent.set()
        self._thread.join()
        self._lock.release()
        self._raise_if_failed()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _put(self, item: Any) -> None:
        self._raise_if_failed()
        if self._closed:
            raise StoreError(f"the run writer for {str(self.path)!r} is closed; nothing more can be written.")
        self._queue.put(item)

    def _raise_if_failed(self) -> None:
        if self._fatal is not None:
            raise StoreError(self._fatal_message) from self._fatal
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    # ---- the writer thread ---------------------------------------------------------------------------------
    def _commit(self, con: sqlite3.Connection) -> None:
        con.commit()
        if self._pending_step is not None:
            done = self._pending_step if self._committed_step is None else self._committed_step
            self._committed_step = max(done, self._pending_step)
            self._pending_step = None

    @staticmethod
    def _checkpoint(con: sqlite3.Connection, wait: float) -> None:
        """Copy the WAL into the database file and truncate it, waiting up to ``wait`` s for readers.

        A reader in the middle of a read can keep the WAL from being truncated; then what it holds stays safely
        in the ``-wal`` file until the next checkpoint (or the last connection closes).
        """
        con.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            con.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")

    @staticmethod
    def _leave_wal(con: sqlite3.Connection) -> None:
        """Switch a finished run file back to a rollback journal, so that it is one plain SQLite file.

        Readers of a WAL file create ``-wal``/``-shm`` files beside it, even read-only ones; a closed run in
        rollback-journal mode has none. The switch needs the file to itself: while a reader holds it, the run
        stays in WAL mode (already checkpointed, so the ``.db`` still holds everything). Appending switches it
        back to WAL.
        """
        con.execute(f"PRAGMA busy_timeout={int(_FLUSH_CHECKPOINT_WAIT * 1000)}")
        with contextlib.suppress(sqlite3.OperationalError):  # "database is locked": a reader is open
            con.execute("PRAGMA journal_mode=DELETE").fetchall()

    def _loop(self) -> None:
        con: sqlite3.Connection | None = None
        try:
            con = sqlite3.connect(self.path, check_same_thread=False, timeout=_BUSY_TIMEOUT_MS / 1000)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")  # WAL: commits need no fsync each; checkpoints sync
            dirty = False
            last_commit = time.monotonic()
            while True:
                wait = max(0.0, self.commit_every - (time.monotonic() - last_commit)) if dirty else None
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    item = None
                if item is not None:
                    op = item[0]
                    if op == "stop":
                        break
                    if op == "flush":
                        self._commit(con)
                        dirty, last_commit = False, time.monotonic()
                        self._checkpoint(con, _FLUSH_CHECKPOINT_WAIT)
                        item[1].set()
                        continue
                    self._apply_or_note(con, item)
                    dirty = True
                if dirty and time.monotonic() - last_commit >= self.commit_every:
                    self._commit(con)
                    dirty, last_commit = False, time.monotonic()
                if item is not None and self._queue.empty():  # work in bursts (see _BURST_S)
                    due = self.commit_every - (time.monotonic() - last_commit) if dirty else self._burst
                    if self._urgent.wait(max(0.0, min(self._burst, due))):
                        self._urgent.clear()
            # Whatever is left (e.g. items enqueued by another thread as "stop" was seen), then the final commit.
            with contextlib.suppress(queue.Empty):
                while True:
                    item = self._queue.get_nowait()
                    if item[0] == "flush":
                        item[1].set()
                    elif item[0] != "stop":
                        self._apply_or_note(con, item)
            self._commit(con)
            self._checkpoint(con, _CLOSE_CHECKPOINT_WAIT)
            self._leave_wal(con)
        except BaseException as exc:  # a storage failure: stop, and tell the training thread at its next call
            self._fatal_message = self._describe_failure(con, exc)
            self._fatal = exc
        finally:
            if con is not None:
                with contextlib.suppress(Exception):
                    con.close()
            with contextlib.suppress(queue.Empty):  # wake whoever waits for a flush
                while True:
                    item = self._queue.get_nowait()
                    if item[0] == "flush":
                        item[1].set()

    def _apply_or_note(self, con: sqlite3.Connection, item: Any) -> None:
        """Apply one record; a record that cannot be stored is dropped and noted, a storage failure raises."""
        try:
            self._apply(con, item)
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError, sqlite3.DataError) as exc:
            self._note(item, exc)
        except sqlite3.Error:
            raise
        except Exception as exc:  # e.g. a summaries callable that failed
            self._note(item, exc)
        else:
            if item[0] == "summaries":
                steps = [item[1]]
            elif "INTO scalars" in item[0] or item[0] == "signals":
                steps = [row[0] for row in item[1]]
            else:
                steps = []
            if self._pending_step is not None:
                steps.append(self._pending_step)
            if steps:
                self._pending_step = max(steps)

    def _note(self, item: Any, exc: BaseException) -> None:
        if self._error is not None:
            return
        if item[0] == "summaries":
            what = f"the summaries of step {item[1]}"
        elif item[0] == "signals":
            what = "the per-step signals of steps " + ", ".join(str(r[0]) for r in item[1][:5])
        else:
            what = "a record for table " + item[0].split(" INTO ", 1)[-1].split()[0]
        hint = ""
        if isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc):
            hint = (
                " That step is already stored: when appending, continue after the stored steps "
                f"(RunWriter.last_step is {self.last_step!r})."
            )
        err = StoreError(
            f"{what} could not be stored in the run file {str(self.path)!r} and was dropped "
            f"({type(exc).__name__}: {exc}); the rest of the run is being written.{hint}"
        )
        err.__cause__ = exc
        self._error = err

    def _describe_failure(self, con: sqlite3.Connection | None, exc: BaseException) -> str:
        """The message for a writer that failed: the cause, the file, and what it holds."""
        held = None
        with contextlib.suppress(Exception):
            if con is not None:
                con.rollback()
                held = con.execute("SELECT count(DISTINCT step), max(step) FROM summaries").fetchone()
                last = con.execute(f"SELECT max(step) FROM ({_STEPS_SQL})").fetchone()[0]
        if held is not None:
            saved = f"it holds {held[0]} step(s) with summaries; the last committed step is {last!r}"
        else:
            saved = f"the last committed step is {self._committed_step!r} (as far as the writer knows)"
        text = str(exc).lower()
        if any(s in text for s in ("disk", "full", "i/o", "readonly", "read-only", "no such file")):
            cause = "the disk is full or failing, or the file or its file system went away"
        else:
            cause = "the file could no longer be written"
        return (
            f"writing the run file {str(self.path)!r} failed on the writer thread ({type(exc).__name__}: {exc}); "
            f"likely cause: {cause}. Everything recorded since the last commit was lost and nothing more is "
            f"written; {saved}. Fix the cause (free disk space, or pass another path) and run again — "
            "if_exists='append' continues this run."
        )

    def _apply(self, con: sqlite3.Connection, item: Any) -> None:
        if item[0] == "summaries":
            _, step, items = item
            if callable(items):
                items = items()
            rows = _encode(step, items)
            # One statement per step (in parts of at most the connection's number of parameters): all or none of
            # its rows, and less time on this thread than one INSERT per row (28 rows: 87-102 -> 78-82 us timed
            # alone, and one release of Python's lock instead of 28), time a training thread on a small machine
            # pays for.
            per = _rows_per_insert(con)
            for lo in range(0, len(rows), per):
                part = rows[lo : lo + per]
                con.execute(_insert_summaries(len(part)), [v for r in part for v in r])
        elif item[0] == "signals":
            out = []
            for step, names, values in item[1]:
                lid = self._layouts.get(names)
                if lid is None:
                    cur = con.execute("INSERT INTO signal_layouts (names) VALUES (?)", (json.dumps(list(names)),))
                    lid = self._layouts[names] = int(cur.lastrowid)
                data = np.asarray(values, dtype="<f8")
                if data.shape != (len(names),):
                    raise ValueError(f"step {step}: {data.size} signal values for {len(names)} names")
                out.append((step, lid, data.tobytes()))
            con.executemany("INSERT OR REPLACE INTO signals VALUES (?, ?, ?)", out)
        else:
            sql, rows = item
            con.executemany(sql, rows)


#: Columns of the ``summaries`` table (one parameter each per inserted row).
_SUMMARY_COLUMNS = 16
#: Rows per ``INSERT`` statement at most (bounds the statement's text: ~25 kB).
_MAX_ROWS_PER_INSERT = 500


@functools.lru_cache(maxsize=64)
def _insert_summaries(n: int) -> str:
    """``INSERT INTO summaries`` of ``n`` rows in one statement."""
    one = "(" + ", ".join("?" * _SUMMARY_COLUMNS) + ")"
    return "INSERT INTO summaries VALUES " + ", ".join([one] * n)


def _rows_per_insert(con: sqlite3.Connection) -> int:
    """The most ``summaries`` rows one statement inserts.

    ``_MAX_ROWS_PER_INSERT``, or fewer where the connection allows fewer parameters per statement (999 in SQLite
    builds before 3.32).
    """
    getlimit = getattr(con, "getlimit", None)  # Python 3.11+
    limit = getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if getlimit is not None else 999
    return max(1, min(_MAX_ROWS_PER_INSERT, limit // _SUMMARY_COLUMNS))


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise InputError(f"run metadata must be JSON-serialisable, got {value!r} ({exc}).") from exc


def _loads(text: Any, what: str) -> Any:
    """Decode one stored JSON value; ``what`` names it in the error."""
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"{what} is not valid JSON ({exc}; stored {str(text)[:80]!r}). The run file was altered or damaged; "
            "copy it again, or rewrite that entry."
        ) from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


class Run:
    """A recorded run, read from its file.

    Cheap to open; every accessor reads the file afresh, so a Run opened while training is still writing sees new
    steps as they are committed. Each call reads in its own short read transaction and keeps none open in
    between, so an open Run never holds back the writer's checkpoints.

    Use :func:`load` to open one. ``Run`` is a context manager; :meth:`close` releases the file.
    """

    #: Summary rows read per query by :meth:`summaries` (no read transaction stays open between pages).
    _PAGE = 4096

    def __init__(self, path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> None:
        self.path = _as_path(path, "load")
        if self.path.is_dir():
            raise _directory_error(self.path, "load")
        if not self.path.is_file():
            raise StoreError(
                f"no run file at {str(self.path)!r}. Pass the path that gradsight.watch(...) wrote "
                "(printed by the watch and stored as run.path)."
            )
        _check_header(self.path, "load")
        try:
            self._con = sqlite3.connect(self.path.as_uri() + "?mode=ro", uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the run file {str(self.path)!r} (SQLite said: {exc}).") from exc
        try:
            names = {r[0] for r in self._q("SELECT name FROM sqlite_master WHERE type='table'")}
            version = self._q("PRAGMA user_version")[0][0]
        except BaseException:
            self._con.close()
            raise
        missing = [t for t in _TABLES if t not in names]
        if missing:
            self._con.close()
            raise StoreError(
                f"{str(self.path)!r} is an SQLite file but not a gradsight run file (no "
                f"{', '.join(map(repr, missing))} table). Pass the .db file that gradsight.watch(...) wrote."
            )
        if version > SCHEMA_VERSION:
            self._con.close()
            raise StoreError(
                f"{str(self.path)!r} has run-file schema version {version}, newer than this gradsight's "
                f"{SCHEMA_VERSION}; upgrade gradsight to read it."
            )
        self.schema_version = version
        self._has_signals = all(t in names for t in _V2_TABLES)

    # ---- basics --------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the file."""
        self._con.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _q(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one query to completion (its read transaction ends with it); SQLite errors become StoreError."""
        try:
            return self._con.execute(sql, tuple(params)).fetchall()
        except sqlite3.ProgrammingError as exc:
            if "closed" in str(exc):
                raise StoreError(f"this Run of {str(self.path)!r} is closed; open it again with load().") from exc
            raise
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot read the run file {str(self.path)!r} (SQLite said: {exc}). The file is damaged — "
                "probably truncated or copied while it was being written; copy it again (Run.snapshot copies a "
                "live run consistently)."
            ) from exc

    def snapshot(self, dest: str | bytes | os.PathLike[str] | os.PathLike[bytes], *, overwrite: bool = False) -> Path:
        """Copy the run to ``dest`` as one consistent, self-contained run file, also while it is being written.

        This is how to copy a live run: ``gradsight.load(path).snapshot("copy.db")``. It uses SQLite's backup
        API, so the copy is a consistent state of the run, at most ``commit_every`` seconds (default 1 s) behind
        the training — call ``watch.flush()`` first to include everything recorded so far. Copying the ``.db``
        file alone with ``cp`` is only safe once the writer is closed: until then the latest commits live in its
        ``-wal`` file. The copy is built under a temporary name and moved into place, so ``dest`` is never a
        partial file.

        Args:
            dest: the file to write (str, bytes or os.PathLike); its directory must exist.
            overwrite: replace ``dest`` if it exists — only when it is a gradsight run file no watch is writing.

        Returns:
            The absolute path of the copy.

        Raises:
            StoreError: ``dest`` exists (without ``overwrite``), is not a run file, is being written, is a
                directory, or cannot be written.
            InputError: ``dest`` is this run's own file.
        """
        target = _as_path(dest, "snapshot")
        if target == self.path:
            raise InputError(f"snapshot: dest {str(target)!r} is this run's own file; pass another path.")
        if target.is_dir():
            raise StoreError(
                f"cannot write the snapshot to {str(target)!r}: it is a directory. Pass a file path such as "
                f"{str(target / self.path.name)!r}."
            )
        if not target.parent.is_dir():
            raise StoreError(
                f"cannot write the snapshot to {str(target)!r}: its directory {str(target.parent)!r} does not "
                "exist. Create it first or pass another path."
            )
        exists = target.exists()
        if exists and not overwrite:
            raise StoreError(
                f"cannot write the snapshot to {str(target)!r}: the file exists and gradsight never overwrites "
                "silently. Pass another path, or overwrite=True to replace a run file."
            )
        if exists and target.stat().st_size and not is_run_file(target):
            raise StoreError(
                f"refusing to overwrite {str(target)!r} with a snapshot: it is not a gradsight run file. "
                "Pass another path."
            )
        lock = _WriterLock(target)
        owner = lock.acquire()
        if owner is not None:
            raise _busy_error(target, owner, "overwrite")
        tmp = _temp_sibling(target)
        try:
            con = sqlite3.connect(tmp)
            try:
                self._con.backup(con)
            finally:
                con.close()
            _place(tmp, target, replace=exists)
        except FileExistsError:
            raise StoreError(
                f"cannot write the snapshot to {str(target)!r}: the file was created by someone else meanwhile. "
                "Pass another path."
            ) from None
        except sqlite3.ProgrammingError as exc:
            raise StoreError(f"this Run of {str(self.path)!r} is closed; open it again with load().") from exc
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot write the snapshot of {str(self.path)!r} to {str(target)!r} ({type(exc).__name__}: {exc}). "
                "Pass a path in a directory you can write to, with free space."
            ) from exc
        finally:
            _unlink_quietly(tmp, *_sidecars(tmp), Path(str(tmp) + "-journal"))
            lock.release()
        return target

    @property
    def meta(self) -> dict[str, Any]:
        """All metadata, JSON-decoded (keys a file lacks are simply absent)."""
        return {
            k: _loads(v, f"the metadata entry {k!r} of {str(self.path)!r}")
            for k, v in self._q("SELECT key, value FROM meta")
        }

    @property
    def framework(self) -> str | None:
        """``"torch"`` or ``"keras"`` (from the metadata), or ``None`` when not recorded."""
        rows = self._q("SELECT value FROM meta WHERE key = 'framework'")
        return _loads(rows[0][0], f"the metadata entry 'framework' of {str(self.path)!r}") if rows else None

    @property
    def tensors(self) -> list[TensorInfo]:
        """Every recorded tensor, in registration order."""
        out = []
        for tid, name, layer, kind, shape, dtype in self._q("SELECT * FROM tensors ORDER BY id"):
            dims = _loads(shape, f"the shape of tensor {name!r} ({kind}) in {str(self.path)!r}")
            if not isinstance(dims, list) or not all(isinstance(d, int) for d in dims):
                raise StoreError(
                    f"the shape of tensor {name!r} ({kind}) in {str(self.path)!r} is {dims!r}, not a list of "
                    "ints. The run file was altered or damaged."
                )
            out.append(TensorInfo(tid, name, layer, kind, tuple(dims), dtype))
        return out

    @property
    def layers(self) -> list[str]:
        """Layer names in model order.

        From the model structure in the metadata when recorded, in the order the forward pass called them where
        the watch recorded it (``call_order``: a module declared after the layers it follows is placed after
        them; see :func:`_in_call_order` for the layers the forward did not call), else in declaration order;
        then any other layer in the order its tensors were registered.
        """
        rows = self._q("SELECT value FROM meta WHERE key = 'model'")
        model = _loads(rows[0][0], f"the metadata entry 'model' of {str(self.path)!r}") if rows else None
        layers = model.get("layers") if isinstance(model, dict) else None
        names = [str(layer["name"]) for layer in layers or [] if isinstance(layer, dict) and "name" in layer]
        called = model.get("call_order") if isinstance(model, dict) else None
        if isinstance(called, list):
            names = _in_call_order(names, [str(n) for n in called])
        seen = set(names)
        for t in self.tensors:
            if t.layer not in seen:
                seen.add(t.layer)
                names.append(t.layer)
        return names

    @property
    def steps(self) -> list[int]:
        """The steps that have tensor summaries, ascending."""
        return [r[0] for r in self._q("SELECT DISTINCT step FROM summaries ORDER BY step")]

    @property
    def scalars(self) -> pd.DataFrame:
        """Per-step scalars as a wide DataFrame: index ``step``, one float64 column per scalar name (loss, lr, ...).

        A value logged as NaN, and a scalar not logged at a step, are both NaN.
        """
        import pandas as pd

        df = pd.DataFrame(self._q("SELECT step, name, value FROM scalars"), columns=["step", "name", "value"])
        # float64 with NaN: a scalar stored as NaN reads back as SQL NULL (None), which must not make an object column
        df["value"] = df["value"].astype("float64")
        parts = [] if df.empty else [df.pivot(index="step", columns="name", values="value")]
        for names, steps, values in self._signal_blocks():
            parts.append(pd.DataFrame(values, index=pd.Index(steps, name="step"), columns=list(names)))
        if not parts:
            return pd.DataFrame(index=pd.Index([], name="step", dtype="int64"))
        wide = parts[0] if len(parts) == 1 else pd.concat(parts, axis=0)
        if len(parts) > 1:  # one row per step: a step's scalars and signals side by side
            wide = wide.groupby(level=0, sort=True).first()
        wide = wide.sort_index()
        wide.index.name = "step"
        wide.columns.name = None
        return wide

    def _signal_blocks(
        self, steps: tuple[int | None, int | None] | None = None
    ) -> list[tuple[tuple[str, ...], list[int], np.ndarray]]:
        """The stored per-step signals, one ``(names, steps, values[steps x names])`` block per layout."""
        if not self._has_signals:
            return []
        layouts = {
            lid: tuple(_loads(names, f"a signal layout of {str(self.path)!r}"))
            for lid, names in self._q("SELECT id, names FROM signal_layouts")
        }
        sql, params = "SELECT step, layout, data FROM signals WHERE 1", []
        if steps is not None:
            if steps[0] is not None:
                sql, params = sql + " AND step >= ?", [*params, int(steps[0])]
            if steps[1] is not None:
                sql, params = sql + " AND step <= ?", [*params, int(steps[1])]
        by_layout: dict[int, tuple[list[int], list[bytes]]] = {}
        for step, lid, data in self._q(sql + " ORDER BY step", params):
            s_list, d_list = by_layout.setdefault(lid, ([], []))
            s_list.append(int(step))
            d_list.append(data)
        out = []
        for lid, (s_list, d_list) in by_layout.items():
            names = layouts.get(lid)
            blob = b"".join(d_list)
            if names is None or len(blob) != 8 * len(names) * len(s_list):
                raise StoreError(
                    f"the per-step signals of {str(self.path)!r} are damaged (layout {lid} of steps "
                    f"{s_list[0]}–{s_list[-1]} does not match its data). The file was altered or corrupted."
                )
            out.append((names, s_list, np.frombuffer(blob, dtype="<f8").reshape(len(s_list), len(names))))
        return out

    def scalar_rows(
        self, *, name: str | None = None, steps: tuple[int | None, int | None] | None = None
    ) -> list[tuple[int, str, float]]:
        """Logged scalars as ``(step, name, value)`` rows in step order, optionally filtered.

        Unlike the wide :attr:`scalars` table, this tells "logged as NaN" (a row whose value is NaN — SQLite keeps
        a NaN as NULL) from "not logged at that step" (no row).

        Args:
            name: only this scalar.
            steps: an inclusive ``(first, last)`` range; either end may be ``None``.
        """
        sql, params = "SELECT step, name, value FROM scalars WHERE 1", []
        if name is not None:
            sql, params = sql + " AND name = ?", [*params, name]
        if steps is not None:
            lo, hi = steps
            if lo is not None:
                sql, params = sql + " AND step >= ?", [*params, int(lo)]
            if hi is not None:
                sql, params = sql + " AND step <= ?", [*params, int(hi)]
        rows = [
            (int(step), str(n), math.nan if value is None else float(value))
            for step, n, value in self._q(sql + " ORDER BY step, name", params)
        ]
        blocks = self._signal_blocks(steps)
        if not blocks:
            return rows
        for names, s_list, values in blocks:
            cols = [i for i, n in enumerate(names) if name is None or n == name]
            rows.extend((s, names[i], float(values[r, i])) for r, s in enumerate(s_list) for i in cols)
        return sorted(rows, key=lambda r: (r[0], r[1]))

    @property
    def last_step(self) -> int | None:
        """The last step with any summary or scalar (``None`` for an empty run)."""
        sql = _STEPS_SQL if self._has_signals else _STEPS_SQL.rsplit(" UNION ALL ", 1)[0]
        return self._q(f"SELECT max(step) FROM ({sql})")[0][0]

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Recorded events (e.g. online findings) as dicts with ``step``, ``kind`` and the payload's fields."""
        sql, params = "SELECT step, kind, payload FROM events", []
        if kind is not None:
            sql += " WHERE kind = ?"
            params.append(kind)
        out = []
        for s, k, p in self._q(sql + " ORDER BY id", params):
            payload = _loads(p, f"the payload of a {k!r} event at step {s} in {str(self.path)!r}")
            if not isinstance(payload, dict):
                raise StoreError(
                    f"the payload of a {k!r} event at step {s} in {str(self.path)!r} is {payload!r}, not a JSON "
                    "object. The run file was altered or damaged."
                )
            out.append({"step": s, "kind": k, **payload})
        return out

    # ---- summaries -----------------------------------------------------------------------------------------
    def _select(
        self,
        kinds: Iterable[str] | str | None,
        layers: Iterable[str] | str | None,
        tensors: Iterable[str] | str | None,
        steps: tuple[int | None, int | None] | None,
    ) -> tuple[str, list[Any]]:
        where, params = [], []
        for column, arg, values in (
            ("t.kind", "kind", kinds),
            ("t.layer", "layer", layers),
            ("t.name", "tensor", tensors),
        ):
            if values is None:
                continue
            values = _names(arg, values)
            if column == "t.kind":
                for k in values:
                    _check_kind(k)
            where.append(f"{column} IN ({', '.join('?' * len(values))})")
            params.extend(values)
        if steps is not None:
            lo, hi = check_steps(steps)
            if lo is not None:
                where.append("s.step >= ?")
                params.append(int(lo))
            if hi is not None:
                where.append("s.step <= ?")
                params.append(int(hi))
        sql = (
            "SELECT s.step, t.id, t.name, t.layer, t.kind, s.count, s.sum, s.sum_sq, s.min, s.max, s.zeros, s.nan, "
            "s.posinf, s.neginf, s.positive, s.hist_lo, s.hist, s.units_total, s.units "
            "FROM summaries s JOIN tensors t ON t.id = s.tensor_id"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        return sql + " ORDER BY s.step, t.id", params

    def summaries(
        self,
        *,
        kind: Iterable[str] | str | None = None,
        layer: Iterable[str] | str | None = None,
        tensor: Iterable[str] | str | None = None,
        steps: tuple[int | None, int | None] | None = None,
    ) -> Iterator[tuple[int, TensorInfo, TensorSummary]]:
        """Iterate ``(step, TensorInfo, TensorSummary)`` in step order, optionally filtered.

        Rows are read in pages of a few thousand, each in its own short read, so an iteration left half-way holds
        nothing open; on a run still being written it ends at the steps committed when its last page was read.

        Args:
            kind: one kind or several (``weight``, ``grad``, ``update``, ``output``, ``output_grad``).
            layer: one layer name or several.
            tensor: one tensor name or several.
            steps: an inclusive ``(first, last)`` range; either end may be ``None``.

        Raises:
            InputError: a filter is not a name, a list of names or a ``(first, last)`` pair (raised by this
                call, not at the first ``next()``).
        """
        sql, params = self._select(kind, layer, tensor, steps)
        return self._pages(sql, params)

    def _pages(self, sql: str, params: list[Any]) -> Iterator[tuple[int, TensorInfo, TensorSummary]]:
        """The rows of :meth:`summaries`' query, read page by page."""
        infos = {t.id: t for t in self.tensors}
        # Page by (step, tensor id) so that no read transaction stays open while the caller iterates.
        where = " AND " if " WHERE " in sql else " WHERE "
        head, order = sql.rsplit(" ORDER BY ", 1)
        after: tuple[int, int] | None = None
        while True:
            if after is None:
                rows = self._q(f"{head} ORDER BY {order} LIMIT {self._PAGE}", params)
            else:
                page_sql = f"{head}{where}(s.step, t.id) > (?, ?) ORDER BY {order} LIMIT {self._PAGE}"
                rows = self._q(page_sql, [*params, *after])
            for row in rows:
                info = infos.get(row[1])
                if info is None:  # registered after this iteration started
                    infos = {t.id: t for t in self.tensors}
                    info = infos[row[1]]
                yield row[0], info, _decode(row[5:], (self.path, info.name, info.kind, row[0]))
            if len(rows) < self._PAGE:
                return
            after = (rows[-1][0], rows[-1][1])

    def summary(self, tensor: str, kind: str, step: int) -> TensorSummary:
        """The summary of one tensor of one kind at one step.

        Raises:
            InputError: nothing was recorded for that tensor, kind and step.
        """
        for _, _, s in self.summaries(kind=kind, tensor=tensor, steps=(step, step)):
            return s
        raise InputError(
            f"no {kind!r} summary of tensor {tensor!r} at step {step!r} in {str(self.path)!r}; "
            f"recorded tensors: {sorted({t.name for t in self.tensors})}, steps: {self._step_range()}."
        )

    def _step_range(self) -> str:
        lo, hi, n = self._q("SELECT min(step), max(step), count(DISTINCT step) FROM summaries")[0]
        return "none" if n == 0 else f"{n} steps from {lo} to {hi}"

    def to_pandas(
        self,
        *,
        kind: Iterable[str] | str | None = None,
        layer: Iterable[str] | str | None = None,
        tensor: Iterable[str] | str | None = None,
        steps: tuple[int | None, int | None] | None = None,
        hist: bool = False,
        units: bool = False,
    ) -> pd.DataFrame:
        """Every summary as a long DataFrame, one row per (step, tensor, kind).

        Columns: ``step``, ``tensor``, ``layer``, ``kind``, the stored fields (``count``, ``sum``, ``sum_sq``,
        ``min``, ``max``, ``zeros``, ``nan``, ``posinf``, ``neginf``, ``positive``), the derived ``finite``,
        ``nonfinite``, ``mean``, ``std``, ``rms``, ``l2``, and with ``hist=True`` a ``hist`` column (int64 arrays
        of 256 bins), with ``units=True`` the columns ``units_active`` (arrays or None) and ``units_total``.
        Filters as in :meth:`summaries`.
        """
        import pandas as pd

        sql, params = self._select(kind, layer, tensor, steps)
        rows = self._q(sql, params)
        cols = ["step", "tensor_id", "tensor", "layer", "kind", *_FIELDS, "hist_lo", "hist", "units_total", "units"]
        df = pd.DataFrame(rows, columns=cols)
        for c in ("sum", "sum_sq", "min", "max"):
            df[c] = df[c].astype("float64")
        finite = df["count"] - df["nan"] - df["posinf"] - df["neginf"]
        with np.errstate(divide="ignore", invalid="ignore"):
            fin = finite.to_numpy(dtype="float64")
            fin[fin == 0] = np.nan
            mean = df["sum"].to_numpy() / fin
            ms = df["sum_sq"].to_numpy() / fin
            df["finite"] = finite
            df["nonfinite"] = df["count"] - finite
            df["mean"] = mean
            df["std"] = np.sqrt(np.maximum(ms - mean * mean, 0.0))
            df["rms"] = np.sqrt(ms)
            df["l2"] = np.sqrt(df["sum_sq"].to_numpy())
        # Decode blobs from the raw rows: pandas turns an integer column with NULLs into float NaN.
        if hist:
            df["hist"] = [_decode_hist(r[15], r[16], (self.path, r[2], r[4], r[0])) for r in rows]
        else:
            df = df.drop(columns=["hist"])
        if units:
            df["units_active"] = [_decode_units(r[18], (self.path, r[2], r[4], r[0])) for r in rows]
        else:
            df = df.drop(columns=["units_total"])
        return df.drop(columns=["tensor_id", "hist_lo", "units"]).reset_index(drop=True)

    def __repr__(self) -> str:
        return (
            f"Run({str(self.path)!r}, framework={self.framework!r}, layers={len(self.layers)}, "
            f"tensors={len(self.tensors)}, steps={self._step_range()})"
        )


def load(path: str | bytes | os.PathLike[str] | os.PathLike[bytes] | Run) -> Run:
    """Open a run file for reading.

    Args:
        path: the run file written by :func:`gradsight.watch` (str, bytes or os.PathLike), or a :class:`Run`
            (returned as is).

    Returns:
        The :class:`Run`.

    Raises:
        StoreError: there is no such file, it is a directory, empty, damaged, or not a gradsight run file.
        InputError: ``path`` is not a path.
    """
    if isinstance(path, Run):
        return path
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise InputError(f"load expects a path to a run file, got {type(path).__name__} {path!r}.")
    return Run(path)
