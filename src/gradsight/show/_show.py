r"""``gradsight show RUN``: a summary of a run for the terminal.

A header with the run's key facts and its loss, one row per layer (the last recorded value of each statistic, as
in the HTML report's layer table), then the findings, root causes first. Drawn with ``rich``: coloured on a
terminal, plain text when piped or captured, so it can be pasted into an issue. Every string that came from the
run (path, layer names, metadata, finding texts) goes through :func:`gradsight._cli_support.terminal_safe` and
is handed to rich as :class:`rich.text.Text` with markup off, so a layer named ``"\x1b[2J"`` shows as that text
instead of clearing the screen, and one named ``"[red]x[/]"`` shows as that text instead of turning red.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._cli_support import console, finding_renderable, terminal_safe
from .._errors import InputError
from ._data import RunLike, finding_list, layer_table, opened
from ._figures import short_label

if TYPE_CHECKING:  # pragma: no cover - rich is imported where the summary is drawn
    import pandas as pd
    from rich.console import RenderableType

__all__ = ["print_show", "render_show", "show_renderables"]

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


def _header(path: str, meta: dict[str, Any], steps: list[int], scalars: pd.DataFrame) -> list[str]:
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
    return lines


def _layers(table: pd.DataFrame, width: int) -> RenderableType:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    if table.empty:
        return Text("no tensors recorded")
    grid = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for key, head, align in _COLUMNS:
        grid.add_column(
            head, justify="left" if align == "<" else "right", no_wrap=True, style="cyan" * (key == "layer")
        )
    for rec in table.to_dict("records"):
        name = Text(short_label(terminal_safe(rec["layer"]), width))
        grid.add_row(name, *(Text(_num(rec[key], key)) for key, _, _ in _COLUMNS[1:]))
    grid.caption = "last recorded value of each statistic; RMS over all elements of the layer's tensors"
    grid.caption_justify = "left"
    return grid


def _findings(found: Sequence[Any]) -> list[RenderableType]:
    from rich.text import Text

    if not found:
        return [Text("findings: none")]
    out: list[RenderableType] = [Text(f"findings ({len(found)}):", style="bold")]
    for f in found:
        text = finding_renderable(f)
        out.append(text.split("\n")[0] if text.plain else Text(""))
        causes = getattr(f, "caused_by", ())
        if causes:
            out.append(Text("    because of: " + ", ".join(terminal_safe(c) for c in causes)))
        layers = getattr(f, "layers", ())
        if layers:
            out.append(Text("    layers: " + ", ".join(terminal_safe(name) for name in layers)))
    return out


#: The fewest characters of a layer name the summary shows: a shortened name keeps both of its ends.
MIN_WIDTH = 8


def check_width(width: Any, option: str = "width") -> None:
    """Refuse a layer-name width that is not an integer of at least :data:`MIN_WIDTH`."""
    if isinstance(width, bool) or not isinstance(width, int) or width < MIN_WIDTH:
        raise InputError(
            f"{option} must be an integer of at least {MIN_WIDTH} (the most characters of a layer name to show; "
            f"longer names keep both ends), got {width!r}; e.g. {option}{' ' if option.startswith('-') else '='}20."
        )


def show_renderables(run: RunLike, *, findings: Sequence[Any] | None = None, width: int = 40) -> list[RenderableType]:
    """The terminal summary of a run as ``rich`` renderables (header, layer table, findings), in order.

    Args:
        run: a :class:`~gradsight.store.Run` or the path of a run file.
        findings: the findings to list; ``None`` (default) runs ``gradsight.diagnose.diagnose(run)``.
        width: the most characters of a layer name to show (longer names are shortened in the middle).
    """
    from rich.text import Text

    check_width(width)
    with opened(run) as r:
        header = _header(str(r.path), r.meta, r.steps, r.scalars)
        table = layer_table(r)
        found = finding_list(r, findings)
    return [Text("\n".join(header)), Text(""), _layers(table, width), Text(""), *_findings(found)]


def print_show(run: RunLike, *, findings: Sequence[Any] | None = None, width: int = 40) -> None:
    """Print the terminal summary of a run to standard output (coloured on a terminal); see :func:`render_show`."""
    out = console()
    for part in show_renderables(run, findings=findings, width=width):
        out.print(part)


def render_show(run: RunLike, *, findings: Sequence[Any] | None = None, width: int = 40) -> str:
    """The terminal summary of a run as plain text (no colour, no escape sequences).

    Args:
        run: a :class:`~gradsight.store.Run` or the path of a run file.
        findings: the findings to list; ``None`` (default) runs ``gradsight.diagnose.diagnose(run)``.
        width: the most characters of a layer name to show (longer names are shortened in the middle).

    Returns:
        The text, one string of several lines, without a trailing newline.
    """
    buffer = io.StringIO()
    out = console(buffer)
    for part in show_renderables(run, findings=findings, width=width):
        out.print(part)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()).rstrip("\n")
