"""Per-layer and headline scalars of one logged step, derived from its tensor summaries (numpy only).

These are the numbers the TensorBoard export and the Lightning / Hugging Face callbacks publish. Each is a
plain function of the stored :class:`~gradsight.TensorSummary` fields, so a run file from yesterday gives the
same values as the live training loop did.

Per layer ``L`` and tensor kind ``k`` (``weight``, ``grad``, ``update``, ``output``, ``output_grad``), pooling
every tensor of that layer and kind (e.g. ``weight`` and ``bias``):

* ``L/k_rms``: root mean square over the finite elements (NaN when there are none);
* ``L/k_nonfinite``: how many elements were NaN or ±Inf (never part of any other statistic or histogram);
* ``L/k_zero_fraction``: the fraction of elements exactly zero (zeros are not in the log2 histogram either);
* ``L/update_ratio``: ``||update|| / ||weight||`` pooled over the layer's tensors that have both an update and a
  weight summary (:func:`gradsight._derived.update_ratio`, the definition the diagnosis and the report use too);
  NaN when any of those elements was NaN/Inf or the weight norm is 0;
* ``L/output_active_rate``: the fraction of output entries ``!= 0``, pooled over units, samples and positions;
* ``L/output_dead_fraction``: the fraction of output units with no active entry in that step.

Headline scalars (one value per step, ``gradsight/`` prefix): ``grad_norm`` (global L2 norm of every gradient;
NaN when any gradient element was NaN/Inf), ``update_ratio_max`` (the largest per-layer update ratio; NaN when a
layer's ratio is undefined that step, so the curve breaks where the trouble is), ``nonfinite`` (non-finite
elements over every recorded tensor) and ``dead_fraction`` (dead output units over every layer with unit
counts). Every definition lives in :mod:`gradsight._derived`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

from .. import _derived as derived
from ..store import KINDS
from ..summary import TensorSummary, merge_all

__all__ = ["HEADLINE_PREFIX", "headline_scalars", "layer_label", "layer_scalars"]

#: Prefix of the headline scalars.
HEADLINE_PREFIX = "gradsight/"


def layer_label(layer: str) -> str:
    """The layer name used in tags: the name itself, ``(model)`` for the root module's empty name."""
    return layer if layer else "(model)"


def _group(items: Iterable[tuple[Any, TensorSummary]]) -> dict[tuple[str, str], list[TensorSummary]]:
    groups: dict[tuple[str, str], list[TensorSummary]] = {}
    for info, s in items:
        groups.setdefault((info.layer, info.kind), []).append(s)
    return groups


def _pooled(summaries: list[TensorSummary]) -> TensorSummary:
    # Unit counts of different tensors need not line up; they are pooled separately (derived.unit_counts).
    return merge_all(dataclasses.replace(s, units_active=None, units_total=0) for s in summaries)


def _units(summaries: list[TensorSummary]) -> tuple[int, int, int, int] | None:
    """(active entries, total entries, dead units, units) pooled over the summaries that recorded units."""
    counts = derived.unit_counts([s.units_active for s in summaries], [s.units_total for s in summaries])
    return counts if counts[3] else None


def _ratios(items: list[tuple[Any, TensorSummary]]) -> dict[str, float]:
    """Per-layer update/weight ratio of one step (:func:`gradsight._derived.update_ratio`)."""
    return derived.step_update_ratios((i.layer, i.name, i.kind, s.sum_sq, s.nonfinite) for i, s in items)


def layer_scalars(items: Iterable[tuple[Any, TensorSummary]]) -> dict[str, float]:
    """Per-layer scalars of one step, keyed by tag (see the module docstring for the definitions).

    Args:
        items: ``(info, summary)`` pairs of one step, where ``info`` has ``name``, ``layer`` and ``kind``
            attributes (a :class:`gradsight.TensorInfo`).

    Returns:
        ``{"<layer>/<kind>_rms": value, ...}`` in layer-then-kind order of first appearance.
    """
    items = list(items)
    groups = _group(items)
    ratios = _ratios(items)
    out: dict[str, float] = {}
    layers = list(dict.fromkeys(layer for layer, _ in groups))
    order = {k: i for i, k in enumerate(KINDS)}
    keyed = sorted(groups.items(), key=lambda kv: (layers.index(kv[0][0]), order.get(kv[0][1], len(order))))
    for (layer, kind), summaries in keyed:
        p = _pooled(summaries)
        tag = f"{layer_label(layer)}/{kind}"
        out[f"{tag}_rms"] = derived.rms(p.sum_sq, p.finite)
        out[f"{tag}_nonfinite"] = float(p.nonfinite)
        out[f"{tag}_zero_fraction"] = p.zeros / p.count if p.count else math.nan
        if kind == "output":
            units = _units(summaries)
            if units is not None:
                active, entries, dead, n = units
                out[f"{tag}_active_rate"] = derived.active_rate(active, entries)
                out[f"{tag}_dead_fraction"] = derived.dead_fraction(dead, n)
        if kind == "update" and layer in ratios:
            out[f"{layer_label(layer)}/update_ratio"] = ratios[layer]
    return out


def headline_scalars(items: Iterable[tuple[Any, TensorSummary]]) -> dict[str, float]:
    """The few per-step numbers worth a logger's attention (see the module docstring).

    Args:
        items: ``(info, summary)`` pairs of one step, as for :func:`layer_scalars`.

    Returns:
        ``{"gradsight/grad_norm": ..., ...}``; a value is left out when the step has no data for it.
    """
    items = list(items)
    groups = _group(items)
    out: dict[str, float] = {}
    grads = [s for (_, kind), ss in groups.items() if kind == "grad" for s in ss]
    if grads:
        out[HEADLINE_PREFIX + "grad_norm"] = derived.global_norm(
            math.fsum(s.sum_sq for s in grads), sum(s.nonfinite for s in grads)
        )
    ratios = list(_ratios(items).values())
    if ratios:
        out[HEADLINE_PREFIX + "update_ratio_max"] = math.nan if any(map(math.isnan, ratios)) else max(ratios)
    if groups:
        out[HEADLINE_PREFIX + "nonfinite"] = float(sum(s.nonfinite for ss in groups.values() for s in ss))
    outputs = [s for (_, kind), ss in groups.items() if kind == "output" for s in ss]
    units = _units(outputs)
    if units is not None:
        out[HEADLINE_PREFIX + "dead_fraction"] = derived.dead_fraction(units[2], units[3])
    return out
