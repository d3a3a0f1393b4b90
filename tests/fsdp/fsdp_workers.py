"""Code that runs inside the spawned FSDP ranks (importable by the children; not a test module).

Every scenario writes a JSON result per rank into ``outdir``; an exception in a rank propagates to the parent
through torch.multiprocessing. Scenarios run in order in one process group, so each must leave both ranks in
step (same number of collectives); the one where a rank raises runs last.
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

import gradsight
from _ranks import Branchy, open_fails, write_result
from gradsight import WatchError

B = 4  # per-rank batch
STEPS = 3
DATA_SEED = 1234
LR = 0.1


class Net(nn.Module):
    """An MLP whose shards are uneven on 2 ranks, with a frozen parameter and a 1-element one (an empty shard).

    ``body.0.weight`` (7, 12) splits 4 + 3 rows, ``body.2.weight`` (5, 7) 3 + 2, ``body.4.weight`` (3, 5) 2 + 1;
    ``temp`` (1,) is 1 + 0 elements: rank 1's shard is empty. ``body.0.bias`` is frozen.
    """

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
        self.temp = nn.Parameter(torch.full((1,), 1.5))
        self.body[0].bias.requires_grad_(False)

    def forward(self, x):
        return self.body(x) * self.temp


def make_net(dtype=torch.float64):
    torch.manual_seed(0)
    return Net().to(dtype)


def shard(net, **kwargs):
    from torch.distributed.fsdp import fully_shard

    for i in (0, 2, 4):
        fully_shard(net.body[i], **kwargs)
    fully_shard(net, **kwargs)
    return net


def data(world, dtype=torch.float64, steps=STEPS, micro=1):
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(steps, micro, world * B, 12, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (steps, micro, world * B), generator=g)
    return x, y


def local_batch(x, y, s, k, rank):
    return x[s, k, rank * B : (rank + 1) * B], y[s, k, rank * B : (rank + 1) * B]


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def sc_merge(rank, world, outdir):
    """full preset, float64, loss = sum: every summary and signal equals one process on the 2b batch."""
    model = shard(make_net())
    opt = torch.optim.SGD(_params(model), lr=LR)
    x, y = data(world)
    res = {}
    with gradsight.watch(model, optimizer=opt, path=Path(outdir, "merge.db"), preset="full") as w:
        for s in range(STEPS):
            xs, ys = local_batch(x, y, s, 0, rank)
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


def sc_fsdp1(rank, world, outdir):
    """FSDP1 with use_orig_params=True (each Linear its own flat parameter): the same run as sc_merge."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    net = make_net()
    wrap = ModuleWrapPolicy({nn.Linear})
    model = FSDP(net, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=wrap)
    opt = torch.optim.SGD(_params(model), lr=LR)
    x, y = data(world)
    with gradsight.watch(model, optimizer=opt, path=Path(outdir, "fsdp1.db"), preset="full"):
        for s in range(STEPS):
            xs, ys = local_batch(x, y, s, 0, rank)
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs), ys, reduction="sum").backward()
            opt.step()
    write_result(outdir, "fsdp1", rank, {})


def sc_refusals(rank, world, outdir):
    """Real models gradsight cannot merge exactly: refused with UnsupportedError on every rank, nothing written."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    from gradsight import UnsupportedError

    def flat():  # FSDP1 with its default, use_orig_params=False
        return FSDP(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), device_id=torch.device("cpu"))

    def hsdp():  # a 2-D mesh: shards replicated over a second dimension
        return fully_shard(nn.Linear(4, 3), mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("r", "s")))

    def tensor_parallel():  # DTensor parameters without FSDP
        net = nn.Linear(4, 2)
        mesh = init_device_mesh("cpu", (world,))
        net.weight = nn.Parameter(distribute_tensor(net.weight.detach(), mesh, [Replicate()]))
        return net

    res = {}
    for kind, build in (("fsdp1_flat", flat), ("hsdp", hsdp), ("tensor_parallel", tensor_parallel)):
        model = build()
        try:
            gradsight.watch(model, path=Path(outdir, f"refused_{kind}.db")).close()
            res[kind] = "accepted"
        except UnsupportedError as e:
            res[kind] = f"refused: {e}"
    write_result(outdir, "refusals", rank, res)


def sc_accum(rank, world, outdir):
    """Gradient accumulation, 2 micro-batches per step, the first under set_requires_gradient_sync(False)."""
    model = shard(make_net())
    opt = torch.optim.SGD(_params(model), lr=LR)
    x, y = data(world, micro=2)
    with gradsight.watch(model, optimizer=opt, path=Path(outdir, "accum.db"), preset="full"):
        for s in range(STEPS):
            opt.zero_grad()
            for k in range(2):
                model.set_requires_gradient_sync(k == 1)
                xs, ys = local_batch(x, y, s, k, rank)
                nn.functional.cross_entropy(model(xs), ys, reduction="sum").backward()
            opt.step()
    write_result(outdir, "accum", rank, {})


def sc_signals(rank, world, outdir):
    """Default preset, clipping, an lr spike at step 20: per-step signals and anomaly captures on every rank."""
    model = shard(make_net())
    opt = torch.optim.SGD(_params(model), lr=0.01)
    steps = 30
    x, y = data(world, steps=steps)
    preclip, reference = [], []
    path = Path(outdir, "signals.db")
    with gradsight.watch(model, optimizer=opt, path=path, rank_paths=True) as w:
        for s in range(steps):
            if s == 20:
                for g in opt.param_groups:
                    g["lr"] *= 1e3
            opt.zero_grad()
            xs, ys = local_batch(x, y, s, 0, rank)
            loss = nn.functional.cross_entropy(model(xs), ys, reduction="sum")
            loss.backward()
            full = [p.grad.full_tensor() for p in _params(model)]  # a collective: the whole gradient
            preclip.append(float(torch.cat([g.reshape(-1) for g in full]).norm()))
            reference.append(
                {n: float(p.grad.full_tensor().norm()) for n, p in model.named_parameters() if p.grad is not None}
            )
            torch.nn.utils.clip_grad_norm_(_params(model), max_norm=0.5)
            opt.step()
            w.log(loss=loss * (1e6 if rank == 1 and s == 10 else 1))  # a rank-local loss spike: not judged
    write_result(outdir, "signals", rank, {"path": str(w.path), "preclip": preclip, "per_tensor": reference})


def sc_mixed(rank, world, outdir):
    """A bfloat16 mixed-precision policy: weights and gradients are the float32 master shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard(make_net(torch.float32), mp_policy=policy)
    opt = torch.optim.SGD(_params(model), lr=LR)
    x, y = data(world, torch.float32)
    with gradsight.watch(model, optimizer=opt, path=Path(outdir, "mixed.db"), preset="full"):
        for s in range(2):
            xs, ys = local_batch(x, y, s, 0, rank)
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs).float(), ys).backward()
            opt.step()
    write_result(outdir, "mixed", rank, {})


def sc_layout_mismatch(rank, world, outdir):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = Branchy()
    model = fully_shard(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(world, torch.float32)
    res = {"error": None, "step": None}
    w = gradsight.watch(model, optimizer=opt, path=Path(outdir, "layout.db"), preset="full")
    try:
        for s in range(STEPS):
            net.extra = rank == 1 and s == 1
            opt.zero_grad()
            xs, ys = local_batch(x, y, s, 0, rank)
            nn.functional.cross_entropy(model(xs), ys).backward()
            opt.step()
    except WatchError as e:
        res["error"], res["step"] = str(e), s
    finally:
        w.close()
    write_result(outdir, "layout_mismatch", rank, res)


def sc_open_fails(rank, world, outdir):
    """Rank 0's run file cannot be created (its folder does not exist): both ranks raise, neither waits."""
    model = shard(make_net(torch.float32))
    open_fails(model, torch.optim.SGD(_params(model), lr=LR), rank, outdir)


def sc_rank_raises(rank, world, outdir):
    """Rank 1 raises in its loop at step 3; it leaves at once, rank 0 fails in FSDP's next collective, no hang."""
    model = shard(make_net(torch.float32))
    opt = torch.optim.SGD(_params(model), lr=LR)
    x, y = data(world, torch.float32, steps=8)
    res = {"error": None}
    t0 = time.perf_counter()
    try:
        with gradsight.watch(model, optimizer=opt, path=Path(outdir, "raises.db"), every=2):
            for s in range(8):
                if rank == 1 and s == 3:
                    raise ValueError("a bad batch on rank 1")
                xs, ys = local_batch(x, y, s, 0, rank)
                opt.zero_grad()
                nn.functional.cross_entropy(model(xs), ys).backward()
                opt.step()
    except Exception as e:  # rank 1: its own error; rank 0: the process group's, once rank 1 has left
        res["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    res["seconds"] = time.perf_counter() - t0
    if rank == 1:
        dist.destroy_process_group()  # leave: the others' pending collective fails instead of waiting
    write_result(outdir, "rank_raises", rank, res)


SCENARIOS = {
    "merge": sc_merge,
    "fsdp1": sc_fsdp1,
    "refusals": sc_refusals,
    "accum": sc_accum,
    "signals": sc_signals,
    "mixed": sc_mixed,
    "layout_mismatch": sc_layout_mismatch,
    "open_fails": sc_open_fails,
    "rank_raises": sc_rank_raises,  # last: rank 1 leaves
}


def run_rank(rank, world, rendezvous, outdir, names):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world, timeout=timedelta(seconds=20))
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
        if names and names[-1] != "rank_raises" and dist.is_initialized():
            dist.destroy_process_group()
    if names and names[-1] == "rank_raises":
        # The last scenario leaves the process group broken (one rank left it). gloo's threads can then abort
        # the interpreter's teardown ("terminate called without an active exception", SIGABRT), which the
        # spawner reports as this rank failing although every result is written: leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
