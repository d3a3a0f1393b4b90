"""Regression tests for the run store, each named after the bug it pins."""

import sqlite3

import numpy as np
import pytest

from gradsight import RunWriter, StoreError, load, summarize


def test_to_pandas_hist_with_a_tensor_without_finite_nonzero_values(tmp_path):
    # hist_lo is NULL for such a tensor; pandas made the column float NaN and the decode slice failed.
    path = tmp_path / "r.db"
    with RunWriter(path) as w:
        a = w.tensor_id("a", "l", "grad", (3,), "float32")
        b = w.tensor_id("b", "l", "grad", (3,), "float32")
        w.log_summaries(0, [(a, summarize(np.ones(3))), (b, summarize(np.full(3, np.nan)))])
    df = load(path).to_pandas(hist=True)
    assert df["hist"][0].sum() == 3 and df["hist"][1].sum() == 0
    assert df["nan"].tolist() == [0, 3]


def test_metadata_is_in_the_file_as_soon_as_the_writer_exists(tmp_path):
    # The schema was committed first and the metadata in a second transaction: a SIGKILL in between left a file
    # without 'framework', and readers failed with KeyError: 'framework'. Now both are in the first transaction.
    path = tmp_path / "r.db"
    w = RunWriter(path, meta={"framework": "torch", "model": {"layers": []}}, commit_every=3600)
    try:
        with load(path) as run:  # nothing flushed or committed by the writer thread yet
            assert run.framework == "torch" and run.meta["model"] == {"layers": []} and run.steps == []
    finally:
        w.close()


def test_flush_does_not_wait_for_a_dead_writer_thread(tmp_path, monkeypatch):
    # A commit failure killed the writer thread with a traceback printed from the thread only; flush then waited
    # its full 30 s timeout and close() raised nothing.
    w = RunWriter(tmp_path / "r.db")

    def broken(self, con):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(RunWriter, "_commit", broken)
    w.log_scalars(0, {"loss": 1.0})
    with pytest.raises(StoreError, match=r"failed on the writer thread \(OperationalError: disk I/O error\)"):
        w.flush(timeout=None)
    with pytest.raises(StoreError, match="disk I/O error"):
        w.close()


def test_closed_run_is_one_plain_file_and_readers_leave_no_sidecars(tmp_path):
    # A closed run leaves WAL mode, so read-only readers create no -wal/-shm files beside it.
    from contextlib import closing

    from gradsight import RunWriter, load, summarize

    path = tmp_path / "run.db"
    with RunWriter(path, meta={"framework": "torch"}) as w:
        tid = w.tensor_id("w", "layer", "weight", (3,), "float32")
        w.log_summaries(0, [(tid, summarize(np.array([1.0, -2.0, 0.0], dtype=np.float32)))])
    with closing(sqlite3.connect(path)) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    with load(path) as run:
        assert run.steps == [0] and run.summary("w", "weight", 0).count == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.db"]
    # appending switches it back to WAL, and closing leaves it plain again
    with RunWriter(path, if_exists="append") as w:
        assert w.last_step == 0
        with closing(sqlite3.connect(path)) as con:
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with load(path) as run:
        assert run.steps == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.db"]
