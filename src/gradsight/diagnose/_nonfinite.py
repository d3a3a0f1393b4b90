"""Rule ``non-finite``: the first step at which a NaN or Inf appeared, and where it came from.

Within one training step values are produced in a fixed order, and a non-finite value spreads *along* that order:
the weights the step starts from (watches record weights *before* the step's update), forward outputs layer by
layer (model order), then the loss, then the backward pass — output gradients and parameter gradients from the
last layer back to the first — then the optimizer's update. A run whose metadata says
``"weights_recorded": "after_update"`` has its weights ordered after the update instead.
So among everything non-finite at the first affected step, the element earliest in that order is the origin and
the rest is spread. The finding lists layers origin first, then in order of first contamination.

Sources, all read from the store: per-tensor summaries (``nan``/``posinf``/``neginf`` counts of every recorded
kind) and the cheap scalars logged every step — a non-finite (or NaN, stored as NULL) ``loss``, and scalars
named ``grad_nonfinite`` / ``grad_nonfinite/<tensor>`` (counts) or ``grad_norm`` / ``grad_norm/<tensor>``
(non-finite norms). Scalars often exist at steps that have no summaries (``every > 1``); then the first step
comes from the scalars and the location from the first summarised step, and the message says so.

Non-finite gradients at steps a loss scaler skipped (``step_skipped``), with steps taken after them, are left
out: the scaler found the overflow of a scale too large for float16 and lowered it, as designed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ._base import Rule, RunData, Thresholds, fmt
from ._finding import Finding
from ._series import global_weight_norm, grad_norm, loss, running_reference

__all__ = ["PHASE_OF_KIND", "NonFiniteRule"]

#: kind -> (phase, rank within a step, whether layers run in model order (True) or reversed (False)).
PHASE_OF_KIND: dict[str, tuple[str, int, bool]] = {
    "weight": ("weights", -1, True),
    "output": ("forward", 0, True),
    "loss": ("forward", 1, True),
    "output_grad": ("backward", 2, False),
    "grad": ("backward", 2, False),
    "update": ("update", 3, True),
}
_WEIGHT_AFTER_UPDATE = ("update", 4, True)
# Within a layer in the backward pass the output gradient comes before the parameter gradients.
_KIND_TIE = {"output": 0, "loss": 0, "output_grad": 0, "grad": 1, "update": 0, "weight": 1}


def _phase(kind: str, data: RunData) -> tuple[str, int, bool]:
    if kind == "weight" and data.meta.get("weights_recorded") == "after_update":
        return _WEIGHT_AFTER_UPDATE
    return PHASE_OF_KIND[kind]


@dataclass(frozen=True)
class _Event:
    step: int
    kind: str
    layer: str | None  # None: the loss, or a scalar without a tensor
    tensor: str | None
    nan: int
    posinf: int
    neginf: int
    count: int | None
    source: str  # "summary" or the scalar name

    def key(self, data: RunData) -> tuple[int, int, int, int]:
        _, rank, forward = _phase(self.kind, data)
        idx = data.layer_index(self.layer) if self.layer is not None else len(data.layers)
        # Unknown layer (scalar-only backward evidence) sorts after known ones in its phase.
        if self.layer is not None and not forward:
            idx = -idx
        return (self.step, rank, idx, _KIND_TIE[self.kind])

    phase: str = ""

    def describe(self) -> str:
        counts = []
        if self.nan:
            counts.append(f"{self.nan} NaN")
        if self.posinf:
            counts.append(f"{self.posinf} +Inf")
        if self.neginf:
            counts.append(f"{self.neginf} -Inf")
        what = ", ".join(counts) if counts else "non-finite values"
        if self.count:
            what += f" of {self.count} values"
        if self.kind == "loss":
            return f"the loss ({what}, forward)"
        where = f"layer {self.layer!r}" if self.layer is not None else "an unidentified tensor"
        label = {
            "output": "output",
            "output_grad": "output gradient",
            "grad": "parameter gradient",
            "update": "optimizer update",
            "weight": "weights",
        }[self.kind]
        tensor = f" {self.tensor!r}" if self.tensor and self.kind in ("grad", "update", "weight") else ""
        phase = "at the start of the step" if self.phase == "weights" else self.phase
        return f"the {label}{tensor} of {where} ({what}, {phase})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "layer": self.layer,
            "kind": self.kind,
            "phase": self.phase,
            "tensor": self.tensor,
            "nan": self.nan,
            "posinf": self.posinf,
            "neginf": self.neginf,
            "count": self.count,
            "source": self.source,
        }


_EXPLANATION = {
    "loss": (
        "Every layer output was finite but the loss was not, so the loss formula itself produced it: typically "
        "log(0) (a probability that underflowed to exactly 0 or 1), 0 * log(0) in a hand-written cross-entropy, "
        "or a division by zero. Its gradient is then infinite or NaN, backpropagation carries it into every "
        "layer, and the next update destroys the weights."
    ),
    "forward": (
        "A layer produced NaN/Inf in the forward pass: an overflow (exp or a product of large activations), 0/0, "
        "or a log/sqrt of an invalid value, often after activations or weights grew too large. Everything "
        "after it in the forward pass, the loss and all gradients become non-finite, and one update with them "
        "makes the weights NaN for good."
    ),
    "backward": (
        "The forward pass and the loss were finite but a gradient was not: an operation whose derivative is "
        "infinite at the current point (sqrt or log at 0, division by a tiny number) or gradients that overflowed "
        "on their way back. Every layer before it receives the non-finite gradient, and the update writes it "
        "into the weights."
    ),
    "update": (
        "Gradients were finite but the optimizer step produced non-finite weights or updates: the step overflowed, "
        "typically because the learning rate times a large gradient exceeded the floating-point range, or an "
        "optimizer state (e.g. Adam's second moment) became zero or non-finite. Once a weight is NaN, every "
        "output that depends on it is NaN too."
    ),
}
_EXPLANATION["loss-overflow"] = (
    "The loss became non-finite after the network had grown ({growth}). Huge weights make huge outputs, and the "
    "loss overflowed: Inf, or NaN from Inf - Inf or 0 * Inf inside the softmax or the square. The loss formula is "
    "not the cause, the growth is: it follows from steps that were too large (see the findings that explain it)."
)
_EXPLANATION["loss-unlocated"] = (
    "The loss is the first non-finite value recorded, but the layer outputs of that step were not recorded, so "
    "it may have come from the forward pass (a layer overflowing) as well as from the loss formula itself (log(0), "
    "0 * log(0) in a hand-written cross-entropy, a division by zero). Its gradient is then non-finite, "
    "backpropagation carries it into every layer, and the next update destroys the weights."
)
_ADVICE = {
    "loss": (
        "Compute the loss from logits with a fused, stable formula: torch.nn.functional.cross_entropy / "
        "keras.losses.CategoricalCrossentropy(from_logits=True), binary_cross_entropy_with_logits / "
        "BinaryCrossentropy(from_logits=True), log_softmax instead of log(softmax(x)).",
        "If you must take a log or divide by hand, clamp the argument: log(p.clamp_min(1e-7)), x / (d + 1e-8).",
        "Never multiply a target by log(p) over all classes: 0 * log(0) is NaN; select the target class instead.",
    ),
    "forward": (
        "Check the inputs for NaN/Inf and normalise them (standardise features, scale images to [0, 1]).",
        "Lower the learning rate, and add gradient clipping (clip_grad_norm_ / clipnorm) so weights cannot blow up.",
        "Add normalisation (BatchNorm/LayerNorm) before the layer, and use numerically stable ops "
        "(logsumexp, softplus) instead of exp/log by hand.",
    ),
    "backward": (
        "Add a small epsilon where a derivative is infinite at 0: sqrt(x + 1e-12), log(x + 1e-7), norms with eps.",
        "Clip gradients (torch.nn.utils.clip_grad_norm_(params, 1.0) / optimizer clipnorm=1.0).",
        "With float16 mixed precision, use a gradient scaler (torch.amp.GradScaler / LossScaleOptimizer).",
    ),
    "update": (
        "Lower the learning rate (start 10x lower) and add a warm-up.",
        "Clip gradients (clip_grad_norm_ / clipnorm) so that one large gradient cannot overflow a step.",
        "For Adam-like optimizers keep eps at or above 1e-8 (1e-7 in float16/bfloat16).",
    ),
}


_ADVICE["loss-overflow"] = _ADVICE["update"]
_ADVICE["loss-unlocated"] = (
    _ADVICE["loss"][0],
    "Record the layer outputs of that step to locate it: a short rerun with gradsight.watch(..., every=1) (an "
    "anomaly capture cannot: it records layer outputs from the step after the one that triggered it).",
    _ADVICE["forward"][1],
)


def _growth_before(data: RunData, step: int, th: Thresholds) -> str | None:
    """What had grown before ``step`` (weights, gradients or the loss), as text, or ``None``."""
    w, _ = global_weight_norm(data)
    w = w[(w.index < step) & np.isfinite(w.to_numpy()) & (w.to_numpy() > 0)]
    if len(w) >= 2:
        # growth within damage_steps steps (a blow-up), not over the whole run (learning grows weights slowly too)
        steps, values = w.index.to_numpy(dtype=np.int64), w.to_numpy(dtype=np.float64)
        # the first recorded step of each window; with sparse records (no per-step signals), the one before
        start = np.minimum(np.searchsorted(steps, steps - th.damage_steps), np.maximum(np.arange(len(steps)) - 1, 0))
        ratio = values / values[start]
        at = int(np.argmax(ratio))
        if ratio[at] >= th.damage_weight_growth:
            return (
                f"the norm of all weights grew {fmt(float(ratio[at]))}x between steps {int(steps[start[at]])} and "
                f"{int(steps[at])}"
            )
    g, _ = grad_norm(data)
    g = g[(g.index < step) & np.isfinite(g.to_numpy())]
    if len(g) >= 2:
        jump = (g / running_reference(g, th.reference_steps)).dropna()
        if len(jump) and float(jump.max()) >= th.damage_grad_jump:
            at = int(jump.idxmax())
            return f"the gradient norm jumped {fmt(float(jump.max()))}x above its running median at step {at}"
    lo = loss(data)
    lo = lo[lo.index < step]
    if len(lo) >= 2 and float(lo.iloc[0]) > 0 and float(lo.max()) >= th.damage_loss_rise * float(lo.iloc[0]):
        return f"the loss rose {fmt(float(lo.max() / lo.iloc[0]))}x by step {int(lo.idxmax())}"
    return None


#: Kinds a loss scaler's skipped step may hold non-finite without anything being wrong: the gradients of a loss
#: scaled past float16's range, which the scaler found and skipped (and then lowered its scale).
_SCALER_KINDS = frozenset({"grad", "output_grad"})


def _without_scaler_skips(data: RunData, events: list[_Event]) -> list[_Event]:
    """The events without the gradients of steps a loss scaler skipped, where training went on after them.

    A ``GradScaler`` / ``LossScaleOptimizer`` starts at a scale that overflows float16 on purpose, skips the
    steps whose gradients overflowed (``step_skipped``) and lowers its scale: those Inf/NaN gradients are the
    scaler working. A run that skips to its last recorded step keeps them (the scaler never recovered), as do
    non-finite outputs, losses, weights and updates at any step.
    """
    if "step_skipped" not in data.scalars.columns:
        return events
    flag = data.scalars["step_skipped"].astype("float64").fillna(0)
    skipped = {int(s) for s in flag.index[flag.to_numpy() > 0]}
    if not skipped:
        return events
    taken = [int(s) for s in flag.index[flag.to_numpy() <= 0]]
    last_taken = max(taken, default=-1)
    return [e for e in events if not (e.kind in _SCALER_KINDS and e.step in skipped and e.step < last_taken)]


class NonFiniteRule(Rule):
    """Locate the first NaN/Inf in a run and report its origin first (code ``non-finite``, severity error).

    Applies when any tensor summaries or a loss / gradient-check scalar were recorded.
    """

    name = "non-finite"
    codes = ("non-finite",)

    def missing(self, data: RunData) -> list[str]:
        """Needs some summaries, or a loss or gradient-check scalar."""
        if data.kinds or self._scalar_names(data):
            return []
        return ["tensor summaries, or a 'loss' / 'grad_nonfinite' / 'grad_norm' scalar"]

    @staticmethod
    def _scalar_names(data: RunData) -> list[str]:
        cols = [str(c) for c in data.scalars.columns]
        loss = data.loss_name()
        prefixes = ("grad_nonfinite", "grad_norm")
        return [c for c in cols if c == loss or c.split("/", 1)[0] in prefixes]

    def _events(self, data: RunData) -> list[_Event]:
        events: list[_Event] = []
        for kind in ("output", "output_grad", "grad", "update", "weight"):
            if kind not in data.kinds:
                continue
            df = data.frame(kind)
            bad = df[df["nonfinite"] > 0]
            for row in bad.itertuples(index=False):
                events.append(
                    _Event(
                        int(row.step),
                        kind,
                        str(row.layer),
                        str(row.tensor),
                        int(row.nan),
                        int(row.posinf),
                        int(row.neginf),
                        int(row.count),
                        "summary",
                    )
                )
        events.extend(self._scalar_events(data))
        return [replace(e, phase=_phase(e.kind, data)[0]) for e in events]

    def _scalar_events(self, data: RunData) -> list[_Event]:
        events: list[_Event] = []
        sc = data.scalars
        loss = data.loss_name()
        grad_layer = {t.name: t.layer for t in data.tensors if t.kind == "grad"}
        for name in self._scalar_names(data):
            col = sc[name]
            base, _, tensor = name.partition("/")
            if name == loss:
                for step in data.null_scalar_steps(name):
                    events.append(_Event(step, "loss", None, None, 1, 0, 0, None, name))
                for step, v in col[col.abs() == math.inf].items():
                    events.append(_Event(int(step), "loss", None, None, 0, int(v > 0), int(v < 0), None, name))
                continue
            layer = grad_layer.get(tensor) if tensor else None
            if base == "grad_nonfinite":
                steps = list(col[col > 0].index) + data.null_scalar_steps(name)
            else:  # grad_norm: only NaN proves a NaN element; +Inf may be an overflow of finite squares
                steps = data.null_scalar_steps(name)
            for step in steps:
                n = col.get(step)
                n = int(n) if base == "grad_nonfinite" and n is not None and not _isnan(n) else 0
                events.append(_Event(int(step), "grad", layer, tensor or None, n, 0, 0, None, name))
        return events

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        events = _without_scaler_skips(data, self._events(data))
        if not events:
            return []
        events.sort(key=lambda e: e.key(data))
        first_step = events[0].step
        last_step = max(e.step for e in events)
        summary_events = [e for e in events if e.source == "summary"]
        # The origin: the first event of the first step, preferring a summary (which knows the layer) when the
        # scalars of that step carry no location.
        origin = events[0]
        located = next((e for e in events if e.step == first_step and e.layer is not None), None)
        if origin.layer is None and origin.kind != "loss" and located is not None:
            origin = located
        first_summary = summary_events[0] if summary_events else None

        layers: list[str] = []
        for e in events:
            if e.layer is not None and e.layer not in layers:
                layers.append(e.layer)
        spread = []
        seen: set[tuple[str | None, str]] = set()
        for e in events:
            if (e.layer, e.kind) not in seen:
                seen.add((e.layer, e.kind))
                spread.append(e.to_dict())
        phase = {"weights": "update", "loss": "loss"}.get(
            origin.phase if origin.kind != "loss" else "loss", origin.phase
        )
        explanation = _EXPLANATION[phase if phase in _EXPLANATION else "forward"]
        if phase == "loss":
            growth = _growth_before(data, first_step, th)
            outputs = "output" in data.kinds and bool((data.frame("output")["step"] == first_step).any())
            if growth is not None:
                phase = "loss-overflow"
                explanation = _EXPLANATION[phase].format(growth=growth)
            elif not outputs:
                phase = "loss-unlocated"
                explanation = _EXPLANATION[phase]

        msg = f"First non-finite value at step {first_step}: {origin.describe()}"
        if origin.layer is None and origin.kind != "loss":
            msg += " (located only by a scalar check)"
        if first_summary is not None and first_summary.step != first_step:
            msg += f"; the first step with summaries, {first_summary.step}, places it in {first_summary.describe()}"
        others = len(layers) - (1 if origin.layer in layers else 0)
        if others > 0:
            msg += f"; it spread to {others} more layer(s) by step {last_step}"
        msg += "."

        evidence: dict[str, Any] = {
            "explained_as": phase,
            "origin": origin.to_dict(),
            "first_step": first_step,
            "last_step": last_step,
            "steps_affected": len({e.step for e in events}),
            "spread": spread[:32],
        }
        if first_summary is not None and first_summary is not origin:
            evidence["first_summary"] = first_summary.to_dict()
        return [
            Finding(
                code="non-finite",
                severity="error",
                layers=tuple(layers),
                first_step=first_step,
                last_step=last_step,
                evidence=evidence,
                message=msg,
                explanation=explanation,
                advice=_advice(data, phase),
            )
        ]


#: Advice first when the first NaN/Inf came from the update of float16 parameters.
_FLOAT16_UPDATE = (
    "The parameters are float16: keep them (and the optimizer's state) in float32 and compute in float16 with "
    "autocast and a gradient scaler (torch.autocast + torch.amp.GradScaler; Keras mixed_float16 policy), or use "
    "bfloat16. In float16, Adam's default eps (1e-8) rounds to 0 and its second moment underflows, so its update "
    "divides by zero whatever the learning rate."
)


def _advice(data: RunData, phase: str) -> tuple[str, ...]:
    """The advice for the phase the first NaN/Inf is explained as; float16 parameters' updates first say so."""
    advice = _ADVICE[phase if phase in _ADVICE else "forward"]
    if phase == "update" and any(
        t.kind in ("weight", "update") and "float16" in t.dtype and "bfloat16" not in t.dtype for t in data.tensors
    ):
        return (_FLOAT16_UPDATE, *advice)
    return advice


def _isnan(value: Any) -> bool:
    """``pandas.notna``'s negation for one scalar cell (NaN, ``None``, NA), without importing pandas."""
    try:
        return value != value or value is None  # NaN: the one float unequal to itself
    except TypeError:  # pandas.NA: its comparison is NA, whose truth value raises
        return True
