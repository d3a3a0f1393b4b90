"""PyTorch Lightning: :class:`GradsightLightningCallback` watches a LightningModule, training code unchanged.

    trainer = L.Trainer(callbacks=[GradsightLightningCallback()], ...)
    trainer.fit(module, data)

What it does, all through Lightning's public callback hooks:

* ``on_fit_start``: ``gradsight.watch(module, optimizer=trainer.optimizers[i], ...)`` — the watch's step counter
  advances at each real optimizer step, so with ``accumulate_grad_batches=k`` one gradsight step spans ``k``
  batches and records the accumulated gradient (see :mod:`gradsight.frameworks.torch._watch`). Lightning runs
  forward and backward inside ``optimizer.step(closure)``; the watch captures gradients right after the closure
  has run, so it records this step's gradients and outputs.
* ``on_train_batch_end``: the loss of each batch (``outputs["loss"]``, as a tensor: no host sync; undoing
  Lightning's division by ``accumulate_grad_batches``); when the optimizer stepped, the mean over the step's
  batches is logged as the step's ``loss``. On a logged step
  (``every``) it also publishes the headline scalars (``gradsight/grad_norm``, ``gradsight/update_ratio_max``,
  ``gradsight/nonfinite``, ``gradsight/dead_fraction``; see :mod:`gradsight.export._scalars`) to every logger of
  the trainer (``logger.log_metrics``), and runs the online diagnosis rules
  (:class:`gradsight.OnlineDiagnosis`): each new finding is reported once (a
  ``GradsightWarning`` by default) and recorded in the run file; a finding whose code is in ``stop_on`` stops
  training gracefully (``trainer.should_stop``).
* ``on_fit_end`` / ``on_exception``: final diagnosis, then the watch is closed and the run file complete.

Multi-process training goes through gradsight's cross-rank aggregation (:mod:`gradsight.frameworks.torch._ddp`,
:mod:`gradsight.frameworks.torch._fsdp`) under Lightning's ``DDPStrategy`` (``strategy="ddp"``, ``"ddp_spawn"``,
``"ddp_fork"``, ``"ddp_notebook"``), ``FSDPStrategy`` (``strategy="fsdp"``: FSDP1, which Lightning configures with
``use_orig_params=True``; Lightning runs it on GPUs only) and ``ModelParallelStrategy`` with FSDP2 data
parallelism (``fully_shard`` in ``configure_model``, ``tensor_parallel_size=1``):

* ``on_fit_start`` watches ``trainer.strategy.model`` on every rank — the ``DistributedDataParallel`` wrapper
  Lightning built around the module (a ``DDPWatch``: layer outputs and output gradients merged over the global
  batch at each logged step, weights, gradients after DDP's all-reduce and updates recorded once), the FSDP1
  wrapper, or the module sharded in place by ``fully_shard`` (an ``FSDPWatch``: shards of weights, gradients and
  updates merged as well, per-step norms summed over ranks). Tensor names are the module's own
  (``net.0.weight``): Lightning 2.x wraps the LightningModule itself, and FSDP1's prefixes are removed. The
  default path is broadcast from rank 0, so every rank agrees on it.
* Rank 0 writes the run file; ``callback.path`` is that file on rank 0 and ``None`` on the other ranks (which
  write nothing). Each rank logs its own batch loss as ``loss`` — only rank 0's is recorded.
* Every read — the headline scalars, the online diagnosis and the final diagnosis — runs on rank 0 only
  (``trainer.is_global_zero``), so findings are reported once and ``callback.findings`` is filled on rank 0.
* A stop decision (``stop_on``) is made on rank 0 and made the same on all ranks with
  ``trainer.strategy.reduce_boolean_decision(..., all=False)`` at each logged step (Lightning does not
  synchronise ``trainer.should_stop`` itself; a rank that stops alone would hang the others in DDP's all-reduce).
  Logged steps are decided by the global step, identical on all ranks, so that collective is reached by all.
* Not recorded under Lightning: the gradient noise scale (Lightning hands DDP's forward ``(batch, batch_idx)``,
  so the watch cannot see the per-rank batch size; under DDP, pass the per-rank ``batch_size=`` in the callback's
  keyword arguments to enable it; under FSDP it is not recorded).
* With ``ddp_spawn`` the callback object in the launching process is a copy that never ran: read the run from the
  path you passed (``GradsightLightningCallback(path=...)``) or from ``<log_dir>/gradsight-runs/``.

Other multi-process strategies (DeepSpeed, tensor parallelism, ...) are refused in ``setup`` with an
:class:`~gradsight.UnsupportedError`: DeepSpeed partitions parameters, gradients and optimizer state inside its
own engine, and tensor-parallel shards are split or replicated in ways gradsight does not merge.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

try:  # the unified package first, then the standalone one
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer
    except ImportError as exc:
        raise ImportError(
            "GradsightLightningCallback needs PyTorch Lightning, which is not installed. Install it with: "
            "pip install 'gradsight[lightning]'  (or: pip install lightning)"
        ) from exc

from gradsight import InputError, OnlineDiagnosis, UnsupportedError, watch
from gradsight.integrations import torch_sharding as sharding
from gradsight.store import default_run_path

__all__ = ["GradsightLightningCallback"]

UNSUPPORTED_STRATEGY_MESSAGE = (
    "GradsightLightningCallback supports multi-process training through Lightning's DDPStrategy (strategy='ddp', "
    "'ddp_spawn', 'ddp_fork' or 'ddp_notebook'), FSDPStrategy (strategy='fsdp') and ModelParallelStrategy with "
    "tensor_parallel_size=1 (fully_shard in configure_model); got strategy {strategy} with world_size={world_size}. "
    "What is missing for it: DeepSpeed partitions parameters, gradients and optimizer state inside its own engine "
    "(its step is not a torch.optim step on the module's parameters), and tensor parallelism splits or replicates "
    "shards in ways gradsight does not merge. Train with strategy='ddp' or 'fsdp', or on one device "
    "(Trainer(devices=1)) to watch the run, or remove the callback for this run."
)


def _strategies() -> tuple[type, ...]:
    try:
        from lightning.pytorch import strategies
    except ImportError:  # pragma: no cover - the standalone package
        from pytorch_lightning import strategies  # type: ignore[no-redef]
    names = ("DDPStrategy", "FSDPStrategy", "ModelParallelStrategy")
    return tuple(getattr(strategies, n) for n in names if hasattr(strategies, n))


def _is_supported_strategy(strategy: Any) -> bool:
    """DDP, FSDP1 or FSDP2 data parallelism; not a subclass that partitions otherwise (DeepSpeed), not TP."""
    if "deepspeed" in type(strategy).__name__.lower() or not isinstance(strategy, _strategies()):
        return False
    return getattr(strategy, "_tensor_parallel_size", 1) in (1, "auto")


def _default_path(trainer: Trainer) -> Path:
    """``<trainer.log_dir>/gradsight-runs/run-<time>.db`` (the default root dir when there is no logger)."""
    base = Path(trainer.log_dir or trainer.default_root_dir)
    path = base / "gradsight-runs" / default_run_path().name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class GradsightLightningCallback(Callback):
    """Watches a LightningModule's gradients, weights, updates and layer outputs during ``trainer.fit``.

    Args:
        path: the run file to write; default ``<trainer.log_dir>/gradsight-runs/run-<time>.db``.
        optimizer_index: which of ``trainer.optimizers`` closes a step (its ``step()``) and defines the updates.
        log_headline: publish the headline scalars to the trainer's loggers on logged steps.
        diagnose: run the online diagnosis rules on logged steps and at the end.
        on_finding: ``"warn"`` (a ``GradsightWarning``), a callable receiving each new ``Finding``, or ``None``.
        stop_on: finding codes that stop training (``trainer.should_stop = True``); default none, e.g.
            ``stop_on=("non-finite",)`` to stop at the first NaN/Inf.
        diagnose_every: run the full rule set every this many logged steps (the non-finite rule runs at each).
        **watch_kwargs: passed to :func:`gradsight.watch` (``preset``, ``every``, ``kinds``, ``units``,
            ``if_exists``, ``config``, ...).

    Attributes:
        watch: the open watch during ``fit`` (``None`` before and after).
        path: the run file, once ``fit`` has started.
        findings: every finding reported during training.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        optimizer_index: int = 0,
        log_headline: bool = True,
        diagnose: bool = True,
        on_finding: str | Callable[[Any], Any] | None = "warn",
        stop_on: Iterable[str] = (),
        diagnose_every: int = 10,
        **watch_kwargs: Any,
    ) -> None:
        if "optimizer" in watch_kwargs or "model" in watch_kwargs:
            raise InputError(
                "GradsightLightningCallback takes the model and optimizer from the Trainer; remove optimizer=/model= "
                "(use optimizer_index= to pick one of several optimizers)."
            )
        self._path = path
        self.optimizer_index = int(optimizer_index)
        self.log_headline = log_headline
        self.diagnose = diagnose
        self.on_finding = on_finding
        self.stop_on = tuple(stop_on)
        self.diagnose_every = diagnose_every
        self.watch_kwargs = watch_kwargs
        self.watch: Any = None
        self.path: Path | None = None
        self.findings: list[Any] = []
        self._diagnosis: Any = None
        self._losses: list[torch.Tensor] = []
        self._seen_step: int | None = None
        self._distributed = False
        self._reads = True
        if diagnose:  # a typo in stop_on / on_finding fails here, not minutes into fit
            OnlineDiagnosis.check_args(on_finding=on_finding, stop_on=self.stop_on, full_every=diagnose_every)

    # ---- set-up --------------------------------------------------------------------------------------------
    def on_init_end(self, *args: Any, **kwargs: Any) -> None:
        """Refuse a Hugging Face Trainer (which calls ``on_init_end`` first) with a clear error instead of its own."""
        raise UnsupportedError(
            "GradsightLightningCallback is PyTorch Lightning's callback, but a Hugging Face Trainer called it. For "
            "the HF Trainer use gradsight.integrations.GradsightTrainerCallback: "
            "Trainer(..., callbacks=[GradsightTrainerCallback(...)])."
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse multi-process strategies other than DDP, FSDP and model-parallel FSDP2 (see the module docstring)."""
        if stage == "fit" and trainer.world_size > 1 and not _is_supported_strategy(trainer.strategy):
            raise UnsupportedError(
                UNSUPPORTED_STRATEGY_MESSAGE.format(
                    world_size=trainer.world_size, strategy=type(trainer.strategy).__name__
                )
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Open the watch on the module and the chosen optimizer."""
        optimizers = trainer.optimizers
        if not optimizers:
            raise UnsupportedError(
                "GradsightLightningCallback found no optimizer on the Trainer: configure_optimizers() returned none. "
                "gradsight closes a step at each optimizer step; return an optimizer from configure_optimizers()."
            )
        if not 0 <= self.optimizer_index < len(optimizers):
            raise InputError(
                f"optimizer_index={self.optimizer_index} is out of range: the module has {len(optimizers)} "
                f"optimizer(s); pass an index in [0, {len(optimizers) - 1}]."
            )
        optimizer = optimizers[self.optimizer_index]
        self._distributed = trainer.world_size > 1
        self._reads = not self._distributed or trainer.is_global_zero
        model: Any = pl_module
        path = Path(self._path) if self._path is not None else _default_path(trainer)
        if self._distributed:
            model = trainer.strategy.model  # DDP's wrapper, FSDP1's wrapper, or the module sharded in place
            is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
            if not is_ddp and sharding(model) is None:
                raise UnsupportedError(
                    f"GradsightLightningCallback expected trainer.strategy.model to be a DistributedDataParallel "
                    f"or FSDP-sharded module under {type(trainer.strategy).__name__} (world_size="
                    f"{trainer.world_size}), got an unsharded {type(model).__name__}; gradsight aggregates across "
                    "ranks only for DDP-wrapped and FSDP-sharded modules (ModelParallelStrategy: call fully_shard "
                    "in configure_model)."
                )
            path = Path(trainer.strategy.broadcast(str(path)))  # the same path on every rank (rank 0's)
        self.path = path
        config = {"integration": "lightning", "accumulate_grad_batches": trainer.accumulate_grad_batches}
        config.update(self.watch_kwargs.get("config") or {})
        kwargs = {k: v for k, v in self.watch_kwargs.items() if k != "config"}
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed: pre-clip norms are unscaled
        if scaler is not None and hasattr(scaler, "unscale_"):
            kwargs.setdefault("scaler", scaler)
        self.watch = watch(model, path=self.path, optimizer=optimizer, config=config, **kwargs)
        self.path = self.watch.path  # None on a rank that writes no file
        self._losses = []
        self._seen_step = self.watch.current_step
        if self.diagnose and self._reads:
            self._diagnosis = OnlineDiagnosis(
                self.watch, on_finding=self.on_finding, stop_on=self.stop_on, full_every=self.diagnose_every
            )

    # ---- per batch -----------------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Collect the batch's loss; after an optimizer step, log the step's loss, headline and findings."""
        if self.watch is None or self.watch.closed:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.detach().reshape(())
            if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
                loss = loss * trainer.accumulate_grad_batches  # Lightning hands out loss / accumulate_grad_batches
            self._losses.append(loss)
        if self.watch.current_step == self._seen_step:
            return  # gradient accumulation: the optimizer has not stepped yet
        step = self.watch.current_step - 1  # the step just closed
        self._seen_step = self.watch.current_step
        if self._losses:
            self.watch.log(loss=torch.stack(self._losses).float().mean(), step=step)
            self._losses = []
        if self.watch.schedule.is_logged(step):
            self._on_logged_step(trainer, step)

    def _on_logged_step(self, trainer: Trainer, step: int) -> None:
        """Read the step (under DDP on rank 0 only); stop when asked, the decision reduced over DDP's ranks."""
        stop = self._read_step(trainer, step) if self._reads else False
        if self._distributed and self.diagnose and self.stop_on:  # the same condition on every rank
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.should_stop = True

    def _read_step(self, trainer: Trainer, step: int) -> bool:
        """Read one logged step: headline scalars to the trainer's loggers, then the diagnosis; whether to stop."""
        if self.log_headline and trainer.loggers:
            from gradsight.export import headline_scalars

            items = [(info, s) for _, info, s in self.watch.summaries(steps=(step, step))]
            metrics = headline_scalars(items)
            if metrics:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=max(trainer.global_step - 1, 0))
        if self._diagnosis is None:
            return False
        self.findings.extend(self._diagnosis.check(step))
        return bool(self._diagnosis.should_stop)

    # ---- the end -------------------------------------------------------------------------------------------
    def _finish(self) -> None:
        if self.watch is None:
            return
        watch, self.watch = self.watch, None
        try:
            if self._diagnosis is not None and not watch.closed:
                self.findings.extend(self._diagnosis.finish())
        finally:
            self._diagnosis = None
            self._losses = []
            watch.close()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Run the final diagnosis and close the watch (the run file is then complete)."""
        self._finish()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Close the watch when training fails, so the run file is complete up to the failure."""
        if self.watch is not None:
            self._diagnosis = None  # a failing fit should surface its own error, not a diagnosis
            self._finish()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Make sure the watch is closed whatever happened (idempotent)."""
        if stage == "fit":
            self._finish()

    def __repr__(self) -> str:
        path = str(self.path) if self.path else None
        return f"GradsightLightningCallback(path={path!r}, watching={self.watch is not None})"
