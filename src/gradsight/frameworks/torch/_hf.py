"""Hugging Face Trainer: :class:`GradsightTrainerCallback` watches the Trainer's model with no change to the code.

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[GradsightTrainerCallback()])
    trainer.train()

What it does, through the public ``TrainerCallback`` events:

* ``on_train_begin``: ``gradsight.watch(model, optimizer=...)`` on the Trainer's model and its torch optimizer
  (unwrapped from Accelerate's ``AcceleratedOptimizer``). The Trainer calls ``optimizer.step()`` once per
  ``gradient_accumulation_steps`` batches, and the watch's step counter advances there, so one gradsight step is
  one Trainer ``global_step`` and records the accumulated gradient. Watch step ``s`` is Trainer step ``s + 1``
  (``state.global_step`` counts completed steps) for a fresh run.
* ``on_step_end``: on a logged step (``every``) it computes the headline scalars (``gradsight/grad_norm``,
  ``gradsight/update_ratio_max``, ``gradsight/nonfinite``, ``gradsight/dead_fraction``) and asks the Trainer to
  log at this step (``control.should_log``), and runs the online diagnosis rules: each new finding is reported
  once (a ``GradsightWarning`` by default) and recorded in the run file; a finding whose code is in ``stop_on``
  stops training (``control.should_training_stop``).
* ``on_log``: records the Trainer's ``loss`` (the mean over the steps since the previous log: set
  ``logging_steps=1`` for one value per step) and numeric ``eval_*`` values in the run file, adds the pending
  headline scalars to ``logs`` and to ``state.log_history`` (so they land in ``trainer_state.json`` and in the
  printed logs). The Trainer calls the ``report_to`` integrations (TensorBoard, W&B, ...) *before* callbacks
  passed in ``callbacks=``; they see the headline scalars only if this callback comes first:
  ``trainer.callback_handler.callbacks.insert(0, callback)``, or use :mod:`gradsight.export` for TensorBoard.
* ``on_train_end``: final diagnosis, then the watch is closed.

Multi-process training (``world_size > 1``: DDP, and FSDP through Accelerate) goes through gradsight's cross-rank
aggregation (:mod:`gradsight.frameworks.torch._ddp`, :mod:`gradsight.frameworks.torch._fsdp`):

* ``on_train_begin`` opens the watch on every rank on the model that does the data parallelism: under FSDP the
  Trainer's model itself (``fully_shard`` shards it in place; FSDP1 wraps it, ``use_orig_params=True``), which
  opens an FSDP watch; under DDP the ``DistributedDataParallel`` wrapper that Accelerate built around the model.
  The Trainer hands callbacks the unwrapped model only, so the callback finds that wrapper once among the live
  objects (``gc.get_objects()``: the ``DistributedDataParallel`` whose ``module`` is the model; a fraction of a
  second, once). Tensor names are the model's own (no ``module.`` prefix).
* Rank 0 writes the one run file (the default path is rank 0's, broadcast to every rank); ``callback.path`` is
  ``None`` on the other ranks. The Trainer's logged ``loss`` is already averaged over ranks.
* Reads — the headline scalars, the online diagnosis, the final diagnosis — run on rank 0 only, so findings are
  reported once and ``callback.findings`` is filled on rank 0. ``control.should_log`` is set on every rank at
  logged steps (the Trainer gathers the loss across ranks when it logs: a rank logging alone would hang), and a
  stop decision (``stop_on``) made on rank 0 is made the same on every rank by one ``all_reduce(MAX)`` of a
  flag at each logged step — logged steps are decided by the global step, identical on every rank — so every
  rank stops at the same step.
* Not supported: DeepSpeed (refused by ``gradsight.watch``). On CPU, Accelerate never shards with FSDP
  (``use_cpu=True`` runs are DDP whatever ``fsdp=`` says).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "GradsightTrainerCallback needs the 'transformers' package, which is not installed. Install it with: "
        "pip install 'gradsight[transformers]'  (or: pip install transformers accelerate)"
    ) from exc

from gradsight import InputError, OnlineDiagnosis, UnsupportedError, watch
from gradsight.integrations import torch_sharding as sharding
from gradsight.store import default_run_path

__all__ = ["GradsightTrainerCallback"]

DEEPSPEED_MESSAGE = (
    "GradsightTrainerCallback does not support DeepSpeed: ZeRO partitions parameters, gradients and optimizer "
    "states inside the DeepSpeed engine, whose step is not a torch.optim step on the model's parameters, so "
    "gradsight would see neither the partitioned gradients nor the step that closes a training step. Train with "
    "DDP or FSDP (TrainingArguments(fsdp=...)) to watch the run, or remove the callback for this run."
)
NO_GROUP_MESSAGE = (
    "GradsightTrainerCallback: the Trainer runs {world_size} processes (world_size={world_size}) but "
    "torch.distributed has no initialised process group in this one, so the ranks' statistics cannot be merged. "
    "Launch the training with torchrun or accelerate launch, which initialise it."
)
NO_WRAPPER_MESSAGE = (
    "GradsightTrainerCallback: the Trainer runs {world_size} processes, but the model ({model}) is neither sharded "
    "with FSDP nor wrapped in a DistributedDataParallel module that gradsight could find, so the ranks' "
    "statistics cannot be merged. Supported multi-process set-ups: DDP and FSDP (FSDP1 with use_orig_params=True, "
    "or FSDP2) through Accelerate."
)


def _data_parallel_model(model: Any, world_size: int) -> Any:
    """The module to watch in a multi-process run: the sharded model itself, or the DDP wrapper around it.

    Raises:
        UnsupportedError: no process group, or neither FSDP nor a DDP wrapper of ``model``.
    """
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not (dist.is_available() and dist.is_initialized()):
        raise UnsupportedError(NO_GROUP_MESSAGE.format(world_size=world_size))
    if isinstance(model, DistributedDataParallel) or sharding(model) is not None:  # sharding refuses DeepSpeed
        return model
    # The Trainer passes callbacks the unwrapped model; Accelerate's DDP wrapper is held by the Trainer only.
    found = [o for o in gc.get_objects() if issubclass(type(o), DistributedDataParallel) and o.module is model]
    if not found:
        raise UnsupportedError(NO_WRAPPER_MESSAGE.format(world_size=world_size, model=type(model).__name__))
    return found[-1]


def _any_rank(flag: bool) -> bool:
    """``flag`` OR-ed over every rank: one ``all_reduce(MAX)`` of one number (every rank must call it)."""
    import torch
    import torch.distributed as dist

    nccl = "nccl" in str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _broadcast_path(path: Path) -> Path:
    """Rank 0's path on every rank (default paths carry a time stamp, different on each rank)."""
    import torch.distributed as dist

    box = [str(path)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


#: What a PyTorch Lightning Trainer reads from its callbacks before anything else (see
#: GradsightTrainerCallback.__getattr__): handed this callback by mistake, it gets a clear error there.
_LIGHTNING_FIRST = frozenset({"setup", "on_exception", "state_key", "on_fit_start", "teardown"})


class GradsightTrainerCallback(TrainerCallback):
    """Watches the Trainer's model: gradients, weights, updates and layer outputs during ``trainer.train()``.

    Args:
        path: the run file to write; default ``<args.output_dir>/gradsight-runs/run-<time>.db``.
        log_headline: add the headline scalars to the Trainer's logs on logged steps.
        diagnose: run the online diagnosis rules on logged steps and at the end.
        on_finding: ``"warn"`` (a ``GradsightWarning``), a callable receiving each new ``Finding``, or ``None``.
        stop_on: finding codes that stop training; default none, e.g. ``stop_on=("non-finite",)``.
        diagnose_every: run the full rule set every this many logged steps (the non-finite rule runs at each).
        **watch_kwargs: passed to :func:`gradsight.watch` (``preset``, ``every``, ``kinds``, ``units``,
            ``if_exists``, ``config``, ...).

    Attributes:
        watch: the open watch during training (``None`` before and after).
        path: the run file, once training has started.
        findings: every finding reported during training.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        log_headline: bool = True,
        diagnose: bool = True,
        on_finding: str | Callable[[Any], Any] | None = "warn",
        stop_on: Iterable[str] = (),
        diagnose_every: int = 10,
        **watch_kwargs: Any,
    ) -> None:
        if "optimizer" in watch_kwargs or "model" in watch_kwargs:
            raise InputError(
                "GradsightTrainerCallback takes the model and optimizer from the Trainer; remove optimizer=/model=."
            )
        self._path = path
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
        self._offset = 0  # watch step = Trainer global_step - 1 + offset
        self._pending: dict[str, float] = {}
        self._distributed = False
        self._reads = True  # this rank reads the run (headline, diagnosis): rank 0, or the only process
        if diagnose:  # a typo in stop_on / on_finding fails here, not minutes into training
            OnlineDiagnosis.check_args(on_finding=on_finding, stop_on=self.stop_on, full_every=diagnose_every)

    def __getattr__(self, name: str) -> Any:
        """Only for attributes this callback lacks: a PyTorch Lightning Trainer asks for its own hooks first."""
        if name.startswith("__") or name not in _LIGHTNING_FIRST:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise UnsupportedError(
            "GradsightTrainerCallback is the Hugging Face Trainer's callback, but a PyTorch Lightning Trainer "
            "was given it. For Lightning use gradsight.integrations.GradsightLightningCallback: "
            "Trainer(callbacks=[GradsightLightningCallback(...)])."
        )

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Open the watch on the Trainer's model and optimizer."""
        import torch

        if getattr(args, "deepspeed", None):
            raise UnsupportedError(DEEPSPEED_MESSAGE)
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None:
            raise UnsupportedError("GradsightTrainerCallback got no model from the Trainer's on_train_begin event.")
        scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer holds the GradScaler
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UnsupportedError(
                f"GradsightTrainerCallback needs the Trainer's torch optimizer, got {type(optimizer).__name__}. "
                "gradsight closes a step at each optimizer.step(); use a torch.optim optimizer."
            )
        self._distributed = args.world_size > 1
        if self._distributed:
            import torch.distributed as dist

            model = _data_parallel_model(model, args.world_size)
            self._reads = dist.get_rank() == 0
        if self._path is not None:
            self.path = Path(self._path)
        else:
            self.path = Path(args.output_dir) / "gradsight-runs" / default_run_path().name
            if self._reads:
                self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._distributed:
            self.path = _broadcast_path(self.path)
        config = {"integration": "transformers", "gradient_accumulation_steps": args.gradient_accumulation_steps}
        config.update(self.watch_kwargs.get("config") or {})
        kwargs_ = {k: v for k, v in self.watch_kwargs.items() if k != "config"}
        if scaler is not None and hasattr(scaler, "unscale_"):  # mixed precision: pre-clip norms unscaled
            kwargs_.setdefault("scaler", scaler)
        self.watch = watch(model, path=self.path, optimizer=optimizer, config=config, **kwargs_)
        self.path = self.watch.path  # None on a rank that writes no file
        self._offset = self.watch.current_step - state.global_step
        self._pending = {}
        if self.diagnose and self._reads:
            self._diagnosis = OnlineDiagnosis(
                self.watch, on_finding=self.on_finding, stop_on=self.stop_on, full_every=self.diagnose_every
            )

    def _step_of(self, state: TrainerState) -> int:
        return state.global_step - 1 + self._offset

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """After an optimizer step: headline scalars and online diagnosis on logged steps."""
        if self.watch is None or self.watch.closed:
            return
        step = self._step_of(state)
        if not self.watch.schedule.is_logged(step):
            return
        if self.log_headline and self._reads:
            from gradsight.export import headline_scalars

            items = [(info, s) for _, info, s in self.watch.summaries(steps=(step, step))]
            self._pending = headline_scalars(items)
        if self.log_headline and (self._pending or self._distributed):
            control.should_log = True  # on every rank alike: the Trainer gathers the loss across ranks to log
        stop = False
        if self._diagnosis is not None:
            self.findings.extend(self._diagnosis.check(step))
            stop = bool(self._diagnosis.should_stop)
        if self._distributed and self.diagnose and self.stop_on:  # the same condition on every rank
            stop = _any_rank(stop)
        if stop:
            control.should_training_stop = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Record the loss (and eval values) in the run file; publish the pending headline scalars."""
        if self.watch is None or self.watch.closed or logs is None or state.global_step < 1:
            return
        values = {
            k: float(v)
            for k, v in logs.items()
            if (k == "loss" or k.startswith("eval_")) and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if values:
            self.watch.log(step=self._step_of(state), **values)
        if self._pending:
            pending, self._pending = self._pending, {}
            logs.update(pending)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(pending)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Run the final diagnosis and close the watch (the run file is then complete)."""
        self.close()

    def close(self) -> None:
        """Close the watch (idempotent); call it yourself if ``trainer.train()`` raised."""
        if self.watch is None:
            return
        watch, self.watch = self.watch, None
        try:
            if self._diagnosis is not None and not watch.closed:
                self.findings.extend(self._diagnosis.finish())
        finally:
            self._diagnosis = None
            watch.close()
