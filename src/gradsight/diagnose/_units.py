"""Rules ``dead-units`` and ``saturated-units``, from the layer-output summaries.

**Dead units** use the per-unit activity counts (``units_active``: how many entries of a unit — samples times
positions — were ``!= 0``). Pooled over the last ``recent_steps`` logged steps, a unit with zero activity never
fired on any of those batches: for a ReLU that means its pre-activation was negative everywhere, so it passes no
gradient and cannot recover by itself.

**Saturated units** need to know the activation, because a stored summary holds ``count``, ``sum``, ``sum_sq``,
``min``/``max`` and a histogram of ``log2|a|`` — and the histogram's last bins below 1 are ``[0.5, 1)``, so
"``|a| > 0.99``" is *not* resolvable from it. What is exact is the mean local derivative of the two classic
saturating activations, computed from the output ``a`` alone:

* ``tanh``: ``d tanh / dz = 1 - a**2``, so the mean gain is ``1 - sum_sq / n``;
* ``sigmoid``: ``d sigma / dz = a (1 - a)``, so the mean gain is ``(sum - sum_sq) / n``, divided by its maximum
  ``1/4`` to put it on the same 0..1 scale.

This is the average factor by which the layer scales the gradient passing back through it (element-wise, before
any correlation with the incoming gradient), i.e. exactly what saturation costs. Limits, stated honestly:

* the activation must be identifiable: from the model structure in the run metadata (a layer whose type,
  class or ``activation`` entry is ``tanh``/``sigmoid``, e.g. ``torch.nn.Tanh`` or ``Dense(activation="tanh")``)
  or, failing that, from a layer name containing ``tanh``/``sigmoid``. Layers with other or unknown activations
  are not judged. A recorded output outside the activation's range (``|a| > 1`` for tanh, ``a`` outside
  ``[0, 1]`` for sigmoid) disqualifies the layer, as the identification must then be wrong;
* it is a mean over all units: half the units fully saturated and half linear reads as a gain of ~0.5;
* the evidence also gives the share of outputs with ``|a| >= 0.5`` (from the histogram), which is coarse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .._packing import EXP_BIAS  # hist bin of |a| in [0.5, 1) is EXP_BIAS - 1, [1, 2) is EXP_BIAS
from ._base import Rule, RunData, Thresholds, fmt, ordered, recent
from ._finding import Finding
from ._inputs import input_advice, input_scale
from ._layers import unit_dead_fraction
from ._series import loss, loss_window

if TYPE_CHECKING:  # pragma: no cover - pandas is imported where it is used, not at import
    import pandas as pd

__all__ = ["DeadUnitsRule", "SaturatedUnitsRule", "activation_of"]


def _recent(df: pd.DataFrame, th: Thresholds) -> pd.DataFrame:
    return df[df["step"].isin(recent(df["step"].unique(), th))]


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj.lower()]
    if isinstance(obj, Mapping):
        out = []
        for k, v in obj.items():
            if k in ("name",):
                continue
            out += _strings(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


def activation_of(data: RunData, layer: str) -> str | None:
    """``"tanh"``, ``"sigmoid"`` or ``None``: the saturating activation a layer applies, when identifiable.

    Reads the layer's entry in ``run.meta["model"]["layers"]`` (its type, class, config and ``activation``
    strings), then falls back to the layer's name.
    """
    info = data.layer_info(layer)
    found = set()
    for text in _strings(info):
        token = text.rsplit(".", 1)[-1].replace("_", "").replace("-", "")
        if token in ("tanh",):
            found.add("tanh")
        elif token in ("sigmoid",):
            found.add("sigmoid")
    if len(found) == 1:
        return found.pop()
    if found:  # contradictory metadata: do not guess
        return None
    name = layer.lower()
    if "tanh" in name and "sigmoid" not in name:
        return "tanh"
    if "sigmoid" in name and "hard" not in name and "log" not in name and "tanh" not in name:
        return "sigmoid"
    return None


class DeadUnitsRule(Rule):
    """Units that output exactly zero for every sample (``dead-units``).

    Pools each layer's per-unit activity over the last ``recent_steps`` logged steps; warns when at least
    ``dead_fraction`` of the layer's units never fired, and errors when all did not. Needs ``output`` summaries
    recorded with per-unit counts.
    """

    name = "dead-units"
    codes = ("dead-units",)
    kinds = ("output",)

    def missing(self, data: RunData) -> list[str]:
        """Needs output summaries with per-unit activity counts."""
        out = super().missing(data)
        if not out and not data.frame("output", units=True)["units_active"].notna().any():
            out.append("per-unit activity counts of layer outputs (units_active)")
        return out

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the class docstring."""
        hits = dead_layers(data, th)
        if not hits:
            return []
        echoes = fold_echoes(hits, data)
        layers = [n for n in ordered(hits, data) if n not in echoes]
        worst = max(layers, key=lambda n: (hits[n]["fraction"], -data.layer_index(n)))
        w = hits[worst]
        all_dead = [n for n in layers if hits[n]["dead"] == hits[n]["units"]]
        lo, hi = w["window_steps"]
        echo_text = ""
        if w.get("echoes"):
            names = ", ".join(f"{e!r} ({data.layer_info(e).get('type', '?')})" for e in w["echoes"])
            echo_text = f" (the parameter-free layer(s) after it, {names}, pass its zeros on and are counted with it)"
        msg = (
            f"Dead units: {w['dead']} of {w['units']} units ({w['fraction']:.0%}) of layer {worst!r} were zero for "
            f"every one of {w['samples_per_unit']} samples over logged steps {lo}–{hi}{echo_text}"
            f"; {len(layers)} layer(s) at or above {th.dead_fraction:.0%} dead."
        )
        scale = input_scale(data, th)
        init = (
            "Initialise biases at 0 (or slightly positive) and weights with He initialisation "
            "(torch.nn.init.kaiming_normal_ / keras 'he_normal')."
        )
        died = _alive_at_start(data, worst, w, th)
        rate = (
            f"Lower the learning rate: the units of {worst!r} were alive at step {died} and died during training, "
            "the usual sign of steps large enough to push them where they never fire again."
            if died is not None
            else "Lower the learning rate; large early steps are the usual way units die during training."
        )
        advice = (
            *((rate, init) if died is not None else (init, rate)),
            "Use an activation with a non-zero slope for negative inputs: LeakyReLU, ELU, GELU, SiLU.",
            "Normalise inputs and add BatchNorm/LayerNorm before the activation to keep pre-activations centred.",
        )
        return [
            Finding(
                code="dead-units",
                severity="error" if all_dead else "warning",
                layers=tuple(layers),
                first_step=min(hits[n]["first_step"] for n in layers),
                last_step=max(hits[n]["last_step"] for n in layers),
                evidence={
                    "threshold_fraction": th.dead_fraction,
                    "recent_steps": th.recent_steps,
                    "layers": {n: hits[n] for n in layers},
                    "echoes": {e: echoes[e] for e in ordered(echoes, data)},
                    "input_scale": scale,
                },
                message=msg,
                explanation=(
                    "A ReLU unit whose pre-activation is negative for every input outputs 0 and has derivative 0, "
                    "so no gradient flows through it to its weights or to the layers before it: it cannot "
                    "recover, and the layer loses that capacity. Common causes are strongly negative biases, a "
                    "learning rate high enough to knock units into the negative region, or poor initialisation."
                ),
                advice=advice if scale is None else (input_advice(scale), *advice),
            )
        ]


def _alive_at_start(data: RunData, layer: str, hit: dict[str, Any], th: Thresholds) -> int | None:
    """The first logged step, when ``layer`` had fewer than ``dead_fraction`` dead units there (before its pool)."""
    steps = sorted(int(s) for s in data.frame("output")["step"].unique())
    if not steps or steps[0] >= hit["window_steps"][0]:
        return None
    start = unit_dead_fraction(data, layer, [steps[0]])
    return steps[0] if start is not None and start[0] < th.dead_fraction else None


def dead_layers(data: RunData, th: Thresholds) -> dict[str, dict[str, Any]]:
    """Per layer with at least ``dead_fraction`` dead units over the last ``recent_steps`` logged steps: evidence."""
    df = data.frame("output", units=True)
    df = df[df["units_active"].notna()]
    hits: dict[str, dict[str, Any]] = {}
    for layer, sub in df.groupby("layer"):
        for tensor, tsub in sub.groupby("tensor"):
            tsub = tsub.sort_values("step")
            pooled = _recent(tsub, th)
            # the units of the last step: a record whose width changes between steps (a softmax over each batch's
            # sequence length) pools only its steps of that width
            width = len(pooled["units_active"].iloc[-1])
            pooled = pooled[[len(a) == width for a in pooled["units_active"]]]
            active = np.sum(np.stack(pooled["units_active"].to_list()), axis=0)
            n_units = int(active.size)
            if n_units == 0:
                continue
            dead = int((active == 0).sum())
            frac = dead / n_units
            if frac < th.dead_fraction or dead == 0:
                continue
            # first step of the final stretch of steps at which the per-step dead fraction held
            per_step = [(int(r.step), float((r.units_active == 0).mean())) for r in tsub.itertuples()]
            first = per_step[-1][0]
            for step, f in reversed(per_step):
                if f < th.dead_fraction:
                    break
                first = step
            prev = hits.get(str(layer))
            if prev is None or frac > prev["fraction"]:
                hits[str(layer)] = {
                    "tensor": str(tensor),
                    "dead": dead,
                    "units": n_units,
                    "fraction": frac,
                    "window_steps": [int(pooled["step"].min()), int(pooled["step"].max())],
                    "samples_per_unit": int(pooled["units_total"].sum()),
                    "first_step": first,
                    "last_step": per_step[-1][0],
                    "dead_units": [int(i) for i in np.flatnonzero(active == 0)[:64]],
                }
    return hits


#: Layer types that only move, pool, drop or reshape their input: directly after a dead layer they output its
#: zeros again (an *echo*), so they are folded into the dead layer's finding instead of reported on their own.
_ECHO_RE = re.compile(
    r"pool|flatten|dropout|reshape|identity|permute|unflatten|squeeze|cropping|zeropadding|upsampling", re.IGNORECASE
)


def is_echo_layer(data: RunData, layer: str) -> bool:
    """A parameter-free layer whose type (model metadata) pools, drops, pads or reshapes its input."""
    info = data.layer_info(layer)
    kind = str(info.get("type") or info.get("class") or "")
    if not kind or not _ECHO_RE.search(kind):
        return False
    has_params = bool(info.get("params")) or any(
        t.layer == layer and t.kind in ("weight", "grad", "update") for t in data.tensors
    )
    return not has_params


def fold_echoes(hits: dict[str, dict[str, Any]], data: RunData) -> dict[str, str]:
    """Fold echo layers into the dead layer right before them: ``{echo: owner}``.

    The owner's entry in ``hits`` gets ``"echoes": [...]``. An echo of an echo belongs to the same owner.
    """
    owner_of: dict[str, str] = {}
    for layer in ordered(hits, data):
        i = data.layer_index(layer)
        prev = data.layers[i - 1] if 0 < i < len(data.layers) else None
        if prev is None or prev not in hits or not is_echo_layer(data, layer):
            continue
        owner = owner_of.get(prev, prev)
        owner_of[layer] = owner
        hits[owner].setdefault("echoes", []).append(layer)
    return owner_of


class SaturatedUnitsRule(Rule):
    """``tanh``/``sigmoid`` layers whose mean local derivative has collapsed (``saturated-units``).

    See the module docstring for the exact gain formulas and their limits. Warns when the median gain over the
    last ``recent_steps`` logged steps is below ``saturation_gain``. Needs ``output`` summaries of layers whose
    activation is identifiable. The model's output layer (the last layer with recorded outputs) is not judged:
    a classifier's sigmoid or softmax output is meant to approach 0 or 1, and its loss (binary cross-entropy on
    a sigmoid, as Keras computes it from the logits) passes back ``p - y`` undiminished.
    """

    name = "saturated-units"
    codes = ("saturated-units",)
    kinds = ("output",)

    def missing(self, data: RunData) -> list[str]:
        """Needs output summaries of at least one identifiable tanh/sigmoid layer."""
        out = super().missing(data)
        if not out:
            layers = {t.layer for t in data.tensors if t.kind == "output"}
            if not any(activation_of(data, n) for n in layers):
                out.append("output summaries of a layer identifiable as tanh or sigmoid (model metadata or name)")
        return out

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the class docstring."""
        hits: dict[str, dict[str, Any]] = {}
        recorded = ordered({t.layer for t in data.tensors if t.kind == "output"}, data)
        output_layer = recorded[-1] if recorded else None
        for layer, sub in data.frame("output", hist=True).groupby("layer"):
            if str(layer) == output_layer:  # the model's output: confident predictions are the goal (see above)
                continue
            act = activation_of(data, str(layer))
            hit = _saturation(sub, act, th) if act is not None else None
            if hit is not None:
                hits[str(layer)] = hit
        if not hits:
            return []
        layers = ordered(hits, data)
        worst = min(layers, key=lambda n: hits[n]["gain"])
        w = hits[worst]
        learned = _learned_through(data, hits, th)
        if learned is not None:
            return [_confident_finding(data, hits, layers, worst, learned, th)]
        a, b = w["window_steps"]
        msg = (
            f"Saturated units: the {w['activation']} layer {worst!r} passes back on average {fmt(w['gain'])} of the "
            f"maximal gradient (mean local derivative relative to its maximum, median over logged steps {a}–{b}; "
            f"threshold {fmt(th.saturation_gain)})"
            + (f", with {w['share_abs_ge_0.5']:.0%} of its outputs at |a| >= 0.5" if w["activation"] == "tanh" else "")
            + f"; {len(layers)} layer(s) affected."
        )
        return [
            Finding(
                code="saturated-units",
                severity="warning",
                layers=tuple(layers),
                first_step=min(hits[n]["first_step"] for n in layers),
                last_step=max(hits[n]["last_step"] for n in layers),
                evidence={"threshold_gain": th.saturation_gain, "recent_steps": th.recent_steps, "layers": hits},
                message=msg,
                explanation=(
                    "tanh and sigmoid are flat for large |inputs|: their derivative 1 - a^2 (tanh) or a(1 - a) "
                    "(sigmoid) goes to 0 as the output approaches its asymptote. A saturated layer therefore "
                    "multiplies the gradient flowing back through it by nearly 0, so its own weights and every "
                    "layer before it stop learning, and it outputs nearly binary values that carry little "
                    "information."
                ),
                advice=(
                    "Initialise weights with a variance-preserving scheme (Glorot/Xavier for tanh and sigmoid) "
                    "instead of large random values, so pre-activations have unit variance.",
                    "Normalise the inputs and add BatchNorm/LayerNorm before the activation.",
                    "Lower the learning rate if saturation grows during training.",
                    "Prefer non-saturating activations (ReLU, GELU, SiLU) in hidden layers; for outputs, feed "
                    "logits to a from_logits / *_with_logits loss instead of applying sigmoid/softmax first.",
                ),
            )
        ]


def _learned_through(data: RunData, hits: dict[str, dict[str, Any]], th: Thresholds) -> dict[str, float] | None:
    """The loss's start and end medians if the units saturated while the loss fell; else ``None``.

    Every saturated layer must have been healthy at its first logged step, and the loss must have decreased (by
    ``loss_min_decrease`` at least) over the run.

    Units that saturate *while* the loss falls are the network growing confident (a BERT pooler's tanh as the
    classifier learns), not what stops it from learning.
    """
    if any(h["gain_first_logged"] < th.saturation_gain for h in hits.values()):
        return None
    values = loss(data)
    if len(values) < max(th.loss_min_steps, 6):
        return None
    w = loss_window(len(values), th)
    start, end = float(np.median(values.iloc[:w])), float(np.median(values.iloc[-w:]))
    if start <= 0 or (start - end) / start < th.loss_min_decrease:
        return None
    return {"loss_start": start, "loss_end": end}


def _confident_finding(
    data: RunData,
    hits: dict[str, dict[str, Any]],
    layers: list[str],
    worst: str,
    learned: dict[str, float],
    th: Thresholds,
) -> Finding:
    """The info finding: units that saturated while the loss fell."""
    w = hits[worst]
    return Finding(
        code="saturated-units",
        severity="info",
        layers=tuple(layers),
        first_step=min(hits[n]["first_step"] for n in layers),
        last_step=max(hits[n]["last_step"] for n in layers),
        evidence={"threshold_gain": th.saturation_gain, "layers": hits, **learned},
        message=(
            f"The {w['activation']} layer {worst!r} saturated during training (mean local derivative "
            f"{fmt(w['gain_first_logged'])} of its maximum at the first logged step, {fmt(w['gain'])} at the end) "
            f"while the loss fell from {fmt(learned['loss_start'])} to {fmt(learned['loss_end'])}: its units grew "
            "confident as the model learned."
        ),
        explanation=(
            "A tanh or sigmoid unit near its asymptote passes back little gradient. Units that were in range at the "
            "start and saturated as the loss fell are the model committing to what it learned (a BERT pooler's "
            "tanh as the classifier trains), not what blocks learning."
        ),
        advice=(
            "Nothing to change while the loss keeps falling; if it stalls, lower the learning rate or add "
            "normalisation before the activation.",
        ),
    )


def _saturation(sub: pd.DataFrame, act: str, th: Thresholds) -> dict[str, Any] | None:
    """The saturation evidence of one layer's output summaries (``sub``) with activation ``act``, or None if fine."""
    import pandas as pd

    g = sub.groupby("step").agg(
        {"sum": "sum", "sum_sq": "sum", "finite": "sum", "min": "min", "max": "max", "hist": "sum"}
    )
    g = g[g["finite"] > 0]
    if g.empty:
        return None
    lo, hi = float(g["min"].min()), float(g["max"].max())
    if (act == "tanh" and (lo < -1.0 or hi > 1.0)) or (act == "sigmoid" and (lo < 0.0 or hi > 1.0)):
        return None
    n = g["finite"].to_numpy(dtype="float64")
    if act == "tanh":
        gain = 1.0 - g["sum_sq"].to_numpy() / n
    else:
        gain = 4.0 * (g["sum"].to_numpy() - g["sum_sq"].to_numpy()) / n
    gain = pd.Series(np.clip(gain, 0.0, 1.0), index=g.index)
    pool = len(recent(g.index, th))
    late = gain.iloc[-pool:]
    med = float(np.median(late.to_numpy()))
    if med >= th.saturation_gain:
        return None
    hist_recent = np.sum(np.stack(g["hist"].iloc[-pool:].to_list()), axis=0)
    big = float(hist_recent[EXP_BIAS - 1 :].sum()) / float(g["finite"].iloc[-pool:].sum())
    below = gain[gain < th.saturation_gain]
    first = int(gain.index[-1])
    for step, v in reversed(list(gain.items())):
        if v >= th.saturation_gain:
            break
        first = int(step)
    return {
        "activation": act,
        "gain": med,
        "gain_first_logged": float(gain.iloc[0]),
        "share_abs_ge_0.5": big,
        "window_steps": [int(late.index[0]), int(late.index[-1])],
        "steps_below": len(below),
        "first_step": first,
        "last_step": int(gain.index[-1]),
    }
