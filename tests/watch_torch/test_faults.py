"""Crash safety (SIGKILL at random moments) and leak freedom (1000 watch/close cycles)."""

import gc
import multiprocessing
import os
import random
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
SLACK = 0.5  # scheduling slack on a loaded 2-core machine


def _child(path, times):
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = watch(model, path=path, optimizer=opt, every=1, commit_every=COMMIT)  # noqa: F841 - killed, never closed
    for step in range(len(times)):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        times[step] = time.monotonic()  # step's summaries are enqueued by now
        time.sleep(0.002)


def test_sigkill_at_random_moments_leaves_a_readable_file_with_every_committed_step(tmp_path):
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(1)
    t_end = time.monotonic() + 25
    trials = 0
    for trial in range(24):
        if time.monotonic() > t_end:
            break
        path = tmp_path / f"k{trial}.db"
        times = ctx.Array("d", 5000, lock=False)
        p = ctx.Process(target=_child, args=(str(path), times), daemon=True)
        p.start()
        time.sleep(rng.uniform(0.05, 0.8))
        killed_at = time.monotonic()
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        trials += 1
        if not path.exists():  # killed before the file was created
            continue
        must_have = [s for s, t in enumerate(times) if 0 < t <= killed_at - COMMIT - SLACK]
        with load(path) as run:
            steps = run.steps
            assert run.meta["framework"] == "torch"
        assert steps == list(range(len(steps))), "steps must be contiguous from 0"
        if must_have:
            assert steps and steps[-1] >= must_have[-1], (trial, steps[-1:], must_have[-1])
        with sqlite3.connect(path) as con:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert trials >= 10


def _hooks(model, opt):
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return n + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


def test_1000_watch_close_cycles_leave_no_hooks_and_no_memory(tmp_path):
    from gradsight.frameworks._torch_watch import Watch

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
