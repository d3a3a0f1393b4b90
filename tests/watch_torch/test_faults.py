"""Crash safety (50 SIGKILLs at random moments) and leak freedom (1000 watch/close cycles)."""

import gc
import multiprocessing
import os
import random
import re
import signal
import sqlite3
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from torch import nn

from gradsight._watch import watch
from gradsight.store import load

COMMIT = 0.05
KILLS = 50
FLUSH_EVERY = 10  # the child flushes every this many steps and records the step: committed for sure


def _child(path, state):
    """Train a tiny model under a watch until killed. ``state``: [watch constructed, last flushed step, steps]."""
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = watch(model, path=path, optimizer=opt, every=1, commit_every=COMMIT)
    state[0] = 1
    for step in range(100_000):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        state[2] = step + 1
        if step % FLUSH_EVERY == 0:
            w.flush()
            state[1] = step


def test_sigkill_at_random_moments_leaves_a_readable_file_with_every_committed_step(tmp_path):
    # No timing assumptions: a kill may land before the watch exists, while it creates the file, mid-step, mid-
    # commit or mid-checkpoint. Whatever the moment, the path is either absent (only before the watch returned)
    # or a run file with its metadata, contiguous steps, and at least every step that a flush had committed.
    ctx = multiprocessing.get_context("fork")
    warm = nn.Linear(2, 2)  # the first optimizer of a process imports torch._dynamo (~1 s): pay it before forking
    warm_opt = torch.optim.SGD(warm.parameters(), lr=0.01)
    with watch(warm, path=tmp_path / "warm.db", optimizer=warm_opt, every=1):
        warm(torch.ones(1, 2)).sum().backward()
        warm_opt.step()
    rng = random.Random(1)
    early = 0
    for trial in range(KILLS):
        path = tmp_path / f"k{trial}.db"
        state = ctx.Array("l", [0, -1, 0], lock=False)
        p = ctx.Process(target=_child, args=(str(path), state), daemon=True)
        p.start()
        # Mostly while training; one kill in five during start-up, when the file is being created. A training-time
        # kill waits for the watch to exist first, so that a loaded machine's slow start-up cannot turn it into one.
        if trial % 5 == 0:
            time.sleep(rng.uniform(0.0, 0.03))
        else:
            deadline = time.monotonic() + 60
            while not state[0] and time.monotonic() < deadline and p.is_alive():
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.3))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        constructed, flushed = state[0], state[1]
        if not path.exists():
            assert not constructed, f"trial {trial}: the watch was constructed but left no file"
            early += 1
            continue
        with load(path) as run:
            steps = run.steps
            assert run.meta["framework"] == "torch" and run.framework == "torch"
            assert [layer["name"] for layer in run.meta["model"]["layers"]] == ["0", "1", "2"]
        assert steps == list(range(len(steps))), f"trial {trial}: steps must be contiguous from 0"
        assert (steps[-1] if steps else -1) >= flushed, (trial, steps[-1:], flushed)
        with sqlite3.connect(path) as con:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert early < KILLS // 2, "most kills must land after the watch started"
    # A kill while the file was being built leaves at most its hidden temporary files, never a partial run file.
    temp = re.compile(r"\.k\d+\.db\.\d+-[0-9a-f]{8}\.tmp(-wal|-shm|-journal)?")
    assert all(temp.fullmatch(n) for n in os.listdir(tmp_path) if n.startswith("."))


def _hooks(model, opt):
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return n + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


def test_1000_watch_close_cycles_leave_no_hooks_and_no_memory(tmp_path):
    from gradsight.frameworks.torch._watch import Watch

    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):  # this test is about hooks, not disks
        with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
            _cycles(Path(shm), Watch)
    else:
        _cycles(tmp_path, Watch)


def _cycles(tmp_path, Watch):

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 4)

    def cycle(i):
        with watch(model, path=tmp_path / f"c{i % 3}.db", optimizer=opt, every=1, if_exists="overwrite") as w:
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            w.log(loss=1.0)
        assert _hooks(model, opt) == 0

    for i in range(100):
        cycle(i)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(100, 1000):
        cycle(i)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 200_000, f"{grown} bytes retained over 900 cycles"
    assert not [o for o in gc.get_objects() if type(o) is Watch]
    assert _hooks(model, opt) == 0


def test_a_dropped_watch_removes_its_hooks(tmp_path):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = watch(model, path=tmp_path / "d.db", optimizer=opt, every=1)
    del w
    gc.collect()
    assert _hooks(model, opt) == 0
    with watch(model, path=tmp_path / "e.db", optimizer=opt):  # the model is free again
        pass


@pytest.mark.parametrize("n", [1])
def test_logging_after_a_failed_writer_does_not_hang(tmp_path, n):
    model = nn.Linear(2, 2)
    with watch(model, path=tmp_path / "f.db") as w:
        w.log(loss=float("nan"), x=float("inf"))
        assert w.scalars.empty or w.scalars.loc[0, "x"] == float("inf")
