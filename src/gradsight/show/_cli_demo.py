"""``gradsight demo``: train a built-in fault scenario, watch it, diagnose it and write its report — the main job.

With no arguments it trains :data:`DEFAULT_SCENARIO` from the fault zoo (:mod:`gradsight.zoo`; built in, no
download, CPU only) for a few hundred steps, with a progress bar on stderr, then writes ``run.db`` and
``report.html`` into a new folder ``gradsight-demo-YYYYmmdd-HHMMSS`` in the current directory, prints the findings
and the report's path. Exit status 0 whenever the demo ran, whatever it found. When it fails or is interrupted, it
removes what it wrote (and the folder, when it created it): no half-written run or empty report is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from .._cli_support import (
    FRAMEWORK_CHOICES,
    FRAMEWORK_HELP,
    console,
    default_framework,
    finding_renderable,
    framework_arg,
    terminal_safe,
)
from .._errors import InputError, StoreError, UnsupportedError
from ..store import load

__all__ = ["DEFAULT_SCENARIO", "ProgressBar", "add_arguments", "run"]

#: The scenario ``gradsight demo`` trains when none is named: fast, and with a clear finding to show.
DEFAULT_SCENARIO = "deep-sigmoid"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``demo`` command's arguments."""
    parser.add_argument(
        "--scenario",
        metavar="NAME",
        default=None,
        help=f"the fault-zoo scenario to train (default {DEFAULT_SCENARIO!r}; --list shows them all)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "--framework",
        type=framework_arg,
        default=None,
        metavar="{" + ",".join(FRAMEWORK_CHOICES) + "}",
        help=f"which framework trains it: {FRAMEWORK_HELP} (default: torch when installed, else tensorflow)",
    )
    parser.add_argument("--steps", type=int, default=None, metavar="N", help="training steps (default: the scenario's)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="folder for run.db and report.html; must be new or empty (default: ./gradsight-demo-YYYYmmdd-HHMMSS)",
    )


def _zoo() -> Any:
    try:
        from .. import zoo
    except ImportError as exc:
        raise UnsupportedError(
            f"gradsight demo needs the fault zoo (gradsight.zoo), which this install lacks ({exc}). "
            "Reinstall gradsight: pip install -e '.[torch]'."
        ) from exc
    return zoo


def _scenario_names(zoo: Any) -> list[tuple[str, str]]:
    """(name, one-line description) of each scenario of the zoo."""
    return [(name, zoo.get_scenario(name).description) for name in zoo.list_scenarios()]


def _out_dir(given: str | None) -> tuple[Path, bool]:
    """The output folder, created if needed, and whether this call created it."""
    if given is None:
        out = Path.cwd() / f"gradsight-demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while out.exists():  # two demos started within the same second
            n += 1
            out = out.with_name(f"{out.name.split('~')[0]}~{n}")
    else:
        out = Path(os.fsdecode(given)).expanduser()
    out = out.resolve()
    if out.exists():
        if not out.is_dir():
            raise StoreError(
                f"--out {str(out)!r} exists and is not a folder; gradsight demo writes run.db and report.html into "
                "a folder. Pass a new folder name."
            )
        if any(out.iterdir()):
            raise StoreError(
                f"--out {str(out)!r} already exists and is not empty; gradsight demo never overwrites. "
                "Pass a new or empty folder, or leave --out out to get a fresh timestamped one."
            )
        return out, False
    out.mkdir(parents=True)
    return out, True


def _clean_up(out: Path, created: bool) -> None:
    """Remove what a failed demo wrote into ``out`` (run.db and its journal, the report), and ``out`` if new."""
    for name in ("run.db", "run.db-wal", "run.db-shm", "run.db-journal", "report.html"):
        with contextlib.suppress(OSError):
            (out / name).unlink()
    for tmp in out.glob(".report.html.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()  # only when empty: never remove anything we did not write


class ProgressBar:
    """A progress bar that follows a run file being written: a ``rich`` bar on a terminal, a line per quarter else.

    The run store can be read while training writes it: a background thread reads the highest logged step every
    ``interval`` seconds and redraws. On a terminal it is a :class:`rich.progress.Progress` (bar, ``done/total
    steps``, elapsed time); anywhere else (a pipe, a log file, a captured stream) it writes a plain line at 0 %,
    each further quarter and the end, with no escape sequences.
    """

    def __init__(
        self, path: Path, total: int | None, *, label: str, stream: TextIO | None = None, interval: float = 0.25
    ) -> None:
        self.path, self.total, self.label = path, total, label
        self.console = console(stream if stream is not None else sys.stderr)
        self.interval = interval
        self._tty = self.console.is_terminal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gradsight-demo-progress", daemon=True)
        self._t0 = time.monotonic()
        self._last_quarter = -1
        self._run: Any = None
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressBar:
        if self._tty:
            self._progress = _rich_progress(self.console)
            self._task = self._progress.add_task(self.label, total=self.total)
            self._progress.start()
        self._draw(0)
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._run is not None:
            self._run.close()
        if exc_type is None:
            self._draw(self.total if self.total else self._step(), final=True)
        if self._progress is not None:
            self._progress.stop()

    def _step(self) -> int:
        from ..store import Run

        try:
            if self._run is None:
                if not self.path.exists():
                    return 0
                self._run = Run(self.path)
            steps = self._run.steps
        except Exception:  # the file is being created; try again next tick
            return 0
        return steps[-1] + 1 if steps else 0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw(self._step())

    def _draw(self, done: int, *, final: bool = False) -> None:
        if self.total:
            done = min(done, self.total)
        if self._progress is not None:
            self._progress.update(self._task, completed=done)
            self._progress.refresh()
            return
        quarter = int(4 * done / self.total) if self.total else 0
        if quarter == self._last_quarter and not final:
            return
        self._last_quarter = quarter
        from rich.text import Text

        elapsed = time.monotonic() - self._t0
        of = f"{done}/{self.total}" if self.total else f"{done}"
        self.console.print(Text(f"{self.label} {of} steps  {elapsed:5.1f} s"))


def _rich_progress(out: Any) -> Any:
    """The terminal progress display: label, bar, ``done/total steps``, elapsed time; redrawn by the caller."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        console=out,
        auto_refresh=False,  # our polling thread redraws after each read of the run file
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo; see the module docstring. Exit status 0 when it ran, whatever it found."""
    zoo = _zoo()
    scenarios = _scenario_names(zoo)
    names = [n for n, _ in scenarios]
    if args.list:
        width = max((len(n) for n in names), default=0)
        for name, desc in scenarios:
            mark = "  (default)" if name == DEFAULT_SCENARIO else ""
            print(f"{name:<{width}}  {desc}{mark}".rstrip())
        return 0
    name = args.scenario or (DEFAULT_SCENARIO if DEFAULT_SCENARIO in names else (names[0] if names else None))
    if name not in names:
        raise InputError(f"unknown scenario {name!r}; the fault zoo has {names}. See them with: gradsight demo --list")
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be a positive number of training steps, got {args.steps!r}.")
    framework = args.framework or default_framework()
    if framework == "keras":  # TensorFlow's C++ INFO/WARNING lines would bury the progress bar
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out, created = _out_dir(args.out)
    try:
        return _train_and_report(zoo, name, framework, args, out)
    except BaseException:
        _clean_up(out, created)
        raise


def _train_and_report(zoo: Any, name: str, framework: str, args: argparse.Namespace, out: Path) -> int:
    safe = terminal_safe
    run_path = out / "run.db"
    t0 = time.monotonic()
    print(f"gradsight demo: training scenario {name!r} with {framework} -> {safe(out)}", file=sys.stderr)
    kwargs: dict[str, Any] = {"framework": framework, "seed": args.seed, "path": run_path}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    total = args.steps if args.steps is not None else int(zoo.get_scenario(name).steps)
    with ProgressBar(run_path, total, label="training"):
        result = zoo.run_scenario(name, **kwargs)
    run_path = Path(result.path)
    t_train = time.monotonic() - t0

    from ._data import finding_list
    from ._html import report

    with load(run_path) as r:
        findings = finding_list(r, result.findings)  # the zoo already diagnosed the run
        report_path = report(r, out / "report.html", findings=findings)
    print(f"gradsight demo: trained in {t_train:.1f} s, total {time.monotonic() - t0:.1f} s", file=sys.stderr)
    _print_findings(findings)
    print(f"run file: {safe(run_path)}")
    print(f"report:   {safe(report_path)}")
    print(f"next:     gradsight show {shlex.quote(safe(out))}")
    return 0


def _print_findings(findings: list[Any]) -> None:
    """The demo's findings on standard output, each coloured by severity on a terminal (escaped, never markup)."""
    from rich.text import Text

    out = console()
    out.print()
    if findings:
        out.print(Text(f"Findings ({len(findings)}):", style="bold"))
        for f in findings:
            out.print(finding_renderable(f))
            out.print()
    else:
        out.print(Text("Findings: none — no diagnosis rule fired on this run.\n"))
