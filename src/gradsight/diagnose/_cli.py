"""``gradsight diagnose RUN [--json]``: print a run's findings, most severe first.

Exit status: 0 when there is no warning or error finding, 1 otherwise (2, bad usage, comes from the dispatcher).
"""

from __future__ import annotations

import argparse
import json
import sys

from .._cli_support import finding_text, resolve_run, terminal_safe

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
    out = sys.stdout
    if args.json:
        json.dump([f.to_dict() for f in findings], out, indent=2, allow_nan=False)
        out.write("\n")
    else:
        counts = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
        where = terminal_safe(path)
        if findings:
            out.write(
                f"{len(findings)} finding(s) in {where}: {counts['error']} error, {counts['warning']} warning, "
                f"{counts['info']} info\n\n"
            )
            # Layer names and evidence come from the run file: escape what could steer the terminal.
            out.write("\n\n".join(finding_text(f) for f in findings) + "\n")
        else:
            out.write(f"No findings in {where}.\n")
        if skipped:
            out.write("\nSkipped (data not recorded):\n")
            for name, missing in skipped.items():
                out.write(f"  {terminal_safe(name)}: needs {terminal_safe(', '.join(missing))}\n")
    return 1 if any(f.severity in ("warning", "error") for f in findings) else 0
