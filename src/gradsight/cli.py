"""The ``gradsight`` command line.

Each subcommand lives next to the pillar it belongs to, in a module that provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches, importing the subcommand's module lazily so that
``gradsight --help`` stays fast and never imports a framework.

Exit status: 0 success, 1 the command ran and found a problem (a failed check, a warning finding), 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ._errors import GradsightError

# name -> (module, one-line help)
_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("gradsight.show._cli_demo", "train, watch and diagnose a built-in fault scenario; write its report"),
    "diagnose": ("gradsight.diagnose._cli", "name what is wrong in a recorded run (most severe first)"),
    "explain": ("gradsight.explain._cli", "derive backprop layer by layer and check it against autodiff"),
    "export": ("gradsight.export._cli", "write a run as TensorBoard events, CSV or Parquet"),
    "report": ("gradsight.show._cli_report", "write the self-contained HTML report of a run file"),
    "show": ("gradsight.show._cli_show", "print a summary table of a run file"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradsight",
        description="See, verify and understand the gradients inside deep neural networks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args))
    except GradsightError as exc:
        print(f"gradsight {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `gradsight explain | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
