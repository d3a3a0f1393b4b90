"""Per-layer tables derived from the run store, shared by the figures, the HTML report and ``gradsight show``.

This module only reads a :class:`~gradsight.store.Run`; it never touches a tensor. Every statistic is merged over
the tensors of a layer from their additive fields (``sum_sq``, ``finite``, unit counts), so a layer's RMS is the
RMS of all its elements together, not a mean of per-tensor RMS values.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _derived as derived
from .._errors import InputError
from ..store import Run, load

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "RunLike",
    "activity",
    "finding_list",
    "layer_rms",
    "layer_table",
    "nonfinite",
    "opened",
    "ordered_layers",
    "step_update_ratio",
    "update_ratio",
]

RunLike = Run | str | os.PathLike  # a Run or the path of a run file


@contextlib.contextmanager
def opened(run: Any) -> Iterator[Run]:
    """Yield a :class:`Run` for a Run or a path; a run opened here is closed on exit."""
    if isinstance(run, Run):
        yield run
        return
    if not isinstance(run, (str, os.PathLike)):
        raise InputError(
            f"expected a gradsight Run or the path of a run file, got {type(run).__name__} {run!r}. "
            "Pass gradsight.load('run.db') or the path itself."
        )
    r = load(run)
    try:
        yield r
    finally:
        r.close()


def ordered_layers(run: Run, present: Sequence[str] | set[str]) -> list[str]:
    """The layers in ``present``, in model order (``run.layers``), unknown ones appended in sorted order."""
    present = set(present)
    out = [name for name in run.layers if name in present]
    out += sorted(present - set(out))
    return out


def _empty() -> pd.DataFrame:
    """An empty wide table (index ``step``, no layer columns)."""
    import pandas as pd

    return pd.DataFrame(index=pd.Index([], name="step", dtype="int64"))


def _per_layer(df: pd.DataFrame) -> pd.DataFrame:
    return df.groupby(["step", "layer"], sort=False)[["sum_sq", "finite", "nonfinite"]].sum()


def layer_rms(run: Run, kind: str) -> pd.DataFrame:
    """Wide table of per-layer RMS of one kind (:func:`gradsight._derived.layer_rms`): step × layer, model order.

    NaN where a layer has no finite element at a step; ``inf`` where the sum of squares overflowed.
    """
    long = derived.layer_rms(run.to_pandas(kind=kind))
    return derived.wide(long, "rms", run.layers)


def nonfinite(run: Run, kind: str) -> pd.DataFrame:
    """Wide table of per-layer counts of NaN/Inf elements of one kind (index ``step``, columns layers)."""
    df = run.to_pandas(kind=kind)
    if df.empty:
        return _empty()
    wide = _per_layer(df)["nonfinite"].unstack("layer").sort_index().fillna(0).astype("int64")
    return wide[ordered_layers(run, wide.columns)]


def update_ratio(run: Run) -> pd.DataFrame:
    """Wide table of ``||update|| / ||weight||`` per layer and step (:func:`gradsight._derived.update_ratio`).

    From the per-step signals ``update_norm/<t>`` and ``weight_norm/<t>`` where the run has them (every step),
    else from the logged steps' summaries. Pooled over the layer's tensors that have both at that step; NaN where
    the ratio is undefined (a NaN/Inf among them, a zero weight norm, a skipped update), so such steps show as gaps.
    """
    per_step = step_update_ratio(run)
    if per_step is not None:
        return per_step
    long = derived.update_ratio_table(run.to_pandas(kind=["weight", "update"]))
    return derived.wide(long, "ratio", run.layers)


def step_update_ratio(run: Run) -> pd.DataFrame | None:
    """:func:`update_ratio` at every step, from the per-step signals; ``None`` when the run has none."""
    import pandas as pd

    sc = run.scalars
    names = [c[len("update_norm/") :] for c in sc.columns if c.startswith("update_norm/")]
    names = [n for n in names if f"weight_norm/{n}" in sc.columns]
    if not names:
        return None
    layer_of = {t.name: t.layer for t in run.tensors if t.kind in ("weight", "grad", "update")}
    layers: dict[str, list[str]] = {}
    for n in names:
        layers.setdefault(layer_of.get(n) or n.rpartition(".")[0] or "model", []).append(n)
    table = {}
    for layer, tensors in layers.items():
        u = sc[[f"update_norm/{n}" for n in tensors]].to_numpy(dtype="float64")
        w = sc[[f"weight_norm/{n}" for n in tensors]].to_numpy(dtype="float64")
        bad = (~np.isfinite(u)).sum(axis=1) + (~np.isfinite(w)).sum(axis=1)  # a gap also where not recorded
        table[layer] = derived.update_ratio(np.nansum(u * u, axis=1), np.nansum(w * w, axis=1), bad)
    wide = pd.DataFrame(table, index=sc.index)
    wide = wide[ordered_layers(run, wide.columns)]
    wide.columns.name = "layer"
    return wide


def activity(run: Run) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-layer activity of the layer outputs: ``(active_rate, dead_fraction)``, wide tables (step × layer).

    ``active_rate`` is the fraction of all output entries of the layer that were ``!= 0``; ``dead_fraction`` the
    fraction of its units that were never active in the step (:func:`gradsight._derived.unit_activity`). Only
    outputs recorded with unit counts appear.
    """
    long = derived.unit_activity(run.to_pandas(kind="output", units=True))
    order = run.layers
    return derived.wide(long, "active_rate", order), derived.wide(long, "dead_fraction", order)


def _last_valid(col: pd.Series) -> float:
    col = col.dropna()
    return float(col.iloc[-1]) if len(col) else math.nan


def layer_table(run: Run) -> pd.DataFrame:
    """One row per layer (model order) with its parameters and the last recorded value of each statistic.

    Columns: ``layer``, ``params`` (elements of its weight tensors), ``tensors`` (their names), ``grad_rms``,
    ``weight_rms``, ``update_ratio``, ``active_rate``, ``dead_fraction`` (each at the last step where it was
    recorded; NaN when never), ``nonfinite_steps`` (steps at which any of its grads/weights/outputs held a NaN
    or Inf).
    """
    import pandas as pd

    infos = run.tensors
    params: dict[str, int] = {}
    names: dict[str, list[str]] = {}
    for t in infos:
        if t.kind == "weight":
            params[t.layer] = params.get(t.layer, 0) + int(np.prod(t.shape, dtype=np.int64))
            names.setdefault(t.layer, []).append(t.name)
    grad, weight, ratio = layer_rms(run, "grad"), layer_rms(run, "weight"), update_ratio(run)
    active, dead = activity(run)
    bad_steps: dict[str, set[int]] = {}
    for kind in ("grad", "weight", "output"):
        nf = nonfinite(run, kind)
        for layer in nf.columns:
            bad_steps.setdefault(layer, set()).update(int(s) for s in nf.index[nf[layer] > 0])
    rows = []
    for layer in ordered_layers(run, {t.layer for t in infos}):

        def last(table: pd.DataFrame, name: str = layer) -> float:
            return _last_valid(table[name]) if name in table.columns else math.nan

        rows.append(
            {
                "layer": layer,
                "params": params.get(layer, 0),
                "tensors": ", ".join(names.get(layer, [])),
                "grad_rms": last(grad),
                "weight_rms": last(weight),
                "update_ratio": last(ratio),
                "active_rate": last(active),
                "dead_fraction": last(dead),
                "nonfinite_steps": len(bad_steps.get(layer, ())),
            }
        )
    return pd.DataFrame(rows)


def finding_list(run: Run, findings: Sequence[Any] | None) -> list[Any]:
    """The findings to show: the ones given, or — when ``None`` — ``gradsight.diagnose.diagnose(run)``.

    When the diagnosis module is not available (an older install) and none are given, the list is empty.
    Findings are returned most severe first, then by first step.
    """
    if findings is None:
        try:
            from ..diagnose import diagnose  # type: ignore[attr-defined]
        except ImportError:
            findings = []
        else:
            findings = list(diagnose(run))
    if isinstance(findings, (str, bytes)) or not isinstance(findings, Iterable):
        raise InputError(
            f"findings must be a list of gradsight.Finding (e.g. gradsight.diagnose(run)), [] or None, got "
            f"{type(findings).__name__} {findings!r:.60}."
        )
    out = list(findings)
    odd = [f for f in out if not all(hasattr(f, a) for a in ("code", "severity", "first_step", "last_step"))]
    if odd:
        raise InputError(
            f"findings must be gradsight.Finding objects (from gradsight.diagnose(run)), got {odd[0]!r:.60} "
            f"({type(odd[0]).__name__})."
        )
    out.sort(key=lambda f: (-_rank(f), f.first_step if f.first_step is not None else -1))
    return out


def _rank(f: Any) -> int:
    return {"info": 0, "warning": 1, "error": 2}.get(getattr(f, "severity", "info"), 0)
