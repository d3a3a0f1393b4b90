"""The ``gradsight`` command line.

Each subcommand lives next to the pillar it belongs to, in a module that provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches, importing the subcommand's module lazily so that
``gradsight --help`` stays fast and never imports a framework.

Exit status: 0 success, 1 the command ran and found a problem (a failed check, a warning finding), 2 bad usage or
an input/output that cannot be used, 130 interrupted (Ctrl-C). Every error is one readable paragraph on stderr —
what was given, what was expected, the fix — never a traceback. An exception that is not ours and not an
operating-system error is a gradsight bug: it is reported as one, with exit status 1 (``GRADSIGHT_DEBUG=1`` shows
its traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

from ._cli_support import terminal_safe
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


def _tolerant_streams() -> None:
    """Never fail on a character the terminal's encoding lacks (e.g. LANG=C): write it as an escape instead."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure):
            with contextlib.suppress(ValueError, OSError):  # a closed or exotic stream keeps its settings
                reconfigure(errors="backslashreplace")


def _error(command: str, message: str) -> None:
    print(f"gradsight {command}: error: {terminal_safe(message, keep_lines=True)}", file=sys.stderr)


def _os_message(exc: OSError) -> str:
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f" {os.fsdecode(exc.filename)!r}" if exc.filename is not None else ""
    if exc.filename2 is not None:
        where += f" -> {os.fsdecode(exc.filename2)!r}"
    return (
        f"the operating system refused to read or write{where}: {what} ({type(exc).__name__}, errno {exc.errno}). "
        "Check that the path exists, that its folder is writable and the disk is not full, or pass another path."
    )


#: Options whose value may start with "-" (a step range such as ``-5:``, which the command then refuses with
#: its own message); argparse would take such a value for an option and say only "expected one argument".
_DASHED_VALUES = ("--steps",)


def _attach_dashed_values(argv: list[str]) -> list[str]:
    """``["--steps", "-5:"]`` as ``["--steps=-5:"]``, so that the command sees the value and explains it."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _DASHED_VALUES and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] != "--":
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status (see the module docstring)."""
    _tolerant_streams()
    parser = _parser()
    args = parser.parse_args(_attach_dashed_values(sys.argv[1:] if argv is None else list(argv)))
    if args.command is None:
        parser.print_help()
        return 2
    command = args.command
    try:
        return int(importlib.import_module(args._module).run(args))
    except GradsightError as exc:
        _error(command, str(exc))
        return 2
    except BrokenPipeError:  # e.g. `gradsight explain | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        _error(command, "interrupted (Ctrl-C); no partial output was kept. Run the command again to finish it.")
        return 130
    except OSError as exc:
        _error(command, _os_message(exc))
        return 2
    except UnicodeError as exc:
        _error(
            command,
            f"a text could not be encoded or decoded ({type(exc).__name__}: {exc}). This usually means a file "
            "name or terminal that is not UTF-8; rename the file, or run with PYTHONIOENCODING=utf-8.",
        )
        return 2
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "gradsight":
            if _debug():
                raise
            return _bug(command, exc)
        _error(
            command,
            f"this command needs the package {exc.name!r}, which is not installed. Install it "
            f"(pip install {exc.name.split('.')[0]}) or the gradsight extra that brings it, e.g. "
            "pip install -e '.[torch]', '.[tensorflow]', '.[tensorboard]' or '.[parquet]'.",
        )
        return 2
    except Exception as exc:
        if _debug():
            raise
        return _bug(command, exc)


def _debug() -> bool:
    return os.environ.get("GRADSIGHT_DEBUG", "") not in ("", "0")


def _bug(command: str, exc: BaseException) -> int:
    _error(
        command,
        f"this is a bug in gradsight, not a problem with your input: an unexpected {type(exc).__name__} "
        f"({exc}). Please report it with the command you ran; rerun with GRADSIGHT_DEBUG=1 to see the traceback.",
    )
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
