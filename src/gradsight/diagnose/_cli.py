"""``gradsight diagnose RUN [--json]``: print a run's findings, root causes first.

The root causes come first (most severe first), each with its evidence and advice, then the symptoms they explain,
each with a "because of" line naming its causes and advice that points to its root.

Exit status: 0 when there is no warning or error finding, 1 otherwise (2, bad usage, comes from the dispatcher).
The text form is printed with ``rich`` (each finding's first line coloured by severity on a terminal, plain text
when piped); ``--json`` writes plain JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .._cli_support import console, finding_renderable, resolve_run, terminal_safe

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``diagnose`` arguments to a (sub)parser."""
    parser.add_argument(
        "run",
        metavar="RUN",
        help="the run file (.db) written by gradsight.watch or gradsight demo, or a folder holding exactly one",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of findings (the Finding fields)")
    parser.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a threshold, e.g. --threshold vanish_ratio=1e-4 (repeatable)",
    )


def _thresholds(items: list[str]) -> dict[str, float]:
    from .._errors import InputError

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise InputError(
                f"--threshold expects NAME=VALUE with a number, got {item!r}; e.g. --threshold vanish_ratio=1e-4."
            ) from None
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``gradsight diagnose``; return the exit status."""
    from ..store import load
    from ._diagnose import diagnose, skipped_rules  # imported here: `gradsight --help` needs no pandas

    path = resolve_run(args.run, command="diagnose")
    with load(path) as r:
        findings = diagnose(r, thresholds=_thresholds(args.threshold) or None)
        skipped = {} if args.json else skipped_rules(r)
    if args.json:
        json.dump([f.to_dict() for f in findings], sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        _print_text(findings, skipped, terminal_safe(path))
    return 1 if any(f.severity in ("warning", "error") for f in findings) else 0


def is_root(finding: Any) -> bool:
    """A root cause: marked so by the diagnosis, or (a finding from elsewhere) without recorded causes."""
    return bool(getattr(finding, "is_root", True)) and not getattr(finding, "caused_by", ())


def _print_text(findings: list[Any], skipped: dict[str, list[str]], where: str) -> None:
    """The text form: a count line, the findings (escaped, as rich Text: never parsed as markup), the skips."""
    from rich.text import Text

    out = console()
    counts = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
    if findings:
        out.print(
            Text(
                f"{len(findings)} finding(s) in {where}: {counts['error']} error, {counts['warning']} warning, "
                f"{counts['info']} info\n"
            )
        )
        # Layer names and evidence come from the run file: finding_renderable escapes what could steer the terminal.
        roots = [f for f in findings if is_root(f)]
        symptoms = [f for f in findings if not is_root(f)]
        for title, group in (("Root causes", roots), ("Symptoms (because of the root causes above)", symptoms)):
            if not group or not symptoms:  # without symptoms every finding is a root: no headings needed
                for i, f in enumerate(group):
                    if i:
                        out.print()
                    out.print(finding_renderable(f))
                continue
            out.print(Text(f"{title}:", style="bold"))
            for f in group:
                out.print(finding_renderable(f))
                out.print()
    else:
        out.print(Text(f"No findings in {where}."))
    if skipped:
        out.print(Text("\nSkipped (data not recorded):", style="bold"))
        for name, missing in skipped.items():
            out.print(Text(f"  {terminal_safe(name)}: needs {terminal_safe(', '.join(missing))}"))
