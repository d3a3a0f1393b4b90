"""Run files you can trust: a catalogue of bad paths and damaged files, each with its exact error, and the
guarantees of the store — self-contained after close, whole from the first transaction, one writer at a time,
no silent writer failure."""

import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

import gradsight
from gradsight import InputError, StoreError
from gradsight.store import Run, RunWriter, is_run_file, load
from gradsight.summary import summarize

META = {"framework": "torch", "model": {"type": "Net", "layers": [{"name": "fc", "type": "Linear", "params": {}}]}}


def x_of(step):
    return np.array([step, -1.0, 0.5, 3.0, 0.0, np.nan]) * (step + 1)


def write_run(path, steps=3, meta=META, **kw):
    with RunWriter(path, meta=meta, **kw) as w:
        a = w.tensor_id("fc.weight", "fc", "weight", (2, 3), "float32")
        b = w.tensor_id("fc", "fc", "output", (4, 2), "float32")
        for s in range(steps):
            w.log_summaries(s, [(a, summarize(x_of(s))), (b, summarize(np.ones((4, 2)), unit_axis=1))])
            w.log_scalars(s, {"loss": 1.0 / (s + 1)})
        w.log_event(1, "note", {"text": "hi"})
    return path


def sql(path, *statements):
    con = sqlite3.connect(path)
    try:
        for s in statements:
            con.execute(s)
        con.commit()
    finally:
        con.close()


# ---- the catalogue: each case builds a bad input, does one thing with it, and names the exact error -------------
def _dir_with_one_run(tmp):
    (tmp / "d").mkdir()
    write_run(tmp / "d" / "only.db")
    return tmp / "d"


def _empty_dir(tmp):
    (tmp / "e").mkdir()
    return tmp / "e"


def _file(content):
    def make(tmp):
        p = tmp / "f.db"
        p.write_bytes(content)
        return p

    return make


def _truncated(n):
    def make(tmp):
        data = write_run(tmp / "whole.db", steps=40).read_bytes()
        p = tmp / "t.db"
        p.write_bytes(data[: n if n > 0 else len(data) // 2])
        return p

    return make


def _foreign_sqlite(tmp):
    p = tmp / "other.db"
    sql(p, "CREATE TABLE t(x)")
    return p


def _meta_only_sqlite(tmp):
    p = tmp / "half.db"
    sql(p, "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
    return p


def _altered(*statements):
    def make(tmp):
        p = write_run(tmp / "r.db")
        sql(p, *statements)
        return p

    return make


def _text_file(tmp):
    p = tmp / "notes.txt"
    p.write_text("precious notes\n")
    return p


def _live(tmp):
    p = tmp / "live.db"
    w = RunWriter(p, meta=META)
    _live.writers.append(w)
    return p


_live.writers = []

_HIST = "UPDATE summaries SET hist = X'01020304050607' WHERE step = 1 AND tensor_id = 1"
_SPAN = "UPDATE summaries SET hist_lo = 250, hist = zeroblob(80) WHERE step = 1 AND tensor_id = 1"
_UNITS = "UPDATE summaries SET units = X'010203040506070809101112' WHERE step = 2 AND tensor_id = 2"

CASES = [
    # (id, make the input, what to do with it, error class, message pattern)
    ("load-dir-with-one-run", _dir_with_one_run, load, StoreError, r"is a directory.*did you mean '.*only\.db'"),
    ("load-empty-dir", _empty_dir, load, StoreError, r"is a directory, not a run file.*such as '.*run\.db'"),
    ("load-missing", lambda t: t / "missing.db", load, StoreError, r"no run file at '.*missing\.db'"),
    ("load-0-byte-file", _file(b""), load, StoreError, r"the file is empty \(0 bytes\)"),
    ("load-garbage", _file(b"not sqlite" * 100), load, StoreError, r"not even an SQLite file; it starts with b'not"),
    ("load-cut-header", _truncated(60), load, StoreError, r"truncated \(60 bytes, shorter than an SQLite header\)"),
    (
        "read-truncated-half",
        _truncated(0),
        lambda p: load(p).to_pandas(),
        StoreError,
        r"cannot read the run file .*malformed.*damaged",
    ),
    ("load-foreign-sqlite", _foreign_sqlite, load, StoreError, r"not a gradsight run file \(no 'meta', 'tensors'"),
    ("load-meta-only", _meta_only_sqlite, load, StoreError, r"no 'tensors', 'summaries', 'scalars', 'events' table"),
    (
        "load-newer-schema",
        _altered("PRAGMA user_version = 7"),
        load,
        StoreError,
        r"schema version 7, newer than .* upgrade gradsight",
    ),
    (
        "meta-bad-json",
        _altered("UPDATE meta SET value = '{torch' WHERE key = 'framework'"),
        lambda p: load(p).meta,
        StoreError,
        r"metadata entry 'framework' .* is not valid JSON",
    ),
    (
        "framework-bad-json",
        _altered("UPDATE meta SET value = '{torch' WHERE key = 'framework'"),
        lambda p: load(p).framework,
        StoreError,
        r"metadata entry 'framework' .* is not valid JSON",
    ),
    (
        "tensor-shape-bad-json",
        _altered("UPDATE tensors SET shape = '[2,' WHERE id = 1"),
        lambda p: load(p).tensors,
        StoreError,
        r"shape of tensor 'fc\.weight' \(weight\) .* not valid JSON",
    ),
    (
        "event-bad-json",
        _altered("UPDATE events SET payload = 'hi'"),
        lambda p: load(p).events(),
        StoreError,
        r"payload of a 'note' event at step 1 .* not valid JSON",
    ),
    (
        "hist-blob-odd-length",
        _altered(_HIST),
        lambda p: load(p).to_pandas(hist=True),
        StoreError,
        r"histogram \(7 bytes, expected a multiple of 8\) of tensor 'fc\.weight' \(weight\) at step 1",
    ),
    (
        "hist-blob-odd-length-summary",
        _altered(_HIST),
        lambda p: load(p).summary("fc.weight", "weight", 1),
        StoreError,
        r"histogram \(7 bytes.* of tensor 'fc\.weight' \(weight\) at step 1 is corrupt",
    ),
    (
        "hist-span-past-256-bins",
        _altered(_SPAN),
        lambda p: list(load(p).summaries()),
        StoreError,
        r"histogram \(10 bins from bin 250, past the 256 bins\) of tensor 'fc\.weight' \(weight\) at step 1",
    ),
    (
        "units-blob-odd-length",
        _altered(_UNITS),
        lambda p: load(p).to_pandas(units=True),
        StoreError,
        r"per-unit counts \(12 bytes, expected a multiple of 8\) of tensor 'fc' \(output\) at step 2",
    ),
    ("load-not-a-path", lambda t: 3.5, load, InputError, r"load expects a path to a run file, got float 3\.5"),
    (
        "write-to-dir-with-one-run",
        _dir_with_one_run,
        RunWriter,
        StoreError,
        r"cannot write the run file '.*d': it is a directory.*did you mean '.*only\.db'",
    ),
    (
        "append-to-foreign-sqlite",
        _foreign_sqlite,
        lambda p: RunWriter(p, if_exists="append"),
        StoreError,
        r"cannot append to .*not a gradsight run file \(no 'meta', 'tensors', 'summaries'",
    ),
    (
        "append-to-meta-only-sqlite",
        _meta_only_sqlite,
        lambda p: RunWriter(p, if_exists="append"),
        StoreError,
        r"not a gradsight run file \(no 'tensors'",
    ),
    (
        "append-to-garbage",
        _file(b"not sqlite" * 100),
        lambda p: RunWriter(p, if_exists="append"),
        StoreError,
        r"cannot append to .*not even an SQLite file",
    ),
    (
        "append-bad-model-json",
        _altered("UPDATE meta SET value = '{' WHERE key = 'model'"),
        lambda p: RunWriter(p, if_exists="append"),
        StoreError,
        r"the 'model' entry of the metadata of .* is not valid JSON",
    ),
    (
        "overwrite-a-text-file",
        _text_file,
        lambda p: RunWriter(p, if_exists="overwrite"),
        StoreError,
        r"refusing to overwrite '.*notes\.txt': it is not a gradsight run file",
    ),
    (
        "overwrite-foreign-sqlite",
        _foreign_sqlite,
        lambda p: RunWriter(p, if_exists="overwrite"),
        StoreError,
        r"refusing to overwrite '.*other\.db'",
    ),
    (
        "overwrite-a-live-run",
        _live,
        lambda p: RunWriter(p, if_exists="overwrite"),
        StoreError,
        r"another gradsight watch is writing it \(this process\).*Close that watch first",
    ),
    (
        "append-to-a-live-run",
        _live,
        lambda p: RunWriter(p, if_exists="append"),
        StoreError,
        r"another gradsight watch is writing it \(this process\)",
    ),
    (
        "snapshot-over-a-live-run",
        _live,
        lambda p: load(write_run(p.with_name("src.db"))).snapshot(p, overwrite=True),
        StoreError,
        r"cannot overwrite the run file '.*live\.db': another gradsight watch is writing it",
    ),
    (
        "snapshot-onto-itself",
        lambda t: write_run(t / "r.db"),
        lambda p: load(p).snapshot(p, overwrite=True),
        InputError,
        r"snapshot: dest '.*r\.db' is this run's own file",
    ),
    (
        "snapshot-over-a-text-file",
        _text_file,
        lambda p: load(write_run(p.with_name("src.db"))).snapshot(p, overwrite=True),
        StoreError,
        r"refusing to overwrite '.*notes\.txt' with a snapshot: it is not a gradsight run file",
    ),
]


@pytest.mark.parametrize(("make", "action", "error", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_catalogue_of_bad_inputs(tmp_path, make, action, error, pattern):
    target = make(tmp_path)
    before = target.read_bytes() if isinstance(target, os.PathLike) and target.is_file() else None
    try:
        with pytest.raises(error, match=pattern) as info:
            action(target)
    finally:
        while _live.writers:
            _live.writers.pop().close()
    assert type(info.value) is error
    if before is not None and target.suffix != ".db":
        assert target.read_bytes() == before, "a refused write must leave the file as it was"


# ---- results that must be exactly right ---------------------------------------------------------------------------
def _frame(path):
    with load(path) as run:
        return run.to_pandas(hist=True)


def assert_same(a, b):
    """Equal frames, NaN-aware; the histogram arrays compared bin by bin."""
    assert a.drop(columns="hist").equals(b.drop(columns="hist"))
    assert all(np.array_equal(x, y) for x, y in zip(a["hist"], b["hist"], strict=True))


def test_copied_run_file_after_close_with_a_reader_open_has_every_step_regression(tmp_path):
    # The writer's close left the last commits in the -wal file while a reader was open: a copy of the .db alone
    # lost them. Now close checkpoints (TRUNCATE) and readers hold no read transaction between calls.
    path = tmp_path / "r.db"
    w = RunWriter(path, meta=META, commit_every=0.01)
    tid = w.tensor_id("fc.weight", "fc", "weight", (2, 3), "float32")
    reader = load(path)
    for s in range(200):
        w.log_summaries(s, [(tid, summarize(x_of(s)))])
        if s % 50 == 0:
            w.flush()
            assert len(reader.to_pandas()) == s + 1
    pages = reader.summaries()
    next(pages)  # a reader in the middle of an iteration
    w.close()
    (tmp_path / "copy").mkdir()
    copy = shutil.copy(path, tmp_path / "copy" / "r.db")  # the .db alone
    assert load(copy).steps == list(range(200))
    original, copied = reader.to_pandas(hist=True), _frame(copy)
    assert_same(copied, original)
    rest = [step for step, _, _ in pages]
    assert rest == list(range(1, len(rest) + 1))
    reader.close()


@pytest.mark.torch
def test_copied_run_file_after_closing_a_watch_that_was_read_has_every_step(tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "w.db"
    with gradsight.watch(model, path=path, optimizer=opt, every=1) as w:
        for step in range(12):
            opt.zero_grad()
            model(torch.randn(5, 3)).pow(2).mean().backward()
            opt.step()
            w.log(loss=float(step))
            if step == 5:
                assert w.to_pandas()["step"].max() == 5  # the watch's own reader stays open
        live = w.to_pandas(hist=True)
    (tmp_path / "copy").mkdir()
    copy = shutil.copy(path, tmp_path / "copy" / "w.db")
    copied = _frame(copy)
    assert sorted(copied["step"].unique()) == list(range(12))
    assert_same(copied, live)
    assert load(copy).scalars["loss"].tolist() == [float(s) for s in range(12)]


def test_snapshot_of_a_live_run_is_consistent_and_self_contained(tmp_path):
    path = tmp_path / "r.db"
    w = RunWriter(path, meta=META, commit_every=60)
    tid = w.tensor_id("fc.weight", "fc", "weight", (2, 3), "float32")
    for s in range(30):
        w.log_summaries(s, [(tid, summarize(x_of(s)))])
    w.flush()
    w.log_summaries(30, [(tid, summarize(x_of(30)))])  # not committed yet: the snapshot may lack it
    with load(path) as run:
        dest = run.snapshot(str(tmp_path / "snap.db"))
    assert dest.name == "snap.db" and not [n for n in os.listdir(tmp_path) if n.startswith(("snap.db-", "."))]
    (tmp_path / "other").mkdir()
    moved = shutil.move(dest, tmp_path / "other" / "snap.db")
    with load(moved) as snap:
        assert snap.steps == list(range(30)) and snap.framework == "torch"
        assert snap.summary("fc.weight", "weight", 29) == summarize(x_of(29))
        again = snap.snapshot(tmp_path / "r2.db")
    with load(path) as run:
        run.snapshot(again, overwrite=True)  # replaces a run file when asked
    w.close()
    assert load(again).steps in (list(range(30)), list(range(31)))
    with pytest.raises(StoreError, match=r"the file exists and gradsight never overwrites silently.*overwrite=True"):
        load(path).snapshot(again)
    with pytest.raises(StoreError, match=r"cannot write the snapshot to '.*other': it is a directory"):
        load(path).snapshot(tmp_path / "other")


@pytest.mark.parametrize(
    "raw",
    [b"r\xc3\xa9sum\xc3\xa9.db", b"\xff\xfe-not-utf8.db"],
    ids=["utf8-bytes", "non-utf8-bytes"],
)
def test_bytes_and_non_utf8_paths_work(tmp_path, raw):
    path = os.fsencode(tmp_path) + b"/" + raw
    write_run(path)
    assert os.path.exists(path) and is_run_file(path)
    with load(path) as run:
        assert run.steps == [0, 1, 2] and run.framework == "torch"
        run.snapshot(path + b".copy")
    assert load(os.fsdecode(path) + ".copy").steps == [0, 1, 2]
    with RunWriter(path, if_exists="append") as w:
        assert w.last_step == 2


def test_a_file_without_metadata_keys_reads_without_key_errors(tmp_path):
    p = write_run(tmp_path / "r.db")
    sql(p, "DELETE FROM meta")
    with load(p) as run:
        assert run.meta == {} and run.framework is None and run.layers == ["fc"]
        assert run.steps == [0, 1, 2]
        assert "framework=None" in repr(run)


@pytest.mark.parametrize("if_exists", ["append", "overwrite"])
def test_an_empty_file_is_replaced_by_a_new_run(tmp_path, if_exists):
    p = tmp_path / "r.db"
    p.touch()
    with RunWriter(p, meta=META, if_exists=if_exists) as w:
        assert w.last_step is None
    with load(p) as run:
        assert run.framework == "torch" and run.steps == []
    with pytest.raises(StoreError, match="already exists and gradsight never overwrites silently"):
        RunWriter(p)


def test_overwrite_replaces_a_run_file_and_its_stale_wal(tmp_path):
    p = write_run(tmp_path / "r.db", steps=5)
    with RunWriter(p, meta={"framework": "keras"}, if_exists="overwrite"):
        pass
    with load(p) as run:
        assert run.steps == [] and run.framework == "keras" and run.tensors == []


def test_append_with_another_architecture_is_refused(tmp_path):
    p = write_run(tmp_path / "r.db")
    with (
        RunWriter(p, if_exists="append") as w,
        pytest.raises(
            StoreError,
            match=r"tensor 'fc\.weight' \(weight\) was stored with shape \[2, 3\] float32, now given \[4, 3\] float32 "
            r"— another model.*if_exists='overwrite'",
        ),
    ):
        w.tensor_id("fc.weight", "fc", "weight", (4, 3), "float32")
    with RunWriter(p, if_exists="append") as w, pytest.raises(StoreError, match=r"now given \[2, 3\] float64"):
        w.tensor_id("fc.weight", "fc", "weight", (2, 3), "float64")
    with RunWriter(p, if_exists="append") as w:  # outputs change shape with the batch: not an architecture change
        assert w.tensor_id("fc", "fc", "output", (7, 2), "float32") == 2
        assert w.tensor_id("fc.weight", "fc", "weight", (2, 3), "float32") == 1
    other = {"framework": "torch", "model": {"layers": [{"name": "fc", "type": "Conv2d", "params": {"w": [1]}}]}}
    with pytest.raises(
        StoreError, match=r"recorded from another model \(layer 'fc' was stored as Linear with parameter shapes \[\]"
    ):
        RunWriter(p, meta=other, if_exists="append")
    renamed = {"model": {"layers": [{"name": "dense_7", "type": "Linear", "params": {}}]}}
    RunWriter(p, meta=renamed, if_exists="append").close()  # the same architecture under new names is fine
    with RunWriter(p, if_exists="append") as w, pytest.raises(StoreError, match="recorded from another model"):
        w.set_meta("model", other["model"])
    assert load(p).steps == [0, 1, 2]


def test_a_run_being_written_by_another_process_is_refused_and_freed_when_it_dies(tmp_path):
    p = tmp_path / "r.db"
    code = (
        "import sys; from gradsight.store import RunWriter; w = RunWriter(sys.argv[1], meta={'framework': 'torch'}); "
        "print('ready', flush=True); sys.stdin.read()"
    )
    with subprocess.Popen([sys.executable, "-c", code, str(p)], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout.readline().strip() == b"ready"
            for mode in ("append", "overwrite"):
                with pytest.raises(StoreError, match=rf"another gradsight watch is writing it \(process {proc.pid}\)"):
                    RunWriter(p, if_exists=mode)
        finally:
            proc.kill()
    with RunWriter(p, if_exists="append") as w:  # the OS released the lock of the killed writer
        assert w.last_step is None
    assert load(p).framework == "torch"


def _construct_then_die(path):
    RunWriter(path, meta=META)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_writer_killed_right_after_construction_leaves_its_metadata(tmp_path):
    p = tmp_path / "r.db"
    proc = multiprocessing.get_context("fork").Process(target=_construct_then_die, args=(str(p),))
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    with load(p) as run:
        assert run.framework == "torch" and run.meta["model"] == META["model"] and run.steps == []
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_a_failing_commit_is_raised_with_cause_file_and_what_was_saved(tmp_path, monkeypatch):
    p = tmp_path / "r.db"
    w = RunWriter(p, meta=META, commit_every=60)
    tid = w.tensor_id("fc.weight", "fc", "weight", (2, 3), "float32")
    for s in range(3):
        w.log_summaries(s, [(tid, summarize(x_of(s)))])
    w.flush()

    def broken(self, con):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(RunWriter, "_commit", broken)
    w.log_summaries(3, [(tid, summarize(x_of(3)))])
    expected = (
        r"writing the run file '.*r\.db' failed on the writer thread \(OperationalError: disk I/O error\); likely "
        r"cause: the disk is full or failing.*it holds 3 step\(s\) with summaries; the last committed step is 2"
    )
    with pytest.raises(StoreError, match=expected) as info:
        w.flush()  # the thread is dead: flush reports it instead of waiting
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    with pytest.raises(StoreError, match=expected):
        w.log_scalars(4, {"loss": 1.0})  # every later call says so
    with pytest.raises(StoreError, match=expected):
        w.tensor_id("b", "b", "grad", (1,), "float32")
    with pytest.raises(StoreError, match=expected):
        w.close()
    w.close()  # once closed, closing again is quiet
    monkeypatch.undo()
    assert load(p).steps == [0, 1, 2]
    with RunWriter(p, if_exists="append") as again:  # the lock was released
        assert again.last_step == 2


def test_a_failing_checkpoint_at_close_is_raised(tmp_path, monkeypatch):
    w = RunWriter(tmp_path / "r.db", meta=META)

    def broken(con, wait):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(RunWriter, "_checkpoint", staticmethod(broken))
    with pytest.raises(StoreError, match=r"database or disk is full.*the disk is full or failing.*0 step"):
        w.close()


def test_a_record_that_cannot_be_stored_is_reported_once_and_writing_goes_on(tmp_path):
    p = write_run(tmp_path / "r.db")
    w = RunWriter(p, if_exists="append")
    tid = w.tensor_id("fc.weight", "fc", "weight", (2, 3), "float32")
    w.log_summaries(2, [(tid, summarize(x_of(9)))])  # step 2 is stored already
    with pytest.raises(
        StoreError,
        match=r"the summaries of step 2 could not be stored .* dropped \(IntegrityError: UNIQUE.*already stored.*"
        r"last_step is 2",
    ):
        w.flush()
    w.log_summaries(3, lambda: 1 / 0)  # a failing summaries callable
    with pytest.raises(StoreError, match=r"summaries of step 3 could not be stored .*ZeroDivisionError"):
        w.flush()
    w.log_summaries(4, [(tid, summarize(x_of(4)))])
    w.close()
    with load(p) as run:
        assert run.steps == [0, 1, 2, 4] and run.summary("fc.weight", "weight", 2) == summarize(x_of(2))


def _write_until_full(path, out):
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
    w = RunWriter(path, meta=META, commit_every=0.01)
    tid = w.tensor_id("fc.weight", "fc", "weight", (2, 3), "float32")
    w.flush()
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    try:
        for s in range(100_000):
            w.log_summaries(s, [(tid, summarize(np.random.default_rng(s).normal(size=500)))])
            if s % 20 == 0:
                w.flush()
        out.put("no error")
    except StoreError as exc:
        out.put(str(exc))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and fork")
def test_a_full_disk_stops_training_with_a_store_error(tmp_path):
    p = tmp_path / "r.db"
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_write_until_full, args=(str(p), out))
    proc.start()
    message = out.get(timeout=120)
    proc.join()
    assert "failed on the writer thread" in message and str(p) in message, message
    assert "likely cause: the disk is full or failing" in message
    with load(p) as run:
        steps = run.steps
    assert steps == list(range(len(steps))) and f"it holds {len(steps)} step(s)" in message


def test_second_writer_on_the_same_file_in_this_process_and_release_at_close(tmp_path):
    p = tmp_path / "r.db"
    w = RunWriter(p, meta=META)
    with pytest.raises(StoreError, match=r"another gradsight watch is writing it \(this process\)"):
        RunWriter(p, if_exists="append")
    assert (tmp_path / "r.db-lock").exists()
    w.close()
    assert not (tmp_path / "r.db-lock").exists()
    RunWriter(p, if_exists="append").close()
    RunWriter(p, if_exists="overwrite").close()


def test_a_run_is_one_file_after_close(tmp_path):
    p = write_run(tmp_path / "r.db")
    assert os.listdir(tmp_path) == ["r.db"]
    with RunWriter(p, if_exists="append") as w:
        w.log_scalars(3, {"loss": 0.1})
    assert os.listdir(tmp_path) == ["r.db"]
    assert isinstance(load(p), Run)
