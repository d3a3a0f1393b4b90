import math
import os
import sqlite3

import numpy as np
import pytest

from gradsight import InputError, StoreError
from gradsight.store import Run, RunWriter, load
from gradsight.summary import summarize


def write_some(path, steps=3, **kw):
    with RunWriter(path, meta={"framework": "torch", "model": {"layers": [{"name": "fc"}]}}, **kw) as w:
        tid = w.tensor_id("fc.weight", "fc", "weight", (2, 3), "float32")
        for s in range(steps):
            x = np.array([[s, -1.0, np.nan], [np.inf, 0.0, 2.0**-140]])
            w.log_summaries(s, [(tid, summarize(x))])
            w.log_scalars(s, {"loss": 1.0 / (s + 1), "bad": math.nan})
        w.log_event(1, "note", {"text": "hi"})
    return path


def test_round_trip(tmp_path):
    p = write_some(tmp_path / "r.db")
    with load(p) as run:
        assert run.steps == [0, 1, 2] and run.layers == ["fc"] and run.framework == "torch"
        s = run.summary("fc.weight", "weight", 2)
        x = np.array([[2, -1.0, np.nan], [np.inf, 0.0, 2.0**-140]])
        assert s == summarize(x)
        df = run.to_pandas(hist=True)
        assert {"step", "tensor", "layer", "kind", "count", "mean", "std", "l2", "hist"} <= set(df.columns)
        assert df["hist"].iloc[-1].sum() == 3
        assert run.scalars["loss"].tolist() == [1.0, 0.5, 1 / 3] and run.scalars["bad"].isna().all()
        assert run.events("note") == [{"step": 1, "kind": "note", "text": "hi"}]
        assert "steps=3 steps from 0 to 2" in repr(run)
        with pytest.raises(InputError, match=r"no 'grad' summary of tensor 'fc\.weight' at step 0"):
            run.summary("fc.weight", "grad", 0)


def test_readable_while_writing(tmp_path):
    w = RunWriter(tmp_path / "r.db", commit_every=0.05)
    tid = w.tensor_id("a", "a", "grad", (1,), "float32")
    w.log_summaries(0, lambda: [(tid, summarize(np.ones(1)))])  # a callable runs on the writer thread
    w.flush()
    with Run(tmp_path / "r.db") as run:
        assert run.steps == [0]
        w.log_summaries(1, [(tid, summarize(np.ones(1)))])
        w.flush()
        assert run.steps == [0, 1]
    w.close()
    w.close()
    with pytest.raises(StoreError, match="is closed"):
        w.log_scalars(2, {"x": 1.0})


def test_flush_and_close_do_not_wait_for_the_writers_burst(tmp_path):
    # The writer thread waits between bursts of work (store._BURST_S); a flush or close wakes it at once, and a
    # commit never waits past commit_every. With a burst of 30 s, each would otherwise take up to 30 s.
    import time

    w = RunWriter(tmp_path / "r.db", commit_every=30.0)
    w._burst = 30.0
    tid = w.tensor_id("a", "a", "grad", (1,), "float32")

    def timed(fn):
        t0 = time.monotonic()
        fn()
        return time.monotonic() - t0

    for s in range(3):
        w.log_summaries(s, [(tid, summarize(np.ones(1)))])
        time.sleep(0.3)  # the writer has applied it by now, and waits for more
        assert timed(w.flush) < 10
        with Run(tmp_path / "r.db") as run:
            assert run.steps == list(range(s + 1))
    w.log_summaries(3, [(tid, summarize(np.ones(1)))])
    time.sleep(0.3)
    assert timed(w.close) < 10
    with Run(tmp_path / "r.db") as run:
        assert run.steps == [0, 1, 2, 3]

    w = RunWriter(tmp_path / "r2.db", commit_every=0.2)  # a commit is not held back by a burst either
    w._burst = 30.0
    tid = w.tensor_id("a", "a", "grad", (1,), "float32")
    w.log_summaries(0, [(tid, summarize(np.ones(1)))])

    def committed():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with Run(tmp_path / "r2.db") as run:
                if run.steps == [0]:
                    return
            time.sleep(0.05)

    assert timed(committed) < 10
    w.close()


def test_existing_file_is_refused_appended_or_overwritten(tmp_path):
    p = write_some(tmp_path / "r.db")
    with pytest.raises(StoreError, match="already exists and gradsight never overwrites silently"):
        RunWriter(p)
    with RunWriter(p, if_exists="append") as w:
        assert w.last_step == 2
        tid = w.tensor_id("fc.weight", "fc", "weight", (2, 3), "float32")
        assert tid == 1
        w.log_summaries(3, [(tid, summarize(np.ones(2)))])
    assert load(p).steps == [0, 1, 2, 3]
    with RunWriter(p, if_exists="overwrite"):
        pass
    assert load(p).steps == []
    with pytest.raises(InputError, match="if_exists must be"):
        RunWriter(p, if_exists="replace")


def test_bad_paths_and_files(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        RunWriter(tmp_path / "nope" / "r.db")
    with pytest.raises(StoreError, match="no run file at"):
        load(tmp_path / "missing.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a gradsight run file"):
        load(junk)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE t(x)")
    with pytest.raises(StoreError, match="not a gradsight run file"):
        RunWriter(other, if_exists="append")
    with pytest.raises(InputError, match="load expects a path"):
        load(3)
    with pytest.raises(InputError, match="unknown tensor kind 'weights'"):
        RunWriter(tmp_path / "k.db").tensor_id("a", "a", "weights", (), "float32")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_directory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    with pytest.raises(StoreError, match="not writable"):
        RunWriter(d / "r.db")


def test_no_pickle_in_the_file(tmp_path):
    p = write_some(tmp_path / "r.db")
    with sqlite3.connect(p) as con:
        for table in ("meta", "tensors", "summaries", "scalars", "events"):
            for row in con.execute(f"SELECT * FROM {table}"):
                for v in row:
                    assert not (isinstance(v, bytes) and v[:1] == b"\x80"), (table, row)
        blob = con.execute("SELECT hist FROM summaries WHERE step = 2").fetchone()[0]
    assert np.frombuffer(blob, "<i8").sum() == 3
    with pytest.raises(InputError, match="JSON-serialisable"):
        RunWriter(tmp_path / "m.db", meta={"x": object()})


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a read-only /proc")
def test_uncreatable_file_says_so_regression():
    # os.access() says yes for root; SQLite then fails to create the file: the message must not blame the file.
    with pytest.raises(StoreError, match=r"cannot create the run file '/proc/gradsight-test\.db'"):
        RunWriter("/proc/gradsight-test.db")


def test_signal_rows_read_back_as_scalars_merged_with_logged_ones(tmp_path):
    w = RunWriter(tmp_path / "r.db")
    names = ("grad_norm", "weight_norm/a")
    w.log_signals([(0, names, [1.5, 2.0]), (1, names, [math.nan, 3.0]), (2, ("grad_norm",), [4.0])])
    w.log_scalars(1, {"loss": 0.5, "clip_ratio": 0.25})
    w.close()
    run = load(tmp_path / "r.db")
    sc = run.scalars
    assert list(sc.index) == [0, 1, 2]
    assert sc.loc[0, "grad_norm"] == 1.5 and sc.loc[1, "weight_norm/a"] == 3.0 and sc.loc[1, "loss"] == 0.5
    assert math.isnan(sc.loc[1, "grad_norm"]) and math.isnan(sc.loc[2, "weight_norm/a"])
    rows = run.scalar_rows(steps=(1, 2))
    assert [(s, n) for s, n, _ in rows] == [
        (1, "clip_ratio"),
        (1, "grad_norm"),
        (1, "loss"),
        (1, "weight_norm/a"),
        (2, "grad_norm"),
    ]
    assert math.isnan(rows[1][2])  # logged as NaN, not absent
    assert run.scalar_rows(name="weight_norm/a") == [(0, "weight_norm/a", 2.0), (1, "weight_norm/a", 3.0)]
    assert run.last_step == 2


def test_version_1_files_are_read_and_appended_to(tmp_path):
    path = tmp_path / "v1.db"
    write_some(path)
    con = sqlite3.connect(path)
    con.executescript("DROP TABLE signals; DROP TABLE signal_layouts; PRAGMA user_version = 1;")
    con.close()
    run = load(path)
    assert run.schema_version == 1 and run.last_step == 2 and "loss" in run.scalars.columns
    run.close()
    w = RunWriter(path, if_exists="append")
    w.log_signals([(3, ("grad_norm",), [7.0])])
    w.close()
    run = load(path)
    assert run.schema_version == 2 and run.last_step == 3 and run.scalars.loc[3, "grad_norm"] == 7.0


def test_damaged_signal_rows_raise_a_store_error(tmp_path):
    w = RunWriter(tmp_path / "r.db")
    w.log_signals([(0, ("a", "b"), [1.0, 2.0])])
    w.close()
    con = sqlite3.connect(tmp_path / "r.db")
    con.execute("UPDATE signals SET data = X'00'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match=r"per-step signals .* are damaged"):
        _ = load(tmp_path / "r.db").scalars


def test_a_steps_summaries_are_inserted_in_parts_and_each_part_whole(tmp_path, monkeypatch):
    """A step's rows go in with one INSERT per part of ``_MAX_ROWS_PER_INSERT``; a failing part stores no row."""
    import gradsight.store as store

    monkeypatch.setattr(store, "_MAX_ROWS_PER_INSERT", 3)
    xs = [np.arange(k + 1, dtype=np.float64) - 2.0 for k in range(7)]  # 7 rows: parts of 3, 3 and 1
    with RunWriter(tmp_path / "r.db") as w:
        tids = [w.tensor_id(f"t{k}", "l", "grad", (k + 1,), "float64") for k in range(8)]
        w.log_summaries(0, [(t, summarize(x)) for t, x in zip(tids[:7], xs, strict=True)])
        w.flush()
        # step 0 again, one part: t7 is new there, t0 is stored already; the part's failure stores neither
        w.log_summaries(0, [(tids[7], summarize(xs[0])), (tids[0], summarize(xs[1]))])
        with pytest.raises(StoreError, match="already stored"):
            w.flush()
    with load(tmp_path / "r.db") as run:
        for k, x in enumerate(xs):
            assert run.summary(f"t{k}", "grad", 0) == summarize(x)
        with pytest.raises(InputError, match="no 'grad' summary of tensor 't7' at step 0"):
            run.summary("t7", "grad", 0)


def test_new_files_use_the_writers_page_size_and_files_with_other_pages_are_appended_to(tmp_path, monkeypatch):
    """New run files get ``_PAGE_SIZE`` pages (a step's rows fit on them); a file made with SQLite's default 4 kB
    pages (earlier versions) is appended to as it is."""
    import gradsight.store as store

    def page_size(path):
        con = sqlite3.connect(path)
        try:
            return con.execute("PRAGMA page_size").fetchone()[0]
        finally:
            con.close()

    assert page_size(write_some(tmp_path / "new.db")) == store._PAGE_SIZE == 8192
    monkeypatch.setattr(store, "_PAGE_SIZE", 4096)
    old = write_some(tmp_path / "old.db", steps=2)
    monkeypatch.undo()
    with RunWriter(old, if_exists="append") as w:
        tid = w.tensor_id("fc.weight", "fc", "weight", (2, 3), "float32")
        w.log_summaries(2, [(tid, summarize(np.arange(6.0)))])
    assert page_size(old) == 4096
    with load(old) as run:
        assert run.steps == [0, 1, 2] and run.summary("fc.weight", "weight", 2) == summarize(np.arange(6.0))
