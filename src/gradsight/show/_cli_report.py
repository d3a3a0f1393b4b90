"""``gradsight report RUN [-o FILE]``: write the self-contained HTML report of a run file."""

from __future__ import annotations

import argparse

from .._cli_support import resolve_run, terminal_safe
from ._cli_show import RUN_HELP

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``report`` command's arguments."""
    parser.add_argument("run", metavar="RUN", help=RUN_HELP)
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        default=None,
        help="where to write the report (default: next to RUN, with the suffix .html); never a run file",
    )


def run(args: argparse.Namespace) -> int:
    """Write the report and print its path; exit status 0 (findings do not change it)."""
    from ._html import report

    path = report(resolve_run(args.run, command="report"), args.output)
    print(terminal_safe(path))
    return 0
