"""Derived quantities: the one definition of every number computed from stored summaries in more than one place.

The diagnosis rules (:mod:`gradsight.diagnose`), the figures, report and terminal table (:mod:`gradsight.show`)
and the exports and logger callbacks (:mod:`gradsight.export`) all read these functions, so a figure, a finding
and a TensorBoard scalar of the same run show the same number. Everything here is numpy/pandas on stored fields
(``sum_sq``, ``finite``, ``nonfinite``, per-unit activity counts); nothing touches a tensor or a framework.

Each quantity has a small numeric kernel that works on numbers or numpy arrays alike, and, where show and
diagnose need whole runs, a table function on the long frame of :meth:`gradsight.Run.to_pandas` that pools with
pandas and then calls the same kernel:

* :func:`rms` / :func:`layer_rms` — a layer's root mean square over the *finite* elements of all its tensors of
  one kind (non-finite elements are counted in ``nonfinite`` and never enter a sum).
* :func:`update_ratio` / :func:`update_ratio_table` / :func:`step_update_ratios` — ``‖ΔW‖ / ‖W‖`` per layer.
* :func:`unit_counts`, :func:`active_rate`, :func:`dead_fraction` / :func:`unit_activity` — how many output
  entries were active (``!= 0``) and how many units never were.
* :func:`global_norm` — the L2 norm of all gradients together.
* :func:`wide` — a long per-(step, layer) table turned into the step × layer table that figures draw.

Non-finite input is never silently dropped: a quantity whose inputs held a NaN or Inf is NaN, and the tables
carry the ``nonfinite`` count next to it so a caller can say why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - pandas is imported where it is used, not at import
    import pandas as pd

__all__ = [
    "RATIO_COLUMNS",
    "RMS_COLUMNS",
    "UNIT_COLUMNS",
    "active_rate",
    "dead_fraction",
    "global_norm",
    "layer_rms",
    "rms",
    "step_update_ratios",
    "unit_activity",
    "unit_counts",
    "update_ratio",
    "update_ratio_table",
    "wide",
]

#: Columns of :func:`layer_rms`.
RMS_COLUMNS = ("step", "layer", "sum_sq", "finite", "nonfinite", "rms")
#: Columns of :func:`update_ratio_table`.
RATIO_COLUMNS = (
    "step",
    "layer",
    "tensors",
    "update_sum_sq",
    "weight_sum_sq",
    "nonfinite",
    "update_l2",
    "weight_l2",
    "ratio",
)
#: Columns of :func:`unit_activity`.
UNIT_COLUMNS = ("step", "layer", "active", "entries", "dead", "units", "active_rate", "dead_fraction")


# ---- kernels: numbers or numpy arrays in, the same shape out ----------------------------------------------------
def rms(sum_sq: Any, finite: Any) -> Any:
    """Root mean square ``sqrt(sum_sq / finite)`` over the finite elements.

    Args:
        sum_sq: sum of squares of the finite elements (a number or an array).
        finite: how many finite elements entered it.

    Returns:
        The RMS; NaN where ``finite == 0`` (nothing to average); ``inf`` where the sum of squares overflowed.
        A float for scalar input, an array for array input.
    """
    s = np.asarray(sum_sq, dtype="float64")
    n = np.asarray(finite, dtype="float64")
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.sqrt(s / np.where(n > 0, n, np.nan))
    return float(out) if out.ndim == 0 else out


def update_ratio(update_sum_sq: Any, weight_sum_sq: Any, nonfinite: Any = 0) -> Any:
    """Update/weight ratio ``‖ΔW‖ / ‖W‖ = sqrt(Σ update sum_sq) / sqrt(Σ weight sum_sq)`` of one layer and step.

    The definition used everywhere in gradsight (diagnosis rules, figures, report, terminal table, exports):
    per layer and logged step, both norms are pooled over the layer's parameter tensors (weights and biases
    together, so a zero-initialised bias cannot make the ratio explode) **that have both a weight and an update
    summary at that step**; a tensor with only one of the two is left out of both norms. The ratio is NaN —
    undefined, and reported as such rather than dropped — when any element of those updates or weights was NaN
    or Inf, when a pooled sum of squares is not finite (overflow), or when the weight norm is 0.

    Args:
        update_sum_sq: the pooled sum of squares of the updates (a number or an array).
        weight_sum_sq: the pooled sum of squares of the weights, over the same tensors.
        nonfinite: how many NaN/Inf elements those updates and weights held together.

    Returns:
        The ratio (float for scalar input, array for array input), NaN where undefined.
    """
    u = np.asarray(update_sum_sq, dtype="float64")
    w = np.asarray(weight_sum_sq, dtype="float64")
    bad = np.asarray(nonfinite) > 0
    defined = ~bad & np.isfinite(u) & np.isfinite(w) & (w > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(defined, np.sqrt(np.where(defined, u, 0.0)) / np.sqrt(np.where(defined, w, 1.0)), np.nan)
    return float(out) if out.ndim == 0 else out


def global_norm(sum_sq: Any, nonfinite: Any = 0) -> Any:
    """The L2 norm of several tensors together, ``sqrt(Σ sum_sq)`` (e.g. every gradient of one step).

    Args:
        sum_sq: the sum of squares over the finite elements of all the tensors (a number, or an array of them).
        nonfinite: how many NaN/Inf elements those tensors held together.

    Returns:
        The norm; NaN when any element was NaN or Inf (as ``torch.nn.utils.clip_grad_norm_`` reports it) or the
        sum is itself NaN. A float for scalar input, an array for array input.
    """
    s = np.asarray(sum_sq, dtype="float64")
    out = np.where(np.asarray(nonfinite) > 0, np.nan, np.sqrt(np.where(np.isnan(s), np.nan, s)))
    return float(out) if out.ndim == 0 else out


def unit_counts(units_active: Iterable[Any], units_total: Iterable[int]) -> tuple[int, int, int, int]:
    """Per-unit activity of some output tensors pooled: ``(active entries, entries, dead units, units)``.

    Args:
        units_active: per tensor, the array of how many entries of each unit (samples times positions) were
            ``!= 0``, or ``None`` when the tensor was recorded without unit counts (skipped).
        units_total: per tensor, how many entries each unit has.

    Returns:
        Four counts; all 0 when no tensor had unit counts.
    """
    active = entries = dead = units = 0
    for u, total in zip(units_active, units_total, strict=True):
        if u is None:
            continue
        u = np.asarray(u)
        if u.size == 0:
            continue
        active += int(u.sum())
        entries += int(u.size) * int(total)
        dead += int(np.count_nonzero(u == 0))
        units += int(u.size)
    return active, entries, dead, units


def active_rate(active: int, entries: int) -> float:
    """The fraction of output entries that were active (``!= 0``); NaN without entries."""
    return active / entries if entries else math.nan


def dead_fraction(dead: int, units: int) -> float:
    """The fraction of output units with no active entry at all; NaN without units."""
    return dead / units if units else math.nan


def step_update_ratios(rows: Iterable[tuple[str, str, str, float, int]]) -> dict[str, float]:
    """:func:`update_ratio` per layer for the summaries of **one** step, without pandas (for per-step callers).

    Args:
        rows: ``(layer, tensor, kind, sum_sq, nonfinite)`` per recorded summary of the step; kinds other than
            ``weight`` and ``update`` are ignored.

    Returns:
        ``{layer: ratio}`` for every layer with at least one tensor that has both a weight and an update summary,
        in order of first appearance; NaN where the ratio is undefined (see :func:`update_ratio`).
    """
    sums: dict[tuple[str, str], dict[str, list[float]]] = {}
    for layer, tensor, kind, sum_sq, nonfinite in rows:
        if kind in ("weight", "update"):
            acc = sums.setdefault((layer, tensor), {}).setdefault(kind, [0.0, 0])
            acc[0] += _sum_sq(sum_sq)
            acc[1] += int(nonfinite)
    pooled: dict[str, list[float]] = {}
    for (layer, _), kinds in sums.items():
        if "weight" in kinds and "update" in kinds:
            p = pooled.setdefault(layer, [0.0, 0.0, 0])
            p[0] += kinds["update"][0]
            p[1] += kinds["weight"][0]
            p[2] += kinds["update"][1] + kinds["weight"][1]
    return {layer: update_ratio(u, w, n) for layer, (u, w, n) in pooled.items()}


def _sum_sq(value: float) -> float:
    """A stored sum of squares; a missing (NaN) one counts as non-finite (``inf``), never as 0."""
    v = float(value)
    return math.inf if math.isnan(v) else v


# ---- tables: the long frame of Run.to_pandas in, one row per (step, layer) out -----------------------------------
def _frame(columns: Sequence[str]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(
        {c: pd.Series(dtype="int64" if c == "step" else "object" if c == "layer" else "float64") for c in columns}
    )


def layer_rms(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (step, layer): the pooled RMS of all of the layer's tensors in ``frame`` (one kind).

    Args:
        frame: a long frame of :meth:`gradsight.Run.to_pandas` for one kind (columns ``step``, ``layer``,
            ``sum_sq``, ``finite``, ``nonfinite``).

    Returns:
        Columns :data:`RMS_COLUMNS`: the pooled ``sum_sq``, ``finite`` and ``nonfinite`` counts and ``rms``
        (:func:`rms`: over the finite elements, NaN when there are none), in order of first appearance.
    """
    if frame.empty:
        return _frame(RMS_COLUMNS)
    g = frame.groupby(["step", "layer"], sort=False)[["sum_sq", "finite", "nonfinite"]].sum().reset_index()
    g["rms"] = rms(g["sum_sq"].to_numpy(), g["finite"].to_numpy())
    return g[list(RMS_COLUMNS)]


def update_ratio_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (step, layer): :func:`update_ratio` over the tensors with both a weight and an update summary.

    Args:
        frame: a long frame of :meth:`gradsight.Run.to_pandas` holding the ``weight`` and ``update`` kinds
            (columns ``step``, ``layer``, ``tensor``, ``kind``, ``sum_sq``, ``nonfinite``).

    Returns:
        Columns :data:`RATIO_COLUMNS`, sorted by step and layer: ``tensors`` (how many tensors were paired),
        the pooled sums of squares, ``nonfinite`` (NaN/Inf elements among those updates and weights),
        ``update_l2``, ``weight_l2`` and ``ratio`` (NaN where undefined; such rows are kept).
    """
    if frame.empty:
        return _frame(RATIO_COLUMNS)
    keys = ["step", "layer", "tensor"]
    f = frame[[*keys, "kind", "sum_sq", "nonfinite"]].copy()
    f["sum_sq"] = f["sum_sq"].astype("float64").fillna(math.inf)  # a missing sum is non-finite, never 0
    u = f[f["kind"] == "update"].groupby(keys)[["sum_sq", "nonfinite"]].sum()
    w = f[f["kind"] == "weight"].groupby(keys)[["sum_sq", "nonfinite"]].sum()
    j = u.add_suffix("_u").join(w.add_suffix("_w"), how="inner")
    if j.empty:
        return _frame(RATIO_COLUMNS)
    j["nonfinite"] = j["nonfinite_u"] + j["nonfinite_w"]
    j["tensors"] = 1
    g = j.groupby(level=["step", "layer"])[["sum_sq_u", "sum_sq_w", "nonfinite", "tensors"]].sum().reset_index()
    g = g.rename(columns={"sum_sq_u": "update_sum_sq", "sum_sq_w": "weight_sum_sq"})
    g["update_l2"] = np.sqrt(g["update_sum_sq"].to_numpy(dtype="float64"))
    g["weight_l2"] = np.sqrt(g["weight_sum_sq"].to_numpy(dtype="float64"))
    g["ratio"] = update_ratio(g["update_sum_sq"].to_numpy(), g["weight_sum_sq"].to_numpy(), g["nonfinite"].to_numpy())
    return g[list(RATIO_COLUMNS)]


def unit_activity(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (step, layer): :func:`unit_counts`, :func:`active_rate` and :func:`dead_fraction` of the outputs.

    Args:
        frame: a long frame of :meth:`gradsight.Run.to_pandas` for the ``output`` kind read with ``units=True``
            (columns ``step``, ``layer``, ``units_active``, ``units_total``). Rows without unit counts are skipped.

    Returns:
        Columns :data:`UNIT_COLUMNS`, in order of first appearance; only (step, layer) pairs with unit counts.
    """
    import pandas as pd

    if frame.empty:
        return _frame(UNIT_COLUMNS)
    f = frame[frame["units_active"].notna()]
    rows = []
    for (step, layer), grp in f.groupby(["step", "layer"], sort=False):
        a, e, d, n = unit_counts(grp["units_active"], grp["units_total"])
        if n:
            rows.append((step, layer, a, e, d, n, active_rate(a, e), dead_fraction(d, n)))
    if not rows:
        return _frame(UNIT_COLUMNS)
    return pd.DataFrame(rows, columns=list(UNIT_COLUMNS))


def wide(long: pd.DataFrame, column: str, order: Sequence[str] | None = None) -> pd.DataFrame:
    """A step × layer table of one column of a long per-(step, layer) table.

    Args:
        long: a table with ``step`` and ``layer`` columns (one of the tables above).
        column: the value to spread out.
        order: the layer columns' order (default: sorted); layers not in ``order`` are appended, sorted.

    Returns:
        Index ``step`` (ascending), one column per layer; NaN where a layer has no value at a step.
    """
    import pandas as pd

    if long.empty:
        return pd.DataFrame(index=pd.Index([], name="step", dtype="int64"))
    table = long.set_index(["step", "layer"])[column].unstack("layer").sort_index()
    present = list(table.columns)
    cols = [c for c in (order or []) if c in present]
    cols += sorted(set(present) - set(cols))
    table = table[cols]
    table.columns.name = "layer"
    return table
