"""A minimal headless-Chromium driver over the DevTools protocol on a pipe (stdlib only, no websocket, no selenium).

Chromium started with ``--remote-debugging-pipe`` reads NUL-terminated JSON commands on fd 3 and writes replies and
events on fd 4. :func:`load_page` opens one page and reports what a user-facing test needs: console messages and
exceptions, every network request, a screenshot, and values evaluated in the page.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--remote-debugging-pipe",
)


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageResult:
    console: list[dict[str, Any]] = field(default_factory=list)  # consoleAPICalled, exceptionThrown, Log entries
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    dialogs: list[str] = field(default_factory=list)  # alert()/confirm() attempts
    screenshot: bytes = b""
    values: dict[str, Any] = field(default_factory=dict)


class _Pipe:
    def __init__(self, binary: str, profile: str) -> None:
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        def wire() -> None:  # runs in the child between fork and exec: put the pipe ends on fds 3 and 4
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=wire,
            pass_fds=(3, 4),  # keep the dup2-ed ends open (close_fds runs after preexec_fn)
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        return self._id

    def _read_one(self, deadline: float) -> dict[str, Any] | None:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._r], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the DevTools pipe; its output:\n{self.output()}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        mid = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_one(deadline)
            if msg is None:
                raise TimeoutError(f"no reply to {method} within {timeout} s; chromium output:\n{self.output()}")
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method} failed: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self._note(msg)

    def _note(self, msg: dict[str, Any]) -> None:
        self.events.append(msg)
        if msg["method"] == "Page.javascriptDialogOpening":  # an alert() would block the page: record, dismiss
            self.send("Page.handleJavaScriptDialog", {"accept": True}, msg.get("sessionId"))

    def wait_for(self, method: str, timeout: float) -> bool:
        if any(e["method"] == method for e in self.events):
            return True
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_one(deadline)
            if msg is None:
                return False
            if "method" in msg:
                self._note(msg)
                if msg["method"] == method:
                    return True

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (msg := self._read_one(deadline)) is not None:
            if "method" in msg:
                self._note(msg)

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait(timeout=10)
        finally:
            os.close(self._w)
            os.close(self._r)
            self._log.close()


def load_page(binary: str, page: Path, expressions: dict[str, str], *, width: int = 1280) -> PageResult:
    """Open ``page`` (a local file) in headless Chromium, wait for load, screenshot it, evaluate ``expressions``."""
    with tempfile.TemporaryDirectory(prefix="gradsight-chromium-") as profile:
        pipe = _Pipe(binary, profile)
        try:
            targets = pipe.call("Target.getTargets")["targetInfos"]
            page_target = next(t for t in targets if t["type"] == "page")
            sid = pipe.call("Target.attachToTarget", {"targetId": page_target["targetId"], "flatten": True})[
                "sessionId"
            ]
            for domain in ("Page", "Runtime", "Log", "Network"):
                pipe.call(f"{domain}.enable", session=sid)
            metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}
            pipe.call("Emulation.setDeviceMetricsOverride", metrics, session=sid)
            pipe.events.clear()
            pipe.call("Page.navigate", {"url": page.resolve().as_uri()}, session=sid)
            if not pipe.wait_for("Page.loadEventFired", 60):
                raise TimeoutError(f"{page} did not finish loading in 60 s; chromium output:\n{pipe.output()}")
            pipe.drain(0.5)  # late console messages / CSP reports
            shot = pipe.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=sid)
            result = PageResult(screenshot=base64.b64decode(shot["data"]))
            for key, expr in expressions.items():
                r = pipe.call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=sid)
                result.values[key] = r.get("result", {}).get("value")
            pipe.drain(0.2)
            for ev in pipe.events:
                m, p = ev["method"], ev.get("params", {})
                if m == "Runtime.consoleAPICalled":
                    result.console.append({"type": p.get("type"), "args": [a.get("value") for a in p.get("args", [])]})
                elif m == "Runtime.exceptionThrown":
                    result.console.append({"type": "exception", "details": p.get("exceptionDetails")})
                elif m == "Log.entryAdded":
                    entry = p.get("entry", {})
                    result.console.append({"type": f"log-{entry.get('level')}", "text": entry.get("text")})
                elif m == "Network.requestWillBeSent":
                    result.requests.append(p.get("request", {}).get("url", ""))
                elif m == "Page.javascriptDialogOpening":
                    result.dialogs.append(p.get("message", ""))
            return result
        finally:
            pipe.close()
