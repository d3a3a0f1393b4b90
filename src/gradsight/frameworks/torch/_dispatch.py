"""The PyTorch adapter's entry point: :func:`watch_torch` picks the watch class for a ``torch.nn.Module``.

It imports :mod:`._watch` (the single-process :class:`Watch`), :mod:`._ddp` (its ``DistributedDataParallel``
subclass) and :mod:`._fsdp` (its subclass for sharded models), so that none imports another's dispatch (no
import cycle).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..._errors import InputError
from ..._schedule import Schedule, schedule_from
from ._ddp import DDPWatch, check_rank_args, distributed_wrapper
from ._fsdp import FSDPWatch, sharding
from ._watch import Watch

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack

    from ..._schedule import ScheduleSettings

__all__ = ["watch_torch"]

NO_BATCH_SIZE = (
    "batch_size= sets the per-rank batch of the gradient noise scale, which is recorded under "
    "DistributedDataParallel only (under FSDP it would need the gradients before the reduce-scatter). "
    "Drop batch_size= for this sharded model."
)


def watch_torch(
    model: nn.Module,
    *,
    path: str | os.PathLike[str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    preset: str | Schedule = "default",
    config: dict[str, Any] | None = None,
    batch_size: int | None = None,
    rank_paths: bool = False,
    scaler: Any = None,
    **settings: Unpack[ScheduleSettings],
) -> Watch:
    """Watch a ``torch.nn.Module``: record summaries of weights, gradients, updates, outputs and output gradients.

    Args:
        model: the module to watch.
        path: the run file to write (its directory must exist); default ``./gradsight-runs/run-<time>.db``.
        optimizer: the ``torch.optim.Optimizer`` whose ``step()`` closes each training step (records updates
            and learning rates). Without one, call ``watch.step()`` after each parameter update.
        preset: ``"cheap"``, ``"default"`` or ``"full"`` (see :mod:`gradsight._schedule`), or a ``Schedule``.
        config: your own run configuration (JSON-serialisable), stored in the metadata as ``user_config``.
        batch_size: ``DistributedDataParallel`` only: the per-rank batch size for the gradient noise scale
            (default: dim 0 of the model's first input). See :mod:`._ddp`.
        rank_paths: ``DistributedDataParallel`` and FSDP only: every rank writes its own run file, not just rank 0.
        scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop, if any: pre-clip gradient norms and the
            layers' output gradients (from the backward of the scaled loss) are then recorded unscaled, like
            everything else (see :mod:`._signals`).
        **settings: the schedule settings, the same for every framework: ``every``, ``kinds``, ``cheap``,
            ``units``, ``cheap_flush``, ``if_exists``, ``commit_every`` (see :func:`gradsight._schedule.schedule`).

    Returns:
        The open :class:`Watch` (a ``DDPWatch`` for a ``DistributedDataParallel`` model, an ``FSDPWatch`` for a
        model sharded with ``fully_shard`` or ``FullyShardedDataParallel(use_orig_params=True)``).

    Raises:
        InputError: ``model`` or ``optimizer`` has the wrong type, or a schedule argument is invalid.
        WatchError: ``model`` is already being watched.
        UnsupportedError: ``model`` is sharded in a way gradsight cannot merge exactly (FSDP1 without
            ``use_orig_params``, hybrid sharding, tensor parallelism, DeepSpeed; see :mod:`._fsdp`).
        StoreError: the run file cannot be created (missing or unwritable directory, existing file).
    """
    if not isinstance(model, nn.Module):
        what = "a tensor" if isinstance(model, torch.Tensor) else f"{type(model).__name__}"
        raise InputError(
            f"gradsight.watch expects a torch.nn.Module (a model instance), got {what}: {model!r:.80}. Pass the "
            "module whose training you want to record, e.g. gradsight.watch(model, optimizer=opt), not a tensor, "
            "its output or its parameters."
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise InputError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}. Pass the optimizer "
            "object (e.g. optimizer=torch.optim.Adam(model.parameters())), or none and call watch.step()."
        )
    if scaler is not None and not (hasattr(scaler, "scale") and hasattr(scaler, "unscale_")):
        raise InputError(
            f"scaler must be a torch.amp.GradScaler (the object whose scale() and step() the loop calls), got "
            f"{type(scaler).__name__}: {scaler!r:.60}. Pass the loop's GradScaler, or leave scaler= out."
        )
    sched = schedule_from(preset, settings)
    kind = sharding(model)
    if kind is not None:
        check_rank_args(batch_size, rank_paths)
        if batch_size is not None:
            raise InputError(NO_BATCH_SIZE)
        common = {"path": path, "optimizer": optimizer, "sched": sched, "config": config, "scaler": scaler}
        return FSDPWatch(model, kind=kind, rank_paths=rank_paths, **common)
    if distributed_wrapper(model, batch_size=batch_size, rank_paths=rank_paths) == "ddp":
        return DDPWatch(
            model,
            path=path,
            optimizer=optimizer,
            sched=sched,
            config=config,
            batch_size=batch_size,
            rank_paths=rank_paths,
            scaler=scaler,
        )
    return Watch(model, path=path, optimizer=optimizer, sched=sched, config=config, scaler=scaler)
