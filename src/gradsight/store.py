"""The run store: one embedded SQLite file per training run (stdlib ``sqlite3``, WAL mode, no server).

Writing happens on a background thread: the training thread only enqueues plain Python/numpy objects, and the
writer thread inserts them and commits at least every ``commit_every`` seconds (default 1 s) — also while the
training thread is busy or stalled — so a process killed at any moment leaves a readable file that has lost at
most the last interval. Readers open the file read-only and can read while training is still writing. Nothing is
ever pickled: numbers are SQLite numbers, arrays are little-endian int64 blobs, metadata is JSON.

Schema, version 1 (``PRAGMA user_version = 1``)::

    meta(key TEXT PRIMARY KEY, value TEXT)            -- JSON values: framework, versions, model, config, ...
    tensors(id INTEGER PRIMARY KEY, name TEXT, layer TEXT, kind TEXT, shape TEXT, dtype TEXT, UNIQUE(name, kind))
        -- kind is one of weight, grad, update, output, output_grad; shape is a JSON list
    summaries(step INTEGER, tensor_id INTEGER, count, sum, sum_sq, min, max, zeros, nan, posinf, neginf, positive,
              hist_lo INTEGER, hist BLOB, units_total INTEGER, units BLOB, PRIMARY KEY(step, tensor_id))
        -- the TensorSummary fields; hist is the span hist[hist_lo : hist_lo + len] of non-zero bins as '<i8'
        -- (NULL/empty when all bins are zero); units is units_active as '<i8' (NULL when not recorded)
    scalars(step INTEGER, name TEXT, value REAL, PRIMARY KEY(step, name))   -- loss, lr, ...; last write wins
    events(id INTEGER PRIMARY KEY, step INTEGER, kind TEXT, payload TEXT)   -- JSON payloads (findings, notes)

``min``/``max`` of a summary with no finite element are stored as +Inf/-Inf, which SQLite keeps as REAL.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
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
from .summary import HIST_BINS, TensorSummary

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["KINDS", "SCHEMA_VERSION", "Run", "RunWriter", "TensorInfo", "default_run_path", "is_run_file", "load"]

SCHEMA_VERSION = 1
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
"""


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
            if fh.read(16) != b"SQLite format 3\x00":
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


def _encode(step: int, tensor_id: int, s: TensorSummary) -> tuple[Any, ...]:
    nz = np.flatnonzero(s.hist)
    if nz.size:
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        hist_lo: int | None = lo
        hist: bytes | None = np.ascontiguousarray(s.hist[lo:hi], dtype="<i8").tobytes()
    else:
        hist_lo, hist = None, None
    units = None if s.units_active is None else np.ascontiguousarray(s.units_active, dtype="<i8").tobytes()
    return (
        step,
        tensor_id,
        int(s.count),
        float(s.sum),
        float(s.sum_sq),
        float(s.min),
        float(s.max),
        int(s.zeros),
        int(s.nan),
        int(s.posinf),
        int(s.neginf),
        int(s.positive),
        hist_lo,
        hist,
        int(s.units_total) if s.units_active is not None else None,
        units,
    )


@dataclass
class SummaryArrays:
    """Summaries of one step as arrays, for the writer's fast path (same rows in the file as ``TensorSummary``).

    Row ``i`` describes tensor ``tensor_ids[i]``: ``ints[i]`` = count, zeros, nan, posinf, neginf, positive
    (int64), ``floats[i]`` = sum, sum_sq, min, max (float64), ``hist[i]`` the 256 bins (int64), ``units[i]`` the
    per-unit activity counts or ``None``, ``units_total[i]`` the entries per unit.
    """

    tensor_ids: list[int]
    ints: np.ndarray
    floats: np.ndarray
    hist: np.ndarray
    units: list[np.ndarray | None]
    units_total: list[int]


def _encode_arrays(step: int, a: SummaryArrays) -> list[tuple[Any, ...]]:
    """``_encode`` for every row of ``a`` at once (column-wise array operations, then one ``zip``)."""
    n = len(a.tensor_ids)
    hist = np.ascontiguousarray(a.hist, dtype="<i8")
    nz = hist != 0
    has = nz.any(axis=1).tolist()
    lo = nz.argmax(axis=1).tolist()
    hi = (HIST_BINS - nz[:, ::-1].argmax(axis=1)).tolist()
    ints = np.asarray(a.ints, dtype=np.int64).T.tolist()  # count, zeros, nan, posinf, neginf, positive
    floats = np.asarray(a.floats, dtype=np.float64).T.tolist()  # sum, sum_sq, min, max
    hist_lo = [lo[i] if has[i] else None for i in range(n)]
    blobs = [hist[i, lo[i] : hi[i]].tobytes() if has[i] else None for i in range(n)]
    totals = [None if u is None else int(t) for u, t in zip(a.units, a.units_total, strict=True)]
    units = [None if u is None else np.ascontiguousarray(u, dtype="<i8").tobytes() for u in a.units]
    return list(
        zip(
            [step] * n,
            a.tensor_ids,
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


def _decode_hist(hist_lo: int | None, blob: bytes | None) -> np.ndarray:
    hist = np.zeros(HIST_BINS, dtype=np.int64)
    if hist_lo is not None and blob:
        span = np.frombuffer(blob, dtype="<i8")
        hist[hist_lo : hist_lo + span.size] = span
    return hist


def _decode(row: tuple[Any, ...]) -> TensorSummary:
    """Decode the columns ``count .. units`` of a summaries row."""
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
        hist=_decode_hist(hist_lo, hist),
        units_active=None if units is None else np.frombuffer(units, dtype="<i8").copy(),
        units_total=units_total or 0,
    )


class RunWriter:
    """Writes one run file from a background thread; see the module docstring for the guarantees.

    Args:
        path: the run file to create. Its directory must exist and be writable.
        meta: initial metadata (JSON-serialisable values), e.g. framework, versions, model structure, config.
        if_exists: what to do when ``path`` exists: ``"error"`` (default: refuse, never silently overwrite),
            ``"append"`` (continue the run; new steps must not repeat stored ones — see :attr:`last_step`), or
            ``"overwrite"`` (delete the old file first; only when asked for explicitly).
        commit_every: the longest time, in seconds, between a write being enqueued and its commit.

    Raises:
        StoreError: the file exists (with ``if_exists="error"``), its directory is missing or unwritable, or it
            is not a gradsight run file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        meta: Mapping[str, Any] | None = None,
        if_exists: Literal["error", "append", "overwrite"] = "error",
        commit_every: float = 1.0,
    ) -> None:
        if if_exists not in ("error", "append", "overwrite"):
            raise InputError(f"if_exists must be 'error', 'append' or 'overwrite', not {if_exists!r}.")
        if not (isinstance(commit_every, (int, float)) and math.isfinite(commit_every) and commit_every > 0):
            raise InputError(f"commit_every must be a positive number of seconds, got {commit_every!r}.")
        self.path = Path(path).expanduser().resolve()
        self.commit_every = float(commit_every)
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
        existed = self.path.exists()
        if existed and if_exists == "error":
            raise StoreError(
                f"the run file {str(self.path)!r} already exists and gradsight never overwrites silently. "
                "Pass another path, if_exists='append' to continue that run, or if_exists='overwrite' to replace it."
            )
        if existed and if_exists == "overwrite":
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(str(self.path) + suffix).unlink()
            existed = False

        # Schema and bookkeeping synchronously, so that errors surface in the caller's thread.
        self._tensors: dict[tuple[str, str], int] = {}
        self.last_step: int | None = None
        try:
            con = sqlite3.connect(self.path)
            try:
                self._init_file(con, existed)
            finally:
                con.close()
        except sqlite3.DatabaseError as exc:
            if not existed:  # e.g. a read-only file system, where os.access cannot tell (root, mounts)
                raise StoreError(
                    f"cannot create the run file {str(self.path)!r} (SQLite said: {exc}); its directory is probably "
                    "not writable. Pass a path in a directory you can write to."
                ) from exc
            raise StoreError(
                f"{str(self.path)!r} is not a gradsight run file (SQLite said: {exc}). Pass another path."
            ) from exc
        if meta:  # one transaction (one fsync) for all initial metadata, not one per key
            rows = [(str(key), _dumps(value)) for key, value in meta.items()]
            with contextlib.closing(sqlite3.connect(self.path)) as con:
                con.execute("PRAGMA synchronous=NORMAL")
                con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)
                con.commit()

        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"gradsight-writer:{self.path.name}", daemon=True)
        self._thread.start()

    # ---- set-up --------------------------------------------------------------------------------------------
    def _init_file(self, con: sqlite3.Connection, existed: bool) -> None:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")  # as on the writer thread: WAL commits need no fsync each
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if existed:
            has_meta = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
            if not has_meta:
                raise StoreError(
                    f"{str(self.path)!r} is an SQLite file but not a gradsight run file (no 'meta' table). "
                    "Pass another path."
                )
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{str(self.path)!r} has run-file schema version {version}, newer than this gradsight's "
                    f"{SCHEMA_VERSION}; upgrade gradsight to append to it."
                )
        con.executescript(f"BEGIN; {_SCHEMA} COMMIT;")  # one transaction, not one per statement
        con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        con.execute(
            "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?), ('created', ?)",
            (json.dumps(SCHEMA_VERSION), json.dumps(datetime.now(timezone.utc).isoformat())),
        )
        con.commit()
        for tid, name, kind in con.execute("SELECT id, name, kind FROM tensors"):
            self._tensors[(name, kind)] = tid
        last = con.execute("SELECT max(step) FROM (SELECT step FROM summaries UNION ALL SELECT step FROM scalars)")
        self.last_step = last.fetchone()[0]

    # ---- the training thread's API -------------------------------------------------------------------------
    def tensor_id(self, name: str, layer: str, kind: str, shape: Iterable[int], dtype: str) -> int:
        """The id of a tensor, registering it on first use (name and kind identify it)."""
        _check_kind(kind)
        key = (name, kind)
        tid = self._tensors.get(key)
        if tid is None:
            tid = len(self._tensors) + 1
            while tid in self._tensors.values():
                tid += 1
            self._tensors[key] = tid
            self._put(
                (
                    "INSERT INTO tensors VALUES (?, ?, ?, ?, ?, ?)",
                    [(tid, name, layer, kind, json.dumps([int(d) for d in shape]), str(dtype))],
                )
            )
        return tid

    def log_summaries(
        self,
        step: int,
        items: Iterable[tuple[int, TensorSummary]] | Callable[[], Iterable[tuple[int, TensorSummary]]],
    ) -> None:
        """Record summaries of one step: ``(tensor_id, TensorSummary)`` pairs.

        ``items`` may also be a zero-argument callable returning them; it is then called on the writer thread,
        which keeps unpacking work off the training thread. The callable may also return a
        :class:`SummaryArrays` (the framework adapters' fast path: rows encoded with array operations).
        """
        self._put(("summaries", int(step), items))

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Record named scalars (loss, learning rate, ...) of one step; a repeated name in a step replaces it."""
        rows = [(int(step), str(k), None if v is None or math.isnan(float(v)) else float(v)) for k, v in values.items()]
        self._put(("INSERT OR REPLACE INTO scalars VALUES (?, ?, ?)", rows))

    def log_scalars_many(self, values: Mapping[int, Mapping[str, float]]) -> None:
        """:meth:`log_scalars` for several steps at once (``{step: {name: value}}``), as one write."""
        rows = [
            (int(step), str(k), None if v is None or math.isnan(float(v)) else float(v))
            for step, vs in values.items()
            for k, v in vs.items()
        ]
        self._put(("INSERT OR REPLACE INTO scalars VALUES (?, ?, ?)", rows))

    def log_event(self, step: int | None, kind: str, payload: Mapping[str, Any]) -> None:
        """Record an event (a finding, a note) with a JSON payload."""
        self._put(("INSERT INTO events (step, kind, payload) VALUES (?, ?, ?)", [(step, kind, _dumps(payload))]))

    def set_meta(self, key: str, value: Any) -> None:
        """Set one metadata entry (a JSON-serialisable value); written synchronously before the thread starts."""
        row = [(str(key), _dumps(value))]
        if getattr(self, "_thread", None) is None:
            with contextlib.closing(sqlite3.connect(self.path)) as con:
                con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", row)
                con.commit()
        else:
            self._put(("INSERT OR REPLACE INTO meta VALUES (?, ?)", row))

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until everything enqueued so far is committed."""
        if self._closed:
            return
        done = threading.Event()
        self._put(("flush", done))
        if not done.wait(timeout):
            raise StoreError(f"the run writer for {str(self.path)!r} did not commit within {timeout} s.")
        self._raise_if_failed()

    def close(self) -> None:
        """Commit everything and stop the writer thread. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(("stop", None))
        self._thread.join()
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
        if self._error is not None:
            err, self._error = self._error, None
            raise StoreError(f"writing the run file {str(self.path)!r} failed: {err!r}") from err

    # ---- the writer thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        con = sqlite3.connect(self.path, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        dirty = False
        last_commit = time.monotonic()
        try:
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
                        con.commit()
                        dirty, last_commit = False, time.monotonic()
                        item[1].set()
                        continue
                    try:
                        self._apply(con, item)
                    except Exception as exc:  # surfaced to the training thread on its next call
                        if self._error is None:
                            self._error = exc
                    dirty = True
                if dirty and time.monotonic() - last_commit >= self.commit_every:
                    con.commit()
                    dirty, last_commit = False, time.monotonic()
        finally:
            # Drain whatever is left (e.g. items enqueued after "stop" was seen) and commit.
            with contextlib.suppress(queue.Empty):
                while True:
                    item = self._queue.get_nowait()
                    if item[0] == "flush":
                        item[1].set()
                    elif item[0] != "stop":
                        with contextlib.suppress(Exception):
                            self._apply(con, item)
            con.commit()
            con.close()

    @staticmethod
    def _apply(con: sqlite3.Connection, item: Any) -> None:
        if item[0] == "summaries":
            _, step, items = item
            if callable(items):
                items = items()
            rows = (
                _encode_arrays(step, items)
                if isinstance(items, SummaryArrays)
                else [_encode(step, tid, s) for tid, s in items]
            )
            con.executemany("INSERT INTO summaries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        else:
            sql, rows = item
            con.executemany(sql, rows)


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise InputError(f"run metadata must be JSON-serialisable, got {value!r} ({exc}).") from exc


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
    steps as they are committed.

    Use :func:`load` to open one. ``Run`` is a context manager; :meth:`close` releases the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_file():
            raise StoreError(
                f"no run file at {str(self.path)!r}. Pass the path that gradsight.watch(...) wrote "
                "(printed by the watch and stored as run.path)."
            )
        try:
            self._con = sqlite3.connect(self.path.as_uri() + "?mode=ro", uri=True, check_same_thread=False)
            version = self._con.execute("PRAGMA user_version").fetchone()[0]
            self._con.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{str(self.path)!r} is not a gradsight run file (SQLite said: {exc}).") from exc
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{str(self.path)!r} has run-file schema version {version}, newer than this gradsight's "
                f"{SCHEMA_VERSION}; upgrade gradsight to read it."
            )
        self.schema_version = version

    # ---- basics --------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the file."""
        self._con.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _q(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        return self._con.execute(sql, tuple(params)).fetchall()

    @property
    def meta(self) -> dict[str, Any]:
        """All metadata, JSON-decoded."""
        return {k: json.loads(v) for k, v in self._q("SELECT key, value FROM meta")}

    @property
    def framework(self) -> str | None:
        """``"torch"`` or ``"keras"`` (from the metadata), or ``None`` when not recorded."""
        return self.meta.get("framework")

    @property
    def tensors(self) -> list[TensorInfo]:
        """Every recorded tensor, in registration order."""
        return [
            TensorInfo(tid, name, layer, kind, tuple(json.loads(shape)), dtype)
            for tid, name, layer, kind, shape, dtype in self._q("SELECT * FROM tensors ORDER BY id")
        ]

    @property
    def layers(self) -> list[str]:
        """Layer names in model order.

        From the model structure in the metadata when recorded, else in the order their tensors were registered.
        """
        model = self.meta.get("model") or {}
        names = [layer["name"] for layer in model.get("layers", []) if "name" in layer]
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
        """Per-step scalars as a wide DataFrame: index ``step``, one column per scalar name (loss, lr, ...)."""
        import pandas as pd

        df = pd.DataFrame(self._q("SELECT step, name, value FROM scalars"), columns=["step", "name", "value"])
        if df.empty:
            return pd.DataFrame(index=pd.Index([], name="step", dtype="int64"))
        wide = df.pivot(index="step", columns="name", values="value").sort_index()
        wide.columns.name = None
        return wide

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
        return [
            (int(step), str(n), math.nan if value is None else float(value))
            for step, n, value in self._q(sql + " ORDER BY step, name", params)
        ]

    @property
    def last_step(self) -> int | None:
        """The last step with any summary or scalar (``None`` for an empty run)."""
        return self._q("SELECT max(step) FROM (SELECT step FROM summaries UNION ALL SELECT step FROM scalars)")[0][0]

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Recorded events (e.g. online findings) as dicts with ``step``, ``kind`` and the payload's fields."""
        sql, params = "SELECT step, kind, payload FROM events", []
        if kind is not None:
            sql += " WHERE kind = ?"
            params.append(kind)
        return [{"step": s, "kind": k, **json.loads(p)} for s, k, p in self._q(sql + " ORDER BY id", params)]

    # ---- summaries -----------------------------------------------------------------------------------------
    def _select(
        self,
        kinds: Iterable[str] | str | None,
        layers: Iterable[str] | str | None,
        tensors: Iterable[str] | str | None,
        steps: tuple[int | None, int | None] | None,
    ) -> tuple[str, list[Any]]:
        where, params = [], []
        for column, values in (("t.kind", kinds), ("t.layer", layers), ("t.name", tensors)):
            if values is None:
                continue
            values = [values] if isinstance(values, str) else list(values)
            if column == "t.kind":
                for k in values:
                    _check_kind(k)
            where.append(f"{column} IN ({', '.join('?' * len(values))})")
            params.extend(values)
        if steps is not None:
            lo, hi = steps
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

        Args:
            kind: one kind or several (``weight``, ``grad``, ``update``, ``output``, ``output_grad``).
            layer: one layer name or several.
            tensor: one tensor name or several.
            steps: an inclusive ``(first, last)`` range; either end may be ``None``.
        """
        infos = {t.id: t for t in self.tensors}
        sql, params = self._select(kind, layer, tensor, steps)
        for row in self._con.execute(sql, params):
            yield row[0], infos[row[1]], _decode(row[5:])

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
            df["hist"] = [_decode_hist(r[15], r[16]) for r in rows]
        else:
            df = df.drop(columns=["hist"])
        if units:
            df["units_active"] = [None if r[18] is None else np.frombuffer(r[18], dtype="<i8").copy() for r in rows]
        else:
            df = df.drop(columns=["units_total"])
        return df.drop(columns=["tensor_id", "hist_lo", "units"]).reset_index(drop=True)

    def __repr__(self) -> str:
        return (
            f"Run({str(self.path)!r}, framework={self.framework!r}, layers={len(self.layers)}, "
            f"tensors={len(self.tensors)}, steps={self._step_range()})"
        )


def load(path: str | os.PathLike[str] | Run) -> Run:
    """Open a run file for reading.

    Args:
        path: the run file written by :func:`gradsight.watch`, or a :class:`Run` (returned as is).

    Returns:
        The :class:`Run`.

    Raises:
        StoreError: there is no such file, or it is not a gradsight run file.
    """
    if isinstance(path, Run):
        return path
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"load expects a path to a run file, got {type(path).__name__} {path!r}.")
    return Run(path)
