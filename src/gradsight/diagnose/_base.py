"""What every diagnosis rule shares: the thresholds, a cached read-only view of a run, and the Rule base class.

Rules are independent units. Each declares the data it needs (tensor kinds and scalar names), reports whether
the run has it (:meth:`Rule.applies` / :meth:`Rule.missing`), and reads *only* the run store through a
:class:`RunData` — never a tensor, never a framework. A rule whose data was not recorded is skipped, not failed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
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
    Values are checked when made: an unknown name is refused with the closest known one, and a value outside
    its meaningful range (a fraction above 1, a growth factor at or below 1), where its rule would silently never
    or always fire, is refused with the range. The counts (``baseline_steps``, ``reference_steps``, ``recent_steps``,
    ``loss_min_steps``, ``damage_steps``, ``accumulate_min_steps``, ``init_chain``) must be whole numbers from 1 to
    10**9; a whole float such as ``3.0`` (the command line reads numbers as floats) is taken as the int ``3``.

    Attributes:
        baseline_steps: how many of the first finite loss values form the run's starting level, against which
            ``loss-not-decreasing`` measures (their median resists one odd first batch; a spike *after* them
            cannot raise the starting level).
        reference_steps: every step is judged against what came before it: the median of the up to this many
            preceding values of the same series (the "running median"). Twenty steps span several batches of
            minibatch noise, the median ignores a few spikes among them, and only the past enters, so a spike
            can never hide in its own baseline (the same window as the watch's anomaly capture).
        explode_growth: exploding gradients over *time*: a gradient norm (global, or a layer's RMS) that grows to
            more than this multiple of the lowest running median it had before. Healthy runs keep gradient norms
            within about one order of magnitude of their level; two orders of magnitude is the signature of
            divergence (heuristic). Growth alone is not enough: see ``damage_*`` — growth that harms nothing is
            a small initial gradient reaching its working level (an LSTM at initialisation), and an isolated
            spike after which training recovers is reported as info.
        explode_depth_ratio: exploding gradients over *depth*: a layer whose median gradient RMS exceeds this
            multiple of the largest median gradient RMS of the layers after it, i.e. gradients amplified by
            three orders of magnitude on their way back (heuristic; the mirror image of ``vanish_ratio``).
        vanish_ratio: vanishing gradients: a layer whose median gradient RMS is below this fraction of the
            largest median gradient RMS of the layers after it. A saturating activation passes at most 1/4
            (sigmoid) of the gradient per layer, so ten such layers shrink it by ~1e-6; 1e-3 flags the early
            layers of such a stack while leaving the 1x-100x spread seen between layers of healthy nets alone.
            Layers whose gradient is exactly zero are left to the dead-units, no-gradient and update-ratio rules.
        dead_fraction: dead units: warn when at least this fraction of a layer's units was exactly zero for
            every sample and position of the last ``recent_steps`` logged steps (a "dying ReLU" layer). A few dead
            units are normal; half of a layer means half of its capacity and of its gradient paths are gone.
            A layer with *all* units dead is an error (no gradient reaches anything before it).
        recent_steps: the number of most recent logged steps that the unit rules pool: a unit is dead only if it
            was zero on every batch of them (so a merely rare unit is not called dead), and saturation is the
            median over them (so a saturated start that training repairs is not reported). At most the later
            half of the logged steps (rounded up) is pooled, so that a short run's initial state does not hide
            what training did to it (see :func:`recent`).
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
        lr_step_ratio: learning-rate-too-high: a step whose update moves all parameters together by at least
            this fraction of their norm (``‖ΔW‖ / ‖W‖`` pooled over every parameter, so a zero-initialised
            layer cannot trigger it) *and* is followed by damage (``damage_*``). 0.5 is 500x the ~1e-3
            heuristic: half the network rewritten in one step; even Adam's large first steps stay one to two
            orders of magnitude below it.
        damage_steps: the steps after a suspicious step (a large update, a gradient jump) in which its
            consequences are looked for: a step too large shows its damage at the next forward passes; five
            steps leave room for momentum and minibatch noise.
        damage_weight_growth: damage: the norm of all weights together grows by this factor within
            ``damage_steps`` steps. Healthy steps change it by about the update ratio (~1e-3 each), i.e. by a
            few percent over such a window; doubling is a blow-up.
        damage_loss_rise: damage: the median loss over the ``damage_steps`` steps after is this many times the
            median over the steps up to it. Minibatch noise moves a median of five losses by far less; a step
            that overshoots multiplies it.
        damage_loss_floor: a loss rise counts as damage only if the loss after it is at least this fraction of the
            run's initial loss (the lowest of the first ``baseline_steps`` values). A converged run whose loss
            wobbles from 2e-4 to 8e-3 has multiplied it by 40 and still kept 99 % of what it learned from a start
            at 0.7; a step that undoes a tenth of the training is damage.
        damage_grad_jump: damage: the gradient norm after the step exceeds this many times its running median
            (the watch's anomaly-capture factor: a jump an order of magnitude above the recent level).
        accumulate_min_steps: gradients-accumulating needs at least this many consecutive gradient norms (a
            monotone run of fewer is plausible by chance: eight increases in a row have probability 1/256 for a
            norm that fluctuates randomly).
        accumulate_monotone: gradients-accumulating: the fraction of steps at which the gradient norm rose.
            Summed gradients grow at (almost) every step; the norm of a fresh minibatch gradient rises at about
            half of them.
        accumulate_growth: gradients-accumulating: the norm grew by at least this factor over the window
            (a sum of n gradients grows like n for aligned gradients and like sqrt(n) for random ones; four
            is sqrt(16), reached within the window lengths tried).
        accumulate_fit: gradients-accumulating: the R² of ``log ‖g‖`` against ``log(steps since the start)``.
            A sum over steps follows a power law ``‖g_s‖ ∝ s^p`` with ``0.4 <= p <= 1.5`` closely; a
            diverging run grows exponentially (a straight line in ``log ‖g‖`` against ``s``, a curve here) and
            a noisy one fits nothing.
        init_bias_sigmas: bad-initialisation: the bias is named as the cause when its mean lies at least this
            many standard deviations of the weight term (``W·x``, measured or estimated) away from 0: then at
            least ~98 % of a Gaussian pre-activation is pushed to the bias's side (below 0: a dead ReLU; far
            from 0: a saturated tanh/sigmoid); otherwise the weights' scale is named.
        init_scale_factor: bad-initialisation: a weight std at least this many times above (or below) the standard
            scale for the activation after the layer (He ``sqrt(2/fan_in)`` for ReLU-like, Glorot
            ``sqrt(2/(fan_in+fan_out))`` for tanh/sigmoid, LeCun ``sqrt(1/fan_in)`` for none). The standard schemes
            and PyTorch's default (``0.58/sqrt(fan_in)``) lie within ~2.5x of one another; 4x beyond the fitting
            one is outside all of them.
        init_chain: bad-initialisation: that many consecutive weighted layers, with only pass-through layers
            (activations, dropout, pooling, flatten) between them, must be off scale the same way. The error
            compounds only along such a chain — three layers 4x off change the signal 64x before the output —
            while normalisation layers and residual streams re-scale it: the two projections of a transformer
            block start small by design (GPT-2's std 0.02) and are reset by LayerNorm and the residual stream.
        why_zero_fraction: the explanation of a near-zero gradient calls a factor "zero" (dead units, zero
            inputs) when at least this fraction of its entries is exactly 0 — the level at which the product
            ``Aᵀ · dJ/dZ`` loses an order of magnitude from that factor alone.
        input_rms_high: the model's inputs count as not normalised when their RMS, estimated at the first logged
            step from the first weighted layer (``rms(W·x) ≈ rms(W) · sqrt(fan_in) · rms(x)`` for weights
            drawn independently of x), is at least this. Standardised features have RMS 1 and images scaled to
            [0, 1] about 0.5; raw pixels (0-255) give ~100, raw counts or prices far more. Large inputs make the
            first layer's pre-activations and every gradient that large, which kills ReLUs and makes a learning
            rate tuned for normalised data far too high. The dead-units and learning-rate-too-high findings then
            name the inputs first.
        unbounded_loss_factor: loss-unbounded: the loss's end median must be below zero by this many times the
            size of its start median (at least 1). Standard losses are never negative; a loss that started near
            0 and reached -10, still falling, has no floor. A negative floor of a legitimate loss (a Gaussian
            negative log-likelihood with a learned variance) is a few units below zero and flat there.
    """

    baseline_steps: int = 3
    reference_steps: int = 20
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
    lr_step_ratio: float = 0.5
    damage_steps: int = 5
    damage_weight_growth: float = 2.0
    damage_loss_rise: float = 2.0
    damage_loss_floor: float = 0.1
    damage_grad_jump: float = 10.0
    accumulate_min_steps: int = 8
    accumulate_monotone: float = 0.8
    accumulate_growth: float = 4.0
    accumulate_fit: float = 0.9
    init_bias_sigmas: float = 2.0
    init_scale_factor: float = 4.0
    init_chain: int = 3
    why_zero_fraction: float = 0.9
    input_rms_high: float = 5.0
    unbounded_loss_factor: float = 10.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (isinstance(value, float) and not math.isfinite(value)) or value < 0:
                raise InputError(
                    f"Thresholds.{f.name} must be a finite, non-negative number, got {value!r}; "
                    f"the default is {f.default!r}."
                )
        for name in _COUNTS:
            value = getattr(self, name)
            if not 1 <= value <= _MAX_COUNT or not float(value).is_integer():
                raise InputError(
                    f"Thresholds.{name} is a count of steps (or layers), a whole number from 1 to {_MAX_COUNT:,}, "
                    f"got {value!r:.40}; the default is {_DEFAULTS[name]!r}. Pass e.g. {name}={_DEFAULTS[name]!r}."
                )
            object.__setattr__(self, name, int(value))  # 3.0 (as the command line parses "3") is the count 3
        if not 0 < self.loss_window <= 0.5:
            raise InputError(f"Thresholds.loss_window must be in (0, 0.5], got {self.loss_window!r}.")
        for name, (low, low_open, high, meaning) in _RANGES.items():
            value = getattr(self, name)
            if value < low or (low_open and value == low) or (high is not None and value > high):
                interval = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
                raise InputError(
                    f"Thresholds.{name} must be in {interval} ({meaning}), got {value!r}: outside it the rule "
                    f"would never (or always) fire. The default is {_DEFAULTS[name]!r}."
                )
        if self.update_ratio_low >= self.update_ratio_high:
            raise InputError(
                f"Thresholds.update_ratio_low ({self.update_ratio_low!r}) must be below update_ratio_high "
                f"({self.update_ratio_high!r})."
            )

    def damage_args(self) -> dict[str, Any]:
        """The keyword arguments of :func:`gradsight.diagnose._series.damage` under these thresholds."""
        return {
            "window": int(self.damage_steps),
            "weight_growth": self.damage_weight_growth,
            "loss_rise": self.damage_loss_rise,
            "loss_floor": self.damage_loss_floor,
            "baseline": int(self.baseline_steps),
            "grad_jump": self.damage_grad_jump,
            "reference_window": int(self.reference_steps),
        }

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


#: The thresholds that count steps (or layers): whole numbers >= 1; ``3.0`` is taken as ``3``.
_COUNTS = (
    "baseline_steps",
    "recent_steps",
    "reference_steps",
    "loss_min_steps",
    "damage_steps",
    "accumulate_min_steps",
    "init_chain",
)
#: The largest count accepted: far beyond any run's length, and small enough for pandas' rolling windows.
_MAX_COUNT = 10**9


#: Each bounded threshold's interval ``(low, low excluded, high or None, what it is)``: a fraction above 1, or a
#: growth factor below 1, would silently turn its rule off (or on for every run).
_RANGES: dict[str, tuple[float, bool, float | None, str]] = {
    "dead_fraction": (0.0, True, 1.0, "a fraction of a layer's units"),
    "why_zero_fraction": (0.0, True, 1.0, "a fraction of a tensor's entries"),
    "damage_loss_floor": (0.0, False, 1.0, "a fraction of the initial loss"),
    "accumulate_monotone": (0.0, True, 1.0, "a fraction of steps"),
    "accumulate_fit": (0.0, False, 1.0, "an R²"),
    "saturation_gain": (0.0, False, 1.0, "a mean derivative relative to its maximum"),
    "vanish_ratio": (0.0, True, 1.0, "a ratio of gradient RMS below 1"),
    "update_ratio_low": (0.0, True, None, "a ratio ||update|| / ||weight||"),
    "lr_step_ratio": (0.0, True, None, "a ratio ||update|| / ||weight||"),
    "explode_growth": (1.0, True, None, "a growth factor"),
    "explode_depth_ratio": (1.0, True, None, "a growth factor"),
    "damage_weight_growth": (1.0, True, None, "a growth factor"),
    "damage_loss_rise": (1.0, True, None, "a growth factor"),
    "damage_grad_jump": (1.0, True, None, "a growth factor"),
    "accumulate_growth": (1.0, True, None, "a growth factor"),
    "init_scale_factor": (1.0, True, None, "a factor off the standard scale, both ways"),
    "input_rms_high": (1.0, True, None, "an RMS above a standardised input's 1"),
    "unbounded_loss_factor": (1.0, True, None, "a growth factor"),
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Thresholds)}
_dataclass_init = Thresholds.__init__


@functools.wraps(_dataclass_init)
def _thresholds_init(self: Thresholds, *args: Any, **kwargs: Any) -> None:
    """The dataclass' ``__init__``, with an unknown or extra argument explained instead of Python's TypeError."""
    unknown = sorted(set(kwargs) - set(_DEFAULTS))
    if unknown:
        close = {n: difflib.get_close_matches(n, list(_DEFAULTS), n=1) for n in unknown}
        hints = "; ".join(f"{n!r}: did you mean {c[0]!r}?" for n, c in close.items() if c)
        raise InputError(
            f"unknown threshold(s) {unknown!r}"
            + (f" ({hints})" if hints else "")
            + f"; expected names among {sorted(_DEFAULTS)!r}, e.g. Thresholds(vanish_ratio=1e-4)."
        )
    twice = sorted(set(kwargs) & set(list(_DEFAULTS)[: len(args)]))
    if twice:
        raise InputError(
            f"Thresholds got {twice!r} both by position and by name; pass each threshold once, by name, "
            "e.g. Thresholds(vanish_ratio=1e-4)."
        )
    if len(args) > len(_DEFAULTS):
        raise InputError(
            f"Thresholds takes at most {len(_DEFAULTS)} values, got {len(args)}; pass them by name, "
            "e.g. Thresholds(vanish_ratio=1e-4)."
        )
    _dataclass_init(self, *args, **kwargs)


Thresholds.__init__ = _thresholds_init  # type: ignore[method-assign]


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
        #: Derived series shared between rules (see :mod:`gradsight.diagnose._series`), computed once per run.
        self.cache: dict[Any, Any] = {}

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
    def tensors(self) -> list[Any]:
        """Every recorded tensor (:attr:`gradsight.Run.tensors`), read once."""
        if "tensors" not in self.cache:
            self.cache["tensors"] = self.run.tensors
        return self.cache["tensors"]

    @property
    def kinds(self) -> set[str]:
        """The tensor kinds that have registered tensors in the run."""
        if self._kinds is None:
            self._kinds = {t.kind for t in self.tensors}
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

    def tensor_layer(self, tensor: str) -> str:
        """The layer of a parameter tensor.

        From the recorded tensors, else from its name (``fc1.weight`` -> ``fc1``, ``dense/kernel`` -> ``dense``, a
        name without a separator -> ``model``).
        """
        if "tensor_layers" not in self.cache:
            self.cache["tensor_layers"] = {t.name: t.layer for t in self.tensors}
        known = self.cache["tensor_layers"].get(tensor)
        if known is not None:
            return str(known)
        sep = "/" if "/" in tensor else "."
        return tensor.rpartition(sep)[0] or "model"

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


def recent(steps: Sequence[int], th: Thresholds) -> list[int]:
    """The logged steps the unit rules pool: the last ``recent_steps``, within the later half of ``steps``.

    The later half (rounded up) keeps a short run's first logged step — its initialisation, before training
    changed anything — out of the pool: a run of 250 steps under the default preset logs steps 0, 100 and 200,
    and units alive at step 0 that died by step 100 would otherwise never count as dead.
    """
    ordered_steps = sorted(dict.fromkeys(int(s) for s in steps))
    keep = min(int(th.recent_steps), max(1, (len(ordered_steps) + 1) // 2))
    return ordered_steps[-keep:] if ordered_steps else []
