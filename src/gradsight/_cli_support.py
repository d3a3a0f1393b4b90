r"""What every command (and every function that writes a file) shares, so that each does it the same way.

* :func:`terminal_safe` — text from a run (layer and tensor names, metadata, paths) made safe for a terminal:
  control characters, ANSI escape sequences, bidi overrides and undecodable file-name bytes are shown
  escaped (``\x1b``, ``\r``, ``\xff``), as the HTML report escapes HTML. Every terminal printer uses it.
* :func:`resolve_run` — a command's RUN argument: a run file, or a folder holding exactly one run file.
* :func:`check_output` — an output path may never be a run file (not even with ``--overwrite``) nor an input.
* :func:`atomic_output` — write to a temporary file in the same folder and rename it into place, so a failure
  never leaves a partial or empty output behind.
* :data:`FRAMEWORK_CHOICES` / :func:`framework_arg` — one spelling of ``--framework`` for every command.
* :func:`console` / :func:`finding_renderable` — terminal output through ``rich``: markup, emoji codes and
  highlighting off (text from a run is never parsed as ``[bold]`` markup), colour only on a terminal, and no
  wrapping when the output is piped or captured.

Nothing here imports pandas, matplotlib or a framework; ``rich`` is imported only when a console is made, so
``import gradsight`` never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ._errors import InputError
from ._frameworks import default_framework as installed_framework
from ._frameworks import framework_info, frameworks

if TYPE_CHECKING:  # pragma: no cover - rich is imported where a console is made
    from rich.console import Console
    from rich.text import Text

__all__ = [
    "FRAMEWORK_CHOICES",
    "FRAMEWORK_HELP",
    "atomic_output",
    "check_output",
    "console",
    "default_framework",
    "finding_renderable",
    "finding_text",
    "framework_arg",
    "resolve_run",
    "terminal_safe",
]

# C0 and C1 control characters (ESC starts ANSI sequences), DEL, bidi/direction marks and overrides, and lone
# surrogates (an undecodable file-name byte b'\xff' arrives as '\udcff' through os.fsdecode).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_KEEP_LINES = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    o = ord(match.group())
    if 0xDC80 <= o <= 0xDCFF:  # a byte os.fsdecode could not decode: show the byte
        return f"\\x{o - 0xDC00:02x}"
    return f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}"


def terminal_safe(text: object, *, keep_lines: bool = False) -> str:
    r"""``str(text)`` with every character that could steer a terminal shown escaped, repr-style.

    Args:
        text: anything; it is converted with ``str``.
        keep_lines: keep newlines and tabs (for a multi-line text gradsight composed, such as a finding);
            by default they are escaped too (for one name or value, which must stay on its line).

    Returns:
        The text, with ``\x1b``, ``\r``, ``\x00``, bidi overrides (``\u202e``) and undecodable file-name bytes
        (``\xff``) written out as escapes; printable text, including non-ASCII letters, is unchanged.
    """
    pattern = _UNSAFE_KEEP_LINES if keep_lines else _UNSAFE
    return pattern.sub(_escape, str(text))


def finding_text(finding: object) -> str:
    """A finding's plain-text form with every field from the run escaped for a terminal.

    Each field (message, layer names, explanation, advice) is escaped on its own, newlines included, before the
    finding composes its lines, so a layer name cannot add a fake line or steer the terminal.
    """
    import dataclasses

    if dataclasses.is_dataclass(finding) and not isinstance(finding, type) and hasattr(finding, "to_text"):
        changes = {}
        for name in ("message", "explanation", "code", "severity"):
            if isinstance(getattr(finding, name, None), str):
                changes[name] = terminal_safe(getattr(finding, name))
        for name in ("layers", "advice"):
            value = getattr(finding, name, None)
            if isinstance(value, (tuple, list)):
                changes[name] = tuple(terminal_safe(v) for v in value)
        try:
            return str(dataclasses.replace(finding, **changes).to_text())  # type: ignore[arg-type]
        except (TypeError, ValueError):  # a finding whose fields validate differently: escape the whole text
            pass
    text = finding.to_text() if hasattr(finding, "to_text") else str(finding)
    return terminal_safe(text, keep_lines=True)


#: Width of output that is not a terminal (a pipe, a file, a test's capture): wide enough that nothing wraps.
PLAIN_WIDTH = 1000
#: The style of a finding's first line, by severity.
SEVERITY_STYLES = {"error": "bold red", "warning": "bold yellow", "info": "cyan"}


def console(file: TextIO | None = None, *, width: int | None = None) -> Console:
    """A ``rich`` console for gradsight's terminal output.

    Markup, emoji codes and automatic highlighting are off, so a layer named ``"[red]x[/]"`` or ``":smile:"``
    prints as exactly that; every run-provided string still goes through :func:`terminal_safe` first. On a
    terminal it colours and fits the terminal's width; anywhere else (a pipe, a file, a captured stream, or with
    ``NO_COLOR``) it writes plain text without escape sequences and without wrapping lines.

    Args:
        file: where to write (default: ``sys.stdout`` at the time of the call).
        width: a fixed width (default: the terminal's, or :data:`PLAIN_WIDTH` when not a terminal).
    """
    from rich.console import Console

    stream = file if file is not None else sys.stdout
    options = {"file": stream, "markup": False, "emoji": False, "highlight": False, "soft_wrap": True}
    out = Console(**options, width=width)
    if not out.is_terminal:
        out = Console(**options, width=width or PLAIN_WIDTH, color_system=None)
    return out


def finding_renderable(finding: object) -> Text:
    """A finding as ``rich`` text: :func:`finding_text` (escaped), its first line styled by severity."""
    from rich.text import Text

    text = Text(finding_text(finding))
    first = text.plain.find("\n")
    style = SEVERITY_STYLES.get(str(getattr(finding, "severity", "")), "")
    if style:
        text.stylize(style, 0, first if first >= 0 else len(text))
    return text


FRAMEWORK_CHOICES: tuple[str, ...] = tuple(s for info in frameworks() for s in info.spellings)
FRAMEWORK_HELP = " or ".join(
    f"{info.spellings[0]} (alias{'es' if len(info.spellings) > 2 else ''} {', '.join(info.spellings[1:])})"
    for info in frameworks()
)


def default_framework() -> str:
    """The framework a command that trains uses when ``--framework`` is not given.

    ``"torch"`` when PyTorch is installed, else ``"keras"``; checked without importing either. It lives here, not
    in ``gradsight.show``, because the framework-free rooms never name a framework module.

    Raises:
        UnsupportedError: neither is installed.
    """
    from ._errors import UnsupportedError

    name = installed_framework()
    if name is not None:
        return name
    raise UnsupportedError(
        "gradsight demo trains a model, so it needs PyTorch or TensorFlow/Keras, and neither is installed. "
        "Install one: pip install 'gradsight[torch]' or pip install 'gradsight[tensorflow]'."
    )


def framework_arg(text: str) -> str:
    """Parse a ``--framework`` value: ``"torch"`` for torch/pytorch, ``"keras"`` for tensorflow/tf/keras.

    Raises:
        argparse.ArgumentTypeError: any other value (argparse turns it into a usage error, exit status 2).
    """
    info = framework_info(text)
    if info is None:
        raise argparse.ArgumentTypeError(
            f"invalid framework {text!r}; expected one of {', '.join(FRAMEWORK_CHOICES)} "
            "(torch and pytorch name PyTorch; tensorflow, tf and keras name TensorFlow/Keras)"
        )
    return info.name


def _is_run_file(path: Path) -> bool:
    from .store import is_run_file

    return is_run_file(path)


def resolve_run(given: str | os.PathLike[str], *, command: str = "show") -> Path:
    """The run file a command's RUN argument names: the path itself, or the one run file in a folder.

    Args:
        given: what the user passed: a run file, or a folder (e.g. the one ``gradsight demo`` wrote).
        command: the subcommand, for the fix in the message.

    Returns:
        The path (a missing or unreadable file is left for :func:`gradsight.load` to explain).

    Raises:
        InputError: a folder with no run file, or with several.
    """
    path = Path(os.fsdecode(given)).expanduser()
    if not path.is_dir():
        return path
    try:
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise InputError(f"cannot list the folder {str(path)!r} given as RUN: {exc.strerror or exc}.") from None
    runs = [p for p in entries if p.is_file() and _is_run_file(p)]
    if len(runs) == 1:
        return runs[0]
    if not runs:
        seen = ", ".join(repr(p.name) for p in entries[:8]) + (", …" if len(entries) > 8 else "")
        raise InputError(
            f"RUN {str(path)!r} is a folder without a gradsight run file in it "
            f"({'it holds ' + seen if entries else 'it is empty'}); expected a run file (.db) written by "
            f"gradsight.watch or gradsight demo, or a folder holding exactly one. Pass the run file itself: "
            f"gradsight {command} PATH/TO/run.db"
        )
    names = ", ".join(repr(p.name) for p in runs)
    raise InputError(
        f"RUN {str(path)!r} is a folder holding {len(runs)} run files ({names}); a folder names a run only when "
        f"it holds exactly one. Pass one of them: gradsight {command} {str(runs[0])!r}"
    )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.expanduser().resolve() == b.expanduser().resolve()


def check_output(
    output: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]] = (), what: str = "output"
) -> Path:
    """Refuse an output path that is a run file or one of the inputs; ``--overwrite`` never lifts this.

    Args:
        output: the path about to be written.
        inputs: the files the command reads (the run file).
        what: how the output is named in the message (``"--output"``, ``"report path"``, …).

    Returns:
        The output path, expanded and absolute.

    Raises:
        InputError: the output is an input, or an existing gradsight run file.
    """
    out = Path(os.fsdecode(output)).expanduser().absolute()
    for given in inputs:
        if _same_file(out, Path(os.fsdecode(given))):
            raise InputError(
                f"{what} {str(out)!r} is the run file itself, the one being read; writing there would destroy the run. "
                "Pass another output path."
            )
    if _is_run_file(out):
        raise InputError(
            f"{what} {str(out)!r} is a gradsight run file; gradsight never replaces a run file with an export or "
            "a report, not even with --overwrite. Pass another path (or delete that run file yourself first)."
        )
    return out


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The temporary file is created (empty, mode 0666 less the umask) in the same folder, so the final rename is
    atomic; on any exception it is removed and ``path`` is left exactly as it was (absent, or the old file).
    """
    from ._errors import InputError, StoreError

    target = Path(path)
    if target.is_dir():
        raise InputError(
            f"cannot write {str(target)!r}: it is a folder. Pass a file path, e.g. {str(target / 'out')!r}."
        )
    if target.exists() and not target.is_file():  # renaming onto it would replace a pipe or a device node
        raise InputError(
            f"cannot write {str(target)!r}: it exists and is not a regular file (a pipe, socket or device); gradsight "
            "writes its outputs to regular files only. Pass another path."
        )
    for _ in range(100):
        tmp = target.with_name(f".{target.name[:64]}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:  # pragma: no cover - a 32-bit random name already taken
            continue
        except OSError as exc:
            raise StoreError(
                f"cannot write {str(target)!r}: {exc.strerror or exc} in its folder {str(target.parent)!r}. "
                "Pass a path in a folder you can write to."
            ) from None
    else:  # pragma: no cover
        raise FileExistsError(f"could not create a temporary file next to {str(target)!r}")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
