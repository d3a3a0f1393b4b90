"""The torch watch's per-step signals: gradient norms before and after clipping, weight and update norms.

What they mean is defined once, for every framework, in :mod:`gradsight._schedule`; this module measures them for
torch. Per optimizer step:

* **End of backward** (every backward pass, through ``register_post_accumulate_grad_hook`` on the parameters and
  an autograd-engine callback queued from it, after DDP's own gradient reduction): the norm of every gradient as
  backward left it, and each gradient's identity and ``_version``. With gradient accumulation the last backward
  before the step wins: its gradients are the accumulated ones.
* **Start of the optimizer step**: if no gradient changed since the end of backward (same tensors, same
  ``_version``), its norms are the norms the optimizer receives and nothing is computed again. Otherwise
  something (``clip_grad_norm_``, a ``GradScaler``'s unscaling) changed them in place: their norms are taken
  again, and the end-of-backward norms become ``grad_norm_preclip`` — divided by the scaler's scale when a
  ``GradScaler`` was given (``scaler=``), so that pre-clip values are unscaled like the rest. The optimizer's
  parameters are copied into a persistent buffer (``torch._foreach_copy_``) and their norms taken: ‖W_before‖.
* **End of the optimizer step**: ``W_after − W_before`` (``_foreach_sub``) and its norms: the update norms. On
  logged steps the full summaries of the weights and updates read the W_before buffer and these differences
  instead of copying the parameters again.

A step that the optimizer never took — ``GradScaler.step`` skips ``optimizer.step()`` when it finds Inf/NaN
gradients — is closed as skipped (``step_skipped``; no update norms) at the scaler's ``update()``, which the
watch wraps while it is open: no optimizer step since the last backward pass means the scaler skipped it. (A loop
that never calls ``update()`` shows the skip as a second end of backward, with new gradient tensors —
``zero_grad()`` set them to ``None`` — before any step.) Detecting it needs the scaler (``scaler=``; without one,
an extra backward pass between steps — a gradient penalty, an analysis — must not be mistaken for a skipped
step). With a scaler the gradient norms at the step are always taken again: ``GradScaler.unscale_`` changes the
gradients in place without bumping their version counter.

Cost per step: the end-of-backward callback and one ``_foreach_norm`` over the gradients per backward pass; one
``_foreach_copy_`` and one ``_foreach_norm`` over the optimizer's parameters, one ``_foreach_sub`` and one
``_foreach_norm`` at the end; a second ``_foreach_norm`` over the gradients only at steps where they were
clipped or unscaled. For CPU float32 tensors, where the compiled kernels were built (:mod:`gradsight._kernels`),
the copy and its norm are one fused pass, and so — at steps without full summaries — is the norm of
``W_after − W_before``, without storing the difference (an anomaly capture at such a step computes the difference
then, before anything changed).

Memory: one copy of the optimizer's parameters (the buffer), and a transient one during the update norm where
the difference is stored. (A second persistent buffer for the update, filled by ``_foreach_copy_`` and
``_foreach_sub_``, was tried: 3.5× faster than ``_foreach_sub`` timed alone on a 3.5 M-parameter model, where the
fresh allocation page-faults, but ≈ 1% slower inside the training step, where the allocator reuses the memory
freed the step before; not kept.)
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..._kernels import norms_at_f32
from ..._watch_core import signal_row
from ._summary import compiled_in_place, f32_addresses

__all__ = ["Backward", "Norms", "StepRecord", "counts_of", "host_records", "norms_of", "np_f32", "scaler_scale"]

#: Norms of a list of tensors: host floats (CPU tensors: read at once, no device sync) or a 1-d device tensor.
Norms = list[float] | torch.Tensor


def np_f32(tensors: Sequence[torch.Tensor]) -> list[np.ndarray] | None:
    """The tensors as numpy views, for the compiled kernels (:mod:`gradsight._kernels`), or ``None``.

    ``None`` unless the kernels were built and every tensor is one they read in place
    (:func:`._summary.compiled_in_place`: a plain, C-contiguous float32 CPU tensor, not a subclass such as
    ``DTensor``).
    """
    if not compiled_in_place(tensors):
        return None
    return [t.detach().numpy() for t in tensors]


def norms_of(tensors: Sequence[torch.Tensor], host: bool) -> Norms:
    """The L2 norm of each tensor, its squares summed in float64; NaN/Inf only when it has non-finite entries.

    Summed in float64 like the summaries' ``sum_sq``, so that the per-step norms agree with them to float64
    rounding: torch's float32 norm is off by up to ~2e-3 (relative) on a tensor of 4 M equal entries, and a float32
    sum of squares overflows from entries of about 1.8e19 on. On the host, plain float32 CPU tensors go through
    the compiled kernel (:func:`gradsight._kernels.norms_at_f32`: one call for all of them; on 3.45 M parameters
    0.25 ms with AVX2 against torch's float32 norm's 0.21 ms, and 4.5x faster than torch accumulating in float64),
    others through torch in float64. On a device, in float64 at once, with no host read.

    Args:
        tensors: the tensors (at least one).
        host: read the results at once (CPU tensors); else keep them on the device in one float64 tensor.
    """
    if any(t.is_sparse for t in tensors):  # a sparse gradient: its stored values (duplicates summed) hold its norm
        tensors = [_values(t) for t in tensors]
    if host:
        at = f32_addresses(tensors)
        if at is not None:  # (the kernels are built: f32_addresses said so)
            return norms_at_f32(*at)  # type: ignore[return-value]
        try:
            return [t.item() for t in torch._foreach_norm(list(tensors), 2, dtype=torch.float64)]
        except RuntimeError:  # mixed dtypes
            return [torch.linalg.vector_norm(t, dtype=torch.float64).item() for t in tensors]
    device = tensors[0].device
    try:
        return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float64))
    except RuntimeError:  # mixed devices or dtypes
        return torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64).to(device) for t in tensors])


def _values(t: torch.Tensor) -> torch.Tensor:
    """A sparse COO tensor's stored values, duplicates summed (a strided tensor itself)."""
    return t.coalesce().values() if t.is_sparse else t


def counts_of(tensors: Sequence[torch.Tensor], norms: Norms, host: bool) -> list[int] | torch.Tensor | None:
    """The number of NaN/±Inf entries of each tensor; ``None`` when the host norms show there are none."""
    if any(t.is_sparse for t in tensors):
        tensors = [_values(t) for t in tensors]
    if host:
        assert isinstance(norms, list)
        if all(map(math.isfinite, norms)):
            return None
        return [int(torch.count_nonzero(d)) for d in torch._foreach_sub(list(tensors), list(tensors))]
    device = tensors[0].device
    return torch.stack([torch.count_nonzero(d).to(device) for d in torch._foreach_sub(list(tensors), list(tensors))])


class Backward:
    """What the end of one backward pass left: the gradients' norms, identities and versions."""

    __slots__ = ("names", "norms", "refs", "versions")

    def __init__(self, names: tuple[str, ...], grads: Sequence[torch.Tensor], norms: Norms) -> None:
        self.names = names
        self.norms = norms
        self.refs = [weakref.ref(g) for g in grads]
        self.versions = [g._version for g in grads]

    def unchanged(self, names: tuple[str, ...], grads: Sequence[torch.Tensor]) -> bool:
        """Whether ``grads`` are the very tensors backward left, not modified since (no clipping, no unscaling)."""
        return (
            names == self.names
            and all(r() is g for r, g in zip(self.refs, grads, strict=True))
            and all(g._version == v for g, v in zip(grads, self.versions, strict=True))
        )

    def replaced(self, grads: Sequence[torch.Tensor]) -> bool:
        """Whether the gradients are new tensors since (zeroed to ``None`` and recomputed: a new iteration)."""
        return bool(grads) and bool(self.refs) and self.refs[0]() is not grads[0]


class StepRecord:
    """One step's per-step signals until they reach the host (values: host lists or device tensors)."""

    __slots__ = (
        "counts",
        "grad",
        "grad_names",
        "lr",
        "param_names",
        "preclip",
        "scale",
        "skipped",
        "step",
        "update",
        "weight",
    )

    def __init__(self, step: int) -> None:
        self.step = step
        self.grad_names: tuple[str, ...] = ()
        self.grad: Norms | None = None
        self.counts: list[int] | torch.Tensor | None = None
        self.preclip: Norms | None = None
        self.scale: torch.Tensor | float | None = None  # the GradScaler's scale: preclip norms are divided by it
        self.param_names: tuple[str, ...] = ()
        self.weight: Norms | None = None
        self.update: Norms | None = None
        self.lr: dict[str, float] = {}
        self.skipped = False

    def device_parts(self) -> list[tuple[str, torch.Tensor]]:
        """The fields still on a device, by name, to be copied to the host in one batch."""
        return [
            (k, v)
            for k in ("grad", "counts", "preclip", "weight", "update", "scale")
            if isinstance(v := getattr(self, k), torch.Tensor)
        ]

    def to_host(self, values: dict[str, list[float]]) -> None:
        """Put the host copies of :meth:`device_parts` in place."""
        for k, v in values.items():
            setattr(self, k, v[0] if k == "scale" else v)

    def row(self) -> tuple[tuple[str, ...], list[float], dict[str, float]]:
        """The step's signals, by :func:`gradsight._watch_core.signal_row` (host values only)."""
        preclip = self.preclip
        if preclip is not None and self.scale is not None:
            s = float(self.scale)  # type: ignore[arg-type]
            preclip = [v / s for v in preclip]  # type: ignore[union-attr]
        return signal_row(
            self.grad_names,
            self.grad or [],  # type: ignore[arg-type]
            self.counts,  # type: ignore[arg-type]
            preclip=preclip,  # type: ignore[arg-type]
            param_names=self.param_names,
            weight=self.weight,  # type: ignore[arg-type]
            update=self.update,  # type: ignore[arg-type]
            lr=self.lr,
            skipped=self.skipped,
        )


def host_records(records: list[StepRecord]) -> None:
    """Copy the device fields of every record to the host: one device->host copy for all of them."""
    parts = [(r, k, t) for r in records for k, t in r.device_parts()]
    if not parts:
        return
    device = parts[0][2].device
    flat = torch.cat([t.reshape(-1).to(device, torch.float64) for _, _, t in parts]).tolist()
    i = 0
    per: dict[int, dict[str, list[float]]] = {}
    for r, k, t in parts:
        n = t.numel()
        per.setdefault(id(r), {})[k] = flat[i : i + n]
        i += n
    for r in records:
        if id(r) in per:
            r.to_host(per[id(r)])


def scaler_scale(scaler: Any) -> torch.Tensor | float | None:
    """The loss scale of an enabled ``torch.amp.GradScaler`` (a device tensor, no sync), else ``None``."""
    if scaler is None or not getattr(scaler, "_enabled", True):
        return None
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().reshape(())
        return scale.item() if scale.device.type == "cpu" else scale.clone()
    return None
