"""``gradsight show RUN``: print a terminal summary table of a run file (or of the one run file in a folder)."""

from __future__ import annotations

import argparse

from .._cli_support import resolve_run

__all__ = ["add_arguments", "run"]

RUN_HELP = "the run file (.db) written by gradsight.watch or gradsight demo, or a folder holding exactly one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``show`` command's arguments."""
    parser.add_argument("run", metavar="RUN", help=RUN_HELP)
    parser.add_argument(
        "--width",
        type=int,
        default=40,
        metavar="N",
        help="show at most N characters of a layer name (at least 8; default 40)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the summary; exit status 0 (findings do not change it)."""
    from . import _show

    _show.check_width(args.width, "--width")
    _show.print_show(resolve_run(args.run, command="show"), width=args.width)
    return 0
