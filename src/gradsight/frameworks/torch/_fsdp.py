"""``gradsight.watch(fsdp_model)``: exact global statistics of sharded models (FSDP2 ``fully_shard``, FSDP1).

Call ``gradsight.watch(model, optimizer=opt, path="run.db")`` on **every** rank, after
``torch.distributed.init_process_group`` and after sharding the model (``fully_shard`` on the submodules and the
root, or ``FullyShardedDataParallel(model, use_orig_params=True)``), with the optimizer built on the sharded
parameters. Rank 0 of the sharding process group writes the run file (``rank_paths=True``: every rank its own
copy); the others write nothing (their ``watch.path`` is ``None``), exactly as under DDP (:mod:`._ddp`).

What is recorded, and how it is merged
    Every kind is rank-local under FSDP, and every kind is merged with :func:`gradsight.summary.merge` across
    ranks into the summary of the whole tensor:

    * ``weight`` — each rank summarises its shard of the parameter as the optimizer holds it (the sharded
      parameter: the DTensor's local shard under FSDP2, the original parameter's view into the local flat shard
      under FSDP1). The shards partition the parameter's elements (FSDP's padding is not part of them), so the
      merge is the summary of the full parameter: counts and histogram bins exactly, ``sum``/``sum_sq`` to
      float64 rounding, min/max exactly. With a mixed-precision policy (``MixedPrecisionPolicy(param_dtype=
      torch.bfloat16)``, FSDP1 ``MixedPrecision``) this is the float32 **master** shard, not the low-precision
      unsharded copy that forward and backward use; with CPU offload it is the shard on the CPU.
    * ``grad`` — the reduce-scattered gradient shard the optimizer sees (after FSDP's averaging over ranks; with
      a mixed-precision ``reduce_dtype`` already cast back to the master dtype). With gradient accumulation under
      ``set_requires_gradient_sync(False)`` (FSDP2) or ``no_sync()`` (FSDP1) it is the gradient of the
      synchronising micro-batch, which carries the accumulated sum.
    * ``update`` — ``W_after - W_before`` of each rank's shard around ``optimizer.step()``.
    * ``output``, ``output_grad`` — rank-local batches, as under DDP: each rank summarises its own slice of the
      batch, merged over the global batch (outputs of a mixed-precision forward are in ``param_dtype``, and are
      summarised exactly: bfloat16/float16 are upcast to float32, which is exact).

    Tensor names are the model's own, unsharded names (``0.weight``; FSDP1's ``_fsdp_wrapped_module``
    components are removed) and the recorded shapes are the **global** shapes, so a run reads like a
    single-process run of the same model. Layer outputs are recorded with each rank's local shape (its slice of
    the batch). A rank whose shard holds no element of a parameter (a parameter smaller than the world, or,
    under FSDP1, one that falls entirely into other ranks' parts of the flat parameter) contributes an empty
    summary — FSDP1 leaves such a parameter's ``.grad`` at ``None`` on that rank while its flat parameter has a
    gradient, and the watch counts it as an empty gradient so that every rank records the same tensors.

The collectives
    *At logged steps* (every ``every`` steps, and in anomaly captures): one ``all_gather_single`` of one int64
    buffer per rank — a fixed header (step, layout fingerprint, payload length) plus the packed statistics of
    every recorded tensor (one row of 266 int64 words, 2,128 bytes, per tensor and kind, plus per-unit counts for
    layer outputs) — the same protocol and checks as DDP (:class:`._ddp.RankedWatch`). Each rank receives
    ``world x (96 + payload)`` bytes. Under FSDP the weights, gradients and updates travel too (under DDP they
    are replicated and do not): ``3 x 2,128`` bytes more per parameter tensor.

    *At every step* (the per-step signals, ``cheap=True``): the norms of the sharded tensors are partial. Each rank
    computes the squared L2 norms of its gradient, weight and update shards (``torch._foreach_norm`` on the local
    shards, as the single-process watch does on whole tensors) and the watch sums them over ranks with **one**
    ``all_reduce(SUM)`` of one float64 vector per step, then takes square roots: ``grad_norm/<t>`` is
    ``sqrt(sum over ranks of |g_r|^2)``, the norm of the whole gradient — never a mean of rank norms. The vector
    has ``4 N + 2 M + 3`` entries (N parameters: squared gradient norm, squared pre-clip norm, non-finite count,
    has-a-gradient flag; M parameters held by the optimizer: squared weight and update norms; three flags),
    ``8 x (4 N + 2 M + 3)`` bytes: 248 bytes for the 6-tensor benchmark MLP, about 6.5 KiB for a 200-tensor
    transformer, in one small collective per step next to FSDP's own all-gathers and reduce-scatters of the full
    parameters. The result is bit-identical on every rank (an all-reduce's result is), so every rank feeds the
    anomaly detector the same values and decides the same captures: a captured step is a logged step, and every
    rank reaches its gather. ``preset="cheap"`` with ``cheap=False`` (no per-step signals) has no per-step
    collective. A logged step has both: the all-reduce at the end of the optimizer step, then the gather.

    Detecting clipping: a DTensor gradient changed in place by ``clip_grad_norm_`` (a ``_foreach_mul_``) bumps
    no version counter — neither the DTensor's nor its local shard's — so the single-process test "same tensor,
    same version since backward" cannot tell a clipped gradient from an untouched one. The FSDP watch therefore
    measures the gradient norms again at the start of every optimizer step (one more ``_foreach_norm`` over the
    local shards, 1/world of the gradient) and compares values: ``grad_norm_preclip/<t>`` and ``clip_ratio``
    appear where they differ, as in a single process.

    The end of backward: FSDP's gradients are final only after its own end-of-backward callback has waited for
    the reduce-scatter, and autograd accumulates into FSDP's unsharded parameters, not into the sharded ones that
    the model exposes, so the single-process post-accumulate-grad hooks never fire. The FSDP watch hooks the
    gradients of the outputs of the model and of every FSDP module instead (a tensor hook per floating-point
    output of each training forward; FSDP modules because they always run through ``__call__``, which the model
    may not: Lightning's ``ModelParallelStrategy`` calls ``training_step`` directly): the first one to fire in a
    backward pass queues the same end-of-backward callback, which runs after FSDP's.

When collectives happen — no hang of our making
    As under DDP: one all-gather at open (settings, parameter names, global shapes and dtypes, start step: ranks
    that differ get a ``WatchError`` on every rank); then per step (the all-reduce) and at logged steps (the
    gather), both decided by the global step number and by values identical on every rank. ``close()``,
    ``flush()``, ``log()`` and reads are collective-free, so a rank that raises and closes its watch returns at
    once; the other ranks then fail in FSDP's next collective (or the process group's timeout), as they would
    without the watch. A rank whose recorded tensors differ from the others' at a logged step (rank-dependent
    control flow) gets a ``WatchError`` on every rank (event ``fsdp_mismatch``).

Not recorded under FSDP
    The gradient noise scale (it needs each rank's gradient before the reduce-scatter: FSDP's unsharded
    gradients, internal to FSDP). Scalars passed to ``watch.log`` are the writing rank's own (log a reduced loss
    for the global one); the loss is not an anomaly signal, since it differs between ranks.

Refused, with :class:`gradsight.UnsupportedError` (see :func:`sharding`)
    ``FullyShardedDataParallel`` without ``use_orig_params=True`` (its parameters are flat, padded
    ``FlatParameter`` shards with no per-tensor gradient), FSDP1 ``NO_SHARD`` and hybrid sharding and FSDP2
    meshes with more than one dimension (HSDP, FSDP with tensor parallelism: shards are replicated over a second
    mesh dimension, and the merge would count them several times), DTensor parameters without FSDP (tensor
    parallelism), models mixing sharded and unsharded floating-point parameters, and DeepSpeed (ZeRO partitions
    parameters, gradients and optimizer state inside its engine, whose step is not a ``torch.optim`` step on the
    model's parameters).
"""

from __future__ import annotations

import math
import os
import sys
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..._errors import UnsupportedError, WatchError
from ..._schedule import KINDS, Schedule
from ...summary import TensorSummary
from ._ddp import _HEADER, _MAGIC, _N_FLOAT, RankedWatch, _crc, _describe, _merged_summaries
from ._signals import Backward, StepRecord
from ._summary import Flat, PackedStats
from ._watch import _JOIN_ELEMENTS, _EndBackward, _is_float, _output_items

__all__ = ["FSDPWatch", "sharding"]

#: Module names that wrappers insert into parameter and module names (FSDP1, activation checkpointing, compile).
_WRAPPER_NAMES = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


# ---- what kind of sharding, or a refusal --------------------------------------------------------------------------
def _is_dtensor(t: Any) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(t, cls)


def _fsdp1_class() -> type | None:
    if "torch.distributed.fsdp" not in sys.modules:  # a model can only be sharded if the user imported FSDP
        return None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return None
    return FullyShardedDataParallel


def _fsdp2_class() -> type | None:
    if "torch.distributed.fsdp" not in sys.modules:
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return None
    return FSDPModule


def _refuse(what: str, why: str) -> UnsupportedError:
    return UnsupportedError(
        f"gradsight.watch does not support {what}: {why} Supported: DistributedDataParallel, FSDP2 (fully_shard over "
        "a 1-D device mesh) and FSDP1 (FullyShardedDataParallel with use_orig_params=True and FULL_SHARD or "
        "SHARD_GRAD_OP); or watch the unwrapped model in a single process."
    )


def _refuse_deepspeed(model: nn.Module) -> None:
    engine = type(model).__name__ == "DeepSpeedEngine" or type(model).__module__.split(".")[0] == "deepspeed"
    if engine or any(hasattr(p, "ds_id") for p in model.parameters()):
        raise _refuse(
            "DeepSpeed (ZeRO)",
            "ZeRO partitions parameters, gradients and optimizer states inside the DeepSpeed engine (flat fp32 "
            "partitions updated by the engine's own step, not by a torch.optim step on the model's parameters), so "
            "gradsight sees neither the partitioned gradients nor the step that closes a training step.",
        )


def _check_fsdp1(modules: list[nn.Module]) -> None:
    for m in modules:
        if not getattr(m, "_use_orig_params", False):
            raise _refuse(
                "FullyShardedDataParallel without use_orig_params=True",
                "its parameters are flat, padded FlatParameter shards that mix many tensors, with no per-tensor "
                "weight or gradient to summarise. Pass use_orig_params=True (the model's own parameters then "
                "stay visible as views of the local shard), or use FSDP2 (torch.distributed.fsdp.fully_shard).",
            )
        strategy = str(getattr(m, "sharding_strategy", ""))
        if "NO_SHARD" in strategy or "HYBRID" in strategy:
            raise _refuse(
                f"FullyShardedDataParallel with {strategy}",
                "parameters are replicated across (a group of) ranks, so merging every rank's copy would count "
                "each element several times. Use FULL_SHARD or SHARD_GRAD_OP, or DistributedDataParallel for "
                "replicated parameters.",
            )


def _check_fully_shard(model: nn.Module) -> None:
    """Every floating-point parameter a DTensor sharded over one common 1-D mesh."""
    mesh = None
    plain = []
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        if not _is_dtensor(p):
            plain.append(name)
            continue
        if p.device_mesh.ndim != 1 or not all(pl.is_shard() for pl in p.placements):
            raise _refuse(
                f"parameter {name!r} placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D device mesh",
                "hybrid sharding (HSDP) and FSDP combined with tensor parallelism replicate or split shards over "
                "a second mesh dimension, and gradsight merges shards over one dimension only.",
            )
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise _refuse(f"parameters on different device meshes ({name!r})", "gradsight merges over one mesh.")
    if plain:
        raise _refuse(
            f"a model mixing sharded and unsharded parameters (unsharded: {plain[:3]!r})",
            "the unsharded ones would be counted once per rank. Call fully_shard on the root module too, so that "
            "every parameter is sharded.",
        )


def sharding(model: nn.Module) -> str | None:
    """``"fully_shard"`` (FSDP2), ``"fsdp1"`` (FSDP1 with ``use_orig_params=True``), or ``None`` (not sharded).

    Raises:
        UnsupportedError: a sharding gradsight cannot merge exactly (see the module docstring).
    """
    if not dist.is_available():
        return None
    fsdp1 = _fsdp1_class()
    if fsdp1 is not None:
        wrapped = [m for m in model.modules() if isinstance(m, fsdp1)]
        if wrapped:
            _check_fsdp1(wrapped)
            return "fsdp1"
    _refuse_deepspeed(model)
    fsdp2 = _fsdp2_class()
    is_fsdp2 = fsdp2 is not None and any(isinstance(m, fsdp2) for m in model.modules())
    if not is_fsdp2:
        dtensors = [n for n, p in model.named_parameters() if _is_dtensor(p)]
        if dtensors:
            raise _refuse(
                f"DTensor parameters without FSDP ({dtensors[:3]!r}: tensor parallelism?)",
                "their shards are split or replicated by a parallelism plan that gradsight does not merge.",
            )
        return None
    _check_fully_shard(model)
    return "fully_shard"


# ---- the sharded view of the model ------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local shard of a DTensor (its own storage, no copy, no collective); other tensors as they are."""
    local = getattr(t, "_local_tensor", None)
    if isinstance(local, torch.Tensor):
        return local
    if _is_dtensor(t):  # pragma: no cover - a DTensor without _local_tensor (a future torch)
        with torch.no_grad():
            return t.to_local()
    return t


def _clean(name: str) -> str:
    """A parameter or module name without FSDP1's (and activation checkpointing's) wrapper components."""
    return ".".join(c for c in name.split(".") if c not in _WRAPPER_NAMES)


def _fsdp1_params(model: nn.Module) -> dict[int, tuple[tuple[int, ...], Any]]:
    """FSDP1 (``use_orig_params=True``): every original parameter's global shape and flat parameter, by ``id``.

    Outside forward/backward each original parameter is a 1-D view of its part of the local flat shard (empty
    when the shard holds none of it); its shape is in the flat parameter's metadata (``_params`` and ``_shapes``,
    in the same order).
    """
    out: dict[int, tuple[tuple[int, ...], Any]] = {}
    for m in model.modules():
        handle = getattr(m, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if flat is None:
            continue
        for p, shape in zip(getattr(flat, "_params", None) or [], getattr(flat, "_shapes", None) or [], strict=False):
            out[id(p)] = (tuple(int(d) for d in shape), flat)
    return out


def _sharded_modules(model: nn.Module) -> list[nn.Module]:
    """The model and its FSDP modules: where the output hooks that detect a backward pass go.

    FSDP modules are always called through ``__call__`` (FSDP's own hooks depend on it), while the model itself
    may not be: Lightning calls ``training_step`` directly under ``ModelParallelStrategy``.
    """
    classes = tuple(c for c in (_fsdp1_class(), _fsdp2_class()) if c is not None)
    return [model, *(m for m in model.modules() if m is not model and isinstance(m, classes))]


def _process_group(model: nn.Module, kind: str) -> Any:
    if kind == "fully_shard":
        p = next(p for p in model.parameters() if _is_dtensor(p))
        return p.device_mesh.get_group()
    fsdp1 = _fsdp1_class()
    root = next(m for m in model.modules() if fsdp1 is not None and isinstance(m, fsdp1))
    return root.process_group


def _policies(model: nn.Module, kind: str) -> dict[str, Any]:
    """What the run's meta says about mixed precision and CPU offload (best effort, from FSDP's state)."""
    mp: Any = None
    offload: Any = None
    if kind == "fully_shard":
        root = next((m for m in model.modules() if hasattr(m, "_get_fsdp_state")), None)
        state = root._get_fsdp_state() if root is not None else None
        group = getattr(state, "_fsdp_param_group", None)
        mp, offload = getattr(group, "mp_policy", None), getattr(group, "offload_policy", None)
        offload = None if offload is None or type(offload).__name__ == "OffloadPolicy" else offload
    else:
        mp = getattr(model, "mixed_precision", None)
        offload = getattr(model, "cpu_offload", None)
        offload = offload if getattr(offload, "offload_params", False) else None
    if mp is not None and all(getattr(mp, k, None) is None for k in ("param_dtype", "reduce_dtype", "buffer_dtype")):
        mp = None  # the default policy: no mixed precision
    return {
        "mixed_precision": None if mp is None else repr(mp),
        "cpu_offload": None if offload is None else repr(offload),
        "weight_recorded": "the sharded parameter the optimizer updates (under a mixed-precision policy the float32 "
        "master shard, not the low-precision unsharded copy used in forward/backward)",
    }


# ---- hooks --------------------------------------------------------------------------------------------------------
class _OutputGradSeen:
    """Tensor hook on a model output: the backward pass has started; queue the end-of-backward callback once."""

    def __init__(self, wref: Callable[[], FSDPWatch | None]) -> None:
        self.wref = wref

    def __call__(self, grad: torch.Tensor) -> None:
        w = self.wref()
        if w is None or w._closed or w._bw_queued:
            return
        w._bw_queued = True
        torch.autograd.Variable._execution_engine.queue_callback(_EndBackward(self.wref))  # type: ignore[arg-type]


class _RootOutputs:
    """Forward hook on the model: hook the gradients of its floating-point outputs (see the module docstring)."""

    def __init__(self, wref: Callable[[], FSDPWatch | None]) -> None:
        self.wref = wref

    def __call__(self, module: nn.Module, args: Any, out: Any) -> None:
        w = self.wref()
        if w is None or w._closed or w._frozen or not torch.is_grad_enabled():
            return
        items = [t for _, t in _output_items(out)]
        if not items and isinstance(out, dict):  # e.g. a Hugging Face ModelOutput
            items = [v for v in out.values() if _is_float(v)]
        hook = _OutputGradSeen(self.wref)
        for t in items:
            if t.requires_grad:
                t.register_hook(hook)


class _Recheck(Backward):
    """The end of a backward pass under FSDP: in-place changes of sharded gradients are invisible to versions.

    ``clip_grad_norm_`` on DTensor gradients bumps no version counter, so "unchanged" is never assumed: the
    watch measures the gradients again at the optimizer step and compares the values (see the module docstring).
    """

    __slots__ = ()

    def unchanged(self, names: tuple[str, ...], grads: Any) -> bool:
        return False


# ---- the per-step signals, summed over ranks ----------------------------------------------------------------------
class _SignalLayout:
    """The fixed layout of the per-step all-reduce vector (the same on every rank; see the module docstring)."""

    def __init__(self, names: tuple[str, ...], update_names: tuple[str, ...]) -> None:
        self.names = names
        self.update_names = update_names
        self.n, self.m = len(names), len(update_names)
        self.index = {n: i for i, n in enumerate(names)}
        self.size = 4 * self.n + 2 * self.m + 3
        self._idx: dict[Any, Any] = {}
        self._present: dict[tuple[int, ...], tuple[str, ...]] = {}

    def index_of(self, names: tuple[str, ...], device: torch.device | None) -> Any:
        """The positions of ``names`` in the layout: a numpy array (``device=None``) or a device tensor (cached)."""
        key = (names, device)
        idx = self._idx.get(key)
        if idx is None:
            pos = [self.index[n] for n in names]
            idx = np.array(pos, dtype=np.int64) if device is None else torch.tensor(pos, device=device)
            self._idx[key] = idx
        return idx

    def vector(self, rec: StepRecord) -> torch.Tensor:
        """This rank's squared norms, counts and flags of ``rec``: float64, on the device of its values."""
        values = (rec.grad, rec.preclip, rec.counts, rec.weight, rec.update)
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
        if device is None:  # host lists (CPU training): numpy, no kernel launches
            v = np.zeros(self.size)
            arr: Callable[[Any], Any] = lambda x: np.asarray(x, dtype=np.float64)  # noqa: E731
        else:
            v = torch.zeros(self.size, dtype=torch.float64, device=device)
            arr = lambda x: _as64(x, device)  # noqa: E731
        n, m = self.n, self.m
        if rec.grad_names and rec.grad is not None:
            idx = self.index_of(rec.grad_names, device)
            g = arr(rec.grad)
            v[idx] = g * g
            p = g if rec.preclip is None else arr(rec.preclip)
            v[n + idx] = p * p
            if rec.counts is not None:
                v[2 * n + idx] = arr(rec.counts)
            v[3 * n + idx] = 1.0
        tail = 4 * n
        if rec.weight is not None and rec.param_names == self.update_names:
            w = arr(rec.weight)
            v[tail : tail + m] = w * w
            v[-3] = 1.0
            if rec.update is not None:
                u = arr(rec.update)
                v[tail + m : tail + 2 * m] = u * u
                v[-2] = 1.0
        v[-1] = 1.0 if rec.preclip is not None else 0.0
        return torch.from_numpy(v) if isinstance(v, np.ndarray) else v

    def fill(self, rec: StepRecord, vals: list[float], world: int) -> None:
        """Put the summed vector's norms (square roots) into ``rec``: host lists, the same on every rank."""
        n, m = self.n, self.m
        present = tuple(i for i in range(n) if vals[3 * n + i] > 0)
        names = self._present.get(present)
        if names is None:
            names = self._present[present] = tuple(self.names[i] for i in present)
        rec.grad_names = names
        rec.grad = [math.sqrt(vals[i]) for i in present] if present else None
        pre = [math.sqrt(vals[n + i]) for i in present]
        rec.preclip = pre if present and vals[-1] > 0 else None
        counts = [vals[2 * n + i] for i in present]
        rec.counts = counts if any(counts) else None
        tail = 4 * n
        if vals[-3] == world:  # every rank measured the weights (it always does, with an optimizer)
            rec.param_names = self.update_names
            rec.weight = [math.sqrt(x) for x in vals[tail : tail + m]]
            rec.update = [math.sqrt(x) for x in vals[tail + m : tail + 2 * m]] if vals[-2] == world else None
        else:
            rec.param_names, rec.weight, rec.update = (), None, None


def _as64(v: Any, device: torch.device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(device, torch.float64).reshape(-1)
    return torch.tensor(v, dtype=torch.float64, device=device)


class _ReducedRecord(StepRecord):
    """A step's signals summed over ranks, still on the device (accelerators: read one step late, like any)."""

    __slots__ = ("layout", "reduced", "world")

    def __init__(self, rec: StepRecord, layout: _SignalLayout, reduced: torch.Tensor, world: int) -> None:
        super().__init__(rec.step)
        self.lr, self.skipped, self.scale = rec.lr, rec.skipped, rec.scale
        self.layout, self.reduced, self.world = layout, reduced, world

    def device_parts(self) -> list[tuple[str, torch.Tensor]]:
        parts = [("reduced", self.reduced)] if self.reduced is not None else []
        return parts + [(k, v) for k, v in super().device_parts() if k == "scale"]

    def to_host(self, values: dict[str, list[float]]) -> None:
        reduced = values.pop("reduced", None)
        if reduced is not None:
            self.reduced = None  # type: ignore[assignment]
            self.layout.fill(self, reduced, self.world)
        super().to_host(values)


# ---- the watch ----------------------------------------------------------------------------------------------------
class FSDPWatch(RankedWatch):
    """A :class:`Watch` on a sharded model (FSDP2 or FSDP1); see the module docstring. Open one on every rank."""

    _mismatch_event = "fsdp_mismatch"

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str,
        path: str | os.PathLike[str] | None,
        optimizer: torch.optim.Optimizer | None,
        sched: Schedule,
        config: dict[str, Any] | None,
        rank_paths: bool = False,
        scaler: Any = None,
    ) -> None:
        if not dist.is_initialized():
            raise WatchError(
                "gradsight.watch(fsdp_model) needs an initialised process group; call "
                "torch.distributed.init_process_group(...) on every rank first (FSDP itself needs it too)."
            )
        self._kind = kind
        self._fsdp_handles: list[Any] = []
        self._gathers = 0
        self._flat1 = _fsdp1_params(model) if kind == "fsdp1" else {}
        self._shapes1 = {k: shape for k, (shape, _) in self._flat1.items()}
        wrapper = "fully_shard (FSDP2)" if kind == "fully_shard" else "FullyShardedDataParallel (use_orig_params=True)"
        meta: dict[str, Any] = {
            "wrapper": wrapper,
            "collective": "per logged step: all_gather_single of one int64 buffer (header + every recorded "
            "tensor's packed statistics); per step: one all_reduce(SUM) of a float64 vector of squared shard norms",
            "merged_kinds": list(KINDS),
            "sharded_kinds": ["weight", "grad", "update"],
            "replicated_kinds": [],
            "grad": "the reduce-scattered gradient shard the optimizer sees, summarised per rank and merged",
            "per_step_signals": "sqrt of the sum over ranks of squared shard norms (one all_reduce per step)",
            **_policies(model, kind),
            "noise_scale": {"status": "not recorded under FSDP (needs the gradients before the reduce-scatter)"},
        }
        try:
            path = self._init_ranks(_process_group(model, kind), rank_paths=rank_paths, path=path, meta=meta)
            super().__init__(model, path=path, optimizer=optimizer, sched=sched, config=config, scaler=scaler)
        except Exception:
            self._abort_open()
            raise
        try:
            self._signals = _SignalLayout(tuple(n for n, _ in self._params), tuple(n for n, _ in self._update_params))
            meta["per_step_bytes"] = 8 * self._signals.size if sched.cheap else 0
            if sched.cheap:  # the model and every FSDP module: whichever runs through __call__ (see _sharded_modules)
                hook = _RootOutputs(weakref.ref(self))
                self._fsdp_handles.extend(m.register_forward_hook(hook) for m in _sharded_modules(model))
            # the local shards do not require grad (the DTensors do): name the frozen parameters from the model's
            self._writer.set_meta("frozen", [n for n, p in self._dparams if not p.requires_grad])
            params = [(n, list(self._gshape[n]), str(p.dtype)) for n, p in self._dparams]
            leaves = [n for n, _ in self._leaves]
            self._sync_start(params, leaves, sched)
        except BaseException as exc:
            if isinstance(exc, Exception):
                self._abort_open()
            self.close()
            raise
        self._writer.set_meta("distributed", self._dmeta)

    # ---- the model: local shards under the original names, global shapes ------------------------------------------
    def _collect_params(self, model: nn.Module) -> tuple[dict[str, list[str]], dict[str, str]]:
        aliases, skipped = super()._collect_params(model)
        named = [(_clean(n), p) for n, p in self._params]
        self._dparams: list[tuple[str, nn.Parameter]] = named  # the model's parameters (DTensors under FSDP2)
        self._gshape = {n: tuple(self._shapes1.get(id(p), p.shape)) for n, p in named}
        self._gnumel = {n: math.prod(s) for n, s in self._gshape.items()}
        self._params = [(n, _local(p)) for n, p in named]  # type: ignore[misc]
        aliases = {_clean(k): [_clean(v) for v in vs] for k, vs in aliases.items()}
        return aliases, {_clean(k): v for k, v in skipped.items()}

    def _collect_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
        local, self._params = self._params, self._dparams  # the optimizer holds the model's parameters
        try:
            meta = super()._collect_optimizer(model, optimizer)
        finally:
            self._params = local
        to_local = {id(p): t for (_, p), (_, t) in zip(self._dparams, local, strict=True)}
        self._update_params = [(n, to_local[id(p)]) for n, p in self._update_params]  # type: ignore[misc]
        return meta

    def _collect_layers(self, model: nn.Module) -> list[dict[str, Any]]:
        layers = super()._collect_layers(model)
        if self._kind != "fsdp1":
            return layers
        # FSDP1: the wrappers are no layers, names lose their prefixes, shapes are the global ones
        wrapper = _fsdp1_class()
        self._leaves = [(_clean(n) or "model", m) for n, m in self._leaves]
        layers = []
        for name, mod in model.named_modules():
            own = dict(mod.named_parameters(recurse=False))
            leaf = next(iter(mod.children()), None) is None
            if (leaf or own) and not (wrapper is not None and isinstance(mod, wrapper)):
                shapes = {k: list(self._shapes1.get(id(v), v.shape)) for k, v in own.items()}
                layers.append({"name": _clean(name) or "model", "type": type(mod).__name__, "params": shapes})
        return layers

    def _grads(self) -> list[tuple[str, torch.Tensor]]:
        out = []
        for n, p in self._dparams:
            g = p.grad
            if g is None and self._flat1 and p.requires_grad and p.numel() == 0:
                flat = self._flat1.get(id(p), (None, None))[1]
                if flat is not None and flat.grad is not None:  # FSDP1: this rank holds none of it, others do
                    g = p.detach()
            if g is not None and g.layout == torch.strided:
                out.append((n, _local(g)))
        return out

    def _param_pack(self, named: list[tuple[str, torch.Tensor]], kind: str, flat: Flat | None = None) -> Flat:
        """As the single-process watch, with global shapes, and joined by global size (the same on every rank)."""
        if flat is None:
            flat = Flat.of([t for _, t in named])
        tids = [
            self._writer.tensor_id(n, n.rpartition(".")[0] or "model", kind, self._gshape[n], str(t.dtype))
            for n, t in named
        ]
        if sum(self._gnumel[n] for n, _ in named) <= _JOIN_ELEMENTS:
            self._param_flats.append((tids, flat))
        else:
            self._packs.append((tids, flat.stats()))
        return flat

    # ---- per-step signals: one all-reduce per step ----------------------------------------------------------------
    def _on_backward_end(self) -> None:
        super()._on_backward_end()
        bw = self._bw
        if bw is not None and type(bw) is Backward:
            bw.__class__ = _Recheck

    def _judge_step(self, rec: StepRecord) -> bool:
        """Sum the step's squared shard norms over ranks (one all-reduce), then record and judge as usual."""
        vec = self._signals.vector(rec).to(self._coll_device)
        dist.all_reduce(vec, group=self._pg)
        reduced = _ReducedRecord(rec, self._signals, vec, self._world)
        if vec.device.type == "cpu":
            reduced.to_host({"reduced": vec.tolist()})
        return super()._judge_step(reduced)

    # ---- the logged step: everything is rank-local, everything is gathered and merged --------------------------
    def _host_summaries(self, packs: list[tuple[list[int], PackedStats]]) -> Callable[[], list[TensorSummary]]:
        step = self._step
        tids = [t for ts, _ in packs for t in ts]
        layouts = [lay for _, p in packs for lay in p.layouts]
        if packs:
            payload = PackedStats.concat([p for _, p in packs]).buf.to(self._coll_device)
        else:
            payload = torch.zeros(0, dtype=torch.int64, device=self._coll_device)
        fingerprint = _crc(
            [
                [_describe(self._writer, t) for t in tids],
                [[None if u is None else u[0] for u in lay.units] for lay in layouts],
            ]
        )
        ints = torch.tensor([_MAGIC, step, fingerprint, payload.numel(), 0, 0], dtype=torch.int64)
        rows = self._exchange(ints, torch.full((_N_FLOAT,), math.nan, dtype=torch.float64), payload)
        self._gathers += 1
        if not self._writes or not packs:
            return list
        if self._gathers == 1:
            self._dmeta["bytes_per_logged_step"] = {
                "sent_per_rank": int(rows.shape[1]) * 8,
                "received_per_rank": int(rows.size) * 8,
                "header": _HEADER * 8,
            }
            self._writer.set_meta("distributed", self._dmeta)
        own = self._rank

        def finish() -> list[TensorSummary]:
            return _merged_summaries(np.asarray(rows), layouts, own)

        return finish

    def _release(self) -> None:
        """Remove the FSDP hooks too; closing is collective-free: safe on a rank that stops early."""
        for h in self._fsdp_handles:
            h.remove()
        self._fsdp_handles.clear()
        self._dparams = []
        super()._release()
