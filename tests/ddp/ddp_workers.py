"""Code that runs inside the spawned ranks (importable by the children; not a test module).

Every scenario writes a JSON result per rank into ``outdir``; an exception in a rank propagates to the parent
through torch.multiprocessing. Scenarios run in order in one process group, so each must leave both ranks in
step (same number of collectives).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsight
from _ranks import Branchy, open_fails, write_result
from gradsight import WatchError

B = 4  # per-rank batch
STEPS = 3
DATA_SEED = 1234


def make_mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def data(world, dtype=torch.float64, steps=STEPS):
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(steps, world * B, 12, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (steps, world * B), generator=g)
    return x, y


def sc_merge(rank, world, outdir):
    """full preset, float64, loss = sum: the global summaries must equal one process on the 2b batch."""
    model = DDP(make_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(world)
    res = {}
    with gradsight.watch(model, optimizer=opt, path=Path(outdir, "merge.db"), preset="full") as w:
        for s in range(STEPS):
            xs, ys = x[s, rank * B : (rank + 1) * B], y[s, rank * B : (rank + 1) * B]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xs), ys, reduction="sum")
            loss.backward()
            opt.step()
            w.log(loss=loss)
        res["path"] = None if w.path is None else str(w.path)
        res["writes"] = w.writes
        try:
            w.to_pandas()
            res["read"] = "ok"
        except WatchError as e:
            res["read"] = str(e)
    write_result(outdir, "merge", rank, res)


def sc_clip(rank, world, outdir):
    """Gradient clipping before optimizer.step() must not change the noise scale (both norms are pre-clip)."""
    model = DDP(make_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(world)
    with gradsight.watch(model, optimizer=opt, path=Path(outdir, "clip.db"), preset="full"):
        opt.zero_grad()
        xs, ys = x[0, rank * B : (rank + 1) * B], y[0, rank * B : (rank + 1) * B]
        nn.functional.cross_entropy(model(xs), ys, reduction="sum").backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
        opt.step()
    write_result(outdir, "clip", rank, {})


def sc_rank_paths(rank, world, outdir):
    model = DDP(make_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(world)
    with gradsight.watch(model, optimizer=opt, path=Path(outdir, "rp.db"), preset="full", rank_paths=True) as w:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[0, rank * B : (rank + 1) * B]), y[0, rank * B : (rank + 1) * B]).backward()
        opt.step()
    write_result(outdir, "rank_paths", rank, {"path": str(w.path)})


def sc_config_mismatch(rank, world, outdir):
    model = DDP(make_mlp(torch.float32))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    res = {}
    try:
        gradsight.watch(model, optimizer=opt, path=Path(outdir, "cfg.db"), every=1 + rank).close()
        res["error"] = None
    except WatchError as e:
        res["error"] = str(e)
    write_result(outdir, "config_mismatch", rank, res)


def sc_open_fails(rank, world, outdir):
    """Rank 0's run file cannot be created (its folder does not exist): both ranks raise, neither waits."""
    model = DDP(make_mlp(torch.float32))
    open_fails(model, torch.optim.SGD(model.parameters(), lr=0.1), rank, outdir)


def sc_layout_mismatch(rank, world, outdir):
    torch.manual_seed(0)
    net = Branchy()
    model = DDP(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(world, torch.float32)
    res = {"error": None, "step": None}
    w = gradsight.watch(model, optimizer=opt, path=Path(outdir, "layout.db"), preset="full")
    try:
        for s in range(STEPS):
            net.extra = rank == 1 and s == 1
            opt.zero_grad()
            nn.functional.cross_entropy(
                model(x[s, rank * B : (rank + 1) * B]), y[s, rank * B : (rank + 1) * B]
            ).backward()
            opt.step()
    except WatchError as e:
        res["error"], res["step"] = str(e), s
    finally:
        w.close()
    write_result(outdir, "layout_mismatch", rank, res)


def sc_early_exit(rank, world, outdir):
    """Rank 1 stops after 6 steps; rank 0 goes on with 2 local steps (no_sync) and closes: nobody hangs."""
    model = DDP(make_mlp(torch.float32))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(world, torch.float32, steps=8)
    res = {}
    w = gradsight.watch(model, optimizer=opt, path=Path(outdir, "early.db"), every=4)
    n = 6 if rank == 1 else 8
    for s in range(n):
        xs, ys = x[s, rank * B : (rank + 1) * B], y[s, rank * B : (rank + 1) * B]
        opt.zero_grad()
        if s < 6:
            loss = nn.functional.cross_entropy(model(xs), ys)
            loss.backward()
        else:  # the other rank is gone: no DDP all-reduce, and steps 6, 7 are not logged
            with model.no_sync():
                loss = nn.functional.cross_entropy(model(xs), ys)
                loss.backward()
        opt.step()
        w.log(loss=loss)
    t0 = time.perf_counter()
    w.close()
    res["close_s"] = time.perf_counter() - t0
    res["steps_run"] = n
    if rank == 0:
        run = gradsight.load(Path(outdir, "early.db"))
        res["logged_steps"] = run.steps
        sc = run.scalars
        res["loss_steps"] = sorted(sc.loc[sc["name"] == "loss", "step"].tolist()) if "name" in sc else None
        res["scalars"] = sc.to_dict(orient="list") if "name" in sc else sc.reset_index().to_dict(orient="list")
    write_result(outdir, "early_exit", rank, res)


def sc_signals(rank, world, outdir):
    """Default preset, clipping, an lr spike at step 20: per-step signals and anomaly captures on every rank."""
    model = DDP(make_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    steps = 30
    x, y = data(world, steps=steps)
    preclip = []
    path = Path(outdir, "signals.db")
    with gradsight.watch(model, optimizer=opt, path=path, rank_paths=True) as w:
        for s in range(steps):
            if s == 20:
                for g in opt.param_groups:
                    g["lr"] *= 1e3
            opt.zero_grad()
            xs, ys = x[s, rank * B : (rank + 1) * B], y[s, rank * B : (rank + 1) * B]
            loss = nn.functional.cross_entropy(model(xs), ys, reduction="sum")
            loss.backward()
            preclip.append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()))
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
            opt.step()
            w.log(loss=loss * (1e6 if rank == 1 and s == 10 else 1))  # a rank-local loss spike: not judged
    write_result(outdir, "signals", rank, {"path": str(w.path), "preclip": preclip})


SCENARIOS = {
    "signals": sc_signals,
    "merge": sc_merge,
    "clip": sc_clip,
    "rank_paths": sc_rank_paths,
    "config_mismatch": sc_config_mismatch,
    "open_fails": sc_open_fails,
    "layout_mismatch": sc_layout_mismatch,
    "early_exit": sc_early_exit,  # last: rank 1 leaves
}


def run_rank(rank, world, rendezvous, outdir, names):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                SCENARIOS[name](rank, world, outdir)
            except BaseException:
                Path(outdir, f"{name}.rank{rank}.error").write_text(traceback.format_exc())
                raise
            Path(outdir, f"{name}.rank{rank}.time").write_text(f"{time.perf_counter() - t0:.3f}")
    finally:
        if names and names[-1] != "early_exit":
            dist.destroy_process_group()
    if names and names[-1] == "early_exit":
        # The last scenario leaves the process group broken (one rank left it). gloo's threads can then abort
        # the interpreter's teardown ("terminate called without an active exception", SIGABRT), which the
        # spawner reports as this rank failing although every result is written: leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
