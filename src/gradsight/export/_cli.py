"""``gradsight export {tensorboard,csv,parquet} RUN``: write a run file in another tool's format.

Registered in :mod:`gradsight.cli`; this module imports nothing heavy at import time (pandas, TensorBoard and
pyarrow are imported when a command runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .._cli_support import resolve_run, terminal_safe
from .._errors import InputError

__all__ = ["add_arguments", "run"]

RUN_HELP = "the run file (.db) written by gradsight.watch or gradsight demo, or a folder holding exactly one"


def _steps(text: str) -> tuple[int | None, int | None]:
    """Parse ``A:B``, ``A:`` or ``:B`` (inclusive, non-negative, ``A <= B``) into a step range."""
    lo, sep, hi = text.strip().partition(":")
    if not sep or (not lo.strip() and not hi.strip()):
        raise argparse.ArgumentTypeError(
            f"expected an inclusive step range FIRST:LAST such as 10:50 (either end may be left empty: 10: or :50), "
            f"got {text!r}"
        )
    ends: list[int | None] = []
    for part in (lo, hi):
        part = part.strip()
        if not part:
            ends.append(None)
            continue
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected whole step numbers in FIRST:LAST such as 10:50, got {part!r} in {text!r}"
            ) from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"steps count from 0, got {value} in {text!r}; e.g. 0:{abs(value)}")
        ends.append(value)
    first, last = ends
    if first is not None and last is not None and first > last:
        raise argparse.ArgumentTypeError(
            f"{text!r} is an empty range: FIRST {first} comes after LAST {last} (the range is inclusive, "
            f"FIRST:LAST); did you mean {last}:{first}?"
        )
    return first, last


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``export`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)

    tb = sub.add_parser(
        "tensorboard",
        help="TensorBoard events: per-layer scalars and log2|x| histograms",
        description="Write per-layer scalars (gradient/weight/update RMS, update ratio, active rate, non-finite "
        "counts) and histograms rebuilt from the log2|x| bins as TensorBoard events. "
        "Then: tensorboard --logdir DIR",
    )
    tb.add_argument("run_file", metavar="RUN", type=Path, help=RUN_HELP)
    tb.add_argument("--logdir", required=True, type=Path, help="directory for the event file (created if missing)")
    tb.add_argument(
        "--histograms",
        choices=("log2", "abs", "none"),
        default="log2",
        help="histograms of log2|x| (default), of |x| with power-of-two buckets, or none",
    )
    tb.add_argument("--steps", type=_steps, default=None, metavar="FIRST:LAST", help="inclusive step range")
    tb.add_argument("--overwrite", action="store_true", help="replace an earlier gradsight export in --logdir")

    for fmt, what in (("csv", "CSV"), ("parquet", "Parquet (needs pyarrow)")):
        p = sub.add_parser(
            fmt,
            help=f"{what}: one row per (step, tensor, kind), as Run.to_pandas()",
            description=f"Write the run's summaries as {what} in the long format of Run.to_pandas().",
        )
        p.add_argument("run_file", metavar="RUN", type=Path, help=RUN_HELP)
        p.add_argument(
            "-o", "--output", type=Path, default=None, help=f"output file (default: RUN with .{fmt}); never a run file"
        )
        p.add_argument("--scalars", action="store_true", help="export the scalars (step, name, value) instead")
        p.add_argument("--hist", action="store_true", help="add the 256 log2|x| bin counts (column 'hist')")
        p.add_argument("--units", action="store_true", help="add per-unit activity ('units_active', 'units_total')")
        p.add_argument("--steps", type=_steps, default=None, metavar="FIRST:LAST", help="inclusive step range")
        p.add_argument(
            "--overwrite", action="store_true", help="replace the output file if it exists (never a run file)"
        )


def run(args: argparse.Namespace) -> int:
    """Run ``gradsight export``; returns the exit status (0 written, 2 bad usage or missing dependency)."""
    run_file = resolve_run(args.run_file, command=f"export {args.format}")
    try:
        if args.format == "tensorboard":
            from ._tensorboard import to_tensorboard

            histograms = None if args.histograms == "none" else args.histograms
            out = to_tensorboard(
                run_file, args.logdir, histograms=histograms, steps=args.steps, overwrite=args.overwrite
            )
            print(f"wrote {terminal_safe(out)}\nview it with: tensorboard --logdir {terminal_safe(args.logdir)}")
            return 0
        from ._tidy import to_csv, to_parquet

        output = args.output or run_file.with_suffix(f".{args.format}")
        filters = {} if args.steps is None else {"steps": args.steps}
        if args.scalars and (args.hist or args.units or filters):
            raise InputError("--scalars cannot be combined with --hist, --units or --steps.")
        write = to_csv if args.format == "csv" else to_parquet
        out = write(
            run_file,
            output,
            table="scalars" if args.scalars else "summaries",
            hist=args.hist,
            units=args.units,
            overwrite=args.overwrite,
            **filters,
        )
        print(f"wrote {terminal_safe(out)}")
        return 0
    except ImportError as exc:  # an optional dependency is missing; the message says what to install
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("gradsight"):
            raise  # our own bug, not a missing dependency: cli.main reports it as one
        print(f"gradsight export {args.format}: error: {terminal_safe(exc, keep_lines=True)}", file=sys.stderr)
        return 2
