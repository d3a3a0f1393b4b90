"""Benchmark the PyTorch watch: step-time overhead, storage per summary, memory over a long run. JSON to stdout.

Method: baseline (unwatched) and watched copies of the same model train side by side in one process, in
alternating blocks of steps (so machine-load drift hits both alike), after a warm-up. A block's cost is its mean
step time (a block spans a whole number of ``every`` periods, so logged steps are included at their true
frequency); reported are the medians of the block means and their ratio (``ratio``; ``ratio_of_means`` and the
per-block ratios show the spread). Beside each ratio, ``aa_ratio`` is the A/A control: a second unwatched copy
timed in the same blocks against the baseline — the noise floor of that measurement. On a shared machine, run it
more than once and report the load average (``machine.loadavg_start``/``loadavg_end``). The CNN and transformer
default configs use blocks of 100 steps (one logged step each).

Configs (targets of the performance issue; the default preset includes the per-step signals and the anomaly
trigger):
  mlp_default          784-128-64-10, batch 32, Adam, CPU, gradsight defaults          target <= 1.08x
  mlp_full             the same, every summary of every kind at every step              target <= 2.0x
  cnn_default          "3C3D" (3 conv + 3 dense, 32x32x3 input, batch 64), defaults     target <= 1.02x
  cnn_full             the same, preset="full"                                          target <= 1.3x
  transformer_default  GPT-style, 4 pre-norm layers, width 256, 4 heads, seq 128, batch 4 target <= 1.02x
  transformer_full     the same, preset="full"                                          target <= 1.3x
  mlp_norms_floor      the MLP with only the default preset's exact per-step norms (gradients at the end of
                       backward, W_before copied with its norms, norms of W_after - W_before) in minimal hooks,
                       no bookkeeping or recording: the floor under mlp_default (no target; measured)
  mlp_compiled_default torch.compile(mlp) watched vs torch.compile(mlp) unwatched        (no target; measured)
Storage: bytes of the run file per (tensor, logged step) with the "full" preset (target <= 1 KiB).
Memory: RSS samples over a long default-preset run (10k steps; ``--long`` for 100k), should stay flat.

Usage: python benchmarks/bench_watch_torch.py [--threads 1] [--long] [--quick] [--only NAMES] [--blocks N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import gradsight
from gradsight.frameworks.torch._dispatch import watch_torch


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def cnn_3c3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 5),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(64, 96, 3),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(96, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Flatten(),
        nn.Linear(128 * 3 * 3, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


class Block(nn.Module):
    """A pre-norm transformer block: LayerNorm, causal self-attention, residual, LayerNorm, GELU MLP, residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small GPT-style language model (tokens -> logits), built from torch layers."""

    def __init__(self, vocab: int = 512, width: int = 256, layers: int = 4, heads: int = 4, seq: int = 128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(seq, width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.ln(self.blocks(x))).flatten(0, 1)


def gpt() -> nn.Module:
    return GPT()


def floor_hooks(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The per-step norms of the default preset and nothing else, in minimal hooks: the cost floor of exact norms.

    At the end of each backward pass the gradients' norms (torch, as the watch takes them); at the optimizer's
    step W_before copied with its norms, and afterwards the norms of W_after - W_before (the compiled kernels where
    they were built, as the watch; else torch). No bookkeeping, no judge, no recording.
    """
    from gradsight import _kernels

    params = [p for p in model.parameters() if p.requires_grad]
    out: dict = {"queued": False}
    views = [p.detach().numpy() for p in params] if _kernels.available() else None
    bufs = [p.detach().clone() for p in params]
    buf_views = [b.numpy() for b in bufs] if views is not None else None

    def end_of_backward() -> None:
        out["queued"] = False
        out["grad"] = [t.item() for t in torch._foreach_norm([p.grad for p in params])]

    def accumulated(_p: torch.Tensor) -> None:
        if not out["queued"]:
            out["queued"] = True
            torch.autograd.Variable._execution_engine.queue_callback(end_of_backward)

    def before(_opt, _args, _kwargs) -> None:
        if views is not None:
            out["weight"] = _kernels.copy_norms_f32(views, buf_views)
        else:
            torch._foreach_copy_(bufs, [p.detach() for p in params])
            out["weight"] = [t.item() for t in torch._foreach_norm(bufs)]

    def after(_opt, _args, _kwargs) -> None:
        if views is not None:
            out["update"] = _kernels.diff_norms_f32(views, buf_views)
        else:
            out["update"] = [
                t.item() for t in torch._foreach_norm(torch._foreach_sub([p.detach() for p in params], bufs))
            ]

    for p in params:
        p.register_post_accumulate_grad_hook(accumulated)
    opt.register_step_pre_hook(before)
    opt.register_step_post_hook(after)
    return out


class Trainer:
    def __init__(self, make, x, y, watch_kwargs=None, tmp=None, compiled=False, floor=False):
        torch.manual_seed(0)
        self.model = make()
        if compiled:
            self.model = torch.compile(self.model)
        self.opt = torch.optim.Adam(self.model.parameters(), 1e-3)
        self.x, self.y = x, y
        self.watch = None
        if floor:
            floor_hooks(self.model, self.opt)
        elif watch_kwargs is not None:
            self.watch = watch_torch(self.model, optimizer=self.opt, path=Path(tmp) / "run.db", **watch_kwargs)

    def steps(self, n: int) -> float:
        m, opt, x, y, w = self.model, self.opt, self.x, self.y, self.watch
        t0 = time.perf_counter()
        for _ in range(n):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            if w is not None:
                w.log(loss=loss)
        return (time.perf_counter() - t0) / n


#: Untimed pause after each watched block. The run writer's thread works in bursts (every 50 ms): without it, a
#: burst started by a watched block runs during the next baseline block and slows that one instead (on the MLP's
#: full preset, with blocks of 20 steps, block ratios spread from 1.4x to 3.3x). What a block's writer work has
#: left at its end (at most one burst) is not counted: blocks with full summaries are long for that (>= 0.25 s).
SETTLE_S = 0.1


def compare(make, x, y, watch_kwargs, block, blocks, warmup, compiled=False, floor=False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base = Trainer(make, x, y, compiled=compiled)
        control = Trainer(make, x, y, compiled=compiled)  # A/A: the same unwatched model, timed the same way
        watched = Trainer(make, x, y, watch_kwargs, tmp, compiled=compiled, floor=floor)
        for t in (base, control, watched):
            t.steps(warmup)
        tb, ta, tw = [], [], []
        for _ in range(blocks):
            tb.append(base.steps(block))
            ta.append(control.steps(block))
            tw.append(watched.steps(block))
            time.sleep(SETTLE_S)  # untimed: the run writer finishes its burst before the next baseline block
        if watched.watch is not None:
            watched.watch.close()
    mb, ma, mw = statistics.median(tb), statistics.median(ta), statistics.median(tw)
    return {
        "watch_kwargs": watch_kwargs,
        "block_steps": block,
        "blocks": blocks,
        "baseline_ms_per_step": round(mb * 1e3, 4),
        "watched_ms_per_step": round(mw * 1e3, 4),
        "ratio": round(mw / mb, 4),
        "aa_ratio": round(ma / mb, 4),
        "ratio_of_means": round(statistics.mean(tw) / statistics.mean(tb), 4),
        "block_ratios": [round(w / b, 3) for w, b in zip(tw, tb, strict=True)],
    }


def storage(steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(mlp, torch.randn(32, 784), torch.randint(0, 10, (32,)), {"preset": "full"}, tmp)
        tr.steps(steps)
        tr.watch.close()
        with gradsight.store.load(Path(tmp) / "run.db") as run:
            rows = len(run.to_pandas())
            n_tensors = len(run.tensors)
        size = os.path.getsize(Path(tmp) / "run.db")
    return {
        "preset": "full",
        "logged_steps": steps,
        "tensors": n_tensors,
        "summary_rows": rows,
        "file_bytes": size,
        "bytes_per_tensor_per_logged_step": round(size / rows, 1),
        "note": "file size includes the per-step scalars (loss, lr, cheap checks) and metadata",
    }


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def long_run(steps: int) -> dict:
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(mlp, torch.randn(32, 784), torch.randint(0, 10, (32,)), {}, tmp)
        every = max(steps // 20, 1)
        t0 = time.perf_counter()
        for i in range(0, steps, every):
            tr.steps(min(every, steps - i))
            samples.append({"step": i + every, "rss_mib": round(rss_kib() / 1024, 1)})
        tr.watch.close()
        size = os.path.getsize(Path(tmp) / "run.db")
    rss = [s["rss_mib"] for s in samples]
    half = rss[len(rss) // 2 :]
    return {
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "rss_samples": samples,
        "rss_growth_second_half_mib": round(max(half) - min(half), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "file_bytes": size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: stable timings)")
    ap.add_argument("--long", action="store_true", help="memory run of 100k steps instead of 10k")
    ap.add_argument("--quick", action="store_true", help="fewer blocks (smoke test)")
    ap.add_argument(
        "--only", default="", help="comma-separated config names to run (default: all), e.g. mlp_default,cnn_default"
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the storage and long memory runs")
    ap.add_argument(
        "--blocks", type=int, default=0, help="blocks per config instead of each config's own number (more: less noise)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    nb = args.blocks

    def blocks(quick: int, full: int) -> int:
        return nb if nb > 0 else (quick if q else full)

    torch.manual_seed(0)
    xm, ym = torch.randn(32, 784), torch.randint(0, 10, (32,))
    xc, yc = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    out = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "python": sys.version.split()[0],
        },
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gradsight": gradsight.__version__,
        "configs": {},
    }
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (4, 128), generator=g)
    xt, yt = ids, torch.randint(0, 512, (4 * 128,), generator=g)
    configs = {
        "mlp_default": (lambda: compare(mlp, xm, ym, {}, block=100, blocks=blocks(6, 30), warmup=200), 1.08),
        "mlp_full": (lambda: compare(mlp, xm, ym, {"preset": "full"}, 200, blocks(3, 12), 50), 2.0),
        "cnn_default": (lambda: compare(cnn_3c3d, xc, yc, {}, block=100, blocks=blocks(1, 5), warmup=10), 1.02),
        "cnn_full": (lambda: compare(cnn_3c3d, xc, yc, {"preset": "full"}, 5, blocks(2, 10), 3), 1.3),
        "transformer_default": (lambda: compare(gpt, xt, yt, {}, 100, blocks(1, 3), 5), 1.02),
        "transformer_full": (lambda: compare(gpt, xt, yt, {"preset": "full"}, 5, blocks(2, 8), 3), 1.3),
        "mlp_norms_floor": (
            lambda: compare(mlp, xm, ym, None, block=100, blocks=blocks(6, 30), warmup=200, floor=True),
            None,
        ),
        "mlp_compiled_default": (
            lambda: compare(mlp, xm, ym, {}, block=100, blocks=blocks(6, 20), warmup=200, compiled=True),
            None,
        ),
    }
    only = [c for c in args.only.split(",") if c]
    unknown = sorted(set(only) - set(configs))
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {sorted(configs)}")
    for name, (run, target) in configs.items():
        if only and name not in only:
            continue
        result = run()
        out["configs"][name] = {
            **result,
            "target": target,
            "met": None if target is None else result["ratio"] <= target,
        }
    if not args.no_memory:
        out["storage"] = storage(20 if q else 200)
        out["memory"] = long_run(1000 if q else (100_000 if args.long else 10_000))
    out["machine"]["loadavg_end"] = os.getloadavg()
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
