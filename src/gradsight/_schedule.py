"""When a watch records what: schedules and cost presets, shared by every framework adapter (no framework code).

A :class:`Schedule` is a small frozen value. Build one with :func:`schedule` from a preset and overrides; the
adapters accept the same keyword arguments (``every``, ``kinds``, ``cheap``, ``units``, ``if_exists``,
``commit_every``) and pass them here.

Steps
    A watch counts optimizer steps from 0 (or from the last stored step + 1 when appending to a run). Step ``s``
    is *logged* — full summaries of every requested kind — when ``Schedule.is_logged(s)``: ``every > 0`` and
    ``s % every == 0``. The rule depends on the step number only, so it is identical on every rank of a
    data-parallel job.

Presets, by cost
    ``"cheap"``   no full summaries at all (``every=0``), only the per-step signals below; no anomaly capture.
    ``"default"`` full summaries every 100 steps, per-step signals, anomaly capture, per-unit activity of outputs.
    ``"full"``    full summaries of every kind at every step (``every=1``), per-step signals, units.

Per-step signals (``cheap=True``), at *every* optimizer step, recorded as scalars (table ``scalars``). Each name
has one meaning in every framework:

    ==============================  ==========================================================================
    ``grad_norm``                   L2 norm of all gradients together **as the optimizer receives them**:
                                    after clipping (``clip_grad_norm_``, ``max_grad_norm``,
                                    ``gradient_clip_val``, Keras ``clipnorm``/``global_clipnorm``/
                                    ``clipvalue``) and, under mixed precision, unscaled. Non-finite entries make
                                    it NaN/Inf.
    ``grad_norm/<tensor>``          the same for one parameter tensor (``<tensor>`` is e.g. ``0.weight``).
    ``grad_nonfinite``              NaN/±Inf gradient entries, all tensors together.
    ``grad_nonfinite/<tensor>``     the same per tensor, only at steps where ``grad_nonfinite > 0``.
    ``grad_norm_preclip``           the global gradient norm as backward left it, before any clipping (unscaled
                                    under mixed precision), with gradient accumulation the accumulated one.
    ``grad_norm_preclip/<tensor>``  the same per tensor, only at steps where it differs from ``grad_norm/<t>``.
    ``clip_ratio``                  ``grad_norm / grad_norm_preclip``, only at steps where the two differ (the
                                    run's meta then has ``clipping: {"first_step": s}``).
    ``weight_norm/<tensor>``        ‖W‖ of a parameter the optimizer holds, before this step's update.
    ``update_norm/<tensor>``        ‖W_after − W_before‖ around this step's optimizer update (0 for a parameter
                                    the optimizer skipped).
    ``lr``, ``lr/<i>``              the learning rate this step's update used (one group; group ``i``).
    ``step_skipped``                1 at a step whose update was skipped (mixed precision found Inf/NaN
                                    gradients); such a step has no ``update_norm``. Absent otherwise.
    ``loss``                        when the user logs it (``watch.log(loss)``; Keras ``fit`` logs it itself).
    ==============================  ==========================================================================

    Only parameters that have a gradient at that step appear in ``grad_*``; the update/weight ratio of a tensor
    at a step is ``update_norm/<t> / weight_norm/<t>``. With gradient accumulation the signals are per optimizer
    step, not per micro-batch. Norms are computed in the tensors' dtype on their device, without a host sync
    where the device is an accelerator, and copied to the host in one batch every ``cheap_flush`` steps or
    ``commit_every`` seconds, whichever comes first (and at close / when the run is read), so a crash loses no
    more of them than of anything else. Cost: a handful of fused norm kernels per step, and one copy of the
    optimizer's parameters, held between the start of ``optimizer.step()`` and its end, to measure the update.

Anomaly capture (``anomaly=True``, the default preset): when a per-step signal is non-finite or jumps above
``anomaly_factor`` times its running median, the step and the next ``anomaly_steps`` steps get full summaries
regardless of ``every``, and an event ``anomaly`` is recorded; rate-limited. The rule is documented in one place,
:mod:`gradsight._anomaly`.

Run files: ``if_exists="error"`` (default) refuses an existing file — gradsight never overwrites silently;
``"append"`` continues it (step numbering resumes after the last stored step) and refuses a run of another model
(a parameter with another shape or dtype); ``"overwrite"`` replaces it, but only a gradsight run file (or an empty
file). A run file that another watch is writing is refused in every mode (see :mod:`gradsight.store`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, TypedDict

from ._anomaly import Anomalies
from ._errors import InputError

__all__ = ["KINDS", "PRESETS", "SETTINGS", "Schedule", "ScheduleSettings", "schedule", "schedule_from"]

#: The kinds of tensor a watch can record (same as ``gradsight.store.KINDS``).
KINDS: tuple[str, ...] = ("weight", "grad", "update", "output", "output_grad")
_IF_EXISTS = ("error", "append", "overwrite")


@dataclass(frozen=True)
class Schedule:
    """What a watch records and when; see the module docstring.

    Attributes:
        every: full summaries at steps ``s`` with ``s % every == 0``; 0 means never.
        kinds: which kinds of tensor get full summaries on logged steps.
        cheap: whether the cheap checks (gradient norms, non-finite counts) run at every step.
        units: whether layer outputs get per-unit activity counts.
        cheap_flush: copy the cheap checks' device results to the host every this many steps.
        if_exists: ``"error"``, ``"append"`` or ``"overwrite"`` for an existing run file.
        commit_every: seconds between commits of the run file (the most a crash can lose).
        anomaly: capture full summaries around steps whose per-step signals jump (see :mod:`gradsight._anomaly`).
        anomaly_factor: a signal above this many times its running median is a jump.
        anomaly_window: the number of past steps that running median is taken over.
        anomaly_steps: steps captured in full after a triggering step.
        anomaly_cooldown: the first gap, in steps, between two captures (it doubles while the anomaly persists).
        preset: the preset this schedule started from.
    """

    every: int = 100
    kinds: tuple[str, ...] = KINDS
    cheap: bool = True
    units: bool = True
    cheap_flush: int = 200
    if_exists: str = "error"
    commit_every: float = 1.0
    anomaly: bool = True
    anomaly_factor: float = 10.0
    anomaly_window: int = 20
    anomaly_steps: int = 5
    anomaly_cooldown: int = 20
    preset: str = "default"

    def is_logged(self, step: int) -> bool:
        """Whether step ``step`` gets full summaries by the ``every`` rule (anomaly captures come on top)."""
        return self.every > 0 and step % self.every == 0

    def anomalies(self) -> Anomalies | None:
        """A fresh anomaly detector for this schedule, or ``None`` when anomaly capture is off or pointless.

        Off when ``anomaly=False``, when ``cheap=False`` (no per-step signals to judge) and when every step is
        logged anyway (``every=1``); see :mod:`gradsight._anomaly`.
        """
        if not (self.anomaly and self.cheap) or self.every == 1:
            return None
        return Anomalies(
            factor=self.anomaly_factor,
            window=self.anomaly_window,
            steps=self.anomaly_steps,
            cooldown=self.anomaly_cooldown,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in the run's metadata under ``config``."""
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d


class ScheduleSettings(TypedDict, total=False):
    """The schedule keyword arguments every watch entry point accepts (``**settings``); see :func:`schedule`."""

    every: int | None
    kinds: str | tuple[str, ...] | list[str] | None
    cheap: bool | None
    units: bool | None
    cheap_flush: int | None
    if_exists: str | None
    commit_every: float | None
    anomaly: bool | None
    anomaly_factor: float | None
    anomaly_window: int | None
    anomaly_steps: int | None
    anomaly_cooldown: int | None


#: The names of the schedule keyword arguments, in :func:`schedule`'s order.
SETTINGS: tuple[str, ...] = tuple(ScheduleSettings.__annotations__)


#: The presets, cheapest first.
PRESETS: dict[str, Schedule] = {
    "cheap": Schedule(every=0, units=False, anomaly=False, preset="cheap"),
    "default": Schedule(),
    "full": Schedule(every=1, anomaly=False, preset="full"),
}


# long function: one flat checklist, a few lines per setting, each with its own message; read best top to bottom
def schedule(
    preset: str | Schedule = "default",
    *,
    every: int | None = None,
    kinds: str | tuple[str, ...] | list[str] | None = None,
    cheap: bool | None = None,
    units: bool | None = None,
    cheap_flush: int | None = None,
    if_exists: str | None = None,
    commit_every: float | None = None,
    anomaly: bool | None = None,
    anomaly_factor: float | None = None,
    anomaly_window: int | None = None,
    anomaly_steps: int | None = None,
    anomaly_cooldown: int | None = None,
) -> Schedule:
    """A :class:`Schedule` from a preset (or an existing schedule) with overrides; arguments left ``None`` keep it.

    Args:
        preset: ``"cheap"``, ``"default"``, ``"full"``, or a :class:`Schedule`.
        every: log full summaries every this many steps (0: never).
        kinds: a kind or several of ``weight``, ``grad``, ``update``, ``output``, ``output_grad``.
        cheap: run the cheap checks at every step.
        units: per-unit activity counts for outputs.
        cheap_flush: steps between host copies of the cheap checks.
        if_exists: ``"error"``, ``"append"`` or ``"overwrite"``.
        commit_every: seconds between commits.
        anomaly: capture full summaries around anomalous steps (see :mod:`gradsight._anomaly`).
        anomaly_factor: jump threshold, in multiples of a signal's running median (> 1).
        anomaly_window: past steps in that running median (>= 3).
        anomaly_steps: steps captured after a triggering step (>= 0).
        anomaly_cooldown: first gap between two captures, in steps (>= 1).

    Returns:
        The schedule.

    Raises:
        InputError: an unknown preset or kind, or a value out of range.
    """
    if isinstance(preset, Schedule):
        base = preset
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise InputError(
            f"unknown preset {preset!r}; expected one of {', '.join(map(repr, PRESETS))} (cheapest first) "
            "or a gradsight Schedule."
        )
    changes: dict[str, Any] = {}
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise InputError(
                f"every must be a non-negative int (log full summaries every `every` steps; 0: never), got {every!r}."
            )
        changes["every"] = every
    if kinds is not None:
        ks = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        bad = [k for k in ks if k not in KINDS]
        if bad:
            raise InputError(f"unknown kind(s) {bad!r} in kinds={kinds!r}; expected any of {list(KINDS)!r}.")
        changes["kinds"] = tuple(k for k in KINDS if k in ks)
    for name, value in (("cheap", cheap), ("units", units), ("anomaly", anomaly)):
        if value is not None:
            if not isinstance(value, bool):
                raise InputError(f"{name} must be True or False, got {value!r}.")
            changes[name] = value
    if cheap_flush is not None:
        if isinstance(cheap_flush, bool) or not isinstance(cheap_flush, int) or cheap_flush < 1:
            raise InputError(f"cheap_flush must be a positive int (steps), got {cheap_flush!r}.")
        changes["cheap_flush"] = cheap_flush
    if if_exists is not None:
        if if_exists not in _IF_EXISTS:
            raise InputError(
                f"if_exists must be one of {', '.join(map(repr, _IF_EXISTS))}, got {if_exists!r}. "
                "gradsight never overwrites a run file unless asked with if_exists='overwrite'."
            )
        changes["if_exists"] = if_exists
    if commit_every is not None:
        if not (isinstance(commit_every, (int, float)) and math.isfinite(commit_every) and commit_every > 0):
            raise InputError(f"commit_every must be a positive number of seconds, got {commit_every!r}.")
        changes["commit_every"] = float(commit_every)
    changes.update(_anomaly_changes(anomaly_factor, anomaly_window, anomaly_steps, anomaly_cooldown))
    return replace(base, **changes)


def _anomaly_changes(
    factor: float | None, window: int | None, steps: int | None, cooldown: int | None
) -> dict[str, Any]:
    """The checked anomaly settings of :func:`schedule` that were given.

    Raises:
        InputError: a value out of range.
    """
    changes: dict[str, Any] = {}
    if factor is not None:
        if not (
            isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor) and factor > 1
        ):
            raise InputError(
                f"anomaly_factor must be a number > 1 (a signal above anomaly_factor times its running median "
                f"triggers a capture), got {factor!r}."
            )
        changes["anomaly_factor"] = float(factor)
    for name, value, low, what in (
        ("anomaly_window", window, 3, "past steps in the running median"),
        ("anomaly_steps", steps, 0, "steps captured after a triggering step"),
        ("anomaly_cooldown", cooldown, 1, "steps between two captures"),
    ):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name} must be an int >= {low} ({what}), got {value!r}.")
            changes[name] = value
    return changes


def schedule_from(preset: str | Schedule, settings: Mapping[str, Any], *, where: str = "gradsight.watch") -> Schedule:
    """:func:`schedule` from the ``**settings`` a watch entry point received; the one place they are checked.

    Args:
        preset: as for :func:`schedule`.
        settings: keyword arguments, each one of :data:`SETTINGS`.
        where: the entry point's name, for the error message.

    Returns:
        The schedule.

    Raises:
        TypeError: a keyword that is not a schedule setting (as Python raises for an unknown keyword).
        InputError: a value out of range (see :func:`schedule`).
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(
            f"{where}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; the schedule settings "
            f"are {', '.join(SETTINGS)} (see gradsight._schedule), next to path=, preset= and config=."
        )
    return schedule(preset, **settings)
