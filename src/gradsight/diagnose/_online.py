"""Online diagnosis: the same rules, evaluated during training on what has been recorded so far.

Call :meth:`OnlineDiagnosis.check` after each logged step (a framework integration does it for you, e.g.
``gradsight.KerasDiagnosisCallback``). It costs one read of the run file:

* the non-finite rule runs on every call, over the steps recorded since the previous call only (cheap, and the
  first NaN is found at the call that follows its step);
* the full rule set runs every ``full_every`` calls (and on :meth:`OnlineDiagnosis.finish`), over the whole run.

Each finding is reported **once**, when it first appears: a finding is new when it names a code/layer pair not
reported before (``non-finite`` once per run, whatever it spreads to). The full rule set relates its findings as
:func:`gradsight.diagnose.diagnose` does: root causes are reported first, and a symptom's warning says what it is
"because of" (its ``caused_by``; its advice points to the root). Reporting is a
:class:`GradsightWarning` (default) or a callback. When a new finding's code is in ``stop_on`` the diagnosis
flags :attr:`OnlineDiagnosis.should_stop` (and raises :class:`TrainingStopped` with ``raise_on_stop=True``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from .._errors import GradsightError, InputError
from ..store import Run
from ._base import Rule, RunData, Thresholds
from ._diagnose import DEFAULT_RULES, _rules, evaluate, sort_findings
from ._finding import CODES, Finding
from ._nonfinite import NonFiniteRule

__all__ = ["GradsightWarning", "OnlineDiagnosis", "TrainingStopped"]


class GradsightWarning(UserWarning):
    """A warning from gradsight during training (filter it with this category).

    Raised for findings reported by :class:`OnlineDiagnosis`, and by a watch that records less than it was asked
    to: a compiled model (no layer outputs), or backward passes without any step (nothing recorded).
    """


class TrainingStopped(GradsightError, RuntimeError):
    """Raised by :meth:`OnlineDiagnosis.check` with ``raise_on_stop=True`` when a ``stop_on`` finding appears.

    Attributes:
        finding: the finding that stopped training.
    """

    def __init__(self, finding: Finding) -> None:
        super().__init__(f"training stopped by gradsight: {finding.message}")
        self.finding = finding


def warn_finding(finding: Finding) -> None:
    """The default reporter: a :class:`GradsightWarning` with the finding's one-line summary."""
    steps = "" if finding.first_step is None else f" at step {finding.first_step}"
    because = f" (because of {', '.join(finding.caused_by)})" if finding.caused_by else ""
    warnings.warn(
        GradsightWarning(f"gradsight {finding.severity} {finding.code}{steps}{because}: {finding.message}"),
        stacklevel=3,
    )


def _checked_options(
    rules: Sequence[Rule] | None,
    on_finding: Literal["warn"] | Callable[[Finding], Any] | None,
    stop_on: Iterable[str],
    full_every: int,
) -> tuple[tuple[str, ...], Callable[[Finding], Any] | None]:
    """``(stop_on, reporter)`` from the constructor's arguments, checked; see :meth:`OnlineDiagnosis.check_args`."""
    if rules is not None:
        if isinstance(rules, (str, Rule)) or not isinstance(rules, Iterable):
            raise InputError(
                f"rules must be a list of gradsight.diagnose.Rule instances, got {type(rules).__name__} "
                f"{rules!r:.80}; e.g. rules=[NonFiniteRule()], or leave it out for every rule."
            )
        rules = _rules(list(rules))
    if isinstance(stop_on, str):
        raise InputError(
            f"stop_on must be a collection of finding codes, got the string {stop_on!r}; "
            f"write stop_on=({stop_on!r},) for one code."
        )
    if not isinstance(stop_on, Iterable):
        raise InputError(
            f"stop_on must be a collection of finding codes, got {type(stop_on).__name__} {stop_on!r:.80}; "
            "write stop_on=() to never stop, or e.g. stop_on=('non-finite',)."
        )
    codes = tuple(stop_on)
    known = set(CODES) | {c for r in (rules or DEFAULT_RULES) for c in r.codes}
    unknown = [c for c in codes if c not in known]
    if unknown:
        raise InputError(f"stop_on names unknown finding code(s) {unknown!r}; expected codes among {sorted(known)!r}.")
    report: Callable[[Finding], Any] | None
    if on_finding == "warn":
        report = warn_finding
    elif on_finding is None or callable(on_finding):
        report = on_finding
    else:
        raise InputError(f"on_finding must be 'warn', a callable or None, got {on_finding!r}.")
    if isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 1:
        raise InputError(f"full_every must be a positive integer, got {full_every!r}.")
    return codes, report


def _check_source(run: Any) -> None:
    """Refuse what cannot be the run: a model (a Keras model's ``path`` is its name), or something with no path.

    Raises:
        InputError: ``run`` is a model, or neither a path nor anything with a ``path``.
    """
    if isinstance(run, (Run, str, os.PathLike)):
        return
    model = hasattr(run, "trainable_variables") or hasattr(run, "named_parameters")  # Keras / torch
    if model or not isinstance(getattr(run, "path", None), (str, os.PathLike)):
        what = "a model" if model else f"{type(run).__name__} {run!r:.80}, which has no 'path' (a run file)"
        raise InputError(
            f"OnlineDiagnosis reads a run, got {what}. Pass the watch returned by gradsight.watch "
            "(run = gradsight.watch(model); OnlineDiagnosis(run)), a gradsight.Run or a run file path."
        )


class OnlineDiagnosis:
    """Evaluate diagnosis rules during training and report each finding once.

    Args:
        run: what the watch writes to: the watch itself, a :class:`gradsight.store.RunWriter` (anything with a
            ``path`` and, optionally, a ``flush()`` that commits pending writes), a :class:`gradsight.Run`, or a
            run file path.
        rules: the rules; default all of :data:`gradsight.diagnose.DEFAULT_RULES`.
        thresholds: a :class:`Thresholds` or a dict of overrides.
        on_finding: ``"warn"`` (a :class:`GradsightWarning`, default), a callable receiving each new
            :class:`Finding`, or ``None`` (collect silently in :attr:`findings`).
        stop_on: finding codes that flag :attr:`should_stop`; default ``("non-finite",)``; ``()`` never stops.
        raise_on_stop: also raise :class:`TrainingStopped` from :meth:`check`.
        full_every: run the full rule set every this many calls (the non-finite rule runs on every call).
        record: write each new finding as an event of kind ``"finding"`` into the run, when ``run`` can log
            events (has ``log_event``, or is a watch holding a ``RunWriter``).

    A run file path that does not exist yet finds nothing until a watch creates it; the first :meth:`check` that
    finds no file warns once (a :class:`GradsightWarning`), in case the path is a typo.

    Raises:
        InputError: ``run`` is a model (pass the watch) or has no run file path, ``rules`` are not
            :class:`Rule` instances, ``stop_on`` is not a collection of known codes, or an invalid ``on_finding`` /
            ``full_every``.
    """

    def __init__(
        self,
        run: Any,
        *,
        rules: Sequence[Rule] | None = None,
        thresholds: Thresholds | Mapping[str, Any] | None = None,
        on_finding: Literal["warn"] | Callable[[Finding], Any] | None = "warn",
        stop_on: Iterable[str] = ("non-finite",),
        raise_on_stop: bool = False,
        full_every: int = 10,
        record: bool = True,
    ) -> None:
        self.stop_on, self._report = _checked_options(rules, on_finding, stop_on, full_every)
        _check_source(run)
        self.rules = tuple(rules) if rules is not None else DEFAULT_RULES
        self._nonfinite = [r for r in self.rules if isinstance(r, NonFiniteRule)]
        self.thresholds = Thresholds.coerce(thresholds)
        self.raise_on_stop = bool(raise_on_stop)
        self.full_every = full_every
        self.record = record
        self._source = run
        self._run: Run | None = run if isinstance(run, Run) else None
        self._missing_warned = False
        self._calls = 0
        self._checked_to: int | None = None  # last step the non-finite rule has seen
        self._seen: set[tuple[str, str | None]] = set()
        #: Every finding reported so far, in order of reporting.
        self.findings: list[Finding] = []
        #: The finding that flagged a stop, or ``None``.
        self.stop_finding: Finding | None = None

    @staticmethod
    def check_args(
        *,
        rules: Sequence[Rule] | None = None,
        thresholds: Thresholds | Mapping[str, Any] | None = None,
        on_finding: Literal["warn"] | Callable[[Finding], Any] | None = "warn",
        stop_on: Iterable[str] = ("non-finite",),
        full_every: int = 10,
    ) -> None:
        """Check the arguments the constructor would check, without a run: fail early, before training starts.

        An integration that creates its :class:`OnlineDiagnosis` only once training has begun (a Lightning or
        Hugging Face callback) calls this in its own constructor, so that a typo in ``stop_on`` fails when the
        callback is built, not minutes into ``fit``::

            OnlineDiagnosis.check_args(on_finding=on_finding, stop_on=stop_on, full_every=diagnose_every)

        Args:
            rules: as for the constructor (the codes they emit are valid in ``stop_on``).
            thresholds: as for the constructor.
            on_finding: as for the constructor.
            stop_on: as for the constructor.
            full_every: as for the constructor.

        Raises:
            InputError: exactly what the constructor raises for the same arguments.
        """
        _checked_options(rules, on_finding, stop_on, full_every)
        Thresholds.coerce(thresholds)

    @property
    def should_stop(self) -> bool:
        """Whether a finding with a code in ``stop_on`` has appeared."""
        return self.stop_finding is not None

    # ---- plumbing ------------------------------------------------------------------------------------------
    def _reader(self) -> Run | None:
        flush = getattr(self._source, "flush", None)
        if callable(flush) and not isinstance(self._source, Run):
            flush()
        if self._run is None:
            path = self._source if isinstance(self._source, (str, os.PathLike)) else getattr(self._source, "path", None)
            if path is None:
                raise InputError(
                    f"OnlineDiagnosis needs a run to read: a watch, RunWriter, Run or run file path, got "
                    f"{type(self._source).__name__} {self._source!r} (it has no 'path')."
                )
            if not os.path.exists(path):
                if isinstance(self._source, (str, os.PathLike)) and not self._missing_warned:
                    self._missing_warned = True  # a path given by hand: a typo never fills, so say it once
                    warnings.warn(
                        f"OnlineDiagnosis: the run file {os.fsdecode(path)!r} does not exist (yet): nothing to "
                        "diagnose until a watch creates it. Check the path, or pass the watch itself "
                        "(OnlineDiagnosis(run) with run = gradsight.watch(model, path=...)).",
                        GradsightWarning,
                        stacklevel=3,
                    )
                return None  # a watch that writes no file (a data-parallel rank that does not record)
            self._run = Run(path)
        return self._run

    def _keys(self, f: Finding) -> set[tuple[str, str | None]]:
        if f.code == "non-finite" or not f.layers:
            return {(f.code, None)}
        return {(f.code, layer) for layer in f.layers}

    def _new(self, findings: Iterable[Finding]) -> list[Finding]:
        fresh = []
        for f in sort_findings(list(findings)):
            keys = self._keys(f)
            if keys - self._seen:
                self._seen |= keys
                fresh.append(f)
        return fresh

    def _evaluate(self, data: RunData, rules: Sequence[Rule]) -> list[Finding]:
        return evaluate(data, rules, self.thresholds)

    # ---- the API -------------------------------------------------------------------------------------------
    def check(self, step: int | None = None, *, full: bool | None = None) -> list[Finding]:
        """Evaluate the rules on what has been recorded and report the findings that are new.

        Args:
            step: the step just logged (only used to label recorded events; the data decide the findings).
            full: force (``True``) or skip (``False``) the full rule set on this call; default: every
                ``full_every`` calls.

        Returns:
            The new findings of this call (already reported), most severe first.

        Raises:
            TrainingStopped: with ``raise_on_stop=True``, when a new finding has a code in ``stop_on``.
        """
        self._calls += 1
        run = self._reader()
        if run is None:
            return []
        if full is None:
            full = self._calls % self.full_every == 0
        found: list[Finding] = []
        if full:
            found = self._evaluate(RunData(run), self.rules)
        elif self._nonfinite and ("non-finite", None) not in self._seen:
            lo = None if self._checked_to is None else self._checked_to + 1
            data = RunData(run, steps=(lo, None))
            found = self._evaluate(data, self._nonfinite)
        last = run.last_step
        if last is not None:
            self._checked_to = int(last)
        fresh = self._new(found)
        log_event = getattr(self._source, "log_event", None)  # a watch or a RunWriter records events
        for f in fresh:
            self.findings.append(f)
            if self.record and callable(log_event):
                log_event(step if step is not None else f.first_step, "finding", f.to_dict())
            if self._report is not None:
                self._report(f)
        stopper = next((f for f in fresh if f.code in self.stop_on), None)
        if stopper is not None and self.stop_finding is None:
            self.stop_finding = stopper
            if self.raise_on_stop:
                raise TrainingStopped(stopper)
        return fresh

    def finish(self) -> list[Finding]:
        """Run the full rule set once more (end of training) and report what is new; release the file."""
        try:
            return self.check(full=True)
        finally:
            self.close()

    def close(self) -> None:
        """Release the run file (when this object opened it)."""
        if self._run is not None and self._run is not self._source:
            self._run.close()
        self._run = None if not isinstance(self._source, Run) else self._source
