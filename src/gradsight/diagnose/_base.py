"""What every diagnosis rule shares: the thresholds, a cached read-only view of a run, and the Rule base class.

Rules are independent units. Each declares the data it needs (tensor kinds and scalar names), reports whether
the run has it (:meth:`Rule.applies` / :meth:`Rule.missing`), and reads *only* the run store through a
:class:`RunData` — never a tensor, never a framework. A rule whose data was not recorded is skipped, not failed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .._errors import InputError
from ..store import Run, load
from ._finding import Finding

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["LOSS_SCALARS", "Rule", "RunData", "Thresholds", "fmt"]

#: Scalar names read as the training loss, first match wins.
LOSS_SCALARS = ("loss", "train/loss", "train_loss")


@dataclass(frozen=True)
class Thresholds:
    """Every number a rule compares against, with its reasoning. All are heuristics unless stated otherwise.

    Pass a modified copy to :func:`gradsight.diagnose.diagnose`, e.g.
    ``diagnose(run, thresholds=Thresholds(vanish_ratio=1e-4))`` or ``thresholds={"vanish_ratio": 1e-4}``.

    Attributes:
        baseline_steps: how many of the first logged steps (with finite gradients) form the baseline that
            gradient growth is measured against; the median over them resists one odd first batch. A series
            shorter than ``2 * baseline_steps`` uses its first half (at least one value).
        explode_growth: exploding gradients over *time*: a gradient norm (global, or a layer's RMS) that grows
            to more than this multiple of its baseline. Healthy runs keep gradient norms within about one order
            of magnitude of their start over short runs (they usually shrink as the loss falls); two orders of
            magnitude of growth is the signature of divergence (heuristic).
        explode_depth_ratio: exploding gradients over *depth*: a layer whose median gradient RMS exceeds this
            multiple of the largest median gradient RMS of the layers after it, i.e. gradients amplified by
            three orders of magnitude on their way back (heuristic; the mirror image of ``vanish_ratio``).
        vanish_ratio: vanishing gradients: a layer whose median gradient RMS is below this fraction of the
            largest median gradient RMS of the layers after it. A saturating activation passes at most 1/4
            (sigmoid) of the gradient per layer, so ten such layers shrink it by ~1e-6; 1e-3 flags the early
            layers of such a stack while leaving the 1x-100x spread seen between layers of healthy nets alone.
            Layers whose gradient is exactly zero are left to the dead-units and update-ratio rules.
        dead_fraction: dead units: warn when at least this fraction of a layer's units was exactly zero for
            every sample and position of the last ``recent_steps`` logged steps (a "dying ReLU" layer). A few dead
            units are normal; half of a layer means half of its capacity and of its gradient paths are gone.
            A layer with *all* units dead is an error (no gradient reaches anything before it).
        recent_steps: the number of most recent logged steps that the unit rules pool: a unit is dead only if it
            was zero on every batch of them (so a merely rare unit is not called dead), and saturation is the
            median over them (so a saturated start that training repairs is not reported).
        saturation_gain: saturated units, for layers known to apply ``tanh`` or ``sigmoid``: warn when the
            layer's mean local derivative, relative to its maximum, is below this. For ``tanh``,
            ``E[1 - a**2] = 1 - sum_sq / n`` and for ``sigmoid`` ``E[a (1 - a)] / 0.25 = 4 (sum - sum_sq) / n``,
            both *exact* from the stored sums. A unit-variance Gaussian pre-activation gives ~0.6 (tanh) and
            ~0.8 (sigmoid); 0.25 corresponds to pre-activations with a standard deviation of about 3.5 (tanh),
            where most units sit on their flat tails and pass almost no gradient.
        update_ratio_high: ``||update|| / ||weight||`` per layer (median over logged steps) above which updates
            are too large. The common rule of thumb (CS231n) is ~1e-3 per SGD step; 1e-1 — a tenth of the
            weights rewritten at every step — is two orders of magnitude above it and means the learning rate
            is too high for that layer.
        update_ratio_low: the same ratio below which a layer is effectively frozen: three orders of magnitude
            under the ~1e-3 heuristic (a million steps to move the weights by their own size).
        loss_min_steps: loss-not-decreasing needs at least this many finite loss values.
        loss_window: the fraction of the finite loss values (at least 3) forming the "start" and "end" windows
            whose medians are compared; medians resist minibatch noise.
        loss_min_decrease: the relative decrease of the end median against the start median below which the
            loss counts as not decreasing (1 %: any run that learns at all clears it).
    """

    baseline_steps: int = 3
    explode_growth: float = 100.0
    explode_depth_ratio: float = 1e3
    vanish_ratio: float = 1e-3
    dead_fraction: float = 0.5
    recent_steps: int = 5
    saturation_gain: float = 0.25
    update_ratio_high: float = 1e-1
    update_ratio_low: float = 1e-6
    loss_min_steps: int = 10
    loss_window: float = 0.2
    loss_min_decrease: float = 0.01

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(
                    f"Thresholds.{f.name} must be a finite, non-negative number, got {value!r}; "
                    f"the default is {f.default!r}."
                )
        if self.baseline_steps < 1 or self.recent_steps < 1:
            raise InputError(
                f"Thresholds.baseline_steps and recent_steps must be at least 1, got {self.baseline_steps!r} and "
                f"{self.recent_steps!r}."
            )
        if not 0 < self.loss_window <= 0.5:
            raise InputError(f"Thresholds.loss_window must be in (0, 0.5], got {self.loss_window!r}.")
        if self.update_ratio_low >= self.update_ratio_high:
            raise InputError(
                f"Thresholds.update_ratio_low ({self.update_ratio_low!r}) must be below update_ratio_high "
                f"({self.update_ratio_high!r})."
            )

    @classmethod
    def coerce(cls, value: Thresholds | Mapping[str, Any] | None) -> Thresholds:
        """A :class:`Thresholds` from ``None`` (the defaults), a mapping of overrides, or a Thresholds."""
        if value is None:
            return cls()
        if isinstance(value, Thresholds):
            return value
        if isinstance(value, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise InputError(
                    f"unknown threshold(s) {unknown!r}; expected names among {sorted(names)!r}, "
                    "e.g. thresholds={'vanish_ratio': 1e-4}."
                )
            return cls(**dict(value))
        raise InputError(
            f"thresholds must be a gradsight.diagnose.Thresholds, a dict of overrides or None, got {value!r}."
        )


def fmt(x: float) -> str:
    """A number as rules print it in messages: 3 significant digits (``1.23e-05``, ``0.0123``, ``4.5``)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.3g}"


class RunData:
    """A read-only, cached view of a run for rules: each kind is read from the store at most once.

    Args:
        run: a :class:`gradsight.Run`, a path to a run file, or an open watch (committed first, then read).
        steps: an optional inclusive ``(first, last)`` step window (online evaluation reads only new steps).
    """

    def __init__(self, run: Run | str | os.PathLike[str], *, steps: tuple[int | None, int | None] | None = None):
        if not isinstance(run, (Run, str, os.PathLike)) and hasattr(run, "path"):  # a watch: commit, then read
            flush = getattr(run, "flush", None)
            if callable(flush):
                flush()
            run = run.path
        self.run = load(run)
        self.steps = steps
        self._frames: dict[tuple[str, bool, bool], pd.DataFrame] = {}
        self._scalars: pd.DataFrame | None = None
        self._kinds: set[str] | None = None
        self._layers: list[str] | None = None
        self._meta: dict[str, Any] | None = None
        self._events: dict[str | None, list[dict[str, Any]]] = {}

    @property
    def meta(self) -> dict[str, Any]:
        """The run's metadata."""
        if self._meta is None:
            self._meta = self.run.meta
        return self._meta

    @property
    def layers(self) -> list[str]:
        """Layer names in model order."""
        if self._layers is None:
            self._layers = self.run.layers
        return self._layers

    def layer_index(self, layer: str) -> int:
        """Position of a layer in model order (unknown layers sort last)."""
        try:
            return self.layers.index(layer)
        except ValueError:
            return len(self.layers)

    @property
    def kinds(self) -> set[str]:
        """The tensor kinds that have registered tensors in the run."""
        if self._kinds is None:
            self._kinds = {t.kind for t in self.run.tensors}
        return self._kinds

    def frame(self, kind: str, *, hist: bool = False, units: bool = False) -> pd.DataFrame:
        """Long DataFrame of one kind's summaries (see :meth:`gradsight.Run.to_pandas`), cached."""
        key = (kind, hist, units)
        if key not in self._frames:
            self._frames[key] = self.run.to_pandas(kind=kind, steps=self.steps, hist=hist, units=units)
        return self._frames[key]

    @property
    def scalars(self) -> pd.DataFrame:
        """Wide per-step scalars (index ``step``), restricted to the step window."""
        if self._scalars is None:
            df = self.run.scalars
            if self.steps is not None and not df.empty:
                lo, hi = self.steps
                mask = np.ones(len(df), dtype=bool)
                if lo is not None:
                    mask &= df.index.to_numpy() >= lo
                if hi is not None:
                    mask &= df.index.to_numpy() <= hi
                df = df[mask]
            self._scalars = df
        return self._scalars

    def loss_name(self) -> str | None:
        """The name of the scalar holding the loss, or ``None`` when no loss was recorded."""
        cols = set(self.scalars.columns)
        return next((n for n in LOSS_SCALARS if n in cols), None)

    def null_scalar_steps(self, name: str) -> list[int]:
        """Steps at which scalar ``name`` was logged as NaN.

        The store writes a NaN scalar as SQL NULL, which the wide :attr:`scalars` frame cannot tell apart from
        "not logged at that step"; this reads the rows themselves.
        """
        return [step for step, _, value in self.run.scalar_rows(name=name, steps=self.steps) if math.isnan(value)]

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Recorded events of one kind (all kinds with ``None``), in order; see :meth:`gradsight.Run.events`."""
        if kind not in self._events:
            self._events[kind] = self.run.events(kind)
        return self._events[kind]

    def layer_info(self, layer: str) -> dict[str, Any]:
        """The model-structure entry of a layer from the metadata (``{}`` when not recorded)."""
        model = self.meta.get("model") or {}
        for entry in model.get("layers", []) or []:
            if isinstance(entry, Mapping) and entry.get("name") == layer:
                return dict(entry)
        return {}


class Rule:
    """Base class of a diagnosis rule.

    Subclasses set :attr:`codes` (the finding codes they may emit), :attr:`kinds` (tensor kinds that must all
    have been recorded) and :attr:`scalars` (scalar names of which at least one must have been recorded, when
    non-empty), and implement :meth:`check`. Override :meth:`missing` for other requirements.
    """

    #: A short identifier, used in skip reports.
    name: ClassVar[str] = "rule"
    #: The finding codes this rule may emit.
    codes: ClassVar[tuple[str, ...]] = ()
    #: Tensor kinds that must all be present.
    kinds: ClassVar[tuple[str, ...]] = ()
    #: Scalar names of which at least one must be present (empty: none needed).
    scalars: ClassVar[tuple[str, ...]] = ()

    def missing(self, data: RunData) -> list[str]:
        """What this rule needs that the run lacks (empty when the rule applies)."""
        out = [f"{k!r} summaries" for k in self.kinds if k not in data.kinds]
        if self.scalars and not set(self.scalars) & set(data.scalars.columns):
            out.append("one of the scalars " + ", ".join(map(repr, self.scalars)))
        return out

    def applies(self, data: RunData | Run | str | os.PathLike[str]) -> bool:
        """Whether the run holds the data this rule needs."""
        if not isinstance(data, RunData):
            data = RunData(data)
        return not self.missing(data)

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """Evaluate the rule on a run that it applies to; return its findings (possibly none)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def ordered(layers: Iterable[str], data: RunData) -> list[str]:
    """Layers in model order, without duplicates."""
    return sorted(dict.fromkeys(layers), key=data.layer_index)
