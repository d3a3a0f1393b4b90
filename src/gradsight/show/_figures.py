"""The figures: matplotlib drawings of a run, read only from the run store.

Three figures, one function each; each takes a :class:`~gradsight.store.Run` or the path of a run file and
returns a :class:`matplotlib.figure.Figure` (never shown, never saved — call ``fig.savefig(...)``):

* :func:`plot_overview` — the training at a glance: loss, per-layer gradient RMS as a layer × step heatmap on a
  log colour scale, weight RMS, update/weight ratio, activation active-rate and dead-unit fraction per layer, with
  the findings marked on the time axis (each root cause's first step in bold, with a ▼ on the loss panel).
* :func:`plot_depth_profile` — gradient (or another kind's) RMS per layer at chosen steps: the picture of
  vanishing and exploding gradients.
* :func:`plot_histograms` — the log2|x| histograms of one tensor over time.

Conventions: colour-blind-safe colours only (Okabe–Ito for categories, viridis/cividis for order and magnitude),
log axes where values span decades, layer names shortened in the middle with an ellipsis and thinned when there
are more than fit, mathtext disabled for names from the model (a ``$`` in a layer name is drawn as a ``$``).

Empty data: a figure whose *whole* content is missing raises :class:`~gradsight.InputError` naming what the run
does hold (a run with no summaries and no scalars; a kind or tensor that was never recorded). A single panel of
the overview whose statistic was not recorded (e.g. no layer outputs were watched) is drawn as an empty panel
with a note saying what was not recorded and how to record it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._cli_support import terminal_safe
from .._errors import InputError
from ..store import KINDS, Run
from ..summary import HIST_BINS, merge_all
from ._data import RunLike, activity, finding_list, layer_rms, nonfinite, opened, update_ratio

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["OKABE_ITO", "axis_labels", "plot_depth_profile", "plot_histograms", "plot_overview", "short_label"]

#: Okabe & Ito (2008) colour-blind-safe palette.
OKABE_ITO = {
    "orange": "#E69F00",
    "skyblue": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
    "black": "#000000",
}
_SEVERITY_COLOUR = {"error": OKABE_ITO["vermillion"], "warning": OKABE_ITO["orange"], "info": OKABE_ITO["skyblue"]}
_LINESTYLES = ("-", "--", ":", "-.")
_SEQ = "viridis"  # lines ordered by depth / time
_MAG = "cividis"  # magnitudes in heatmaps
_MAX_LABEL = 28  # characters of a layer name on an axis
_LABEL_PITCH_IN = 0.17  # vertical space one 8-pt tick label needs, in inches
_NAMES = {
    "grad": "gradient",
    "weight": "weight",
    "update": "update",
    "output": "layer output",
    "output_grad": "output gradient",
}


# ---- helpers --------------------------------------------------------------------------------------------------
def short_label(name: str, width: int = _MAX_LABEL) -> str:
    """A layer name for an axis: at most ``width`` characters, shortened in the middle with ``…``.

    The end of a name (``...layers.3.q_proj``) usually tells layers apart better than its start, so both ends are
    kept. Returned as plain text: set it on a Text with ``parse_math=False`` (the figures do).
    """
    name = terminal_safe(name)  # (a control character would be a missing glyph)
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    tail = width - 1 - head
    return name[:head] + "…" + name[-tail:]


def axis_labels(names: Sequence[str], width: int = _MAX_LABEL) -> list[str]:
    """Short labels for a list of layer names; prefixed with the layer index when shortening made two equal."""
    short = [short_label(n, width) for n in names]
    if len(set(short)) == len(short):
        return short
    return [f"{i}: {short_label(n, max(8, width - len(str(i)) - 2))}" for i, n in enumerate(names)]


def _plain(texts: Any) -> None:
    """Turn off mathtext on Text artists that show user strings."""
    for t in texts:
        t.set_parse_math(False)


def _thin(n: int, available_in: float, pitch_in: float = _LABEL_PITCH_IN) -> int:
    """Label every k-th of ``n`` items so that labels ``pitch_in`` apart fit in ``available_in`` inches."""
    fits = max(1, int(available_in / pitch_in))
    return max(1, math.ceil(n / fits))


def _layer_styles(n: int) -> list[tuple[Any, str]]:
    """Colour by depth (viridis, dark = input side) and a cycling line style, so neighbours differ twice."""
    import matplotlib

    cmap = matplotlib.colormaps[_SEQ]
    pos = np.linspace(0.0, 0.85, n)
    return [(cmap(p), _LINESTYLES[i % len(_LINESTYLES)]) for i, p in enumerate(pos)]


def _empty_panel(ax: Axes, title: str, note: str) -> None:
    ax.set_title(title, loc="left", fontsize=10)
    ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.35", wrap=True)
    ax.set_yticks([])


def _spans_decades(values: np.ndarray) -> bool:
    v = values[np.isfinite(values) & (values > 0)]
    return v.size > 0 and v.max() / v.min() >= 30.0


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges halfway between (possibly unevenly spaced) steps."""
    s = np.asarray(steps, dtype="float64")
    if s.size == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[:-1] + s[1:]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def _layer_axis(ax: Axes, labels: Sequence[str], height_in: float, *, axis: str = "y") -> None:
    n = len(labels)
    k = _thin(n, height_in) if axis == "y" else _thin(n, height_in, pitch_in=0.2)
    idx = list(range(0, n, k))
    all_labels = axis_labels(labels)
    shown = [all_labels[i] for i in idx]
    if axis == "y":
        ax.set_yticks(idx, shown, fontsize=8)
        _plain(ax.get_yticklabels())
    else:
        ax.set_xticks(idx, shown, fontsize=8, rotation=90)
        _plain(ax.get_xticklabels())


def _heatmap(
    fig: Figure, ax: Axes, table: pd.DataFrame, bad: pd.DataFrame | None, height_in: float, label: str
) -> None:
    """Layer × step heatmap of positive magnitudes on a log colour scale; non-finite cells marked with ×."""
    from matplotlib.colors import LogNorm

    data = table.to_numpy(dtype="float64").T  # layers × steps
    ok = np.isfinite(data) & (data > 0)
    masked = np.ma.masked_where(~ok, data)
    import matplotlib

    cmap = matplotlib.colormaps[_MAG].with_extremes(bad="0.85")
    if ok.any():
        lo, hi = float(data[ok].min()), float(data[ok].max())
        if hi <= lo:
            lo, hi = lo / 2, hi * 2
        norm = LogNorm(vmin=lo, vmax=hi)
    else:
        norm = LogNorm(vmin=1e-8, vmax=1.0)
    x = _edges(table.index.to_numpy())
    y = np.arange(data.shape[0] + 1) - 0.5
    mesh = ax.pcolormesh(x, y, masked, cmap=cmap, norm=norm, shading="flat", rasterized=True)
    ax.set_ylim(data.shape[0] - 0.5, -0.5)  # first layer on top
    cb = fig.colorbar(mesh, ax=ax, pad=0.01, fraction=0.04)
    cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    if bad is not None and not bad.empty:
        b = bad.reindex(index=table.index, columns=table.columns).fillna(0).to_numpy().T
        ys, xs = np.nonzero(b > 0)
        if ys.size:
            ax.scatter(
                table.index.to_numpy()[xs],
                ys,
                marker="x",
                s=18,
                color=OKABE_ITO["vermillion"],
                linewidths=1.2,
                label="NaN/Inf present",
                zorder=3,
            )
            ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
    _layer_axis(ax, [str(c) for c in table.columns], height_in)


def _lines(ax: Axes, table: pd.DataFrame, styles: dict[str, tuple[Any, str]], *, log: bool) -> None:
    for layer in table.columns:
        colour, ls = styles[layer]
        col = table[layer]
        ax.plot(table.index.to_numpy(), col.to_numpy(dtype="float64"), color=colour, ls=ls, lw=1.3)
    if log:
        ax.set_yscale("log")


def _mark_findings(axes: Sequence[Axes], findings: Sequence[Any], legend_ax: Axes) -> None:
    """Shade each finding's steps on every panel; list them in a legend on ``legend_ax``.

    A root cause (a finding the diagnosis marks ``is_root``, with no ``caused_by``) is drawn with a bold solid line
    at its first step and a ▼ at the top of ``legend_ax`` (the loss panel); symptoms with thin dashed lines. The
    legend lists the roots first and, when there are symptoms, says "root" or "because of ..." for each.
    """
    from matplotlib.lines import Line2D

    handles, labels = [], []
    shown = [f for f in findings if getattr(f, "first_step", None) is not None]
    shown.sort(key=lambda f: not _is_root(f))  # stable: roots first, each group in the diagnosis' order
    chained = not all(_is_root(f) for f in shown)  # name roles only when there is a chain to tell apart
    for i, f in enumerate(shown):
        colour = _SEVERITY_COLOUR.get(f.severity, OKABE_ITO["black"])
        first = f.first_step
        last = f.last_step if f.last_step is not None else first
        root = _is_root(f)
        ls = "-" if root else _LINESTYLES[1 + i % (len(_LINESTYLES) - 1)]
        lw = 2.4 if root else 1.0
        for ax in axes:
            ax.axvline(first, color=colour, ls=ls, lw=lw, zorder=5 if root else 4)
            if last > first:
                ax.axvspan(first, last, color=colour, alpha=0.08, lw=0, zorder=0)
        if root:
            legend_ax.plot(
                [first],
                [1.0],
                marker="v",
                color=colour,
                markersize=9,
                transform=legend_ax.get_xaxis_transform(),
                clip_on=False,
                zorder=6,
                ls="none",
            )
        if i < 6:
            handles.append(Line2D([], [], color=colour, ls=ls, lw=lw + 0.3))
            steps = f"step {first}" if last == first else f"steps {first}–{last}"
            role = ("; root" if root else "; because of " + ", ".join(getattr(f, "caused_by", ()))) if chained else ""
            labels.append(f"{f.severity}: {f.code} ({steps}{role})")
    if len(shown) > 6:
        handles.append(Line2D([], [], color="none"))
        labels.append(f"+{len(shown) - 6} more findings (see report)")
    if handles:
        leg = legend_ax.legend(handles, labels, loc="upper right", fontsize=7, framealpha=0.9, title="findings")
        leg.get_title().set_fontsize(7)
        _plain(leg.get_texts())


def _is_root(f: Any) -> bool:
    """A root cause: marked so by the diagnosis, or without recorded causes."""
    return bool(getattr(f, "is_root", True)) and not getattr(f, "caused_by", ())


def _loss_panel(ax_loss: Axes, scalars: pd.DataFrame) -> None:
    """The loss over the steps (log axis when it spans decades), or a note that none was recorded."""
    if "loss" in scalars.columns and scalars["loss"].notna().any():
        loss = scalars["loss"].astype("float64")
        ax_loss.plot(loss.index.to_numpy(), loss.to_numpy(), color=OKABE_ITO["black"], lw=1.3)
        if (loss.dropna() > 0).all() and _spans_decades(loss.to_numpy()):
            ax_loss.set_yscale("log")
            ax_loss.set_ylabel("loss (log)", fontsize=8)
        else:
            ax_loss.set_ylabel("loss", fontsize=8)
        bad = loss.index[~np.isfinite(loss.to_numpy())]
        for s in bad[:1]:
            ax_loss.annotate("loss not finite", (s, 1.0), xycoords=("data", "axes fraction"), fontsize=7, va="top")
        ax_loss.set_title("Loss", loc="left", fontsize=10)
    else:
        _empty_panel(ax_loss, "Loss", "no 'loss' scalar recorded — log it with watch.log(loss=...)")


def _grad_norm_overlay(ax_loss: Axes, scalars: pd.DataFrame, anomalies: Sequence[dict[str, Any]]) -> None:
    """On the loss panel: the gradient norm of every step, and a marker at each anomaly capture.

    The global norm as the optimizer received it on a right axis (log when it spans decades), dashed as backward
    left it where clipping changed it.
    """
    if "grad_norm" in scalars.columns and scalars["grad_norm"].notna().any():
        ax_g = ax_loss.twinx()
        g = scalars["grad_norm"].astype("float64")
        ax_g.plot(g.index.to_numpy(), g.to_numpy(), color=OKABE_ITO["blue"], lw=0.9, label="gradient norm")
        if "grad_norm_preclip" in scalars.columns:
            pre = scalars["grad_norm_preclip"].astype("float64")
            if (pre.dropna() != g.reindex(pre.dropna().index)).any():
                ax_g.plot(
                    pre.index.to_numpy(),
                    pre.to_numpy(),
                    color=OKABE_ITO["blue"],
                    lw=0.9,
                    ls="--",
                    label="before clipping",
                )
        positive = g[np.isfinite(g) & (g > 0)]
        if len(positive) and _spans_decades(positive.to_numpy()):
            ax_g.set_yscale("log")
        ax_g.set_ylabel("gradient norm", fontsize=8, color=OKABE_ITO["blue"])
        ax_g.tick_params(labelsize=7, colors=OKABE_ITO["blue"])
        ax_g.legend(loc="lower right", fontsize=7, frameon=False)
    for e in anomalies:
        ax_loss.annotate(
            "◆",
            (e["step"], 0.0),
            xycoords=("data", "axes fraction"),
            fontsize=8,
            ha="center",
            va="bottom",
            color=OKABE_ITO["purple"],
        )
    if anomalies:
        ax_loss.annotate(
            "◆ anomaly capture",
            (0.005, 0.02),
            xycoords="axes fraction",
            fontsize=7,
            color=OKABE_ITO["purple"],
            va="bottom",
        )


def _grad_panel(fig: Figure, ax_grad: Axes, grad: pd.DataFrame, grad_bad: pd.DataFrame, heat_in: float) -> None:
    """Gradient RMS per layer as a layer x step heatmap (log colour scale), or a note that none was recorded."""
    if grad.empty:
        _empty_panel(ax_grad, "Gradient RMS per layer", "no gradient summaries recorded")
    else:
        _heatmap(fig, ax_grad, grad, grad_bad, heat_in, "gradient RMS (log scale)")
        ax_grad.set_title("Gradient RMS per layer (log colour scale; grey = zero or no data)", loc="left", fontsize=10)


def _weight_panel(ax_w: Axes, weight: pd.DataFrame, styles: dict[str, tuple[Any, str]]) -> None:
    """Weight RMS per layer, one line each."""
    if weight.empty:
        _empty_panel(ax_w, "Weight RMS per layer", "no weight summaries recorded")
    else:
        _lines(ax_w, weight, styles, log=_spans_decades(weight.to_numpy(dtype="float64")))
        ax_w.set_ylabel("RMS" + (" (log)" if ax_w.get_yscale() == "log" else ""), fontsize=8)
        ax_w.set_title("Weight RMS per layer", loc="left", fontsize=10)


def _ratio_panel(ax_r: Axes, ratio: pd.DataFrame, styles: dict[str, tuple[Any, str]]) -> None:
    """Update/weight ratio per layer (log axis, gaps where undefined) with the ~1e-3 reference line."""
    if ratio.empty:
        _empty_panel(
            ax_r,
            "Update / weight ratio",
            "no update summaries recorded (updates need the optimizer step to be watched)",
        )
    else:
        _lines(ax_r, ratio, styles, log=True)
        ax_r.axhline(1e-3, color="0.4", lw=0.8, ls=(0, (1, 2)))
        ax_r.annotate(
            "1e-3, a common healthy ratio",
            (0.005, 1e-3),
            xycoords=("axes fraction", "data"),
            fontsize=7,
            ha="left",
            va="bottom",
            color="0.3",
            bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
        )
        ax_r.set_ylabel("‖Δw‖ / ‖w‖ (log)", fontsize=8)
        ax_r.set_title("Update / weight ratio per layer", loc="left", fontsize=10)


def _activity_panels(
    ax_a: Axes, ax_d: Axes, active: pd.DataFrame, dead: pd.DataFrame, styles: dict[str, tuple[Any, str]]
) -> None:
    """Active rate and dead-unit fraction per layer, or a note on both when no unit counts were recorded."""
    if active.empty:
        note = "no layer-output unit counts recorded (activations are recorded when layer outputs are watched)"
        _empty_panel(ax_a, "Activation active rate", note)
        _empty_panel(ax_d, "Dead-unit fraction", note)
    else:
        _lines(ax_a, active, styles, log=False)
        ax_a.set_ylim(-0.03, 1.03)
        ax_a.set_ylabel("fraction ≠ 0", fontsize=8)
        ax_a.set_title("Activation active rate per layer (fraction of output entries ≠ 0)", loc="left", fontsize=10)
        _lines(ax_d, dead, styles, log=False)
        ax_d.set_ylim(-0.03, 1.03)
        ax_d.set_ylabel("fraction of units", fontsize=8)
        ax_d.set_title("Dead-unit fraction per layer (units never active in the step)", loc="left", fontsize=10)


# ---- the figures ----------------------------------------------------------------------------------------------
def plot_overview(run: RunLike, *, findings: Sequence[Any] | None = None) -> Figure:
    """The training at a glance, one panel per statistic over the steps.

    Panels, top to bottom, sharing the step axis: loss (log axis when it spans decades), with the global gradient
    norm at every step on a right axis (dashed: before clipping, where clipping changed it) and a ◆ at each anomaly
    capture; gradient RMS per layer as a layer × step heatmap on a log colour scale (NaN/Inf cells marked ×); weight
    RMS per layer; update/weight ratio per layer at every step where the per-step signals were recorded (with the
    common ~1e-3 reference); activation active rate and dead-unit fraction per layer. Each finding is drawn as a
    vertical line at its first step, shading up to its last step, coloured by severity; a root cause's line is bold
    and solid, with a ▼ above the loss panel at its first step. Per-layer lines are coloured by depth (viridis, dark
    = input side).

    Args:
        run: a :class:`~gradsight.store.Run` or the path of a run file.
        findings: the findings to mark; ``None`` (default) runs ``gradsight.diagnose.diagnose(run)``, ``[]``
            marks none.

    Returns:
        The matplotlib Figure.

    Raises:
        InputError: the run holds neither tensor summaries nor scalars (nothing to draw).
    """
    import matplotlib.pyplot as plt

    with opened(run) as r:
        scalars = r.scalars
        grad = layer_rms(r, "grad")
        if grad.empty and scalars.empty:
            raise InputError(
                f"plot_overview: the run {str(r.path)!r} holds no tensor summaries and no scalars, so there is "
                "nothing to draw. Was training logged? With gradsight.watch(model) the watch records each "
                "optimizer step; a run that crashed before its first step is empty."
            )
        grad_bad = nonfinite(r, "grad")
        weight = layer_rms(r, "weight")
        ratio = update_ratio(r)
        active, dead = activity(r)
        found = finding_list(r, findings)
        anomalies = r.events("anomaly")
        order = r.layers
        title = _run_title(r)

    line_layers = [name for name in order if any(name in t.columns for t in (weight, ratio, active, dead))]
    styles = dict(zip(line_layers, _layer_styles(len(line_layers)), strict=True))

    n_grad = max(1, grad.shape[1])
    heat_in = min(max(1.8, 0.24 * n_grad), 9.0)
    heights = [1.7, heat_in, 1.7, 1.7, 1.5, 1.5]
    fig, axes = plt.subplots(
        len(heights),
        1,
        figsize=(11, sum(heights) + 1.4),
        sharex=True,
        height_ratios=heights,
        layout="constrained",
    )
    ax_loss, ax_grad, ax_w, ax_r, ax_a, ax_d = axes
    fig.suptitle(f"gradsight overview — {title}", fontsize=12, parse_math=False)

    _loss_panel(ax_loss, scalars)
    _grad_norm_overlay(ax_loss, scalars, anomalies)
    _grad_panel(fig, ax_grad, grad, grad_bad, heat_in)
    _weight_panel(ax_w, weight, styles)
    _ratio_panel(ax_r, ratio, styles)
    _activity_panels(ax_a, ax_d, active, dead, styles)

    for ax in axes:
        ax.tick_params(labelsize=8)
        ax.grid(True, which="major", color="0.92", lw=0.6)
        ax.set_axisbelow(True)
    ax_d.set_xlabel("step", fontsize=9)
    ax_d.tick_params(labelbottom=True)

    _mark_findings(axes, found, ax_loss)
    _layer_legend(fig, line_layers, styles, [ax_w, ax_r, ax_a, ax_d])
    return fig


def _layer_legend(
    fig: Figure, layers: Sequence[str], styles: dict[str, tuple[Any, str]], line_axes: Sequence[Axes]
) -> None:
    """One legend for every per-layer line panel (up to 30 layers); a depth colour bar beyond that."""
    if not layers:
        return
    if len(layers) <= 30:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=styles[n][0], ls=styles[n][1], lw=1.5) for n in layers]
        leg = fig.legend(
            handles,
            axis_labels(layers, 24),
            loc="outside right center",
            fontsize=7,
            title="layer (input → output)",
            frameon=False,
        )
        leg.get_title().set_fontsize(8)
        _plain(leg.get_texts())
        return
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    sm = ScalarMappable(norm=Normalize(0, len(layers) - 1), cmap=matplotlib.colormaps[_SEQ].resampled(256))
    cb = fig.colorbar(sm, ax=list(line_axes), location="right", fraction=0.03, pad=0.01)
    cb.set_label("layer depth (line colour)", fontsize=8)
    cb.set_ticks([0, len(layers) - 1], labels=[short_label(layers[0], 16), short_label(layers[-1], 16)])
    _plain(cb.ax.get_yticklabels())
    cb.ax.tick_params(labelsize=7)


def _run_title(run: Run) -> str:
    meta = run.meta
    parts = [run.path.name]
    if meta.get("framework"):
        parts.append(str(meta["framework"]))
    if meta.get("scenario"):
        parts.append(f"scenario {meta['scenario']}")
    return short_label(" · ".join(parts), 90)


def _pick_steps(all_steps: Sequence[int], n: int = 5) -> list[int]:
    if len(all_steps) <= n:
        return list(all_steps)
    idx = np.unique(np.round(np.linspace(0, len(all_steps) - 1, n)).astype(int))
    return [all_steps[i] for i in idx]


def _chosen_steps(recorded_steps: list[int], steps: Sequence[int] | None, kind: str) -> list[int]:
    """The steps plot_depth_profile draws: ``steps`` checked against the recorded ones, or up to five spread out."""
    if steps is None:
        return _pick_steps(recorded_steps)
    ok = isinstance(steps, Sequence) and not isinstance(steps, (str, bytes))
    ok = ok and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in steps)
    if not ok:
        raise InputError(
            f"plot_depth_profile(steps=...) expects a list of step numbers, got {type(steps).__name__} {steps!r}. "
            "Pass e.g. steps=[0, 100], or steps=None to pick some automatically."
        )
    chosen = [int(s) for s in steps]
    missing = [s for s in chosen if s not in set(recorded_steps)]
    if missing or not chosen:
        raise InputError(
            f"plot_depth_profile: steps {missing or list(steps)!r} were not recorded for kind {kind!r}; "
            f"recorded steps run from {recorded_steps[0]} to {recorded_steps[-1]} ({len(recorded_steps)} "
            f"steps, e.g. {recorded_steps[:5]}). Pass steps=None to pick some automatically."
        )
    return chosen


def plot_depth_profile(run: RunLike, *, steps: Sequence[int] | None = None, kind: str = "grad") -> Figure:
    """RMS per layer, input side to output side, one line per chosen step (log axis).

    Gradients that shrink layer by layer toward the input are vanishing; gradients that grow are exploding. Steps
    are coloured in time order (viridis, dark = early). A step at which a layer held NaN/Inf is marked with ▲ at
    the top of the axis.

    Args:
        run: a :class:`~gradsight.store.Run` or the path of a run file.
        steps: the steps to draw; ``None`` picks up to five spread over the run (first and last included).
            Steps that were not recorded are an error.
        kind: which tensors: ``"grad"`` (default), ``"weight"``, ``"update"``, ``"output"`` or ``"output_grad"``.

    Returns:
        The matplotlib Figure.

    Raises:
        InputError: ``kind`` is unknown or was never recorded, or a requested step was not recorded.
    """
    import matplotlib
    import matplotlib.pyplot as plt

    if kind not in KINDS:
        raise InputError(f"plot_depth_profile: unknown kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}.")
    with opened(run) as r:
        table = layer_rms(r, kind)
        bad = nonfinite(r, kind)
        title = _run_title(r)
        if table.empty:
            recorded = sorted({t.kind for t in r.tensors})
            raise InputError(
                f"plot_depth_profile: the run {str(r.path)!r} has no {kind!r} summaries; it recorded "
                f"{recorded or 'none'}. Pass kind= one of those."
            )
    chosen = _chosen_steps([int(s) for s in table.index], steps, kind)
    layers = [str(c) for c in table.columns]
    n = len(layers)
    width = min(max(7.0, 0.42 * n + 3.0), 18.0)
    fig, ax = plt.subplots(figsize=(width, 4.6), layout="constrained")
    cmap = matplotlib.colormaps[_SEQ]
    x = np.arange(n)
    drawn = False
    for i, s in enumerate(chosen):
        colour = cmap(0.85 * i / max(1, len(chosen) - 1))
        y = table.loc[s].to_numpy(dtype="float64")
        y = np.where(np.isfinite(y) & (y > 0), y, np.nan)
        drawn = drawn or bool(np.isfinite(y).any())
        ax.plot(x, y, marker="o", ms=3.5, color=colour, lw=1.4, label=f"step {s}")
        if not bad.empty and s in bad.index:
            row = bad.loc[s].reindex(table.columns).fillna(0).to_numpy()
            hit = np.nonzero(row > 0)[0]
            if hit.size:
                ax.scatter(
                    hit,
                    np.ones(hit.size),
                    marker="^",
                    color=colour,
                    s=40,
                    zorder=4,
                    transform=ax.get_xaxis_transform(),
                    clip_on=False,
                )
    if bad.reindex(index=chosen).fillna(0).to_numpy().sum() > 0:
        ax.scatter([], [], marker="^", color="0.3", label="NaN/Inf in layer")
    _log_or_note(ax, drawn, "every RMS at these steps is zero or non-finite")
    ax.set_xlim(-0.5, n - 0.5)
    _layer_axis(ax, layers, width - 2.0, axis="x")
    ax.set_xlabel("layer (input side → output side)", fontsize=9)
    ax.set_ylabel(f"{_NAMES[kind]} RMS (log)", fontsize=9)
    ax.set_title(f"{_NAMES[kind].capitalize()} RMS by depth — {title}", loc="left", fontsize=11, parse_math=False)
    ax.tick_params(labelsize=8)
    ax.grid(True, which="major", color="0.9", lw=0.6)
    leg = ax.legend(fontsize=8, loc="best", framealpha=0.9)
    _plain(leg.get_texts())
    return fig


def _log_or_note(ax: Axes, drawn: bool, note: str) -> None:
    """A log y axis when something positive and finite was drawn; else (a log axis has no range) a note."""
    if drawn:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")


def _hist_lines(
    ax_l: Axes,
    steps: np.ndarray,
    frac: np.ndarray,
    counts: np.ndarray,
    zeros: np.ndarray,
    nonfin: np.ndarray,
    y_edges: np.ndarray,
) -> None:
    """The right panel of plot_histograms: the histograms (``frac``: steps × drawn bins) at up to four steps."""
    import matplotlib

    cmap_l = matplotlib.colormaps[_SEQ]
    drawable = [int(s) for s, row in zip(steps, frac, strict=True) if np.isfinite(row).any() and np.nansum(row) > 0]
    if not drawable:  # every picked step was all zeros or non-finite: nothing has a place on a log axis
        _empty_panel(ax_l, "histograms at chosen steps", "no step with a finite non-zero element")
        return
    picks = _pick_steps(drawable, 4)
    centers = np.sqrt(y_edges[:-1] * y_edges[1:])
    for i, s in enumerate(picks):
        j = int(np.searchsorted(steps, s))
        c = counts[j] if counts[j] else math.nan
        lab = f"step {s}: zeros {zeros[j] / c:.1%}"
        if nonfin[j]:
            lab += f", NaN/Inf {nonfin[j] / c:.1%}"
        ax_l.step(
            centers,
            frac[j],
            where="mid",
            color=cmap_l(0.85 * i / max(1, len(picks) - 1)),
            lw=1.4,
            ls=_LINESTYLES[i % len(_LINESTYLES)],
            label=lab,
        )
    ax_l.set_xscale("log", base=2)
    ax_l.set_xlabel("|x| (log2 axis)", fontsize=9)
    ax_l.set_ylabel("fraction of elements", fontsize=9)
    ax_l.set_title("histograms at chosen steps", loc="left", fontsize=10)
    ax_l.legend(fontsize=7, framealpha=0.9)
    ax_l.tick_params(labelsize=8)
    ax_l.grid(True, color="0.92", lw=0.6)


def _read_histograms(run: RunLike, tensor: str, kind: str) -> tuple[dict[int, list[Any]], bool, str]:
    """``(summaries per step, whether tensor named a tensor rather than a layer, run title)`` for plot_histograms."""
    with opened(run) as r:
        infos = [t for t in r.tensors if t.kind == kind]
        by_name = [t for t in infos if t.name == tensor]
        chosen = by_name or [t for t in infos if t.layer == tensor]
        if not chosen:
            names = sorted({t.name for t in infos})
            raise InputError(
                f"plot_histograms: no {kind!r} tensor or layer named {tensor!r} in {str(r.path)!r}. Recorded "
                f"{kind!r} tensors: {names[:20]}{' …' if len(names) > 20 else ''}. Pass one of those names (or a "
                "layer name), or another kind=."
            )
        per_step: dict[int, list[Any]] = {}
        for step, _, s in r.summaries(kind=kind, tensor=[t.name for t in chosen]):
            per_step.setdefault(step, []).append(s)
        title = _run_title(r)
    return per_step, bool(by_name), title


def plot_histograms(run: RunLike, tensor: str, *, kind: str = "grad") -> Figure:
    """The log2|x| histograms of one tensor over time, from the stored bins.

    Left: a step × magnitude heatmap of the fraction of the tensor's finite non-zero elements in each power-of-two
    bin (log colour scale). Right: the histograms at up to four steps as lines, each labelled with the fraction of
    exact zeros and of NaN/Inf elements, which have no bin.

    Args:
        run: a :class:`~gradsight.store.Run` or the path of a run file.
        tensor: a tensor name (``"0.weight"``, ``"dense_1/kernel"``) or a layer name, whose tensors of ``kind``
            are then merged (histograms add).
        kind: ``"grad"`` (default), ``"weight"``, ``"update"``, ``"output"`` or ``"output_grad"``.

    Returns:
        The matplotlib Figure.

    Raises:
        InputError: ``kind`` is unknown, or nothing of that kind was recorded for ``tensor``.
    """
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    if kind not in KINDS:
        raise InputError(f"plot_histograms: unknown kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}.")
    if not isinstance(tensor, str):
        raise InputError(f"plot_histograms: tensor must be a tensor or layer name (str), got {tensor!r}.")
    per_step, by_name, title = _read_histograms(run, tensor, kind)
    if not per_step:
        raise InputError(f"plot_histograms: the {kind!r} tensor {tensor!r} has no recorded steps yet.")
    steps = np.array(sorted(per_step), dtype="int64")
    merged = [merge_all(per_step[int(s)]) for s in steps]
    hist = np.stack([m.hist for m in merged]).astype("float64")  # steps × 256
    counts = np.array([m.count for m in merged], dtype="float64")
    zeros = np.array([m.zeros for m in merged], dtype="float64")
    nonfin = np.array([m.nonfinite for m in merged], dtype="float64")
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = hist / np.where(counts > 0, counts, np.nan)[:, None]
    used = np.nonzero(hist.sum(axis=0) > 0)[0]

    fig, (ax_h, ax_l) = plt.subplots(1, 2, figsize=(12, 4.6), width_ratios=[1.35, 1], layout="constrained")
    label = tensor if by_name else f"layer {tensor}"
    fig.suptitle(
        f"{_NAMES[kind].capitalize()} histograms of {short_label(label, 60)} — {title}", fontsize=11, parse_math=False
    )
    if used.size == 0:
        _empty_panel(ax_h, "log2|x| histogram over steps", "every element was zero or non-finite")
        _empty_panel(ax_l, "histograms at chosen steps", "every element was zero or non-finite")
        return fig
    lo, hi = max(int(used[0]) - 1, 1), min(int(used[-1]) + 2, HIST_BINS - 1)
    # bin f spans [2**(f-127), 2**(f-126)); bin 0 (subnormals) is drawn as [2**-128, 2**-126) on the log axis
    y_edges = np.ldexp(1.0, np.arange(lo, hi + 1) - 127)
    data = frac[:, lo:hi].T
    ok = np.isfinite(data) & (data > 0)
    cmap = matplotlib.colormaps[_MAG].with_extremes(bad="white")
    vmin = float(data[ok].min()) if ok.any() else 1e-6
    mesh = ax_h.pcolormesh(
        _edges(steps),
        y_edges,
        np.ma.masked_where(~ok, data),
        cmap=cmap,
        norm=LogNorm(vmin=vmin, vmax=1.0),
        shading="flat",
        rasterized=True,
    )
    ax_h.set_yscale("log", base=2)
    cb = fig.colorbar(mesh, ax=ax_h, pad=0.01)
    cb.set_label("fraction of elements in bin (log scale)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    ax_h.set_xlabel("step", fontsize=9)
    ax_h.set_ylabel("|x| (power-of-two bins, log2 axis)", fontsize=9)
    ax_h.set_title("log2|x| histogram over steps", loc="left", fontsize=10)

    _hist_lines(ax_l, steps, frac[:, lo:hi], counts, zeros, nonfin, y_edges)
    ax_h.tick_params(labelsize=8)
    return fig
