"""What the 2-rank DDP and FSDP suites share: spawning the ranks, their result files, comparing summaries.

Importable by the test modules and by the spawned ranks (``tests/`` is on ``sys.path``, which the children inherit).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradsight

#: Tolerance of float64 sums against a one-process reference.
FLOAT64 = {"rtol": 1e-9, "atol": 1e-12}


def spawn_ranks(run_rank: Callable, out: Path, names: list[str], what: str, timeout: float = 120.0) -> Path:
    """Spawn 2 ranks running ``run_rank(rank, 2, rendezvous, out, names)``; fail (never hang) after ``timeout`` s.

    ``rendezvous`` is a ``file://`` init method in ``out``: the ranks meet through a file, not a TCP port that
    another test's ranks could take between choosing it and binding it (a free port found by binding port 0 is
    free only until it is closed).
    """
    t0 = time.perf_counter()
    rendezvous = f"file://{Path(out, 'rendezvous').resolve()}"
    ctx = mp.start_processes(
        run_rank, args=(2, rendezvous, str(out), names), nprocs=2, join=False, start_method="spawn"
    )
    try:
        while not ctx.join(timeout=max(0.1, timeout - (time.perf_counter() - t0))):
            if time.perf_counter() - t0 > timeout:
                pytest.fail(
                    f"{what} ranks did not finish within {timeout:.0f} s (a hang); results so far: "
                    f"{sorted(p.name for p in out.iterdir())}"
                )
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return out


def write_result(outdir: str | Path, name: str, rank: int, result: Any) -> None:
    """In a rank: write what scenario ``name`` found, for the test to read with :func:`result`."""
    Path(outdir, f"{name}.rank{rank}.json").write_text(json.dumps(result))


def result(out: str | Path, name: str, rank: int) -> Any:
    """What rank ``rank`` wrote for scenario ``name``."""
    return json.loads(Path(out, f"{name}.rank{rank}.json").read_text())


def open_fails(model: nn.Module, opt: Any, rank: int, outdir: str | Path) -> None:
    """Scenario: open a watch whose run file cannot be created on rank 0 (its folder is missing) on every rank.

    Writes, per rank: the error raised (text and type), the seconds the open took, and the sum of an all_reduce
    made afterwards (3.0 on 2 ranks when the process group still works).
    """
    res: dict[str, Any] = {"error": None, "type": None}
    t0 = time.perf_counter()
    try:
        gradsight.watch(model, optimizer=opt, path=Path(outdir, "missing-folder", "open.db")).close()
    except Exception as e:
        res["error"], res["type"] = str(e), type(e).__name__
    res["seconds"] = time.perf_counter() - t0
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)  # the process group still works: the next collective completes on both ranks
    res["after"] = float(t)
    write_result(outdir, "open_fails", rank, res)


def assert_open_failed_on_every_rank(out: str | Path) -> None:
    """Rank 0 raised its own error, rank 1 a ``WatchError`` naming rank 0, both at once; the group still works."""
    r0, r1 = result(out, "open_fails", 0), result(out, "open_fails", 1)
    assert r0["type"] == "StoreError" and "does not exist" in r0["error"]  # rank 0's own error
    assert r1["type"] == "WatchError" and "failed to open on rank(s) [0]" in r1["error"]
    assert r0["seconds"] < 10 and r1["seconds"] < 10  # no wait for the process group's timeout (20-30 s here)
    assert r0["after"] == r1["after"] == 3.0  # the group is intact: the next all_reduce sums 1 + 2


def assert_same(a: Any, b: Any, scale: float = 1.0, what: Any = "") -> None:
    """b == a * scale (scale a power of two): counts, bins and units exactly, sums/min/max to float64 tolerance."""
    shift = int(math.log2(scale))
    for k in ("count", "zeros", "nan", "posinf", "neginf", "positive", "units_total"):
        assert getattr(a, k) == getattr(b, k), (what, k, getattr(a, k), getattr(b, k))
    ha, hb = a.hist, b.hist
    if shift:
        ha = np.roll(ha, shift)
    assert np.array_equal(ha, hb), (what, "hist", np.flatnonzero(ha != hb))
    if a.units_active is None:
        assert b.units_active is None, what
    else:
        assert np.array_equal(a.units_active, b.units_active), (what, "units")
    for k, p in (("sum", 1), ("sum_sq", 2), ("min", 1), ("max", 1)):
        want, got = getattr(a, k) * scale**p, getattr(b, k)
        assert math.isclose(want, got, rel_tol=FLOAT64["rtol"], abs_tol=FLOAT64["atol"]), (what, k, want, got)


class Branchy(nn.Module):
    """A model whose recorded outputs depend on a flag: set it on one rank for a layout that differs across ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 8)
        self.idn = nn.Identity()
        self.b = nn.Linear(8, 3)
        self.extra = False

    def forward(self, x):
        h = self.a(x)
        if self.extra:  # rank-dependent control flow: one more recorded output on one rank
            h = self.idn(h)
        return self.b(h)
