"""The HTML report: one self-contained file, readable offline, that loads nothing.

Layout: a header with the run's key facts, the findings first — root causes (severity, layers, message, explanation,
advice, the evidence folded away), then the symptoms they explain, each saying what it is because of — the figures
(embedded as base64 PNG ``data:`` images), a per-layer table, and the full run metadata. The page has no JavaScript,
and a strict Content-Security-Policy (``default-src 'none'; img-src data:; style-src 'unsafe-inline'``) so that even
a hostile string could not make it load anything. Every string that came from the run (layer and tensor names,
metadata and config values, finding texts) is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._cli_support import atomic_output, check_output, terminal_safe
from .._errors import InputError, StoreError
from ..store import Run
from ._data import RunLike, finding_list, layer_table, opened

__all__ = ["CSP", "render_html", "report"]

#: The Content-Security-Policy of every report: nothing may load except inline styles and data: images.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:1.2em 1.6em;color:#1a1a1a;background:#fff}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#555;margin:.2em 0 1em}code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em;
background:#f4f4f4;padding:0 .25em;border-radius:3px;word-break:break-all}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}th,td{border:1px solid #ddd;padding:.25em .55em;
text-align:left;vertical-align:top}th{background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.finding{border-left:5px solid #56B4E9;background:#f7fbfe;padding:.4em .9em;margin:.7em 0}
.finding.warning{border-color:#E69F00;background:#fffaf0}.finding.error{border-color:#D55E00;background:#fff5f0}
.finding p{margin:.3em 0}.finding[data-role=symptom]{margin-left:1.6em;opacity:.92}
.because{font-style:italic}h3{font-size:1.05em;margin:1em 0 .3em}.counts span{margin-right:1.2em}.ok{color:#009E73}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
details pre{white-space:pre-wrap;font-size:.85em;background:#f8f8f8;padding:.5em}
footer{margin-top:2em;color:#777;font-size:.85em}
"""


def _e(text: object, *, lines: bool = False) -> str:
    r"""Text for the page, HTML-escaped.

    Control characters are written as escapes (``\x1b``; ``\n`` too unless ``lines``), as the terminal summary
    shows them, so a name from the run stays one line of visible text.
    """
    return html.escape(terminal_safe(text, keep_lines=lines))


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=96)
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        if x == 0 or (1e-3 <= abs(x) < 1e5):
            return f"{x:.4g}"
        return f"{x:.3e}"
    return str(x)


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
        return
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > 600:
        text = text[:600] + " …"
    out.append((prefix, text))


def _finding_html(f: Any) -> str:
    body = f.to_html() if hasattr(f, "to_html") else f'<div class="finding"><p>{_e(str(f), lines=True)}</p></div>'
    evidence = getattr(f, "evidence", None)
    if evidence:
        data = f.to_dict()["evidence"] if hasattr(f, "to_dict") else evidence
        pre = _e(json.dumps(data, indent=1, default=str), lines=True)
        details = f"<details><summary>evidence</summary><pre>{pre}</pre></details>"
        # inside the finding's box, so the evidence reads (and is found in the DOM) as part of its finding
        body = body[: -len("</div>")] + details + "</div>" if body.endswith("</div>") else body + details
    return body


def _is_root(f: Any) -> bool:
    return bool(getattr(f, "is_root", True)) and not getattr(f, "caused_by", ())


def _chain_html(found: Sequence[Any]) -> str:
    """The findings as chains: the root causes, then the symptoms, each saying what it is because of.

    Without symptoms (every finding its own root) the list is shown as it is, without headings.
    """
    roots = [f for f in found if _is_root(f)]
    symptoms = [f for f in found if not _is_root(f)]
    if not symptoms:
        return "".join(_finding_html(f) for f in found)
    return (
        '<h3 id="roots">Root causes</h3>'
        + "".join(_finding_html(f) for f in roots)
        + '<h3 id="symptoms">Symptoms, because of the root causes above</h3>'
        + "".join(_finding_html(f) for f in symptoms)
    )


def _figures(run: Run, findings: Sequence[Any]) -> list[tuple[str, str, str]]:
    """(title, caption, base64 PNG or '' with the reason in caption) for each figure."""
    from ._figures import plot_depth_profile, plot_histograms, plot_overview

    out: list[tuple[str, str, str]] = []

    def add(title: str, caption: str, make: Any) -> None:
        try:
            out.append((title, caption, _png(make())))
        except InputError as exc:
            out.append((title, f"Not drawn: {exc}", ""))

    add(
        "Training overview",
        "Loss, per-layer gradient RMS (layer × step, log colour scale), weight RMS, update/weight ratio and "
        "activation statistics over the steps; findings are marked at their steps, each root cause's first step "
        "with a bold line and a ▼ on the loss panel.",
        lambda: plot_overview(run, findings=findings),
    )
    add(
        "Gradient depth profile",
        "Gradient RMS per layer at a few steps: falling toward the input means vanishing gradients, rising means "
        "exploding ones.",
        lambda: plot_depth_profile(run),
    )
    grads = [t for t in run.tensors if t.kind == "grad"]
    if grads:
        layers = {t.layer for t in grads}
        target = next((name for f in findings for name in getattr(f, "layers", ()) if name in layers), grads[0].layer)
        add(
            f"Gradient histograms of layer {target}",
            "Distribution of |gradient| in power-of-two bins over the steps (the first layer named by a finding, "
            "else the first layer).",
            lambda: plot_histograms(run, target, kind="grad"),
        )
    return out


def _layer_rows(run: Run) -> str:
    table = layer_table(run)
    types = {}
    for layer in (run.meta.get("model") or {}).get("layers", []) or []:
        if isinstance(layer, dict) and "name" in layer:
            types[str(layer["name"])] = str(layer.get("type", layer.get("class", "")))
    head = (
        "<tr><th>layer</th><th>type</th><th>parameters</th><th>tensors</th><th>grad RMS</th><th>weight RMS</th>"
        "<th>update/weight</th><th>active rate</th><th>dead units</th><th>steps with NaN/Inf</th></tr>"
    )
    rows = []
    for rec in table.to_dict("records"):
        rows.append(
            "<tr>"
            f"<td><code>{_e(str(rec['layer']))}</code></td><td>{_e(types.get(str(rec['layer']), ''))}</td>"
            f"<td class=num>{rec['params']:,}</td><td>{_e(rec['tensors'])}</td>"
            + "".join(
                f"<td class=num>{_e(_fmt(rec[k]))}</td>"
                for k in ("grad_rms", "weight_rms", "update_ratio", "active_rate", "dead_fraction")
            )
            + f"<td class=num>{rec['nonfinite_steps']}</td></tr>"
        )
    if not rows:
        return "<p>No tensors were recorded.</p>"
    return (
        "<p>Last recorded value of each statistic; RMS over all elements of the layer's tensors.</p>"
        f"<table>{head}{''.join(rows)}</table>"
    )


def render_html(run: RunLike, *, findings: Sequence[Any] | None = None) -> str:
    """The report as an HTML string (see :func:`report`)."""
    with opened(run) as r:
        found = finding_list(r, findings)
        meta = r.meta
        steps = r.steps
        figures = _figures(r, found)
        layers_html = _layer_rows(r)
        name = r.path.name
        path = str(r.path)
        n_layers = len(r.layers)
    facts = [
        ("run file", path),
        ("framework", str(meta.get("framework", "unknown"))),
        ("steps", f"{len(steps)} logged, {steps[0]} to {steps[-1]}" if steps else "none logged"),
        ("layers", str(n_layers)),
        ("created", str(meta.get("created", ""))),
    ]
    if meta.get("scenario"):
        facts.insert(1, ("scenario", str(meta["scenario"])))
    fact_html = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)

    counts = {s: sum(1 for f in found if getattr(f, "severity", "") == s) for s in ("error", "warning", "info")}
    if found:
        count_html = "".join(f"<span>{_e(s)}: <b>{n}</b></span>" for s, n in counts.items())
        findings_html = f'<p class="counts">{count_html}</p>' + _chain_html(found)
    else:
        findings_html = '<p class="ok">No findings: none of the diagnosis rules fired on this run.</p>'

    fig_html = []
    for title, caption, png in figures:
        if png:
            fig_html.append(
                f'<figure><img alt="{_e(title)}" src="data:image/png;base64,{png}">'
                f"<figcaption><b>{_e(title)}.</b> {_e(caption, lines=True)}</figcaption></figure>"
            )
        else:
            fig_html.append(f"<figure><figcaption><b>{_e(title)}.</b> {_e(caption, lines=True)}</figcaption></figure>")

    flat: list[tuple[str, str]] = []
    _flatten("", meta, flat)
    meta_html = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in flat)

    from .. import __version__

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="referrer" content="no-referrer">
<meta name="generator" content="gradsight {_e(__version__)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gradsight report — {_e(name)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>gradsight report</h1><p class="sub"><code>{_e(name)}</code></p><table>{fact_html}</table></header>
<section id="findings"><h2>Findings ({len(found)})</h2>{findings_html}</section>
<section id="figures"><h2>Figures</h2>{"".join(fig_html)}</section>
<section id="layers"><h2>Layers</h2>{layers_html}</section>
<section id="metadata"><h2>Run metadata</h2><table>{meta_html}</table></section>
<footer>Generated by gradsight {_e(__version__)} on {stamp}. Self-contained: this file loads nothing.</footer>
</body>
</html>
"""


def _is_report(path: Path) -> bool:
    """Whether an existing file is a gradsight report (its head names gradsight; earlier ones, their title)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b'<meta name="generator" content="gradsight' in head or b"<title>gradsight report" in head


def report(run: RunLike, path: str | os.PathLike[str] | None = None, *, findings: Sequence[Any] | None = None) -> Path:
    """Write the self-contained HTML report of a run.

    Args:
        run: a :class:`~gradsight.store.Run` or the path of a run file.
        path: where to write the report; ``None`` puts it next to the run file with the suffix ``.html``
            (``run.db`` → ``run.html``). An existing gradsight report there is replaced (reports are derived from
            the run file and can always be regenerated), but never another file, a run file, or the run file
            itself. The file
            is written to a temporary name and renamed, so a failure leaves no partial report behind.
        findings: the findings to show; ``None`` (default) runs ``gradsight.diagnose.diagnose(run)``.

    Returns:
        The path of the written file (absolute).

    Raises:
        StoreError: the run file cannot be read, or the report's directory does not exist.
        InputError: ``run`` is neither a Run nor a path, ``path`` is not a path, or the report path is a run file
            or another existing file that is not a gradsight report.
    """
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise InputError(
            f"report(path=...) expects a file path (str or os.PathLike) or None, got {type(path).__name__} "
            f"{path!r}. Pass e.g. report(run, 'run.html'), or leave it out to write next to the run file."
        )
    with opened(run) as r:
        out = r.path.with_suffix(".html") if path is None else Path(os.fsdecode(path)).expanduser()
        out = check_output(out.resolve(), inputs=[r.path], what="the report path")
        if out.is_file() and not _is_report(out):
            raise InputError(
                f"the report path {str(out)!r} already exists and is not a gradsight report; gradsight never "
                "overwrites other files silently. Pass another path, or delete that file yourself first."
            )
        if not out.parent.is_dir():
            raise StoreError(
                f"report: cannot write {str(out)!r}: the directory {str(out.parent)!r} does not exist. "
                "Create it first or pass another path."
            )
        text = render_html(r, findings=findings)
    # A file name with undecodable bytes (os.fsdecode's surrogates) appears in the page as an escape.
    data = text.encode("utf-8", errors="backslashreplace")
    with atomic_output(out) as tmp:
        tmp.write_bytes(data)
    return out
