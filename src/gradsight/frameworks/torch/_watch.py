"""``gradsight.watch`` for ``torch.nn.Module``: hooks that record summaries into a run file.

What is recorded (see :mod:`gradsight._schedule` for *when*):

* per parameter (tensor name = parameter name, e.g. ``0.weight``; layer = the owning module, e.g. ``0``):
  ``weight`` (W as used by this step's forward/backward, i.e. before the optimizer step), ``grad`` (the
  gradient the optimizer sees: with gradient accumulation, the accumulated gradient) and ``update``
  (``W_after - W_before`` around the optimizer step; only for parameters the optimizer holds).
* per leaf module (no children; tensor name = module name, e.g. ``1``): ``output`` and ``output_grad``
  (dJ/dA, via a tensor hook on the output — never ``register_full_backward_hook``, which breaks ``torch.func``).
  Tuple/list/dict outputs record each floating-point element as ``<module>.<index or key>``; non-float and
  non-tensor elements are skipped. A module called several times in a step (a module used twice in one
  forward, or several micro-batches with gradient accumulation) gets the ``merge`` of its calls' summaries.
  Only forwards that take part in training are recorded: a forward counts when a backward pass reaches its
  outputs before the step closes (whatever the module's ``train``/``eval`` mode). Evaluation under
  ``torch.no_grad()`` is not recorded, and neither is a validation forward run with gradients enabled but never
  backpropagated (``model.eval(); model(x_val)``): its summaries are computed, held until the step closes (at
  most ``_MAX_PENDING_FORWARDS`` such forwards per step, the oldest dropped first), then dropped; a dropped
  forward's output gradients are not recorded either. Forwards inside ``torch.func`` transforms are skipped, and
  so are the recomputations of activation checkpointing (``torch.utils.checkpoint`` with ``use_reentrant=False``,
  Hugging Face ``gradient_checkpointing_enable()``) during backward: the forward they repeat was recorded (with
  ``use_reentrant=True`` the forward runs without gradients, and its recomputation is what gets recorded). Output
  gradients are copied when they arrive (autograd may hand the same memory on to a parameter's ``.grad``, which
  clipping then changes in place).
* scalars: ``loss`` and anything passed to :meth:`Watch.log`; ``lr`` (``lr/<i>`` for several param groups) at
  logged steps; the cheap checks ``grad_norm``, ``grad_nonfinite``, ``grad_norm/<tensor>``,
  ``grad_nonfinite/<tensor>`` at every step.

Step boundaries: the step counter starts at 0 and advances at each ``optimizer.step()`` (through the public
``register_step_pre_hook``/``register_step_post_hook``), or at each :meth:`Watch.step` when no optimizer is
given. Gradient accumulation (several backward passes per optimizer step) is one step: gradients are summarised
once, at the optimizer step (the accumulated gradient), outputs and output gradients of every micro-batch are
merged.

``optimizer.step(closure)`` (LBFGS, Lightning, any closure user): the closure computes the step's gradients and
outputs *inside* ``step()``, after the step pre-hook. The pre-hook therefore hands the optimizer a wrapped closure
that calls the real one — every time, uncached, so training is unchanged — and captures the step (gradients,
weights, cheap checks) right after its *first* evaluation; outputs of later evaluations (LBFGS's line search) are
not recorded. See :class:`_CaptureAfterClosure`.

Unit axis of per-unit activity (outputs only): dim 1 for outputs with >= 3 dims of convolutions, batch/instance/
group norms, pooling and channel dropout (NCHW-style layouts); a parameter-free module (activation, dropout)
whose input is the same-shaped output of a recorded module inherits that module's axis; otherwise the last dim
(``Linear`` on ``(N, F)`` or ``(N, T, F)``).

Compiled models: the ``OptimizedModule`` returned by ``torch.compile(model)`` (and a model compiled in place
with ``model.compile()``) is watched through the original module's parameters, with hooks only outside the
compiled region, so recording adds no graph break and no recompilation. Layer outputs and output gradients are
not recorded for a compiled model (per-layer hooks would run inside the compiled graph); weights, gradients,
updates and scalars are. The run's meta says so (``compiled``, ``notes``) and the watch warns once
(:class:`gradsight.GradsightWarning`) when those kinds were asked for.

A watch that sees backward passes but never a step records nothing; it warns (``GradsightWarning``) and records an
event ``no-optimizer-step`` after ``NO_STEP_WARN_AFTER`` backward passes without a step, or at close, and
``gradsight.diagnose`` reports it as ``no-steps-recorded``. Likewise, when another optimizer than the one given
updates the model's parameters ``NO_STEP_WARN_AFTER`` times in a row without a step of the watched one (an
optimizer replaced during training), the watch warns once and records an event ``foreign-optimizer``: its steps
no longer close (an optimizer that wraps the watched one, or a second one stepping between the watched one's
steps, is not such a case).

Cost: nothing but three cheap Python hooks (root forward pre-hook, optimizer pre/post hooks) and the cheap checks
run on steps that are not logged; the leaf forward hooks are attached only for logged steps. On a logged step,
weights, gradients, updates and outputs are summarised on their device in batches (see
:mod:`._summary`): the outputs of a micro-batch in one batch, the step's small parameter kinds (grad,
weight, update; up to ``_JOIN_ELEMENTS`` each) joined into one batch at the step's end. The packed results are
copied to the host once; the run writer's thread encodes them as arrays (no per-summary Python objects) and
writes them.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ... import _kernels
from ..._errors import InputError, WatchError
from ..._packing import Rows, SummaryArrays, merge_rows
from ..._schedule import Schedule
from ..._watch_core import WatchCore, judged_signals, unit_axis
from ...diagnose import GradsightWarning
from ...store import RunWriter
from ...summary import TensorSummary, to_rows
from ._signals import Backward, StepRecord, counts_of, host_records, norms_of, np_f32, scaler_scale
from ._summary import Flat, PackedStats, compiled_in_place, to_host_rows

__all__ = ["Watch", "unit_axis_for"]

#: Parameter batches up to this many elements are kept until the step ends and summarised together (one kernel
#: set per step instead of one per kind; the cost is holding the copies during ``optimizer.step()``).
_JOIN_ELEMENTS = 1 << 22
#: Layer outputs and output gradients of at least this many elements are summarised in their hooks, read in place;
#: smaller ones are kept (outputs as copies) and summarised together at the end of the forward or at the step.
_NOW_ELEMENTS = 1 << 17
#: Backward passes without any step after which the watch warns that it records nothing (also checked at close).
#: Large enough for gradient accumulation over many micro-batches before the first optimizer step.
NO_STEP_WARN_AFTER = 100
#: Forwards without a backward pass (so far) kept per step; older ones are dropped first.
_MAX_PENDING_FORWARDS = 64
#: Lists of tensor ids kept by ``_tensor_ids`` (cleared when full: a model whose forwards vary keeps few).
_TID_CACHE = 256

_CHANNEL_FIRST: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, InstanceNorm*d
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)


def unit_axis_for(module: nn.Module, output: torch.Tensor, inherited: int | None = None) -> int | None:
    """The unit axis of a module's output: :func:`gradsight._watch_core.unit_axis` for torch modules.

    Args:
        module: the module that produced ``output`` (channel-first: convolutions, norms, pooling, channel dropout).
        output: the output tensor.
        inherited: the unit axis of the module's (same-shaped) input, when that input was a recorded output.
            A parameter-free module's 4-D or 5-D output without one (its input came from a functional op, such as
            a residual ``out + identity``) takes dim 1: torch's layout of images and volumes is ``(N, C, ...)``.

    Returns:
        The axis, or ``None`` for a 0-d output.
    """
    channel_first = isinstance(module, _CHANNEL_FIRST)
    if not channel_first and inherited is None and output.dim() >= 4:
        # torch lays 4-D/5-D activations out (N, C, ...): a ReLU after a residual add, say
        channel_first = not _has_own_params(module)
    return unit_axis(output.dim(), channel_first=channel_first, inherited=inherited)


def _has_own_params(module: nn.Module) -> bool:
    """Whether ``module.parameters(recurse=False)`` would yield any (read from its dict: a forward hook's cost)."""
    return any(p is not None for p in module._parameters.values())


def _host_cheap(tensors: list[torch.Tensor]) -> bool:
    """Whether the cheap checks read their norms on the host at once: every gradient on the CPU (no device sync).

    Tests replace this function to exercise the accelerator path on CPU.
    """
    return all(t.is_cpu for t in tensors)


def _is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.layout == torch.strided


_IS_WRAPPED = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def _functorch_wrapped(t: torch.Tensor) -> bool:
    return _IS_WRAPPED is not None and bool(_IS_WRAPPED(t))


def _output_items(out: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [("", out)] if _is_float(out) else []
    if isinstance(out, (tuple, list)):
        return [(f".{i}", t) for i, t in enumerate(out) if _is_float(t)]
    if isinstance(out, dict):
        return [(f".{k}", t) for k, t in out.items() if _is_float(t)]
    return []


class Watch(WatchCore):
    """An open watch on a ``torch.nn.Module``; create it with :func:`gradsight.watch`.

    The public API (``current_step``, ``step()``, ``log``, ``log_event``, ``flush``, ``close``, the context
    manager and the read API of :class:`gradsight.store.Run`) is :class:`gradsight._watch_core.WatchCore`'s;
    this class captures: hooks on the model and the optimizer, summaries computed on the device.
    ``os.fspath(watch)`` and ``gradsight.load(watch)`` give the run file.
    """

    framework = "torch"
    #: Layer outputs and output gradients this large are summarised in their hooks (see ``_NOW_ELEMENTS``).
    _now_elements: float = _NOW_ELEMENTS
    #: Whether ``_pack`` reads large tensors in place (``Flat.of(copy=False)``) instead of copying them.
    _pack_in_place = True

    def __init__(
        self,
        model: nn.Module,
        *,
        path: str | os.PathLike[str] | None,
        optimizer: torch.optim.Optimizer | None,
        sched: Schedule,
        config: dict[str, Any] | None,
        scaler: Any = None,
    ) -> None:
        self._closed = True  # until fully set up, so that a failed __init__ leaves nothing to close
        self.schedule = sched
        self._scaler = scaler
        self._handles: list[Any] = []
        self._leaf_handles: list[Any] = []
        self._notes: list[str] = []
        # ---- compiled models: introspect the original module, hook only outside the compiled region -----------
        outer = model
        self._compiled = _compiled_kind(model)
        if self._compiled == "torch.compile":
            model = model._orig_mod  # type: ignore[assignment]
        if self._compiled is not None and ("output" in sched.kinds or "output_grad" in sched.kinds):
            note = (
                f"layer outputs and output gradients are not recorded: the model is compiled ({self._compiled}), "
                "and per-layer hooks would run inside the compiled graph (graph breaks, recompilation). Weights, "
                "gradients, updates and scalars are recorded. To record outputs, watch an uncompiled copy of the "
                "model for a few steps."
            )
            self._notes.append(note)
            warnings.warn(GradsightWarning(f"gradsight: {note}"), stacklevel=4)
        aliases, skipped = self._collect_params(model)
        self._optimizer = optimizer
        opt_meta = self._collect_optimizer(model, optimizer)
        layers = self._collect_layers(model)
        self._model_meta: dict[str, Any] = {"type": type(model).__name__, "layers": layers}
        # the layers in the order the first forward that counts calls them (see _resolve); None once written
        self._call_order: dict[str, None] | None = {} if self._leaves else None
        self._open(
            model,
            path=path,
            sched=sched,
            config=config,
            meta={
                "model": dict(self._model_meta),
                "aliases": aliases,
                "skipped": skipped,
                "optimizer": None if optimizer is None else type(optimizer).__name__,
                "optimizer_params": opt_meta,
                "frozen": [n for n, p in self._params if not p.requires_grad],  # requires_grad=False at watch()
                "compiled": self._compiled,
                # which CPU kernels computed the float32 sums and norms (they agree to float64/float32 rounding)
                "cpu_kernels": "compiled" if _kernels.available() else "numpy/torch",
                "cpu_simd": _kernels.simd(),
            },
        )
        self._model_ref = weakref.ref(model)
        self._keep_stored_order()
        self._init_step_state()
        self._attach(outer, optimizer)

    def _versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def _collect_params(self, model: nn.Module) -> tuple[dict[str, list[str]], dict[str, str]]:
        """Unique floating-point parameters; returns the aliases (tied weights) and the skipped ones, for meta."""
        params: dict[int, tuple[str, nn.Parameter]] = {}
        aliases: dict[str, list[str]] = {}
        skipped: dict[str, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in params:
                aliases.setdefault(params[id(p)][0], []).append(name)
                continue
            if not p.is_floating_point():
                skipped[name] = f"dtype {p.dtype} is not floating point"
                continue
            params[id(p)] = (name, p)
        self._params: list[tuple[str, nn.Parameter]] = list(params.values())
        return aliases, skipped

    def _collect_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
        """The parameters whose updates are recorded; the optimizer's part of the metadata.

        Raises:
            InputError: the optimizer holds parameters, none of them the model's.
        """
        if optimizer is None:
            self._update_params = [(n, p) for n, p in self._params if p.requires_grad]
            return None
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self._update_params = [(n, p) for n, p in self._params if id(p) in held]
        if held and not self._update_params:
            raise InputError(
                f"the optimizer given ({type(optimizer).__name__}) holds {len(held)} parameter tensor(s), but "
                f"none of them belongs to the watched {type(model).__name__} (which has {len(self._params)}), "
                "so no step of this model would ever be recorded. It is probably the optimizer of another "
                "model (or of a copy made after the optimizer was created). Pass the optimizer that updates "
                "this model: gradsight.watch(model, optimizer=torch.optim.SGD(model.parameters(), lr=...))."
            )
        held_names = {n for n, _ in self._update_params}
        return {
            "type": type(optimizer).__name__,
            "params_held": len(held),
            "model_params_held": len(self._update_params),
            "model_params": len(self._params),
            "not_held": [n for n, _ in self._params if n not in held_names],  # the model's, by name
        }

    def _collect_layers(self, model: nn.Module) -> list[dict[str, Any]]:
        """Leaf modules (hooked on logged steps) and the layer structure for the metadata."""
        self._leaves: list[tuple[str, nn.Module]] = []
        layers: list[dict[str, Any]] = []
        for name, mod in model.named_modules():
            leaf = next(iter(mod.children()), None) is None
            own = dict(mod.named_parameters(recurse=False))
            if leaf or own:
                lname = name or "model"
                if leaf and self._compiled is None:  # compiled: no hooks inside the compiled region
                    self._leaves.append((lname, mod))
                layers.append(
                    {"name": lname, "type": type(mod).__name__, "params": {k: list(v.shape) for k, v in own.items()}}
                )
        return layers

    def _init_step_state(self) -> None:
        """The per-step state, for the step the writer continues at."""
        sched = self.schedule
        self._logged = self._full_step(self._step)
        self._fwd_seen = False
        # train/eval mode of the last forward with gradients, and of the one before the last backward pass: a
        # forward in the other mode after a step (validation with gradients on) does not move run.log to the next
        self._fwd_mode: bool | None = None
        self._train_mode: bool | None = None
        self._log_fwd = True
        self._in_forward = False  # between the model's forward pre-hook and its forward hook (see _RootEnd)
        self._acts: list[tuple[str, str, str, torch.Tensor, int | None]] = []  # name, layer, kind, tensor, axis
        self._act_packs: list[tuple[list[int], PackedStats]] = []  # large output gradients, summarised in hooks
        # each recorded output's unit axis, by id, for the parameter-free layer that takes it as input next; a weak
        # reference to the output tells a live one from a new tensor at a reused id without keeping it alive
        # (held to the step's end, a logged step's outputs could not be freed in backward, and the next forward's
        # would need fresh memory: +3 ms per step on the 3C3D CNN's full preset)
        self._axis_of: dict[int, tuple[weakref.ref[torch.Tensor], int | None]] = {}
        self._packs: list[tuple[list[int], PackedStats]] = []
        # leaf modules' outputs recorded by forwards outside backward, not yet matched by a recomputation in
        # backward (activation checkpointing: see _on_output)
        self._unmatched: dict[tuple[str, tuple[int, ...]], int] = {}  # (module, output shape) -> calls
        # gradient hooks on outputs that are leaf tensors (a module returning a parameter): such a hook lives on
        # the tensor, not on this forward's graph, so it is removed when the step closes
        self._leaf_out_hooks: list[Any] = []
        self._param_flats: list[tuple[list[int], Flat]] = []  # small parameter batches, summarised together
        self._tid_cache: dict[tuple[tuple[str, str], ...], list[int]] = {}  # see _tensor_ids
        self._flat_before: Flat | None = None
        self._capture_pending = False  # a closure was passed to optimizer.step(): capture after its first call
        self._cheap_names: tuple[str, ...] = ()
        self._frozen = False  # inside optimizer.step() after that capture: later closure calls are not recorded
        # ---- per-step signals (see ._signals) ----
        self._records: list[StepRecord] = []  # steps whose signals are still on a device, until the next flush
        self._rec: StepRecord | None = None  # the step in progress, from the start of optimizer.step() to its end
        self._bw: Backward | None = None  # what the last backward pass of this step left
        self._bw_queued = False  # an end-of-backward callback is queued for the backward pass in progress
        self._lagged: StepRecord | None = None  # a device step's signals, judged at the next step (see _judge_step)
        self._wbuf: list[torch.Tensor] | None = None  # W_before of the optimizer's parameters
        self._wbuf_np: list[np.ndarray] | None = None  # its numpy views, for the compiled kernels (CPU float32)
        self._wbuf_layout: list[tuple[Any, ...]] = []  # (dtype, shape, device) of the parameters it was made for
        self._wbuf_for: _Params | None = None  # the parameter views it was last checked against
        self._pviews: _Params | None = None  # the optimizer's parameters, detached, while they stay in place
        self._wbuf_step = -1  # the step whose W_before the buffer holds
        self._loss: tuple[int, Any] | None = None  # the last logged loss, for the anomaly judge
        self._loss_judged = -1  # the step of the last loss fed to the judge
        self._bw_counts: Any = None
        self._stepped_since_bw = True
        self._do_weights = "weight" in sched.kinds
        self._do_update = "update" in sched.kinds
        self._do_grad = "grad" in sched.kinds
        self._do_outputs = "output" in sched.kinds or "output_grad" in sched.kinds
        # forwards of the current logged step: the one in progress, and finished ones with their packed outputs
        self._fwd: _Forward | None = None
        self._done: list[tuple[_Forward, list[tuple[list[int], PackedStats]]]] = []
        self._stepped = False  # a step closed since this watch opened
        self._backwards = 0  # backward passes seen before the first step (see NO_STEP_WARN_AFTER)
        self._no_step_reported = False
        self._unseen_noted = False

    def _attach(self, outer: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """The hooks (each holds only a weak reference to this watch); the watch is open afterwards."""
        wref = weakref.ref(self)
        self._compiled_host: nn.Module | None = None
        self._root_out: Any = None
        if self._compiled == "Module.compile":  # hooks would run inside the compiled _call_impl: wrap it instead
            outer._compiled_call_impl = _CompiledCall(wref, outer._compiled_call_impl)
            self._compiled_host = outer
        else:
            self._handles.append(outer.register_forward_pre_hook(_RootPreHook(wref)))
            self._root_out = outer.register_forward_hook(_RootOutHook(wref))
            self._handles.append(self._root_out)
            self._handles.append(outer.register_forward_hook(_RootEnd(wref)))
        self._scaler_update: tuple[Any, Any] | None = None  # (the scaler, its own instance attribute "update")
        update = getattr(self._scaler, "update", None)
        if self.schedule.cheap and callable(update):  # a step the scaler skips closes at its update(), at once
            self._scaler_update = (self._scaler, vars(self._scaler).get("update"))
            self._scaler.update = _ScalerUpdate(wref, update)
        # another optimizer -> whether it holds watched parameters (weak keys: an id could be reused)
        self._foreign: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        self._foreign_steps = 0  # their steps since the watched optimizer's last step
        self._foreign_reported = False
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(_OptHook(wref, True)))
            self._handles.append(optimizer.register_step_post_hook(_OptHook(wref, False)))
            self._handles.append(register_optimizer_step_post_hook(_ForeignStep(wref)))
        if self.schedule.cheap:  # the end of every backward pass: gradients as backward left them (pre-clip)
            hook = _GradAccumulated(wref)
            for _, p in self._params:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(hook))
        self._closed = False
        self._finalizer = weakref.finalize(self, _finalize, self._handles, self._leaf_handles, self._writer)
        if self._logged:
            self._arm()

    # ---- extension points (overridden by the DDP watch in ._ddp) -------------------------------------
    def _host_summaries(self, packs: list[tuple[list[int], PackedStats]]) -> Callable[[], list[TensorSummary]]:
        """Start turning one logged step's packed device statistics into host summaries.

        ``packs`` are ``(tensor ids, packed statistics)`` in step order (possibly none; each pack holds either
        only rank-local kinds — outputs, output gradients — or only parameter kinds); the returned function,
        called on the run writer's thread, gives the summaries in the same order: a list of ``TensorSummary``,
        or a :class:`._summary.Rows` (the fast path, encoded by the writer with array operations). The
        DDP watch combines the ranks' statistics here, in one collective on the training thread.
        """
        if not packs:
            return list
        return to_host_rows(PackedStats.concat([p for _, p in packs]))

    # ---- hooks ----------------------------------------------------------------------------------------------
    def _arm(self) -> None:
        """Attach the leaf forward hooks (only for logged steps)."""
        if self._leaf_handles or not self._do_outputs:
            return
        wref = weakref.ref(self)
        for name, mod in self._leaves:
            self._leaf_handles.append(mod.register_forward_hook(_LeafHook(wref, name)))

    def _disarm(self) -> None:
        for h in self._leaf_handles:
            h.remove()
        self._leaf_handles.clear()

    def _on_forward(self, module: nn.Module) -> None:
        if self._frozen or not torch.is_grad_enabled():
            return
        self._in_forward = True
        self._bw_queued = False  # a backward pass that raised never ran its callback
        self._fwd_seen = True
        self._fwd_mode = module.training
        self._log_fwd = self._train_mode is None or module.training == self._train_mode
        self._axis_of.clear()
        if self._optimizer is None and self.schedule.cheap and self._wbuf_step != self._step:
            self._copy_weights()  # no optimizer: W_before is the weights at the step's first forward
        if self._logged:
            self._end_forward()  # a new forward: summarise the previous one now and free its tensors
            self._flush_acts()
            self._fwd = _Forward(self._step)
            if self._optimizer is None and (self._do_update or self._do_weights) and self._flat_before is None:
                self._flat_before = Flat.of([p for _, p in self._params])  # W_before: weights and updates

    def _end_forward(self) -> None:
        """Summarise the outputs of the forward in progress; keep them until a backward pass shows they count.

        Forwards that have had no backward pass (yet: a loss over several forwards comes after the last of them)
        wait for the step (see :meth:`_resolve`), at most ``_MAX_PENDING_FORWARDS`` of them; beyond that the
        oldest is dropped, and its output gradients are not recorded if a backward pass reaches it later.
        """
        fwd, self._fwd = self._fwd, None
        if fwd is None or not (fwd.acts or fwd.packs):
            return
        acts, fwd.acts = fwd.acts, []
        packs, fwd.packs = fwd.packs, []
        if acts:
            packs.extend(self._pack(acts))
        self._done.append((fwd, packs))
        waiting = [i for i, (f, _) in enumerate(self._done) if not f.backed]
        if len(waiting) > _MAX_PENDING_FORWARDS:
            self._done[waiting[0]][0].dropped = True
            del self._done[waiting[0]]

    def _resolve(self) -> list[tuple[str, str, str, torch.Tensor, int | None]]:
        """At the step: keep the output summaries of the forwards that had a backward pass, drop the others.

        Returns:
            The small outputs of the forward in progress, not yet summarised, when a backward pass went through
            it (the step summarises them with its output gradients, in one batch); else none.
        """
        fwd, self._fwd = self._fwd, None
        done, self._done = self._done, []
        if self._call_order is not None and not self._call_order:  # the first forward that counts gives the order
            backed = [f for f, _ in done if f.backed] + ([fwd] if fwd is not None and fwd.backed else [])
            if backed:
                self._call_order = dict(backed[0].order)
        for f, packs in done:
            if f.backed:
                self._packs.extend(packs)
        if fwd is None or not fwd.backed:  # (an unbacked forward's outputs are not summarised at all)
            return []
        self._packs.extend(fwd.packs)
        return fwd.acts

    def _on_root_output(self, out: Any) -> None:
        """Before the first step: count backward passes through the model's output (see ``NO_STEP_WARN_AFTER``)."""
        if self._stepped or not torch.is_grad_enabled():
            return
        t = next((t for _, t in _output_items(out) if t.requires_grad), None)
        if t is None and isinstance(out, Mapping):  # e.g. a Hugging Face ModelOutput: its loss or logits
            t = next((v for v in out.values() if _is_float(v) and v.requires_grad), None)
        if t is not None:
            t.register_hook(_BackwardSeen(weakref.ref(self)))

    def _on_backward(self) -> None:
        if self._stepped or self._closed:
            return
        self._backwards += 1
        if self._backwards >= NO_STEP_WARN_AFTER:
            self._report_no_step()

    def _report_no_step(self) -> None:
        """Warn once, and record an event, that backward passes were seen but no step closed."""
        if self._no_step_reported or self._stepped or not self._backwards:
            return
        self._no_step_reported = True
        if self._optimizer is None:
            cause = "no optimizer was given (optimizer=None) and watch.step() was never called"
        else:
            cause = f"the optimizer given ({type(self._optimizer).__name__}) was never stepped"
        msg = (
            f"gradsight recorded no step: the watch on {str(self.path)!r} saw {self._backwards} backward pass(es) "
            f"but no optimizer step, because {cause}. Steps close at optimizer.step(), so nothing but scalars "
            "you log gets recorded. Fix: pass the optimizer that updates the model, gradsight.watch(model, "
            "optimizer=opt), or call watch.step() after each parameter update in a loop without a torch optimizer."
        )
        self._writer.log_event(
            self._step,
            "no-optimizer-step",
            {
                "backward_passes": self._backwards,
                "optimizer": None if self._optimizer is None else type(self._optimizer).__name__,
                "message": msg,
            },
        )
        warnings.warn(GradsightWarning(msg), stacklevel=3)

    def _on_foreign_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Another optimizer stepped: count it if it holds watched parameters; warn once past the limit."""
        holds = self._foreign.get(optimizer)
        if holds is None:
            watched = {id(p) for _, p in self._params}
            holds = any(id(p) in watched for g in optimizer.param_groups for p in g["params"])
            self._foreign[optimizer] = holds
        if not holds or self._foreign_reported:
            return
        self._foreign_steps += 1
        if self._foreign_steps < NO_STEP_WARN_AFTER:
            return
        self._foreign_reported = True
        given, other = type(self._optimizer).__name__, type(optimizer).__name__
        msg = (
            f"gradsight records no new steps: another optimizer ({other}) has updated the watched model's parameters "
            f"{self._foreign_steps} times in a row without a step of the optimizer given to the watch ({given}). "
            f"Steps close at the watched optimizer's step(), so no step is recorded from step {self._step} on "
            f"(scalars logged since are recorded at step {self._step}). Fix: close this watch and open one with the "
            "new optimizer, gradsight.watch(model, optimizer=new_opt, path=..., if_exists='append')."
        )
        self._writer.log_event(
            self._step,
            "foreign-optimizer",
            {"steps": self._foreign_steps, "optimizer": other, "watched_optimizer": given, "message": msg},
        )
        self._notes.append(msg)
        self._writer.set_meta("notes", list(self._notes))
        warnings.warn(GradsightWarning(msg), stacklevel=4)

    def _note_unseen_forward(self) -> None:
        """Gradients but no forward seen in a logged step: the hooks run inside a graph compiled after watch()."""
        if self._unseen_noted:
            return
        self._unseen_noted = True
        note = (
            f"layer outputs are not recorded from step {self._step}: the step has gradients but gradsight's hooks "
            "saw no forward of the model, most likely because the model was compiled (torch.compile or "
            "model.compile()) after the watch was opened, and hooks stay out of compiled graphs. Open the watch "
            "on the compiled model instead, gradsight.watch(compiled_model, ...), to get a clear record of what "
            "is and is not recorded."
        )
        self._notes.append(note)
        self._writer.set_meta("notes", list(self._notes))
        warnings.warn(GradsightWarning(f"gradsight: {note}"), stacklevel=4)

    def _on_output(self, name: str, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if self._frozen:
            return
        items = _output_items(out)
        if not items or any(_functorch_wrapped(t) for _, t in items):  # (inside a functorch transform: not ours)
            return
        if not torch.is_grad_enabled():
            if self._fwd is not None and self._in_forward:  # within a forward run with gradients: a reentrant
                self._sites(self._fwd, name, module, args, items)  # checkpoint's first pass (order, widths only)
            return
        key = (name, tuple(items[0][1].shape))
        if _in_backward():  # activation checkpointing recomputes forwards during backward
            left = self._unmatched.get(key, 0)
            if left:  # a repeat of a forward recorded already (use_reentrant=False): not a new output
                self._unmatched[key] = left - 1
                return
        else:
            self._unmatched[key] = self._unmatched.get(key, 0) + 1
        if self._fwd is None:  # a leaf module called outside the model's forward
            self._fwd = _Forward(self._step)
        fwd = self._fwd
        units = self.schedule.units
        for (suffix, t), (layer, axis) in zip(items, self._sites(fwd, name, module, args, items), strict=True):
            tname = layer + suffix
            if "output" in self.schedule.kinds:
                if t.numel() >= self._now_elements:  # summarised now, as the layer left it: no copy to keep
                    fwd.packs.extend(self._pack([(tname, layer, "output", t.detach(), axis if units else None)]))
                else:  # copied (a later in-place op must not change it) and summarised with the others
                    fwd.acts.append((tname, layer, "output", t.detach().clone(), axis if units else None))
            if t.requires_grad:  # also when output_grad is not recorded: the hook tells that the forward counts
                hook = t.register_hook(_GradHook(weakref.ref(self), tname, layer, axis if units else None, fwd))
                if t.is_leaf:  # (a parameter returned as it is): the hook would outlive the step
                    self._leaf_out_hooks.append(hook)

    def _sites(
        self, fwd: _Forward, name: str, module: nn.Module, args: tuple[Any, ...], items: list[tuple[str, torch.Tensor]]
    ) -> list[tuple[str, int | None]]:
        """Each output's record (layer name: ``act``, or ``act#2`` for a shared module's second width) and unit axis.

        Notes the layer in the forward's call order (:attr:`_Forward.order`), and the output's unit axis for the
        parameter-free layer that takes it next.
        """
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        inherited = None
        if inp is not None and not _has_own_params(module):
            rec = self._axis_of.get(id(inp))
            if rec is not None and rec[0]() is inp:
                inherited = rec[1]
        out = []
        for suffix, t in items:
            axis = unit_axis_for(module, t, inherited if inp is not None and t.shape == inp.shape else None)
            self._axis_of[id(t)] = (weakref.ref(t), axis)
            layer = name
            if self.schedule.units and axis is not None:  # a shared module: one record per width of its outputs
                k = _width_site(fwd, name + suffix, t.shape[axis])
                if k:
                    layer = f"{name}#{k + 1}"
            fwd.order.setdefault(layer)
            out.append((layer, axis))
        return out

    def _on_output_grad(self, tname: str, layer: str, axis: int | None, grad: torch.Tensor, fwd: _Forward) -> None:
        if not self._logged or self._closed or self._frozen or fwd.dropped or fwd.step != self._step:
            return  # (a forward of an earlier step: a graph kept with retain_graph and backpropagated again)
        fwd.backed = True
        if "output_grad" in self.schedule.kinds:
            scale = scaler_scale(self._scaler)
            if scale is not None:  # the backward of a GradScaler's scaled loss: record dJ/dA unscaled
                grad = grad.detach() / scale
            if grad.numel() >= self._now_elements:  # summarised now: the gradient need not be held to the step
                self._act_packs.extend(self._pack([(tname, layer, "output_grad", grad.detach(), axis)]))
            else:  # copied: autograd may pass this memory on as a parameter's .grad, which clipping changes
                self._acts.append((tname, layer, "output_grad", grad.detach().clone() if scale is None else grad, axis))

    def _tensor_ids(self, entries: Sequence[tuple[str, str, str, torch.Tensor]]) -> list[int]:
        """The writer's ids of ``(name, layer, kind, tensor)`` entries, kept for each list of names and kinds.

        The writer registers a tensor on first use and keeps its id; a logged step asks for the same lists again.
        """
        key = tuple((e[0], e[2]) for e in entries)
        tids = self._tid_cache.get(key)
        if tids is None:
            tids = [self._writer.tensor_id(n, layer, kind, t.shape, str(t.dtype)) for n, layer, kind, t in entries]
            if len(self._tid_cache) >= _TID_CACHE:
                self._tid_cache.clear()
            self._tid_cache[key] = tids
        return tids

    def _pack(self, acts: list[tuple[str, str, str, torch.Tensor, int | None]]) -> list[tuple[list[int], PackedStats]]:
        """Summarise layer outputs or output gradients on their devices: one pack per device."""
        tids = self._tensor_ids([a[:4] for a in acts])
        by_device: dict[torch.device, list[int]] = {}
        for i, a in enumerate(acts):
            by_device.setdefault(a[3].device, []).append(i)
        packs = []
        for idx in by_device.values():
            # summarised at once: large tensors are read in place (outputs are already private clones)
            flat = Flat.of([acts[i][3] for i in idx], [acts[i][4] for i in idx], copy=not self._pack_in_place)
            packs.append(([tids[i] for i in idx], flat.stats()))
        return packs

    def _flush_acts(self, outputs: list[tuple[str, str, str, torch.Tensor, int | None]] | None = None) -> None:
        """Summarise the output gradients seen so far (they come from a backward pass, so they always count).

        Args:
            outputs: layer outputs to summarise in the same batch (see :meth:`_resolve`).
        """
        if self._act_packs:
            self._packs.extend(self._act_packs)
            self._act_packs = []
        acts, self._acts = [*(outputs or ()), *self._acts], []
        if acts:
            self._packs.extend(self._pack(acts))

    def _param_pack(self, named: list[tuple[str, torch.Tensor]], kind: str, flat: Flat | None = None) -> Flat:
        """Summarise one parameter kind: now, or (small batches) with the step's other parameter kinds at its end.

        Args:
            named: ``(parameter name, tensor)`` of the kind.
            kind: ``"grad"``, ``"weight"`` or ``"update"``.
            flat: the batch, where the caller made it from tensors that stay unchanged until the step ends (the
                W_before buffer, the updates); else it is made here from ``named``.
        """
        tensors = [t for _, t in named]
        # Small batches are kept and summarised together at the end of the step, in one kernel set. Tensors that
        # may change before then (the gradients, which an optimizer may modify in place) are copied for that,
        # except where the compiled kernel reads them: it takes any number of buffers in one call, so they are
        # summarised now, in place.
        small = sum(t.numel() for t in tensors) <= _JOIN_ELEMENTS and (
            flat is not None or not compiled_in_place(tensors)
        )
        if flat is None:  # a large batch is summarised at once: its large tensors can be read in place
            flat = Flat.of(tensors, copy=small)
        tids = self._tensor_ids([(n, n.rpartition(".")[0] or "model", kind, t) for n, t in named])
        if small:  # summarised with the step's other parameter kinds at once
            self._param_flats.append((tids, flat))
        else:  # large: summarise now, so that the copy can go
            self._packs.append((tids, flat.stats()))
        return flat

    def _grads(self) -> list[tuple[str, torch.Tensor]]:
        out = []
        for n, p in self._params:
            g = p.grad
            if g is not None and g.layout in (torch.strided, torch.sparse_coo):  # nn.Embedding(sparse=True)'s
                out.append((n, g))
        return out

    def _before_step(self) -> None:
        """At the optimizer's step (before it changes W): cheap checks; on logged steps grads and W_before."""
        grads = self._grads() if (self.schedule.cheap or self._logged) else []
        if self.schedule.cheap:
            self._signals_before(grads)
        if not self._logged:
            return
        if not self.schedule.cheap:  # the learning rate is a per-step signal; without those, at logged steps
            self._buffer_scalars(self._step, self._lrs())
        if (
            grads
            and self._leaf_handles
            and not (self._fwd_seen or self._fwd or self._done or self._acts or self._act_packs)
        ):
            self._note_unseen_forward()
        self._flush_acts(self._resolve())  # the last forward's outputs and the output gradients: one batch
        if self._do_grad and grads:
            self._param_pack([(n, g.detach().to_dense() if g.is_sparse else g.detach()) for n, g in grads], "grad")
        weights = [(n, p.detach()) for n, p in self._params]
        same = [id(p) for _, p in self._update_params] == [id(p) for _, p in self._params]
        if self._optimizer is not None or self._flat_before is None:
            before = None
            if self._do_weights or self._do_update:  # W_before: the signals' copy of it if there is one
                before = self._wbuf_batch() if same else None
                if before is None:
                    before = Flat.of([p for _, p in weights])
            if self._do_weights and before is not None:
                self._param_pack(weights, "weight", before)
            if self._do_update and self._optimizer is not None:
                self._flat_before = before if same else Flat.of([p.detach() for _, p in self._update_params])
        elif self._do_weights:  # no optimizer: W_before was taken at the step's first forward
            self._param_pack(weights, "weight", self._flat_before)

    def _after_step(self, skipped: bool = False) -> None:
        """Close the step: the update, the per-step signals and their judge, full summaries if any; advance.

        The step advances even when recording it fails (a StoreError from the writer reaches the user, and the
        next step keeps its own number).
        """
        self._foreign_steps = 0  # (the watched optimizer stepped: other optimizers' steps count from here)
        if not self._stepped:  # the first step: stop counting backward passes (see NO_STEP_WARN_AFTER)
            self._stepped = True
            if self._root_out is not None:
                self._root_out.remove()
        try:
            if self._capture_pending:  # a closure was passed but never called: capture what there is now
                self._before_step()
            self._capture_pending = self._frozen = False
            diffs, capture = self._signals_after(skipped) if self.schedule.cheap else (None, False)
            before = self._flat_before if (self._logged and not skipped and self._do_update) else None
            if before is not None and self._update_params:
                params = [p.detach() for _, p in self._update_params]
                if diffs is not None and all(p.dtype in (torch.float32, torch.float64) for p in params):
                    update = Flat.of(diffs, copy=False)  # the signals' W_after - W_before, computed already
                else:  # (low precision: the difference of the float32 upcasts, not of the rounded values)
                    if self._optimizer is None and len(params) < len(self._params):  # W_before of every parameter
                        held = {id(p) for _, p in self._update_params}
                        before = before.take([i for i, (_, p) in enumerate(self._params) if id(p) in held])
                    update = Flat.of(params).minus(before, inplace=True)
                self._param_pack(self._update_params, "update", update)
            if self._logged:
                self._flush_step()
            elif capture and diffs is not None:  # an anomaly at this step: capture it now, at hand
                self._capture_now(diffs)
        finally:
            self._capture_pending = self._frozen = False
            self._flat_before = None
            self._fwd, self._done = None, []
            self._unmatched.clear()
            self._remove_leaf_out_hooks()
            self._bw = None
            self._step += 1
            self._fwd_seen = False
            was, self._logged = self._logged, self._full_step(self._step)
            if self._logged and not was:
                self._arm()
            elif was and not self._logged:
                self._disarm()
        self._maybe_flush_scalars(len(self._records))

    # ---- per-step signals (see ._signals) ------------------------------------------------------------------
    def _host(self, tensors: list[torch.Tensor]) -> bool:
        return _host_cheap(tensors)

    def _on_backward_end(self) -> None:
        """The end of a backward pass (engine callback): note the gradients as backward left them."""
        self._bw_queued = False
        if self._closed or self._frozen:
            return
        grads = self._grads()
        if not grads:
            return
        raw = [g for _, g in grads]  # identities and versions: the .grad tensors themselves
        tensors = [g.detach() if g.requires_grad else g for g in raw]  # (backward(create_graph=True)'s need it)
        if self._scaler is not None and self._bw is not None and self._bw.replaced(raw) and not self._stepped_since_bw:
            self._skip_step()  # a whole iteration passed without optimizer.step(): the GradScaler skipped it
        host = self._host(tensors)
        norms = norms_of(tensors, host)
        self._bw = Backward(tuple(n for n, _ in grads), raw, norms)
        self._bw_counts = counts_of(tensors, norms, host)
        self._stepped_since_bw = False

    def _copy_weights(self) -> list[float] | None:
        """Copy the optimizer's parameters into the W_before buffer (allocated again when their layout changes).

        A parameter converted after ``watch()`` (``model.double()``, ``.to(device)``) or resized gets a new
        buffer: copied into the old one, W_before would be rounded to the old dtype (or broadcast, or refused).

        Returns:
            The copies' norms where the compiled kernel computed them on the way (CPU float32), else ``None``.
        """
        pv = self._param_views()
        params = pv.params
        if not params:
            return None
        norms = None
        fresh = False
        if self._wbuf_for is not pv:  # new views: the parameters may have been converted or resized
            layout = [(p.dtype, p.shape, p.device) for p in params]
            fresh = self._wbuf is None or layout != self._wbuf_layout
            self._wbuf_for, self._wbuf_layout = pv, layout
        if not fresh and self._wbuf_np is not None and pv.views is not None:  # (the common case: no torch op)
            norms = _kernels.copy_norms_f32(pv.views, self._wbuf_np)
        else:
            with torch.no_grad():
                if fresh:
                    self._wbuf = [p.clone() for p in params]
                    self._wbuf_np = np_f32(self._wbuf)
                else:
                    try:
                        torch._foreach_copy_(self._wbuf, params)
                    except RuntimeError:  # mixed devices or dtypes
                        for b, p in zip(self._wbuf, params, strict=True):
                            b.copy_(p)
        self._wbuf_step = self._step
        return norms

    def _param_views(self) -> _Params:
        """The optimizer's parameters, detached, their names, and their numpy views for the compiled kernels.

        Kept from step to step while every parameter keeps its memory and shape (checked at each call: its data
        pointer and shape). A parameter given new memory (``p.data = ...``, ``model.double()``, ``.to(device)``)
        gets new views: the old ones, which keep the old memory alive, would read values no longer trained.
        """
        ups = self._update_params
        key = [(p.data_ptr(), p.shape) for _, p in ups]
        pv = self._pviews
        if pv is None or pv.of is not ups or pv.key != key:
            params = [p.detach() for _, p in ups]
            pv = self._pviews = _Params(ups, key, params, tuple(n for n, _ in ups), np_f32(params))
        return pv

    def _signals_before(self, grads: list[tuple[str, torch.Tensor]]) -> None:
        """At the start of the step: gradient norms (pre- and post-clip), W_before and its norms, the lr."""
        rec = self._rec = StepRecord(self._step)
        names = tuple(n for n, _ in grads)
        if names != self._cheap_names:  # one tuple per distinct layout, shared by the steps that have it
            self._cheap_names = names
        rec.grad_names = self._cheap_names
        if grads:
            bw = self._bw
            # with a loss scaler the gradients were unscaled in place since backward (GradScaler.unscale_ bumps no
            # version counter, so unchanged() cannot see it): their norms are taken again
            scaled = self._scaler is not None and scaler_scale(self._scaler) is not None
            if bw is not None and not scaled and bw.unchanged(names, [g for _, g in grads]):
                rec.grad, rec.counts = bw.norms, self._bw_counts
            else:
                tensors = [g.detach() for _, g in grads]
                host = self._host(tensors)
                rec.grad = norms_of(tensors, host)
                rec.counts = counts_of(tensors, rec.grad, host)
                if bw is not None and bw.names == names:  # clipped or unscaled since backward
                    rec.preclip = bw.norms
                    rec.scale = scaler_scale(self._scaler)
        copied = None
        if self._optimizer is not None:
            copied = self._copy_weights()
            rec.lr = self._lrs()
        if self._wbuf is not None and self._wbuf_step == self._step and self._pviews is not None:
            rec.param_names = self._pviews.names  # checked by _copy_weights just now
            rec.weight = copied if copied is not None else norms_of(self._wbuf, self._host(self._wbuf))

    def _lrs(self) -> dict[str, float]:
        """The optimizer's learning rates now, by scalar name (``lr``, or ``lr/<i>`` for several groups)."""
        out: dict[str, float] = {}
        if self._optimizer is None:
            return out
        groups = self._optimizer.param_groups
        for i, g in enumerate(groups):
            lr = g.get("lr")
            if isinstance(lr, (int, float, torch.Tensor)) and not isinstance(lr, bool):
                out["lr" if len(groups) == 1 else f"lr/{i}"] = float(lr)
        return out

    def _wbuf_batch(self) -> Flat | None:
        """This step's W_before buffer as a batch (large tensors read in place), if the signals copied it."""
        if self._wbuf is None or self._wbuf_step != self._step:
            return None
        return Flat.of(self._wbuf, copy=False)

    def _signals_after(self, skipped: bool) -> tuple[list[torch.Tensor] | None, bool]:
        """At the end of the step: update norms; judge the step.

        Returns:
            The updates ``W_after - W_before`` of the optimizer's parameters (``None`` when not measured), and
            whether an anomaly capture starts at this step.
        """
        self._stepped_since_bw = True
        rec, self._rec = self._rec, None
        if rec is None:  # no start of step seen (watch.step() calls _before_step first; a closure may not)
            return None, False
        diffs = None
        pv = self._param_views()
        params = pv.params
        if rec.weight is not None and self._wbuf is not None and not skipped:
            views = pv.views if (self._wbuf_np is not None and self._wbuf_for is pv) else None
            if views is not None and not self._logged:  # the norms only, in one pass: the differences not stored
                rec.update = _kernels.diff_norms_f32(views, self._wbuf_np)
            elif views is not None:  # a logged step summarises the differences: stored, with their norms
                diffs = [torch.empty_like(b) for b in self._wbuf]
                rec.update = _kernels.diff_into_norms_f32(views, self._wbuf_np, [d.numpy() for d in diffs])
            else:
                with torch.no_grad():
                    diffs = torch._foreach_sub(params, self._wbuf)
                rec.update = norms_of(diffs, self._host(diffs))
        rec.skipped = skipped
        capture = self._judge_step(rec)
        if capture and diffs is None and rec.update is not None:  # W_after and W_before are intact: take them now
            with torch.no_grad():
                diffs = torch._foreach_sub(params, self._wbuf)
        return diffs, capture

    def _judge_step(self, rec: StepRecord) -> bool:
        """Record the step's signals and feed them to the anomaly judge; whether a capture starts at this step.

        Host values (CPU) are judged at once. Device values are judged one step late, so that reading them waits
        only for the previous step to finish on the device: a trigger there captures the step after it.
        """
        if self._anomalies is None:
            if rec.device_parts():
                self._records.append(rec)
            else:
                self._buffer_signals(rec.step, *rec.row())
            return False
        capture = False
        lagged, self._lagged = self._lagged, None
        if lagged is not None:
            host_records([lagged])
            capture = self._judge_host(lagged)
        if rec.device_parts():
            self._lagged = rec
            return capture
        return self._judge_host(rec) or capture

    def _judge_host(self, rec: StepRecord) -> bool:
        names, values, sparse = rec.row()
        self._buffer_signals(rec.step, names, values, sparse)
        loss = self._loss
        judged: dict[str, float] = {}
        if loss is not None and loss[0] > self._loss_judged:
            value = loss[1]
            if isinstance(value, torch.Tensor):
                value = value.item() if value.device.type == "cpu" else None
            if value is not None:
                self._loss_judged = loss[0]
                if self._anomaly_loss:
                    judged["loss"] = float(value)
        judged.update((n, values[i]) for n, i in judged_signals(names))
        return self._judge_values(rec.step, judged)

    def _capture_now(self, diffs: list[torch.Tensor]) -> None:
        """Full summaries of a step that an anomaly triggered at its end: W_before, gradients, updates."""
        grads = self._grads()
        if self._do_grad and grads:
            self._param_pack([(n, g.detach()) for n, g in grads], "grad")
        if self._do_weights and self._wbuf is not None:
            before = dict(zip((n for n, _ in self._update_params), self._wbuf, strict=True))
            self._param_pack([(n, before.get(n, p.detach())) for n, p in self._params], "weight")
        if self._do_update:
            self._param_pack(list(zip((n for n, _ in self._update_params), diffs, strict=True)), "update")
        self._flush_step()

    def _skip_step(self, next_started: bool = True) -> None:
        """Close a step whose optimizer step never ran (a GradScaler found non-finite gradients).

        Args:
            next_started: the skip is seen at the next iteration's end of backward (its forward and backward
                belong to the next step); else at the scaler's ``update()`` (see :class:`_ScalerUpdate`), where
                the forward and backward in progress are the skipped step's own.
        """
        bw = self._bw
        assert bw is not None
        rec = StepRecord(self._step)
        rec.grad_names = bw.names
        scale = scaler_scale(self._scaler)
        norms = bw.norms
        if scale is not None:  # the gradients were unscaled before the skip: so are their norms
            norms = norms / scale if isinstance(norms, torch.Tensor) else [v / float(scale) for v in norms]
        rec.grad, rec.counts = norms, self._bw_counts
        params = [p.detach() for _, p in self._update_params]
        if params:
            rec.param_names = tuple(n for n, _ in self._update_params)
            rec.weight = norms_of(params, self._host(params))
        self._rec = rec
        if not next_started:
            if self._logged:
                self._flush_acts(self._resolve())
            self._after_step(skipped=True)
            return
        # the forward and backward in progress belong to the next step: keep them out of the skipped one
        fwd, acts, act_packs = self._fwd, self._acts, self._act_packs
        self._fwd, self._acts, self._act_packs = None, [], []
        if self._logged:  # the skipped step's finished forwards: their outputs (its output gradients are in _packs)
            self._resolve()
        self._after_step(skipped=True)
        self._fwd_seen = True
        if self._logged:
            if fwd is not None:
                fwd.step = self._step
            self._fwd, self._acts, self._act_packs = fwd, acts, act_packs

    def _keep_stored_order(self) -> None:
        """Appending: keep the stored run's call order and shared-module records until this watch's own are known.

        The model's description is written again when the watch opens (the architecture an appended run is checked
        against); without this, a session that logs no forward would leave the run in declaration order.
        """
        stored = getattr(self._writer, "_stored_model", None)
        if not isinstance(stored, dict) or not isinstance(stored.get("call_order"), list):
            return
        declared = {entry["name"] for entry in self._model_meta["layers"]}
        shares = [e for e in stored.get("layers") or [] if isinstance(e, dict) and "shares" in e]
        self._model_meta["layers"].extend(e for e in shares if e.get("name") not in declared)
        self._model_meta["call_order"] = list(stored["call_order"])
        self._writer.set_meta("model", dict(self._model_meta))

    def _write_call_order(self) -> None:
        """Once, after the first logged step that ran a forward: the leaf modules' call order, into the metadata.

        The layer list keeps the modules' registration order (the architecture an appended run is checked
        against), with a shared module's further records (``act#2``) added as parameter-free layers of its type;
        ``call_order`` gives the order of the forward pass, which :attr:`gradsight.store.Run.layers` follows:
        ``self.relu = nn.ReLU()`` declared after the layers it follows is placed after them.
        """
        order, self._call_order = self._call_order, None
        if order:
            layers = self._model_meta["layers"]
            declared = {entry["name"]: entry for entry in layers}
            for name in order:  # a shared module's further records (see _width_site): described as the module
                base = name.rpartition("#")[0]
                if name not in declared and base in declared:
                    layers.append({"name": name, "type": declared[base]["type"], "params": {}, "shares": base})
            self._model_meta["call_order"] = list(order)
            self._writer.set_meta("model", dict(self._model_meta))

    def _flush_step(self) -> None:
        if self._call_order:
            self._write_call_order()
        packs, self._packs = self._packs, []
        flats, self._param_flats = self._param_flats, []
        if flats:  # every small parameter batch of the step (grad, weight, update) in one kernel set
            packs.append(([t for ts, _ in flats for t in ts], Flat.join([f for _, f in flats]).stats()))
        self._acts.clear()
        self._act_packs.clear()
        self._fwd, self._done = None, []
        self._axis_of.clear()
        finish = self._host_summaries(packs)  # called even without packs: the DDP watch's collective needs it
        if not packs:
            return
        tids = [t for ts, _ in packs for t in ts]

        def items() -> SummaryArrays:
            summaries = finish()
            rows = summaries if isinstance(summaries, Rows) else to_rows(summaries)
            return SummaryArrays(*merge_rows(tids, rows))

        self._writer.log_summaries(self._step, items)

    def _host_scalars(self, pending: list[tuple[int, str, Any]]) -> dict[int, dict[str, float]]:
        """The per-step signals and the logged scalars on the host: one device->host copy for each kind."""
        records, self._records = self._records, []
        host_records(records)
        rows: dict[int, dict[str, float]] = {}
        for rec in records:
            names, values, sparse = rec.row()
            self._signal_rows.append((rec.step, names, values))
            if sparse:
                rows.setdefault(rec.step, {}).update(sparse)
        tensors = []
        for s, k, v in pending:
            if isinstance(v, torch.Tensor):
                if v.device.type == "cpu":  # no device to wait for: one read each is the cheapest
                    rows.setdefault(s, {})[k] = float(v.item())
                else:
                    tensors.append((s, k, v))
        if tensors:  # device values: one copy for all of them
            host_t = torch.stack([v.detach().reshape(()).to("cpu", torch.float64) for _, _, v in tensors]).tolist()
            for (s, k, _), v in zip(tensors, host_t, strict=True):
                rows.setdefault(s, {})[k] = v
        for s, k, v in pending:
            if not isinstance(v, torch.Tensor):
                rows.setdefault(s, {})[k] = float(v)
        return rows

    # ---- the user's API (see WatchCore) -----------------------------------------------------------------------
    def _records_lr(self) -> bool:
        return self._optimizer is not None  # without one, a loop's own learning rate is the user's to log

    def _default_log_step(self) -> int:
        """The step whose forward pass ran last.

        ``log`` after the forward of step ``s`` (before or after ``optimizer.step()``) records at ``s``. A forward
        after the step in another train/eval mode than the forwards that had backward passes (a validation pass
        with gradients enabled) is not the next step's.
        """
        return self._step if ((self._fwd_seen and self._log_fwd) or self._step == 0) else self._step - 1

    def _scalar_value(self, name: str, value: Any) -> Any:
        """Tensors are kept (detached) and copied to the host in one batch at the next flush: no sync."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise InputError(
                    f"log({name}=...) expects a number or a one-element tensor, got a tensor of shape "
                    f"{tuple(value.shape)}. Reduce it first, e.g. log({name}=t.mean())."
                )
            if value.is_meta:
                raise InputError(
                    f"log({name}=...) got a tensor on the 'meta' device, which holds a shape but no value. Log a "
                    "tensor computed on a real device (cpu, cuda, ...)."
                )
            if value.is_complex():
                raise InputError(
                    f"log({name}=...) expects a real number, got a complex tensor ({value.dtype}). Log its real "
                    f"part or its magnitude, e.g. log({name}=t.abs())."
                )
            return value.detach()
        return super()._scalar_value(name, value)

    def log(self, loss: Any = None, *, step: int | None = None, **scalars: Any) -> None:
        """See :meth:`gradsight._watch_core.WatchCore.log`; ``log(loss)`` with a tensor takes a short path."""
        if (
            not scalars
            and step is None
            and type(loss) is torch.Tensor
            and loss.numel() == 1
            and not loss.is_complex()
            and not loss.is_meta
            and not self._closed
        ):
            s = self._default_log_step()
            # a CPU loss is read now (no device to wait for): once, for the judge and the flush alike; not while
            # Dynamo traces a compiled step that calls log() (item() would break its graph)
            value = loss.item() if loss.is_cpu and not _compiling() else loss.detach()
            self._loss = (s, value)
            self._scalars.append((s, "loss", value))  # the common call, per step
            return
        super().log(loss, step=step, **scalars)
        if loss is not None:
            s = self._default_log_step() if step is None else int(step)
            self._loss = (s, self._scalars[-1][2] if self._scalars and self._scalars[-1][1] == "loss" else loss)

    def step(self) -> None:
        """Close the current step explicitly; for training loops without a ``torch.optim`` optimizer.

        Call it after the parameters were updated (and before gradients are zeroed): the step's gradients are
        summarised then, and the update is ``W now - W at the step's first forward``.

        Raises:
            WatchError: the watch was given an optimizer (its ``step()`` already closes steps), or is closed.
        """
        self._check_open("step")
        if self._optimizer is not None:
            raise WatchError(
                "watch.step() is for loops without an optimizer; this watch advances at each "
                f"{type(self._optimizer).__name__}.step() already. Remove the watch.step() call."
            )
        self._before_step()
        self._after_step()

    def _before_close(self) -> None:
        lagged, self._lagged = self._lagged, None
        if lagged is not None:  # the last step's device signals, not judged: nothing follows to capture
            host_records([lagged])
            self._buffer_signals(lagged.step, *lagged.row())
        self._report_no_step()  # may raise: a StoreError, or the warning under an "error" warnings filter

    def _release(self) -> None:
        """Remove every hook and drop the tensors held. Data of a logged step not closed by a step is dropped."""
        self._remove_hooks()
        self._acts.clear()
        self._act_packs.clear()
        self._fwd, self._done = None, []
        self._packs.clear()
        self._param_flats.clear()
        self._axis_of.clear()
        self._flat_before = None
        self._wbuf = self._wbuf_np = self._bw = self._rec = self._lagged = None
        self._wbuf_for = self._pviews = None
        self._loss = None
        self._optimizer = None
        self._params = []
        self._update_params = []
        self._leaves = []
        self._finalizer.detach()

    def _remove_leaf_out_hooks(self) -> None:
        for h in self._leaf_out_hooks:
            h.remove()
        self._leaf_out_hooks.clear()

    def _on_scaler_update(self) -> None:
        """``GradScaler.update()``: with no optimizer step since the last backward pass, the scaler skipped it."""
        if not self._closed and not self._frozen and not self._stepped_since_bw and self._bw is not None:
            self._skip_step(next_started=False)

    def _remove_hooks(self) -> None:
        self._disarm()
        self._remove_leaf_out_hooks()
        if self._scaler_update is not None:
            scaler, own = self._scaler_update
            self._scaler_update = None
            if isinstance(vars(scaler).get("update"), _ScalerUpdate):
                if own is None:
                    del scaler.update
                else:
                    scaler.update = own
        for h in self._handles:
            h.remove()
        self._handles.clear()
        host = self._compiled_host
        if host is not None:
            call = vars(host).get("_compiled_call_impl")
            if isinstance(call, _CompiledCall):
                host._compiled_call_impl = call.call
            self._compiled_host = None

    def __enter__(self) -> Watch:
        return self


def _finalize(handles: list[Any], leaf_handles: list[Any], writer: RunWriter) -> None:
    """A watch that was dropped without close(): remove its hooks and close its file."""
    for h in [*handles, *leaf_handles]:
        h.remove()
    with contextlib.suppress(Exception):  # finalizers must not raise
        writer.close()


def _compiled_kind(model: nn.Module) -> str | None:
    """How a model is compiled: ``"torch.compile"``, ``"Module.compile"`` or ``None``.

    ``"torch.compile"`` is the wrapper that ``torch.compile(model)`` returns, ``"Module.compile"`` a model compiled
    in place with ``model.compile()``. Read without importing ``torch._dynamo``.
    """
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return "torch.compile"
    if getattr(model, "_compiled_call_impl", None) is not None:
        return "Module.compile"
    return None


def _in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (activation checkpointing recomputes there)."""
    task = getattr(torch._C, "_current_graph_task_id", None)  # what torch.utils.checkpoint itself reads
    return task is not None and task() != -1


def _compiling() -> bool:
    """Whether Dynamo is tracing: every hook then returns at once, so it adds nothing to a compiled graph."""
    return torch.compiler.is_compiling()


def _width_site(fwd: _Forward, tname: str, width: int) -> int:
    """Which record of a module's output takes an output ``width`` units wide: 0 for the first width of a forward.

    A module called at several places of one forward with outputs of different widths (one ``nn.ReLU`` after
    layers of 64 and of 32 units) gets one record per width (``act``, ``act#2``, in the order of the forward):
    per-unit counts of different units cannot be merged, and one record would mix two depths of the network.
    Calls with the same width (a block's ``relu`` used twice, a cell called at every time step) share one record,
    and every forward starts again: a width that changes from batch to batch (a dropout on attention
    probabilities, over the sequence length of each batch) stays one record.
    """
    widths = fwd.widths.setdefault(tname, [])
    if width not in widths:
        widths.append(width)
    return widths.index(width)


class _Forward:
    """One forward pass of a logged step: its layer outputs, until a backward pass shows that it counts."""

    __slots__ = ("acts", "backed", "dropped", "order", "packs", "step", "widths")

    def __init__(self, step: int) -> None:
        self.step = step  # the step it belongs to: gradient hooks of older forwards record nothing
        self.backed = False  # an output's gradient hook fired: a backward pass went through this forward
        self.dropped = False  # dropped unbacked (see Watch._end_forward): its gradients are not recorded
        self.acts: list[tuple[str, str, str, torch.Tensor, int | None]] = []  # small outputs (clones)
        self.packs: list[tuple[list[int], PackedStats]] = []  # large outputs, summarised in their hooks
        self.widths: dict[str, list[int]] = {}  # each output's widths in this forward, by tensor name (_width_site)
        self.order: dict[str, None] = {}  # the layers in the order this forward called them (Watch._sites)


class _RootPreHook:
    def __init__(self, wref: Callable[[], Watch | None]) -> None:
        self.wref = wref

    def __call__(self, module: nn.Module, args: Any) -> None:
        if _compiling():
            return
        w = self.wref()
        if w is not None and not w._closed:
            w._on_forward(module)


class _RootEnd:
    """The model's forward returned: calls without gradients from now on are not part of it."""

    def __init__(self, wref: Callable[[], Watch | None]) -> None:
        self.wref = wref

    def __call__(self, module: nn.Module, args: Any, out: Any) -> None:
        w = self.wref()
        if w is not None:
            w._in_forward = False


class _RootOutHook:
    """Before the first step: a tensor hook on the model's output counts backward passes."""

    def __init__(self, wref: Callable[[], Watch | None]) -> None:
        self.wref = wref

    def __call__(self, module: nn.Module, args: Any, out: Any) -> None:
        if _compiling():
            return
        w = self.wref()
        if w is not None and not w._closed:
            w._on_root_output(out)


class _BackwardSeen:
    def __init__(self, wref: Callable[[], Watch | None]) -> None:
        self.wref = wref

    def __call__(self, grad: torch.Tensor) -> None:
        w = self.wref()
        if w is not None:
            w._on_backward()


class _CompiledCall:
    """Stands in for ``model._compiled_call_impl`` of a model compiled with ``model.compile()``.

    That compiled call runs the module's hooks inside the compiled region; this wrapper runs the watch's root
    hooks around it instead, eagerly. :meth:`Watch.close` puts the original back.
    """

    def __init__(self, wref: Callable[[], Watch | None], call: Callable[..., Any]) -> None:
        self.wref, self.call = wref, call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        w = self.wref()
        host = None if w is None else w._compiled_host
        if w is not None and not w._closed and host is not None:
            w._on_forward(host)
        out = self.call(*args, **kwargs)
        w = self.wref()
        if w is not None and not w._closed:
            w._on_root_output(out)
        return out


class _LeafHook:
    def __init__(self, wref: Callable[[], Watch | None], name: str) -> None:
        self.wref, self.name = wref, name

    def __call__(self, module: nn.Module, args: Any, out: Any) -> None:
        if _compiling():  # the model was compiled after the watch was opened: hooks stay out of its graph
            return
        w = self.wref()
        if w is not None and not w._closed and w._logged:
            w._on_output(self.name, module, args, out)


class _ScalerUpdate:
    """Stands in for ``scaler.update`` (an instance attribute; :meth:`Watch.close` removes it).

    A ``GradScaler`` skips ``optimizer.step()`` when it finds Inf/NaN gradients, and no optimizer hook runs; its
    ``update()``, which every scaler loop calls once per iteration (Lightning's and Accelerate's included), is
    where the watch learns it at once. Without it the skip shows only at the next iteration's end of backward
    (the losses and outputs of the skipped iteration then went to the next step) or never (the last iteration).
    """

    def __init__(self, wref: Callable[[], Watch | None], call: Callable[..., Any]) -> None:
        self.wref, self.call = wref, call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        w = self.wref()
        if w is not None:
            w._on_scaler_update()  # before the real update, which changes the scale the norms were taken at
        return self.call(*args, **kwargs)


class _GradHook:
    def __init__(
        self, wref: Callable[[], Watch | None], tname: str, layer: str, axis: int | None, fwd: _Forward
    ) -> None:
        self.wref, self.tname, self.layer, self.axis, self.fwd = wref, tname, layer, axis, fwd

    def __call__(self, grad: torch.Tensor) -> None:
        w = self.wref()
        if w is not None:
            w._on_output_grad(self.tname, self.layer, self.axis, grad, self.fwd)


class _Params(NamedTuple):
    """The optimizer's parameters as the per-step signals read them (see ``Watch._param_views``)."""

    of: list[tuple[str, nn.Parameter]]  # the watch's list they were made from
    key: list[tuple[int, torch.Size]]  # each parameter's data pointer and shape then
    params: list[torch.Tensor]  # detached
    names: tuple[str, ...]
    views: list[np.ndarray] | None  # numpy views for the compiled kernels, if they read every one in place


class _OptHook:
    def __init__(self, wref: Callable[[], Watch | None], pre: bool) -> None:
        self.wref, self.pre = wref, pre

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> Any:
        w = self.wref()
        if w is None or w._closed:
            return None
        if not self.pre:
            w._after_step()
            return None
        # optimizer.step(closure): the closure computes this step's gradients (and outputs) inside step(), after
        # this pre-hook. Capture right after its first call instead (see _CaptureAfterClosure).
        if kwargs.get("closure") is not None:
            wrapped = _CaptureAfterClosure(self.wref, kwargs["closure"])
            w._capture_pending = True
            return args, {**kwargs, "closure": wrapped}
        if len(args) > 1 and callable(args[1]):  # args[0] is the optimizer itself
            wrapped = _CaptureAfterClosure(self.wref, args[1])
            w._capture_pending = True
            return (args[0], wrapped, *args[2:]), kwargs
        w._before_step()
        return None


class _ForeignStep:
    """A global optimizer step post-hook: tells the watch when an optimizer it was not given has stepped."""

    def __init__(self, wref: Callable[[], Watch | None]) -> None:
        self.wref = wref

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        w = self.wref()
        if w is None or w._closed or optimizer is w._optimizer:
            return
        w._on_foreign_step(optimizer)


class _GradAccumulated:
    """Post-accumulate-grad hook on each parameter: queues one end-of-backward callback per backward pass."""

    def __init__(self, wref: Callable[[], Watch | None]) -> None:
        self.wref = wref

    def __call__(self, param: torch.Tensor) -> None:
        w = self.wref()
        if w is None or w._closed or w._bw_queued or _compiling():
            return
        w._bw_queued = True
        w._train_mode = w._fwd_mode
        w._log_fwd = True  # the forward in progress had a backward pass: it is this step's, whatever its mode
        torch.autograd.Variable._execution_engine.queue_callback(_EndBackward(self.wref))


class _EndBackward:
    """The end-of-backward callback.

    Its first call queues it again, so that it runs after every callback queued during the backward pass — DDP's
    gradient reduction among them — and sees the final gradients.
    """

    def __init__(self, wref: Callable[[], Watch | None]) -> None:
        self.wref, self.requeued = wref, False

    def __call__(self) -> None:
        if not self.requeued:
            self.requeued = True
            torch.autograd.Variable._execution_engine.queue_callback(self)
            return
        w = self.wref()
        if w is not None:
            w._on_backward_end()


class _CaptureAfterClosure:
    """The closure handed to ``optimizer.step``: calls the user's closure, then (first call only) captures the step.

    Regression fix: a step pre-hook runs *before* ``optimizer.step(closure)`` evaluates the closure, so capturing
    there recorded the previous step's gradients and none of this step's outputs (Lightning, LBFGS, any closure
    user). The closure is never evaluated early nor cached: the optimizer calls it when and as often as it wants
    (LBFGS re-evaluates it during its line search) and always gets a fresh evaluation, so wrapping changes nothing
    about training. The watch captures gradients, weights and cheap checks right after the *first* evaluation —
    the gradient at the step's starting point, which is what torch.optim optimizers (LBFGS included) evaluate
    before changing any parameter — and ignores the outputs and output gradients of later evaluations. (An
    optimizer that changes the parameters before its first closure call, e.g. SAM's perturbation, gets weights
    and updates relative to the parameters at that call.) If the closure is never called, the capture happens
    at the step post-hook.
    """

    def __init__(self, wref: Callable[[], Watch | None], closure: Callable[[], Any]) -> None:
        self.wref, self.closure = wref, closure

    def __call__(self) -> Any:
        result = self.closure()
        w = self.wref()
        if w is not None and not w._closed and w._capture_pending:
            w._capture_pending = False
            w._before_step()
            w._frozen = True  # later evaluations of the closure within this step are not recorded
        return result
