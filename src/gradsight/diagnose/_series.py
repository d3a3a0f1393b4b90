"""Per-step series the rules share: read from the per-step signals where recorded, else from the logged steps.

A watch records two kinds of data (see :mod:`gradsight._schedule`): the *per-step signals* — scalars at every
optimizer step (``grad_norm``, ``grad_norm/<t>``, ``grad_norm_preclip``, ``weight_norm/<t>``,
``update_norm/<t>``, ``lr``, ``step_skipped``, ``loss``) — and full *summaries* at logged steps (every ``every``
steps, plus anomaly captures around jumps, which are ordinary logged steps here). Older run files and runs with
``cheap=False`` have no per-step norms of weights and updates. Every function below prefers the per-step signal
and falls back to the summaries, and says which it used (``source``), so that a rule judges each step against the
steps before it whenever those were recorded.

All series are pandas Series indexed by step (ascending); tables are step × tensor or step × layer DataFrames.
Results are cached on the :class:`~gradsight.diagnose.RunData` (one computation per diagnosis).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .._derived import global_norm, update_ratio, update_ratio_table
from ._base import RunData

if TYPE_CHECKING:  # pragma: no cover - pandas is imported where it is used, not at import
    import pandas as pd

__all__ = [
    "anomalies_near",
    "cached",
    "global_update_ratio",
    "global_weight_norm",
    "grad_norm",
    "gradient_spikes",
    "held_grad_norm",
    "held_tensors",
    "layer_update_ratios",
    "loss",
    "loss_rise_after",
    "loss_window",
    "lr",
    "median_between",
    "nonfinite_steps",
    "per_tensor",
    "preclip_norm",
    "running_reference",
    "spike_jumps",
    "tensor_grad_norms",
    "update_norms",
    "weight_norms",
]


def cached(data: RunData, key: str, make: Callable[[], Any]) -> Any:
    """``make()`` once per run and key."""
    if key not in data.cache:
        data.cache[key] = make()
    return data.cache[key]


def _series(values: Any = None, index: Any = None) -> pd.Series:
    import pandas as pd

    if values is None:
        return pd.Series(dtype="float64", index=pd.Index([], name="step", dtype="int64"))
    return pd.Series(values, index=index, dtype="float64").sort_index()


def per_tensor(data: RunData, prefix: str) -> pd.DataFrame:
    """The per-step signals ``<prefix>/<tensor>`` as a step × tensor table (NaN where not logged at a step).

    A signal logged as NaN (stored as NULL) reads as NaN too; :func:`nonfinite_steps` tells the two apart.
    """

    def make() -> pd.DataFrame:
        cols = [c for c in data.scalars.columns if str(c).startswith(prefix + "/")]
        table = data.scalars[cols].astype("float64").copy()
        table.columns = [str(c)[len(prefix) + 1 :] for c in cols]
        return table.sort_index()

    return cached(data, f"per_tensor:{prefix}", make)


def _summary_table(data: RunData, kind: str) -> pd.DataFrame:
    """Step × tensor table of the L2 norms of one kind's summaries (NaN where a tensor held NaN/Inf)."""
    import pandas as pd

    if kind not in data.kinds:
        return pd.DataFrame(index=pd.Index([], name="step", dtype="int64"))
    f = data.frame(kind)
    if f.empty:
        return pd.DataFrame(index=pd.Index([], name="step", dtype="int64"))
    l2 = f["l2"].astype("float64").where(f["nonfinite"] == 0)
    table = pd.DataFrame({"step": f["step"], "tensor": f["tensor"], "l2": l2}).pivot_table(
        index="step", columns="tensor", values="l2", aggfunc="first", dropna=False
    )
    table.columns.name = None
    return table.sort_index()


def grad_norm(data: RunData) -> tuple[pd.Series, str]:
    """The global gradient norm per step (non-finite kept as NaN/Inf) and its source.

    The ``grad_norm`` scalar (every step, as the optimizer receives the gradient: after clipping) when recorded,
    else the norm over all gradient summaries of each logged step.
    """

    def make() -> tuple[pd.Series, str]:
        if "grad_norm" in data.scalars.columns:
            s = data.scalars["grad_norm"].astype("float64").dropna()
            for step in data.null_scalar_steps("grad_norm"):
                s.loc[step] = math.nan
            return s.sort_index(), "scalar grad_norm"
        if "grad" in data.kinds:
            per = data.frame("grad").groupby("step")[["sum_sq", "nonfinite"]].sum()
            norm = global_norm(per["sum_sq"].to_numpy(), per["nonfinite"].to_numpy())
            return _series(norm, per.index), "grad summaries"
        return _series(), ""

    return cached(data, "grad_norm", make)


def preclip_norm(data: RunData) -> pd.Series:
    """``grad_norm_preclip`` per step (the norm as backward left it, before clipping); empty when not recorded."""
    if "grad_norm_preclip" not in data.scalars.columns:
        return _series()
    return data.scalars["grad_norm_preclip"].astype("float64").dropna().sort_index()


def tensor_grad_norms(data: RunData) -> tuple[pd.DataFrame, str]:
    """Step × tensor gradient norms: the per-step ``grad_norm/<t>`` signals, else the grad summaries."""

    def make() -> tuple[pd.DataFrame, str]:
        table = per_tensor(data, "grad_norm")
        if not table.empty and table.shape[1]:
            return table, "per-step grad_norm/<tensor>"
        return _summary_table(data, "grad"), "grad summaries"

    return cached(data, "tensor_grad_norms", make)


def weight_norms(data: RunData) -> tuple[pd.DataFrame, str]:
    """Step × tensor weight norms before each step's update: ``weight_norm/<t>``, else the weight summaries."""

    def make() -> tuple[pd.DataFrame, str]:
        table = per_tensor(data, "weight_norm")
        if not table.empty and table.shape[1]:
            return table, "per-step weight_norm/<tensor>"
        return _summary_table(data, "weight"), "weight summaries"

    return cached(data, "weight_norms", make)


def update_norms(data: RunData) -> tuple[pd.DataFrame, str]:
    """Step × tensor update norms ‖W_after − W_before‖: ``update_norm/<t>``, else the update summaries.

    Steps the optimizer skipped (``step_skipped``) have no update and are left out.
    """

    def make() -> tuple[pd.DataFrame, str]:
        table = per_tensor(data, "update_norm")
        if not table.empty and table.shape[1]:
            if "step_skipped" in data.scalars.columns:
                skipped = data.scalars["step_skipped"].fillna(0) > 0
                table = table[~skipped.reindex(table.index, fill_value=False)]
            return table, "per-step update_norm/<tensor>"
        return _summary_table(data, "update"), "update summaries"

    return cached(data, "update_norms", make)


def held_tensors(data: RunData) -> tuple[list[str], str]:
    """The parameter tensors the optimizer holds, and where that was read (empty when unknown)."""
    w = per_tensor(data, "weight_norm")
    if w.shape[1]:
        return [str(c) for c in w.columns], "per-step weight_norm/<tensor>"
    u = per_tensor(data, "update_norm")
    if u.shape[1]:
        return [str(c) for c in u.columns], "per-step update_norm/<tensor>"
    if "update" in data.kinds:
        names = list(dict.fromkeys(str(t) for t in data.frame("update")["tensor"]))
        if names:
            return names, "update summaries"
    return [], ""


def held_grad_norm(data: RunData) -> tuple[pd.Series, str]:
    """The gradient norm of the parameters the optimizer holds, per step, and its source.

    From the per-tensor norms where it is known which parameters the optimizer holds and it holds fewer than have
    gradients (the gradients of parameters it does not hold are never zeroed by ``optimizer.zero_grad()``: they
    pile up, and that is the not-optimized rule's business); else :func:`grad_norm`.
    """

    def make() -> tuple[pd.Series, str]:
        held, _ = held_tensors(data)
        g, _ = tensor_grad_norms(data)
        cols = [t for t in g.columns if t in set(held)]
        if not held or not cols or len(cols) == g.shape[1]:
            return grad_norm(data)
        arr = g[cols].to_numpy(dtype="float64")
        present = ~np.isnan(arr).all(axis=1)
        with np.errstate(over="ignore", invalid="ignore"):
            norm = np.sqrt(np.nansum(arr**2, axis=1))
        return _series(norm[present], g.index[present]), "gradients of the parameters the optimizer holds"

    return cached(data, "held_grad_norm", make)


def global_weight_norm(data: RunData) -> tuple[pd.Series, str]:
    """‖W‖ of all recorded parameters together per step (steps where every tensor's norm is finite)."""

    def make() -> tuple[pd.Series, str]:
        table, source = weight_norms(data)
        if table.empty or not table.shape[1]:
            return _series(), source
        arr = table.to_numpy(dtype="float64")
        present = ~np.isnan(arr)
        # only steps that have every tensor recorded at most steps: a step with part of the tensors is not comparable
        full = present.sum(axis=1) >= max(1, int(np.median(present.sum(axis=1))))
        with np.errstate(over="ignore", invalid="ignore"):
            norm = np.sqrt(np.nansum(arr**2, axis=1))
        return _series(norm[full], table.index[full]), source

    return cached(data, "global_weight_norm", make)


def layer_update_ratios(data: RunData) -> tuple[pd.DataFrame, str]:
    """Step × layer update/weight ratio ‖ΔW‖/‖W‖ (see :func:`gradsight._derived.update_ratio`).

    From the per-step ``update_norm/<t>`` and ``weight_norm/<t>`` (every step) where both were recorded, pooled
    over each layer's tensors with both at that step; else from the update and weight summaries (logged steps).
    NaN where undefined.
    """

    def make() -> tuple[pd.DataFrame, str]:
        import pandas as pd

        u, usrc = update_norms(data)
        w, _ = weight_norms(data)
        if usrc.startswith("per-step") and not w.empty and "per-step" in weight_norms(data)[1]:
            common = [t for t in u.columns if t in w.columns]
            steps = u.index.intersection(w.index)
            uu = u.loc[steps, common].to_numpy(dtype="float64")
            ww = w.loc[steps, common].to_numpy(dtype="float64")
            layers = [data.tensor_layer(t) for t in common]
            out = {}
            for layer in dict.fromkeys(layers):
                idx = [i for i, name in enumerate(layers) if name == layer]
                both = ~np.isnan(uu[:, idx]) & ~np.isnan(ww[:, idx])
                usq = np.where(both, uu[:, idx], 0.0) ** 2
                wsq = np.where(both, ww[:, idx], 0.0) ** 2
                bad = (~np.isfinite(usq) | ~np.isfinite(wsq)).sum(axis=1)
                ratio = update_ratio(usq.sum(axis=1), wsq.sum(axis=1), bad)
                ratio = np.where(both.any(axis=1), ratio, np.nan)
                out[layer] = ratio
            return pd.DataFrame(out, index=steps).sort_index(), "per-step update_norm / weight_norm"
        if "update" not in data.kinds or "weight" not in data.kinds:
            return pd.DataFrame(index=pd.Index([], name="step", dtype="int64")), ""
        t = update_ratio_table(pd.concat([data.frame("update"), data.frame("weight")], ignore_index=True))
        if t.empty:
            return pd.DataFrame(index=pd.Index([], name="step", dtype="int64")), ""
        table = t.pivot_table(index="step", columns="layer", values="ratio", aggfunc="first", dropna=False)
        table.columns.name = None
        return table.sort_index(), "update and weight summaries"

    return cached(data, "layer_update_ratios", make)


def global_update_ratio(data: RunData) -> tuple[pd.Series, str]:
    """‖ΔW‖/‖W‖ over all parameters together per step (robust to a zero-initialised layer), and its source."""

    def make() -> tuple[pd.Series, str]:
        u, usrc = update_norms(data)
        w, _ = weight_norms(data)
        common = [t for t in u.columns if t in w.columns]
        steps = u.index.intersection(w.index)
        if not common or steps.empty:
            return _series(), ""
        uu = u.loc[steps, common].to_numpy(dtype="float64")
        ww = w.loc[steps, common].to_numpy(dtype="float64")
        both = ~np.isnan(uu) & ~np.isnan(ww)
        with np.errstate(over="ignore", invalid="ignore"):
            usq = np.where(both, uu, 0.0) ** 2
            wsq = np.where(both, ww, 0.0) ** 2
        bad = (~np.isfinite(usq) | ~np.isfinite(wsq)).sum(axis=1)
        ratio = update_ratio(usq.sum(axis=1), wsq.sum(axis=1), bad)
        ratio = np.where(both.any(axis=1), ratio, np.nan)
        return _series(ratio, steps).dropna(), usrc

    return cached(data, "global_update_ratio", make)


def loss(data: RunData) -> pd.Series:
    """The finite values of the loss scalar per step (empty when no loss was recorded)."""

    def make() -> pd.Series:
        name = data.loss_name()
        if name is None:
            return _series()
        s = data.scalars[name].astype("float64")
        return s[np.isfinite(s.to_numpy())].sort_index()

    return cached(data, "loss", make)


def loss_window(n: int, th: Any) -> int:
    """How many of ``n`` loss values form the start and the end windows the loss rules compare (at least 3)."""
    return max(3, math.ceil(th.loss_window * n))


def lr(data: RunData) -> pd.Series:
    """The learning rate per step (``lr``, else the first group's ``lr/0``); empty when not recorded."""
    for name in ("lr", "lr/0"):
        if name in data.scalars.columns:
            return data.scalars[name].astype("float64").dropna().sort_index()
    return _series()


def nonfinite_steps(data: RunData) -> list[int]:
    """Steps at which a NaN/Inf was recorded anywhere: the loss, the gradient checks, or any summary."""

    def make() -> list[int]:
        steps: set[int] = set()
        sc = data.scalars
        name = data.loss_name()
        # an infinite gradient norm with no non-finite gradient entry counted at its step is an overflow of the
        # norm (float32 runs recorded before the norms were recomputed in float64), not a NaN/Inf
        counted = sc["grad_nonfinite"] if "grad_nonfinite" in sc.columns else None
        for col in [c for c in (name, "grad_norm", "grad_norm_preclip") if c and c in sc.columns]:
            v = sc[col].astype("float64")
            inf = np.isinf(v.to_numpy())
            if col != name and counted is not None:
                inf &= ~(counted.reindex(v.index).to_numpy(dtype="float64") == 0)
            steps |= {int(s) for s in v.index[inf]}
            steps |= set(data.null_scalar_steps(col))
        if counted is not None:
            steps |= {int(s) for s in sc.index[counted.fillna(0).to_numpy() > 0]}
        for kind in data.kinds:
            f = data.frame(kind)
            steps |= {int(s) for s in f.loc[f["nonfinite"] > 0, "step"].unique()}
        return sorted(steps)

    return cached(data, "nonfinite_steps", make)


def anomalies_near(data: RunData, first: int, last: int) -> list[dict[str, Any]]:
    """The watch's ``anomaly`` events (see :mod:`gradsight._anomaly`) at steps ``first..last``: what it captured."""
    keys = ("step", "reason", "signal", "value", "baseline", "captured")
    return [
        {k: e.get(k) for k in keys}
        for e in data.events("anomaly")
        if isinstance(e.get("step"), int) and first <= e["step"] <= last
    ][:8]


def running_reference(series: pd.Series, window: int) -> pd.Series:
    """For each value, the median of the up to ``window`` finite values *before* it (NaN for the first).

    What a step is compared with: only its past, so a spike is judged against what came before it and can
    never hide in its own baseline; the median resists one earlier odd value.
    """
    s = series[np.isfinite(series.to_numpy())]
    return s.shift(1).rolling(window, min_periods=1).median()


def median_between(series: pd.Series, lo: float, hi: float) -> float:
    """The median of the finite values with ``lo <= step <= hi`` (NaN when there are none)."""
    idx = series.index.to_numpy()
    v = series.to_numpy(dtype="float64")[(idx >= lo) & (idx <= hi)]
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else math.nan


def after(series: pd.Series, step: int, window: int) -> pd.Series:
    """The values at steps in ``(step, step + window]``, or, when none were recorded there, the next one after."""
    idx = series.index.to_numpy()
    inside = series[(idx > step) & (idx <= step + window)]
    if len(inside):
        return inside
    return series[idx > step].iloc[:1]


def before(series: pd.Series, step: int, window: int) -> pd.Series:
    """The values at steps in ``[step - window, step]``, or, when none were recorded there, the last one before."""
    idx = series.index.to_numpy()
    inside = series[(idx >= step - window) & (idx <= step)]
    if len(inside):
        return inside
    return series[idx < step].iloc[-1:]


def _typical_growth(data: RunData, step: int, window: int, weight_growth: float) -> dict[str, Any] | None:
    """The median over parameter tensors of their norm's growth within ``window`` steps after ``step``, or None.

    The global weight norm is dominated by the largest tensors (a transformer's embeddings and LayerNorm gains):
    the typical tensor's norm can double while it barely moves. The reference is each tensor's norm at ``step``
    (before its update), the growth its largest norm after it (as :func:`after` picks the steps); tensors that
    start the run at zero (biases: a few steps take them from 0 to anything) or end non-finite (the non-finite
    rule's) have no growth factor.
    """
    table, _ = weight_norms(data)
    if table.empty or table.shape[1] < 2:
        return None
    idx = table.index.to_numpy()
    ref = table[idx <= step]
    later = table[(idx > step) & (idx <= step + window)]
    if later.empty:
        later = table[idx > step].iloc[:1]
    if ref.empty or later.empty:
        return None
    start = ref.iloc[-1].to_numpy(dtype="float64")
    peak = later.max(axis=0, skipna=True).to_numpy(dtype="float64")
    initial = table.iloc[0].to_numpy(dtype="float64")  # zero-initialised (biases): no scale to grow from
    ok = np.isfinite(start) & (start > 0) & np.isfinite(peak) & np.isfinite(initial) & (initial > 0)
    if ok.sum() < 2:
        return None
    growth = peak[ok] / start[ok]
    return {
        "typical_tensor": True,
        "growth": float(np.median(growth)),
        "tensors_grown": int((growth >= weight_growth).sum()),
        "threshold": weight_growth,
        "tensors": int(ok.sum()),
        "step": int(later.loc[:, ok].idxmax(axis=0).max()),
    }


def weight_damage_text(w: dict[str, Any]) -> str:
    """The words for :func:`damage`'s ``weights`` entry (the global norm's growth, or the typical tensor's)."""
    from ._base import fmt

    if w.get("typical_tensor"):
        return (
            f"the typical parameter tensor's norm grew {fmt(w['growth'])}x (median over {w['tensors']} tensors; "
            f"{w['tensors_grown']} of them {fmt(w['threshold'])}x or more, by step {w['step']})"
        )
    return f"the norm of all weights grew {fmt(w['growth'])}x ({fmt(w['from'])} to {fmt(w['to'])} by step {w['step']})"


def loss_rise_after(
    data: RunData, step: int, before_steps: int, after_steps: int, *, rise: float, floor: float, baseline: int
) -> dict[str, float] | None:
    """The loss's rise after ``step``, or ``None`` when it did not rise ``rise`` times.

    Compares the median of the ``after_steps`` values after ``step`` with the median of the ``before_steps`` values
    up to it. A rise also has to leave the loss at ``floor`` times the initial loss or more (the lowest of the first
    ``baseline`` values): a converged loss that wobbles from 2e-4 to 8e-3 lost nothing that matters.
    """
    lo = loss(data)
    if not len(lo):
        return None
    ref_loss = before(lo, step, before_steps)
    later_loss = after(lo, step, after_steps)
    if not (len(ref_loss) and len(later_loss)):
        return None
    a, b = float(np.median(ref_loss.to_numpy())), float(np.median(later_loss.to_numpy()))
    initial = float(lo.iloc[: max(1, baseline)].min())
    if a > 0 and b / a >= rise and b >= floor * initial:
        return {"before": a, "after": b, "rise": b / a}
    return None


def damage(
    data: RunData,
    step: int,
    *,
    window: int,
    weight_growth: float,
    loss_rise: float,
    grad_jump: float,
    reference_window: int,
    loss_floor: float = 0.0,
    baseline: int = 3,
) -> dict[str, Any]:
    """What went wrong in the ``window`` steps after ``step``: the consequences of a step too large.

    Returns a dict with an entry per consequence seen (empty when none):

    * ``weights``: the global weight norm grew ``weight_growth``-fold or more over its value at ``step``, or the
      median over parameter tensors of their norms' growth did (``typical_tensor``: see :func:`_typical_growth`);
    * ``loss``: the median loss after ``step`` is ``loss_rise`` times (or more) the median over the ``window``
      steps up to it (the loss logged at a step is computed before that step's update), and at least
      ``loss_floor`` times the initial loss (the lowest of the first ``baseline`` values: see
      :func:`loss_rise_after`);
    * ``gradient``: the gradient norm after ``step`` exceeded ``grad_jump`` times its running median (the
      median of the ``reference_window`` values before it);
    * ``non_finite``: a NaN/Inf was recorded within the ``window`` steps after ``step`` (a NaN long after a step
      is no evidence against that step).
    """
    out: dict[str, Any] = {}
    w, _ = global_weight_norm(data)
    w = w[np.isfinite(w.to_numpy()) & (w.to_numpy() > 0)]
    if len(w):
        ref = before(w, step, window)
        later = after(w, step, window)
        if len(ref) and len(later):
            start, peak = float(ref.iloc[-1]), float(later.max())
            if start > 0 and peak / start >= weight_growth:
                out["weights"] = {"from": start, "to": peak, "step": int(later.idxmax()), "growth": peak / start}
    if "weights" not in out:
        typical = _typical_growth(data, step, window, weight_growth)
        if typical is not None and typical["growth"] >= weight_growth:
            out["weights"] = typical
    rose = loss_rise_after(data, step, window, window, rise=loss_rise, floor=loss_floor, baseline=baseline)
    if rose is not None:
        out["loss"] = rose
    g, _ = grad_norm(data)
    g = g[np.isfinite(g.to_numpy())]
    if len(g) > 1:
        ref_g = running_reference(g, reference_window)
        later = after(g, step, window)
        if len(later):
            jumps = (later / ref_g.reindex(later.index)).replace([np.inf], np.nan).dropna()
            if len(jumps) and float(jumps.max()) >= grad_jump:
                at = int(jumps.idxmax())
                out["gradient"] = {
                    "step": at,
                    "norm": float(g.loc[at]),
                    "running_median": float(ref_g.loc[at]),
                    "jump": float(jumps.max()),
                }
    bad = [s for s in nonfinite_steps(data) if step < s <= step + window]
    if bad:
        out["non_finite"] = {"step": bad[0]}
    return out


def gradient_spikes(data: RunData, th: Any) -> set[int]:
    """Steps where the gradient, not the learning rate, made the update large.

    Past the first ``damage_steps`` steps, the gradient norm jumped ``damage_grad_jump`` times above its running
    median while the learning rate stayed at or below its own running median, and the steps before were fine (the
    running median of the pooled update/weight ratio below ``update_ratio_high``). Such a step is large because of its
    gradient (one bad batch, a loss spike), not because of the learning rate, which was the same at the steps
    before, when the updates were fine: lowering it would slow the whole run to absorb one batch. The
    exploding-gradients rule reports the spike. The first steps are left to learning-rate-too-high: a learning
    rate too high from the start shows as large early gradients too.
    """
    return set(spike_jumps(data, th))


def spike_jumps(data: RunData, th: Any) -> dict[int, float]:
    """:func:`gradient_spikes` with each step's jump over the running median."""

    def make() -> dict[int, float]:
        return _spike_jumps(data, th)

    key = f"spike_jumps/{th.reference_steps}/{th.damage_grad_jump}/{th.damage_steps}/{th.update_ratio_high}"
    return cached(data, key, make)


def _spike_jumps(data: RunData, th: Any) -> dict[int, float]:
    norm, _ = grad_norm(data)
    norm = norm[np.isfinite(norm.to_numpy())]
    if norm.empty:
        return {}
    jump = norm / running_reference(norm, th.reference_steps)
    rates = lr(data)
    rate_ref = running_reference(rates, th.reference_steps) if len(rates) else rates
    ratio, _ = global_update_ratio(data)
    ratio_ref = running_reference(ratio, th.reference_steps) if len(ratio) else ratio
    out: dict[int, float] = {}
    for step in jump.index[(jump >= th.damage_grad_jump).to_numpy()]:
        if int(step) < th.damage_steps:
            continue
        r, ref = rates.get(step, math.nan), rate_ref.get(step, math.nan)
        if len(rates) and not (math.isfinite(r) and math.isfinite(ref) and r <= ref * (1 + 1e-6)):
            continue  # the learning rate rose into this step (or is unknown there): it may be the cause
        if not float(ratio_ref.get(step, 0.0)) < th.update_ratio_high:
            continue  # the steps before were already too large: the learning rate was not fine until then
        out[int(step)] = float(jump.loc[step])
    return out
