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
    ``"cheap"``   no full summaries at all (``every=0``), only the cheap checks below.
    ``"default"`` full summaries every 100 steps, cheap checks at every step, per-unit activity of outputs.
    ``"full"``    full summaries of every kind at every step (``every=1``), cheap checks, units.

Cheap checks (``cheap=True``), at *every* step, recorded as scalars (table ``scalars``):
    ``grad_norm``               L2 norm of all gradients together (non-finite entries make it NaN/Inf).
    ``grad_nonfinite``          number of NaN/±Inf gradient entries, all tensors together.
    ``grad_norm/<tensor>``      L2 norm of one parameter's gradient (``<tensor>`` is e.g. ``0.weight``).
    ``grad_nonfinite/<tensor>`` NaN/±Inf entries of one parameter's gradient — recorded only at steps where
                                ``grad_nonfinite > 0`` (absent means 0; it keeps the table small).
    Only parameters that have a gradient at that step appear. The norms are computed in the gradients' dtype
    (float32 accumulation for float32 gradients). They are computed on the device without a host sync and
    copied to the host in one batch every ``cheap_flush`` steps or ``commit_every`` seconds, whichever comes
    first (and at close / when the run is read), so a crash loses no more of them than of anything else.

Other scalars a watch records: ``loss`` (or any name the user passes to ``log``), and ``lr`` (one optimizer
param group) or ``lr/<i>`` (group ``i``, several groups) at logged steps.

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
        preset: the preset this schedule started from.
    """

    every: int = 100
    kinds: tuple[str, ...] = KINDS
    cheap: bool = True
    units: bool = True
    cheap_flush: int = 200
    if_exists: str = "error"
    commit_every: float = 1.0
    preset: str = "default"

    def is_logged(self, step: int) -> bool:
        """Whether step ``step`` gets full summaries."""
        return self.every > 0 and step % self.every == 0

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


#: The names of the schedule keyword arguments, in :func:`schedule`'s order.
SETTINGS: tuple[str, ...] = tuple(ScheduleSettings.__annotations__)


#: The presets, cheapest first.
PRESETS: dict[str, Schedule] = {
    "cheap": Schedule(every=0, units=False, preset="cheap"),
    "default": Schedule(),
    "full": Schedule(every=1, preset="full"),
}


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
    for name, value in (("cheap", cheap), ("units", units)):
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
    return replace(base, **changes)


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
