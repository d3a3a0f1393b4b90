"""Show: figures (matplotlib) and the self-contained HTML report.

Everything here only reads the run store (a :class:`~gradsight.store.Run` or the path of a run file); nothing here
touches a tensor or imports a framework. matplotlib is imported when a figure is first drawn.

* :func:`plot_overview`, :func:`plot_depth_profile`, :func:`plot_histograms` — one figure each.
* :func:`report` — one self-contained HTML file: metadata, findings, figures, per-layer table.
* :func:`render_show` — the text of ``gradsight show``.
"""

from __future__ import annotations

from ._figures import plot_depth_profile, plot_histograms, plot_overview
from ._html import render_html, report
from ._show import render_show

__all__ = ["plot_depth_profile", "plot_histograms", "plot_overview", "render_html", "render_show", "report"]
