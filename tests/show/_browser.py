"""Open a local page in Debian's headless Chromium through Playwright for Python, recording what a test needs.

Playwright drives the system browser (``/usr/bin/chromium``, ``executable_path``); it never downloads one, so
``playwright install`` is neither needed nor run. :func:`open_page` yields the live Playwright ``Page`` for real
DOM queries, with every console message, page error, dialog and network request the page produced.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def skip_reason() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


@dataclass
class PageLog:
    """What the page did while it was open."""

    console: list[str] = field(default_factory=list)  # "type: text" of every console message
    errors: list[str] = field(default_factory=list)  # uncaught exceptions in the page
    dialogs: list[str] = field(default_factory=list)  # alert()/confirm()/prompt() attempts (dismissed)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for


@contextlib.contextmanager
def open_page(path: Path, *, width: int = 1280) -> Iterator[tuple[Any, PageLog]]:
    """Open the local file ``path`` in headless Chromium and yield ``(page, log)`` once it has loaded.

    A fresh user-data folder is used and removed afterwards; the browser is closed on exit.
    """
    from playwright.sync_api import sync_playwright

    log = PageLog()

    def on_dialog(dialog: Any) -> None:
        log.dialogs.append(dialog.message)
        dialog.dismiss()

    with tempfile.TemporaryDirectory(prefix="gradsight-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": width, "height": 900},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(10_000)  # a missing element fails in seconds, not after 30 s
            page.on("console", lambda m: log.console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: log.errors.append(str(e)))
            page.on("dialog", on_dialog)
            page.on("request", lambda r: log.requests.append(r.url))
            page.goto(path.resolve().as_uri(), wait_until="load")
            page.wait_for_timeout(300)  # late console messages and CSP reports
            yield page, log
        finally:
            context.close()
