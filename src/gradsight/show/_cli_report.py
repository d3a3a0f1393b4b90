"""``gradsight report RUN [-o FILE]``: write the self-contained HTML report of a run file."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``report`` command's arguments."""
    parser.add_argument("run", metavar="RUN", help="the run file (.db) written by gradsight.watch or gradsight demo")
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        default=None,
        help="where to write the report (default: next to RUN, with the suffix .html)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the report and print its path; exit status 0 (findings do not change it)."""
    from ._html import report

    path = report(args.run, args.output)
    print(path)
    return 0
