"""``gradsight explain``: run a built-in example and print its trace.

Exit status: 0 every term verified, 1 some term failed verification, 2 bad usage (an :class:`InputError`,
turned into exit 2 by ``gradsight.cli``).
"""

from __future__ import annotations

import argparse
import json

from .._cli_support import FRAMEWORK_CHOICES, FRAMEWORK_HELP, framework_arg, terminal_safe
from .._errors import InputError

__all__ = ["add_arguments", "run"]


#: The name the examples and the JSON output use for each framework.
_DISPLAY = {"torch": "torch", "keras": "tensorflow"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``explain`` subcommand's options to ``parser``."""
    parser.add_argument(
        "--framework",
        type=framework_arg,
        default=None,
        metavar="{" + ",".join(FRAMEWORK_CHOICES) + "}",
        help=f"framework whose autodiff is checked: {FRAMEWORK_HELP} (default: torch if installed, else tensorflow)",
    )
    parser.add_argument("--example", default="default", metavar="NAME", help="built-in example (see --list)")
    parser.add_argument("--list", action="store_true", help="list the built-in examples and exit")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (to_dict form)")
    parser.add_argument(
        "--finite-differences",
        action="store_true",
        help="also check dJ/dW and dJ/db against float64 central differences",
    )


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status."""
    from ._examples import EXAMPLES

    if args.list:
        width = max(len(n) for n in EXAMPLES)
        for name, ex in EXAMPLES.items():
            print(f"{name:<{width}}  {ex.summary}")
        return 0
    if args.example not in EXAMPLES:
        raise InputError(f"unknown example {args.example!r}; expected one of: {', '.join(EXAMPLES)} (see --list)")
    from ._adapter import default_framework

    framework = _DISPLAY[args.framework or default_framework()]
    result = EXAMPLES[args.example].run(framework, bool(args.finite_differences))
    if args.json:
        from ._trace import clean_json

        payload = {"example": args.example, "framework": framework, "ok": result.ok, "result": result.data}
        print(json.dumps(clean_json(payload), indent=2, ensure_ascii=False))
    else:
        print(terminal_safe(result.text, keep_lines=True))
    return 0 if result.ok else 1
