"""``gradsight.watch(ddp_model)``: correct global statistics under ``torch.nn.parallel.DistributedDataParallel``.

Call ``gradsight.watch(ddp_model, optimizer=opt, path="run.db")`` on **every** rank, after
``torch.distributed.init_process_group`` (gloo or nccl) and after wrapping the model. The watch records the
wrapped module (tensor names are the single-process ones: ``0.weight``, not ``module.0.weight``).

What each kind means under DDP
    ``output``, ``output_grad`` are rank-local (each rank sees its own slice of the batch). At each logged step
    every rank's summaries are combined with :func:`gradsight.summary.merge` into the summary of the whole
    global batch: counts and histogram bins exactly, ``sum``/``sum_sq`` to float64 rounding, min/max exactly —
    the same numbers one process would record on the concatenated batch (``world * b`` samples). The loss is the
    one DDP differentiates: averaging the ranks' gradients makes it the mean of the ranks' losses,
    ``J = (1/world) sum_r J_r``, so ``output_grad`` is each rank's dJ_r/dA divided by ``world`` (exact when
    ``world`` is a power of two). With a mean-reduced loss that is the one-process gradient on the global batch;
    with a sum-reduced one, it is ``1/world`` of it, like ``grad``. Either way ``output_grad`` and ``grad`` keep
    the one-process relation dJ/dW = Aᵀ·dJ/dZ. The shape recorded for a layer output (``run.tensors``) is the
    writing rank's local one; its summary counts the whole global batch.
    ``weight``, ``grad`` (the gradient after DDP's all-reduce, the one the optimizer sees) and ``update`` are
    identical on every rank, so they are *not* reduced again: the writing rank records its own. The assumption is
    verified cheaply at every logged step: the sum and the sum of squares of all gradients and of all weights
    travel in the same collective and are compared across ranks; the result is in the run's metadata
    (``meta["distributed"]["replicas_identical"]``: ``verified`` yes/no, ``max_rel_deviation``,
    ``steps_checked``) and, when ranks differ by more than ``REPLICA_RTOL``, as an event
    ``ddp_replicas_differ``. Per-tensor summaries of the local, pre-all-reduce gradients are not recorded; their
    total squared norm is (it feeds the noise scale below).

Which rank writes
    Rank 0 of the DDP process group writes the run file at ``path``; the other ranks write nothing (their
    ``watch.path`` is ``None`` and the read API raises ``WatchError``). With ``rank_paths=True`` every rank writes
    its own file with the same global summaries: rank 0 at ``path``, rank ``r`` at ``<stem>.rank<r><suffix>``.
    Scalars passed to ``watch.log`` are recorded by the writing rank(s) as given on that rank (log a reduced
    loss if you want the global one).

The one collective per logged step
    At a logged step each rank packs a fixed-size header (magic, step, a fingerprint of its layout — tensor
    names, kinds, dtype groups, unit counts —, its payload length, local batch size, the noise-scale norms and
    the replica fingerprints) followed by the packed int64 statistics of its rank-local tensors (the buffer of
    :class:`._summary.PackedStats`) and calls ``all_gather_single`` (``all_gather_into_tensor``) once.
    Every rank then checks every header — a different step, layout or length is a :class:`WatchError` raised on
    *all* ranks alike, never a hang or garbage — and the writing rank unpacks each rank's slice and merges.

    Why a gather and not ``all_reduce``: the packed buffer mixes additive int64 counts, float64 sums (bit-cast)
    and min/max. One ``all_reduce`` applies one op: SUM cannot give min/max, MAX cannot give counts, so exact
    statistics via all_reduce need two collectives (SUM and MAX) on a re-encoded float64 buffer (counts are
    exact in float64 only up to 2**53). A gather is one round trip, exact, and independent of the layout; it
    also lets every rank see every header, which is what makes mismatches fail loudly on all ranks. The cost is
    bandwidth: each rank receives ``world x (header + payload)`` bytes instead of ~``2 x payload`` for a ring
    all-reduce. The payload is about 2.1 KiB per rank-local tensor (one row of 266 int64 words: 6 counts, 4
    floats, 256 bins) plus its units; only rank-local kinds are gathered (weights/grads/updates are not), e.g.
    ~25 KiB per rank for a 5-layer MLP, once per logged step (every 100 steps by default). At hundreds of ranks
    that grows to several MiB per logged step; there, log less often or use fewer kinds.

    Buffer sizes must agree before a gather, and a rank cannot know the others' sizes in advance: the watch keeps
    an agreed capacity (the largest payload of the last logged step, known to all ranks). When a payload does not
    fit — the first logged step, or when the layout grows — the headers of that round say so and all ranks repeat
    the gather with the new capacity: two collectives on such a step, one on every other logged step.

Gradient noise scale (McCandlish et al., "An Empirical Model of Large-Batch Training", 2018, appendix A)
    At logged steps only (nothing is attached on other steps), a ``register_post_accumulate_grad_hook`` per
    parameter records this rank's local squared gradient norm ``|g_r|^2`` before DDP's reducer all-reduces it
    (batch ``B_small = b``), and an end-of-backward callback, chained to run after DDP's own (which finalises
    ``p.grad``), records the squared norm of the all-reduced gradient ``|G|^2`` (batch ``B_big = world * b``);
    both in float64. With ``|G_small|^2`` the mean of ``|g_r|^2`` over ranks and ``|G_big|^2 = |G|^2``::

        grad_sq = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)   # unbiased estimate of |G_true|^2
        trace   = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)             # unbiased estimate of tr(Sigma)
        noise_scale = B_simple = trace / grad_sq

    recorded as scalars ``noise_scale``, ``noise_scale/grad_sq`` and ``noise_scale/trace`` at logged steps. Both
    norms are taken when backward ends, so gradient clipping before ``optimizer.step()`` does not affect them. A
    single step's estimate is very noisy (``grad_sq`` can even be negative); average ``grad_sq`` and ``trace``
    over many steps (McCandlish et al. use exponential moving averages) and divide the averages, e.g.
    ``s = run.scalars; s["noise_scale/trace"].mean() / s["noise_scale/grad_sq"].mean()``. The estimator is
    invariant to the loss scale (sum vs mean). It assumes one synchronising backward per optimizer step
    (micro-batches under ``ddp.no_sync()`` are fine: the local gradient is the accumulated one) and equal
    per-rank batches (with unequal ones ``b`` is their mean, and DDP's average is then not exactly the big-batch
    gradient). ``b``: ``batch_size=`` if given, else the samples this rank fed through the DDP model with
    gradients enabled during the step (dim 0 of its first tensor argument, summed over micro-batches). Not
    recorded with one rank or in a step with several synchronising backward passes.

    Why not a DDP communication hook: DDP allows one per model (it would take the user's slot), it cannot be
    removed, and a Python hook runs at every step — measured ~5 % of a 3 ms step on the benchmark MLP.

When collectives happen — and why nothing of ours can hang
    The watch communicates only (a) once when it opens (all ranks exchange a fingerprint of the schedule and the
    model's parameters plus the writing rank's start step — ranks watching with different settings get a
    ``WatchError`` on every rank; a rank whose watch fails to open, e.g. because its run file cannot be created,
    still takes part with a failure row and raises its own error, and the others raise a ``WatchError`` naming
    it) and (b) at logged steps. Whether a step is logged depends only on the global
    step number (:mod:`gradsight._schedule`), which advances at each ``optimizer.step()``; it is identical on all
    ranks as long as every rank calls ``optimizer.step()`` equally often — which DDP already requires, since every
    synchronising backward is an all-reduce (a ``GradScaler`` that skips a step skips it on all ranks: the
    inf check sees all-reduced gradients). ``close()``, ``flush()``, ``log()`` and the read API are
    collective-free, so a rank that finishes early and closes its watch never blocks the others. What is not
    possible: a rank that stops while the others keep training with DDP hangs in DDP's own all-reduce, watch or
    not; steps the others take under ``ddp.no_sync()`` are fine as long as no logged step falls among them (a
    logged step is a collective: every rank must reach it). Uneven inputs with ``ddp.join()`` are not supported
    (the shadow all-reduces of joined ranks do not take part in the watch's gather).

FSDP
    Sharded models (``fully_shard``, ``FullyShardedDataParallel(use_orig_params=True)``) get the FSDP watch of
    :mod:`._fsdp`, a sibling of :class:`DDPWatch`: both build on :class:`RankedWatch` (ranks, the writing rank,
    the check at open and the one gather per logged step), defined here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import weakref
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..._errors import InputError, WatchError
from ..._schedule import Schedule
from ...store import RunWriter, default_run_path
from ...summary import TensorSummary, merge_all
from ._summary import PackedStats, to_host, unpack
from ._watch import Watch

__all__ = ["REPLICA_RTOL", "DDPWatch", "RankedWatch", "check_rank_args", "distributed_wrapper"]

#: Ranks count as identical when every replica fingerprint agrees to this relative deviation.
REPLICA_RTOL = 1e-6
#: The kinds that are rank-local (merged across ranks); the others are identical replicas.
LOCAL_KINDS = ("output", "output_grad")
_MAGIC = 0x67736464  # "gsdd"
#: First word of a rank's row in the gather at open when its watch failed to open (the others then raise too).
_OPEN_FAILED = 0x67736678  # "gsfx"
# Header: int64 words, then float64 words (bit-cast).
_I_MAGIC, _I_STEP, _I_FP, _I_LEN, _I_BATCH, _I_SYNCS = range(6)
_N_INT = 6
_F_LOCAL, _F_REDUCED, _F_GSUM, _F_GSQ, _F_WSUM, _F_WSQ = range(6)
_N_FLOAT = 6
_HEADER = _N_INT + _N_FLOAT


# ---- detection -----------------------------------------------------------------------------------------------------
def check_rank_args(batch_size: int | None, rank_paths: bool) -> None:
    """Check the data-parallel keyword arguments of ``gradsight.watch`` (their types and values).

    Raises:
        InputError: ``rank_paths`` is not a bool or ``batch_size`` is not a positive int.
    """
    if not isinstance(rank_paths, bool):
        raise InputError(f"rank_paths must be True or False, got {rank_paths!r}.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size must be a positive int (samples per rank per step), got {batch_size!r}.")


def distributed_wrapper(model: nn.Module, *, batch_size: int | None = None, rank_paths: bool = False) -> str | None:
    """``"ddp"`` for a ``DistributedDataParallel`` model, ``None`` for a plain one.

    Sharded models are told apart before this is called (:func:`._fsdp.sharding`).

    Raises:
        InputError: ``batch_size``/``rank_paths`` given for a model that is not DDP, or invalid.
    """
    is_ddp = dist.is_available() and isinstance(model, nn.parallel.DistributedDataParallel)
    check_rank_args(batch_size, rank_paths)
    if not is_ddp and (batch_size is not None or rank_paths):
        raise InputError(
            f"batch_size= and rank_paths= apply to distributed models only (rank_paths= to DistributedDataParallel "
            f"and FSDP, batch_size= to DistributedDataParallel); got a {type(model).__name__}. Wrap it first "
            "(DistributedDataParallel(model)) or drop those arguments."
        )
    return "ddp" if is_ddp else None


# ---- writers ------------------------------------------------------------------------------------------------------
class _DDPRunWriter(RunWriter):
    """A :class:`RunWriter` that remembers each tensor id's name and kind (to tell rank-local packs apart)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.described: dict[int, tuple[str, str]] = {}

    def tensor_id(self, name: str, layer: str, kind: str, shape: Any, dtype: str) -> int:
        tid = super().tensor_id(name, layer, kind, shape, dtype)
        self.described[tid] = (name, kind)
        return tid


class _NullWriter:
    """The writer of a rank that writes no file: assigns tensor ids like :class:`RunWriter`, stores nothing."""

    path = None
    last_step: int | None = None

    def __init__(self) -> None:
        self.described: dict[int, tuple[str, str]] = {}
        self._ids: dict[tuple[str, str], int] = {}
        self.closed = False

    def tensor_id(self, name: str, layer: str, kind: str, shape: Any, dtype: str) -> int:
        tid = self._ids.setdefault((name, kind), len(self._ids) + 1)
        self.described[tid] = (name, kind)
        return tid

    def log_summaries(self, step: int, items: Any) -> None:
        pass

    def log_scalars(self, step: int, values: Any) -> None:
        pass

    def log_signals(self, rows: Any) -> None:
        pass

    def log_event(self, step: int | None, kind: str, payload: Any) -> None:
        pass

    def set_meta(self, key: str, value: Any) -> None:
        pass

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _describe(writer: _DDPRunWriter | _NullWriter, tid: int) -> tuple[str, str]:
    return writer.described[tid]


# ---- the noise-scale hooks (attached for logged steps only) ----------------------------------------------------------
class _LocalGradHook:
    """Post-accumulate-grad hook: |g|^2 of one parameter's local gradient, before DDP's reducer all-reduces it.

    ``register_post_accumulate_grad_hook`` runs inside the AccumulateGrad node, before the node's post-hooks, one of
    which is DDP's reducer hook that copies the gradient into its bucket; so ``p.grad`` is still this rank's own
    (accumulated, with ``no_sync`` micro-batches) gradient. The first hook of a backward queues the end-of-backward
    callbacks that read the all-reduced gradients.
    """

    def __init__(self, wref: Callable[[], DDPWatch | None], index: int) -> None:
        self.wref, self.index = wref, index

    def __call__(self, p: torch.Tensor) -> None:
        w = self.wref()
        if w is None or w._closed or p.grad is None:
            return
        w._local_sq[self.index] = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64).square()
        if not w._cb_queued:
            w._cb_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(w._end_of_backward)


class _BatchHook:
    """Forward pre-hook on the DDP model: counts the step's samples and attaches the noise-scale hooks."""

    def __init__(self, wref: Callable[[], DDPWatch | None]) -> None:
        self.wref = wref

    def __call__(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        w = self.wref()
        if w is None or w._closed or not w._logged or not torch.is_grad_enabled():
            return
        if not w._grad_handles and w._world > 1:
            w._arm_noise()
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is not None and first.dim() > 0:
            w._batch_seen += int(first.shape[0])


def _sum_sq(ts: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all elements of ``ts``, accumulated in float64 (the noise scale subtracts such sums)."""
    dev = ts[0].device
    try:
        norms = torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float64))
    except RuntimeError:  # mixed devices or dtypes
        norms = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64).to(dev) for t in ts])
    return norms.square().sum()


def _gather_fn() -> Callable[..., Any]:
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _crc(obj: Any) -> int:
    return zlib.crc32(json.dumps(obj, sort_keys=True, default=str).encode())


# ---- what the DDP and FSDP watches share ---------------------------------------------------------------------------
class RankedWatch(Watch):
    """A :class:`Watch` opened on every rank of a process group: the writing rank, the check at open, the gather.

    The DDP watch (here) and the FSDP watch (:mod:`._fsdp`) subclass it. A subclass calls :meth:`_init_ranks`
    before ``Watch.__init__`` and :meth:`_sync_start` after it; at logged steps it calls :meth:`_exchange` (the
    one gather) and :func:`_merged_summaries` on the gathered rows. See the module docstring for the protocol.
    """

    _mismatch_event = "ddp_mismatch"
    # The rank-local summaries are gathered in one layout that every rank must share, whatever its batch size:
    # no size-dependent choices (summarised in the hook or later, read in place or copied).
    _now_elements = math.inf
    _pack_in_place = False

    def _on_output_grad(self, tname: str, layer: str, axis: int | None, grad: Any, fwd: Any) -> None:
        """Record dJ/dA for the loss the ranks train together: the mean of their losses (see the module docstring).

        DDP and FSDP average the ranks' parameter gradients, which is the gradient of ``J = (1/world) sum_r J_r``;
        each rank's backward gives dJ_r/dA, so dJ/dA on its slice of the batch is that divided by ``world``.
        Recording it keeps ``output_grad`` and ``grad`` of one run related as in one process (dJ/dW = Aᵀ·dJ/dZ).
        """
        if self._world > 1 and self._logged and "output_grad" in self.schedule.kinds:
            grad = grad.detach() / self._world
        super()._on_output_grad(tname, layer, axis, grad, fwd)

    def _init_ranks(
        self, pg: Any, *, rank_paths: bool, path: str | os.PathLike[str] | None, meta: dict[str, Any]
    ) -> str | os.PathLike[str] | None:
        """Rank, world, writing rank and collective device of ``pg``; returns the path this rank writes to.

        ``meta`` (the run's ``meta["distributed"]``) gets ``backend``, ``world_size``, ``writing_ranks`` and
        ``rank``.
        """
        self._pg = pg
        self._rank = dist.get_rank(pg)
        self._world = dist.get_world_size(pg)
        self._writes = self._rank == 0 or rank_paths
        backend = str(dist.get_backend(pg))
        self._coll_device = (
            torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        )
        self._cap = 0  # agreed payload capacity (int64 words), identical on all ranks
        self._open_gathered = False  # whether this rank took part in the gather at open (see _abort_open)
        self._anomaly_loss = False  # each rank has its own loss: anomalies are judged on identical signals only
        meta.update(
            backend=backend,
            world_size=self._world,
            writing_ranks="all (rank_paths=True)" if rank_paths else [0],
            rank=self._rank,
        )
        self._dmeta = meta
        if not self._writes:
            return os.devnull  # never opened: this rank's writer stores nothing
        if rank_paths:
            base = Path(path) if path is not None else default_run_path()
            base.parent.mkdir(parents=True, exist_ok=True)
            return base if self._rank == 0 else base.with_name(f"{base.stem}.rank{self._rank}{base.suffix}")
        return path

    def _open_writer(self, path: str | os.PathLike[str], meta: dict[str, Any]) -> Any:
        meta["distributed"] = self._dmeta
        if not self._writes:
            return _NullWriter()
        s = self.schedule
        return _DDPRunWriter(path, meta=meta, if_exists=s.if_exists, commit_every=s.commit_every)

    def _sync_start(self, params: list[Any], leaves: list[str], sched: Schedule) -> None:
        """The one collective at open: same schedule and parameters on every rank; agree on the start step.

        Args:
            params: ``(name, global shape, dtype)`` of every parameter, the same on every rank.
            leaves: the leaf modules' names.
            sched: the schedule.
        """
        cfg = {
            "every": sched.every,
            "kinds": list(sched.kinds),
            "units": sched.units,
            "anomaly": [
                sched.anomaly,
                sched.cheap,
                sched.anomaly_factor,
                sched.anomaly_window,
                sched.anomaly_steps,
                sched.anomaly_cooldown,
            ],
            "params": params,
            "leaves": leaves,
        }
        mine = torch.tensor([_MAGIC, _crc(cfg), self._step, int(self._writes)], dtype=torch.int64)
        self._open_gathered = True
        rows = self._all_gather(mine).tolist()
        failed = [rank for rank, r in enumerate(rows) if r[0] == _OPEN_FAILED]
        if failed:
            raise WatchError(
                f"gradsight.watch failed to open on rank(s) {failed} (the error raised there says why), so rank "
                f"{self._rank} does not open it either: every rank raises instead of waiting for the others at a "
                f"collective. Fix the error reported on rank(s) {failed}."
            )
        if any(r[0] != _MAGIC for r in rows) or len({r[1] for r in rows}) > 1:
            raise WatchError(
                f"gradsight.watch({self._dmeta.get('wrapper', 'model')}) was opened with different settings or "
                f"models on different ranks (configuration fingerprints per rank: {[r[1] for r in rows]!r}; this is "
                f"rank {self._rank}, with {cfg['every']=!r}, {cfg['kinds']=!r}, {cfg['units']=!r}, "
                f"{cfg['anomaly']=!r}). Every rank must call gradsight.watch with the same every/kinds/units/anomaly "
                "settings/preset on the same model."
            )
        starts = {r[2] for r in rows if r[3]}
        if len(starts) > 1:
            raise WatchError(
                f"the ranks' run files resume at different steps ({sorted(starts)!r}); with rank_paths=True and "
                "if_exists='append', every rank's file must come from the same run."
            )
        start = rows[0][2]
        if start != self._step:  # a rank without a file resumes where rank 0's file continues
            self._step = start
            was, self._logged = self._logged, self._full_step(start)
            if self._logged and not was:
                self._arm()
            elif was and not self._logged:
                self._disarm()

    def _abort_open(self) -> None:
        """After this rank failed to open its watch: take part in the gather at open with a failure row.

        The other ranks are waiting there (in :meth:`_sync_start`); they read the row and raise a ``WatchError``
        instead of waiting for this rank for ever (or until the process group's timeout). Nothing is done when
        this rank has already taken part, or has no process group yet. This rank then raises its own error.
        """
        if getattr(self, "_open_gathered", False) or getattr(self, "_pg", None) is None:
            return
        self._open_gathered = True
        with contextlib.suppress(Exception):  # the original error matters more than a failed collective
            self._all_gather(torch.tensor([_OPEN_FAILED, 0, 0, 0], dtype=torch.int64))

    def _all_gather(self, send: torch.Tensor) -> np.ndarray:
        send = send.to(self._coll_device)
        recv = send.new_empty(self._world * send.numel())
        _gather_fn()(recv, send, group=self._pg)
        return recv.view(self._world, -1).cpu().numpy()

    def _exchange(self, ints: torch.Tensor, floats: torch.Tensor, payload: torch.Tensor) -> np.ndarray:
        """The gather: one collective, or two when a payload outgrows the agreed capacity (then all ranks agree)."""
        head = torch.cat([ints.to(self._coll_device), floats.to(self._coll_device).view(torch.int64)])
        n = payload.numel()
        while True:
            cap = self._cap
            if n == cap:
                body = payload
            elif n < cap:
                body = torch.cat([payload, payload.new_zeros(cap - n)])
            else:
                body = payload.new_zeros(cap)
            rows = self._all_gather(torch.cat([head, body]))
            self._check_headers(rows)
            lengths = rows[:, _I_LEN]
            need = int(lengths.max())
            if need > cap:
                self._cap = need
                continue
            self._cap = need
            return rows

    def _check_headers(self, rows: np.ndarray) -> None:
        magic, steps, fps, lens = (rows[:, i].tolist() for i in (_I_MAGIC, _I_STEP, _I_FP, _I_LEN))
        if any(m != _MAGIC for m in magic) or len(set(steps)) > 1 or len(set(fps)) > 1 or len(set(lens)) > 1:
            detail = {"step": steps, "layout_fingerprint": fps, "payload_words": lens}
            with_writer = self._writer if self._writes else None
            if with_writer is not None:
                with_writer.log_event(self._step, self._mismatch_event, detail)
            raise WatchError(
                f"the ranks disagree at a logged step (per rank: {detail!r}; this is rank {self._rank}). Every rank "
                "must record the same tensors at the same step: look for rank-dependent control flow in "
                "forward (a module called on some ranks only), a different model or watch settings on one rank, or "
                "ranks that called optimizer.step() a different number of times. gradsight raised this on every "
                "rank instead of merging mismatched statistics."
            )

    # ---- the user's API -----------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's rank in the process group."""
        return self._rank

    @property
    def writes(self) -> bool:
        """Whether this rank writes a run file (rank 0, or every rank with ``rank_paths=True``)."""
        return self._writes

    def _reader(self) -> Any:
        if not self._writes:
            raise WatchError(
                f"rank {self._rank} writes no run file (only rank 0 does); read the run on rank 0, e.g. "
                "`if watch.writes: df = watch.to_pandas()`, or pass rank_paths=True to give every rank its own file."
            )
        return super()._reader()

    def __fspath__(self) -> str:
        if not self._writes:
            raise WatchError(
                f"rank {self._rank} writes no run file (only rank 0 does); see {type(self).__name__}.writes."
            )
        return super().__fspath__()


def _merged_summaries(rows: np.ndarray, layouts: list[Any], own: int) -> list[TensorSummary]:
    """Every rank's summaries of the same tensors (the gathered ``rows``), merged tensor by tensor.

    Args:
        rows: the gathered buffer, one row per rank: header, then the packed statistics of ``layouts``.
        layouts: this rank's layouts of the packed statistics (every rank's have the same rows and units).
        own: this rank (its counts are in its layout; the others' are rebuilt from their fields).
    """
    per_rank: list[list[TensorSummary]] = []
    for r in range(rows.shape[0]):
        arr = rows[r, _HEADER:]
        out: list[TensorSummary] = []
        off = 0
        for lay in layouts:
            ss, off = unpack(arr, lay, off)
            out.extend(ss)
        if r != own:  # counts come from the layout (this rank's numels); rebuild them from the fields
            for s in out:
                s.count = s.zeros + int(s.hist.sum()) + s.nan + s.posinf + s.neginf
                if s.units_active is not None and s.units_active.size:
                    s.units_total = s.count // s.units_active.size
        per_rank.append(out)
    return [merge_all(col) for col in zip(*per_rank, strict=True)]


# ---- the DDP watch ------------------------------------------------------------------------------------------------
class DDPWatch(RankedWatch):
    """A :class:`Watch` on a ``DistributedDataParallel`` model; see the module docstring. Open one on every rank."""

    def __init__(
        self,
        ddp: nn.parallel.DistributedDataParallel,
        *,
        path: str | os.PathLike[str] | None,
        optimizer: torch.optim.Optimizer | None,
        sched: Schedule,
        config: dict[str, Any] | None,
        batch_size: int | None = None,
        rank_paths: bool = False,
        scaler: Any = None,
    ) -> None:
        if not dist.is_initialized():
            raise WatchError(
                "gradsight.watch(ddp_model) needs an initialised process group; call "
                "torch.distributed.init_process_group(...) on every rank first (DDP itself needs it too)."
            )
        self._batch_size = batch_size
        self._local_sq: dict[int, torch.Tensor] = {}
        self._reduced_sq: torch.Tensor | None = None
        self._syncs = 0  # synchronising backward passes seen in this logged step
        self._cb_queued = False
        self._grad_handles: list[Any] = []
        self._batch_seen = 0
        self._ddp_ref = weakref.ref(ddp)
        self._checked = 0
        self._max_dev = 0.0
        self._ddp_handles: list[Any] = []
        module = ddp.module
        self._fp_params = [p for p in dict.fromkeys(module.parameters()) if p.is_floating_point()]
        meta: dict[str, Any] = {
            "wrapper": "DistributedDataParallel",
            "collective": "all_gather_single of one int64 buffer (header + rank-local statistics) per logged step",
            "merged_kinds": list(LOCAL_KINDS),
            "replicated_kinds": ["weight", "grad", "update"],
            "grad": "after DDP's all-reduce (identical on all ranks; not reduced again)",
            "replicas_identical": {
                "verified": None,
                "steps_checked": 0,
                "max_rel_deviation": None,
                "tolerance": REPLICA_RTOL,
                "how": "sum and sum of squares of all gradients and all weights, compared across ranks at each "
                "logged step in the same collective",
            },
        }
        try:
            path = self._init_ranks(ddp.process_group, rank_paths=rank_paths, path=path, meta=meta)
            meta["noise_scale"] = {
                "status": "recorded" if self._world > 1 else "not recorded: world_size is 1",
                "batch_size": batch_size if batch_size is not None else "dim 0 of the model input, per step",
                "estimator": "B_simple, McCandlish et al. 2018 (appendix A); see gradsight.frameworks.torch._ddp",
            }
            super().__init__(module, path=path, optimizer=optimizer, sched=sched, config=config, scaler=scaler)
        except Exception:
            self._abort_open()
            raise
        try:
            wref = weakref.ref(self)
            self._ddp_handles.append(ddp.register_forward_pre_hook(_BatchHook(wref), with_kwargs=True))
            params = [(n, list(p.shape), str(p.dtype)) for n, p in module.named_parameters()]
            leaves = [n for n, m in module.named_modules() if next(iter(m.children()), None) is None]
            self._sync_start(params, leaves, sched)
        except BaseException as exc:
            if isinstance(exc, Exception):
                self._abort_open()
            self.close()
            raise
        self._writer.set_meta("distributed", self._dmeta)

    # ---- set-up -------------------------------------------------------------------------------------------------
    def _arm_noise(self) -> None:
        wref = weakref.ref(self)
        for i, p in enumerate(self._fp_params):
            if p.requires_grad:
                self._grad_handles.append(p.register_post_accumulate_grad_hook(_LocalGradHook(wref, i)))

    def _disarm_noise(self) -> None:
        for h in self._grad_handles:
            h.remove()
        self._grad_handles.clear()

    def _end_of_backward(self) -> None:
        """First end-of-backward callback: queue the second, which runs after DDP's own (it finalises p.grad)."""
        torch.autograd.Variable._execution_engine.queue_callback(self._after_reduction)

    def _after_reduction(self) -> None:
        self._cb_queued = False
        ddp = self._ddp_ref()
        if self._closed or ddp is None or not ddp.require_backward_grad_sync:  # a no_sync micro-batch
            return
        self._syncs += 1
        grads = [p.grad.detach() for p in self._fp_params if p.grad is not None and p.grad.layout == torch.strided]
        if grads:
            self._reduced_sq = _sum_sq(grads)

    # ---- the logged step ----------------------------------------------------------------------------------------
    def _host_summaries(self, packs: list[tuple[list[int], PackedStats]]) -> Callable[[], list[TensorSummary]]:
        step = self._step
        is_local = []
        for tids, _ in packs:
            kinds = {_describe(self._writer, t)[1] in LOCAL_KINDS for t in tids}
            if len(kinds) > 1:  # pragma: no cover - packs are per kind family by construction
                raise WatchError("internal: a pack mixes rank-local and replicated tensors")
            is_local.append(kinds == {True})
        local = [p for (_, p), loc in zip(packs, is_local, strict=True) if loc]
        layouts = [lay for p in local for lay in p.layouts]
        payload = PackedStats.concat(local).buf.to(self._coll_device) if local else None
        if payload is None:
            payload = torch.zeros(0, dtype=torch.int64, device=self._coll_device)
        local_tids = [t for (ts, _), loc in zip(packs, is_local, strict=True) if loc for t in ts]
        fingerprint = _crc(
            [
                [_describe(self._writer, t) for t in local_tids],
                [[lay.groups, [None if u is None else u[0] for u in lay.units]] for lay in layouts],
            ]
        )
        batch = self._batch_size if self._batch_size is not None else self._batch_seen
        ints = torch.tensor([_MAGIC, step, fingerprint, payload.numel(), batch, self._syncs], dtype=torch.int64)
        rows = self._exchange(ints, self._floats(), payload)
        self._disarm_noise()
        self._local_sq, self._reduced_sq, self._syncs, self._batch_seen = {}, None, 0, 0
        self._after_gather(step, rows)

        if not self._writes:
            return list
        replicated = [p for (_, p), loc in zip(packs, is_local, strict=True) if not loc]
        rep_finish = to_host(PackedStats.concat(replicated)) if replicated else list
        own, n_local = self._rank, len(local_tids)

        def finish() -> list[TensorSummary]:
            merged = iter(_merged_summaries(rows, layouts, own) if n_local else [])
            reps = iter(rep_finish())
            result: list[TensorSummary] = []
            for (tids, _), loc in zip(packs, is_local, strict=True):
                src = merged if loc else reps
                result.extend(next(src) for _ in tids)
            return result

        return finish

    def _floats(self) -> torch.Tensor:
        """The float64 header words: noise-scale norms and replica fingerprints (on the parameters' device)."""
        dev = self._fp_params[0].device if self._fp_params else self._coll_device
        nan = torch.tensor(math.nan, dtype=torch.float64, device=dev)

        def sums(ts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            if not ts:
                return nan, nan
            return torch.stack([t.sum(dtype=torch.float64).to(dev) for t in ts]).sum(), _sum_sq(ts).to(dev)

        grads = [p.grad.detach() for p in self._fp_params if p.grad is not None and p.grad.layout == torch.strided]
        g_sum, g_sq = sums(grads)
        w_sum, w_sq = sums([p.detach() for p in self._fp_params])
        local = torch.stack([v.to(dev) for v in self._local_sq.values()]).sum() if self._local_sq else nan
        reduced = nan if self._reduced_sq is None else self._reduced_sq.to(dev)
        return torch.stack([local, reduced, g_sum, g_sq, w_sum, w_sq]).to(torch.float64)

    def _after_gather(self, step: int, rows: np.ndarray) -> None:
        """Replica check and noise scale from the gathered headers (cheap numpy on every rank)."""
        f = np.ascontiguousarray(rows[:, _N_INT:_HEADER]).view(np.float64)
        ref = f[0, _F_GSUM:]
        scale = np.maximum(np.abs(ref), np.finfo(np.float64).tiny)
        dev_all = np.abs(f[:, _F_GSUM:] - ref) / scale
        dev = float(np.nanmax(dev_all)) if np.isfinite(ref).any() else 0.0
        self._checked += 1
        self._max_dev = max(self._max_dev, dev)
        rep = self._dmeta["replicas_identical"]
        rep.update(verified=self._max_dev <= REPLICA_RTOL, steps_checked=self._checked, max_rel_deviation=self._max_dev)
        if not self._writes:
            return
        if dev > REPLICA_RTOL:
            names = ["grad_sum", "grad_sum_sq", "weight_sum", "weight_sum_sq"]
            self._writer.log_event(
                step,
                "ddp_replicas_differ",
                {"max_rel_deviation": dev, "per_rank": {n: f[:, _F_GSUM + i].tolist() for i, n in enumerate(names)}},
            )
        self._writer.set_meta("distributed", self._dmeta)

        batches = rows[:, _I_BATCH].astype(np.float64)
        local, reduced = f[:, _F_LOCAL], f[0, _F_REDUCED]
        ok = (
            self._world > 1
            and (rows[:, _I_SYNCS] == 1).all()
            and (batches > 0).all()
            and np.isfinite(local).all()
            and math.isfinite(reduced)
        )
        if not ok:
            return
        b_small = float(batches.mean())
        b_big = self._world * b_small
        g_small, g_big = float(local.mean()), float(reduced)
        grad_sq = (b_big * g_big - b_small * g_small) / (b_big - b_small)
        trace = (g_small - g_big) / (1.0 / b_small - 1.0 / b_big)
        noise = trace / grad_sq if grad_sq != 0.0 else math.nan
        self.log(step=step, **{"noise_scale": noise, "noise_scale/grad_sq": grad_sq, "noise_scale/trace": trace})

    def _release(self) -> None:
        """Remove the DDP hooks too; closing is collective-free: safe on a rank that finishes early."""
        for h in self._ddp_handles:
            h.remove()
        self._ddp_handles.clear()
        self._disarm_noise()
        super()._release()
