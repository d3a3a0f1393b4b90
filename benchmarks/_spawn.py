"""Launching the 2-rank benchmarks (bench_ddp.py, bench_fsdp.py): gloo on loopback, a hard time limit, JSON out."""

from __future__ import annotations

import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def run_two_ranks(rank_main: Callable, args: dict[str, Any], what: str, limit_s: float, out: str | None) -> None:
    """Spawn ``rank_main(rank, 2, port, args, result_path)`` on 2 ranks; print the JSON rank 0 wrote (and save it).

    Exits with a message when the ranks do not finish within ``limit_s`` seconds.
    """
    with socket.socket() as s:  # a free loopback port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = str(Path(tmp) / "result.json")
        ctx = mp.start_processes(rank_main, args=(2, port, args, result), nprocs=2, join=False, start_method="spawn")
        deadline = time.monotonic() + limit_s
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                sys.exit(f"{what}: ranks did not finish within {limit_s:.0f} s")
        text = Path(result).read_text()
    print(text)
    if out:
        Path(out).write_text(text + "\n")
