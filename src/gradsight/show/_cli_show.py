"""``gradsight show RUN``: print a terminal summary table of a run file."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``show`` command's arguments."""
    parser.add_argument("run", metavar="RUN", help="the run file (.db) written by gradsight.watch or gradsight demo")
    parser.add_argument(
        "--width", type=int, default=40, metavar="N", help="show at most N characters of a layer name (default 40)"
    )


def run(args: argparse.Namespace) -> int:
    """Print the summary; exit status 0 (findings do not change it)."""
    from ._show import render_show

    print(render_show(args.run, width=max(8, args.width)))
    return 0
