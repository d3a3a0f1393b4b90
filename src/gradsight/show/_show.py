r"""``gradsight show RUN``: a plain-text summary of a run for the terminal.

A header with the run's key facts and its loss, one row per layer (the last recorded value of each statistic, as
in the HTML report's layer table), then the findings, most severe first. Plain ASCII-art table, no colours and no
dependencies, so it can be piped and pasted into an issue. Every string that came from the run (path, layer
names, metadata, finding texts) goes through :func:`gradsight._cli_support.terminal_safe`, so a layer named
``"\x1b[2J"`` shows as that text instead of clearing the screen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .._cli_support import finding_text, terminal_safe
from ._data import RunLike, finding_list, layer_table, opened
from ._figures import short_label

__all__ = ["render_show"]

_COLUMNS = (
    ("layer", "layer", "<"),
    ("params", "params", ">"),
    ("grad_rms", "grad RMS", ">"),
    ("weight_rms", "weight RMS", ">"),
    ("update_ratio", "upd/weight", ">"),
    ("active_rate", "active", ">"),
    ("dead_fraction", "dead", ">"),
    ("nonfinite_steps", "NaN/Inf steps", ">"),
)


def _num(x: Any, key: str) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "-"
    if key in ("active_rate", "dead_fraction"):
        return f"{x:.0%}"
    if key == "params":
        return f"{int(x):,}"
    if isinstance(x, float):
        return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"
    return str(x)


def _table(rows: list[list[str]], aligns: Sequence[str]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(aligns))]

    def line(r: list[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, aligns, widths, strict=True)).rstrip()

    out = [line(rows[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[1:]]
    return out


def render_show(run: RunLike, *, findings: Sequence[Any] | None = None, width: int = 40) -> str:
    """The terminal summary of a run as a string.

    Args:
        run: a :class:`~gradsight.store.Run` or the path of a run file.
        findings: the findings to list; ``None`` (default) runs ``gradsight.diagnose.diagnose(run)``.
        width: the most characters of a layer name to show (longer names are shortened in the middle).

    Returns:
        The text, one string of several lines, without a trailing newline.
    """
    with opened(run) as r:
        meta = r.meta
        steps = r.steps
        scalars = r.scalars
        table = layer_table(r)
        found = finding_list(r, findings)
        path = str(r.path)
    safe = terminal_safe
    lines = [f"run       {safe(path)}"]
    if meta.get("scenario"):
        lines.append(f"scenario  {safe(meta['scenario'])}")
    lines.append(f"framework {safe(meta.get('framework', 'unknown'))}")
    lines.append(f"steps     {len(steps)} logged" + (f", {steps[0]} to {steps[-1]}" if steps else ""))
    if "loss" in scalars.columns:
        loss = scalars["loss"].dropna()
        if len(loss):
            lines.append(
                f"loss      {loss.iloc[0]:.4g} (step {loss.index[0]}) -> {loss.iloc[-1]:.4g} (step {loss.index[-1]})"
            )
    lines.append("")
    if table.empty:
        lines.append("no tensors recorded")
    else:
        rows = [[head for _, head, _ in _COLUMNS]]
        for rec in table.to_dict("records"):
            rows.append([short_label(safe(rec["layer"]), width)] + [_num(rec[key], key) for key, _, _ in _COLUMNS[1:]])
        lines += _table(rows, [a for _, _, a in _COLUMNS])
        lines.append("(last recorded value of each statistic; RMS over all elements of the layer's tensors)")
    lines.append("")
    if found:
        lines.append(f"findings ({len(found)}):")
        for f in found:
            text = finding_text(f)
            lines.append(text.split("\n")[0] if text else "")
            layers = getattr(f, "layers", ())
            if layers:
                lines.append("    layers: " + ", ".join(safe(name) for name in layers))
    else:
        lines.append("findings: none")
    return "\n".join(lines)
