"""Benchmark gradsight under FSDP2: 2 CPU ranks (gloo, 127.0.0.1), unwatched vs watched ``fully_shard``. JSON out.

Method: each rank holds two FSDP2 copies of the same model (``fully_shard`` on every layer and on the root):
one unwatched, one watched with gradsight's defaults (full summaries every 100 steps, per-step signals every
step with their one ``all_reduce`` of squared shard norms, anomaly capture, one ``all_gather`` per logged step).
They train in alternating blocks of ``every`` steps (so a block holds exactly one logged step, at its true
frequency, and machine-load drift hits both alike; which of the pair goes first alternates), after a warm-up block
each. A block's cost is its mean step time on rank 0; ``ratio`` is the median over pairs of watched / baseline
(target <= 1.10x), ``ratio_of_medians`` the ratio of the per-variant medians, for two models:

* ``mlp``: MLP 784-128-64-10, batch 32 per rank, Adam (the single-process and DDP benchmarks' model);
* ``transformer``: 2 pre-norm encoder layers (d_model 64, 4 heads, feed-forward 256), sequence 32, batch 8 per
  rank, a 10-class head on the mean token, AdamW.

Also reported, from the watched run's metadata: the bytes each rank sends and receives at a logged step (the
gather) and the size of the per-step all-reduce vector. One intra-op thread per rank.

Note: the 2-core machine these numbers come from is shared with other jobs; two ranks already occupy both cores,
so single blocks are noisy (see ``block_ratios``); compare medians.

Usage: python benchmarks/bench_fsdp.py [--blocks 10] [--every 100] [--models mlp,transformer] [--quick] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from _spawn import run_two_ranks

TARGET = 1.10


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(64, 4, dim_feedforward=256, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(2)
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


def build(kind: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    if kind == "mlp":
        model: nn.Module = nn.Sequential(
            nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )
        for i in (0, 2, 4):
            fully_shard(model[i])
        fully_shard(model)
        return model, torch.optim.Adam(model.parameters(), 1e-3)
    model = Transformer()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), 1e-3)


def batch(kind: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    if kind == "mlp":
        return torch.randn(32, 784, generator=g), torch.randint(0, 10, (32,), generator=g)
    return torch.randn(8, 32, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


def bench_model(kind: str, rank: int, args: dict, tmp: str) -> dict:
    import gradsight

    every = args["every"]
    x, y = batch(kind, rank)
    models = {}
    for name in ("baseline", "watched"):
        m, opt = build(kind)
        w = gradsight.watch(m, optimizer=opt, path=Path(tmp) / f"{kind}.db", every=every) if name == "watched" else None
        models[name] = (m, opt, w)

    def block(name: str) -> tuple[float, list[float]]:
        m, opt, w = models[name]
        times = []
        t0 = time.perf_counter()
        for _ in range(every):
            t = time.perf_counter()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            if w is not None:
                w.log(loss=loss)
            times.append(time.perf_counter() - t)
        return (time.perf_counter() - t0) / every, times

    for name in models:
        block(name)  # warm-up
    tb, tw, logged, plain = [], [], [], []
    for i in range(args["blocks"]):
        if i % 2:  # alternate which variant goes first: an order bias cancels out
            mean, times = block("watched")
            tb.append(block("baseline")[0])
        else:
            tb.append(block("baseline")[0])
            mean, times = block("watched")
        tw.append(mean)
        logged.append(times[0])  # the block's first step is the logged one
        plain.append(statistics.median(times[1:]))
    w = models["watched"][2]
    meta = w.meta["distributed"] if w.writes else {}
    w.close()
    mb, mw = statistics.median(tb), statistics.median(tw)
    ratio = statistics.median(a / b for a, b in zip(tw, tb, strict=True))  # the median of paired block ratios
    n_params = sum(1 for _ in models["watched"][0].parameters())
    return {
        "model": kind,
        "parameter_tensors": n_params,
        "baseline_ms_per_step": round(mb * 1e3, 4),
        "watched_ms_per_step": round(mw * 1e3, 4),
        "ratio": round(ratio, 4),
        "ratio_of_medians": round(mw / mb, 4),
        "ratio_of_means": round(statistics.mean(tw) / statistics.mean(tb), 4),
        "target": TARGET,
        "target_met": ratio <= TARGET,
        "logged_step_ms_median": round(statistics.median(logged) * 1e3, 3),
        "unlogged_step_ms_median": round(statistics.median(plain) * 1e3, 3),
        "block_ratios": [round(a / b, 3) for a, b in zip(tw, tb, strict=True)],
        "bytes_per_logged_step": meta.get("bytes_per_logged_step"),
        "per_step_all_reduce_bytes": meta.get("per_step_bytes"),
    }


def rank_main(rank: int, world: int, port: int, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_model(kind, rank, args, tmp) for kind in args["models"]]
    if rank == 0:
        result = {
            "benchmark": "fsdp2_default",
            "config": {
                "world_size": world,
                "backend": "gloo",
                "sharding": "fully_shard on every layer and on the root (FSDP2)",
                "every": args["every"],
                "threads_per_rank": 1,
                "block_steps": args["every"],
                "blocks": args["blocks"],
            },
            "results": results,
            "machine": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cpus": os.cpu_count(),
                "note": "shared 2-core machine: noisy",
            },
        }
        Path(out).write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--models", type=str, default="mlp,transformer")
    ap.add_argument("--quick", action="store_true", help="3 blocks of 50 steps (a smoke run)")
    ap.add_argument("--out", type=str, default=None, help="also write the JSON here")
    a = ap.parse_args()
    args = {
        "blocks": 3 if a.quick else a.blocks,
        "every": 50 if a.quick else a.every,
        "models": [m for m in a.models.split(",") if m],
    }
    run_two_ranks(rank_main, args, "bench_fsdp", 1200, a.out)


if __name__ == "__main__":
    main()
