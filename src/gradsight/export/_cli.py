"""``gradsight export {tensorboard,csv,parquet} RUN``: write a run file in another tool's format.

Registered in :mod:`gradsight.cli`; this module imports nothing heavy at import time (pandas, TensorBoard and
pyarrow are imported when a command runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .._errors import InputError

__all__ = ["add_arguments", "run"]


def _steps(text: str) -> tuple[int | None, int | None]:
    """Parse ``A:B``, ``A:`` or ``:B`` (inclusive) into a step range."""
    lo, sep, hi = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected a step range FIRST:LAST (either end may be empty), got {text!r}")
    try:
        return (int(lo) if lo else None, int(hi) if hi else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integer steps in FIRST:LAST, got {text!r}") from None


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
    tb.add_argument("run_file", metavar="RUN", type=Path, help="the run file (.db) written by gradsight.watch")
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
        p.add_argument("run_file", metavar="RUN", type=Path, help="the run file (.db) written by gradsight.watch")
        p.add_argument("-o", "--output", type=Path, default=None, help=f"output file (default: RUN with .{fmt})")
        p.add_argument("--scalars", action="store_true", help="export the scalars (step, name, value) instead")
        p.add_argument("--hist", action="store_true", help="add the 256 log2|x| bin counts (column 'hist')")
        p.add_argument("--units", action="store_true", help="add per-unit activity ('units_active', 'units_total')")
        p.add_argument("--steps", type=_steps, default=None, metavar="FIRST:LAST", help="inclusive step range")
        p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")


def run(args: argparse.Namespace) -> int:
    """Run ``gradsight export``; returns the exit status (0 written, 2 bad usage or missing dependency)."""
    try:
        if args.format == "tensorboard":
            from ._tensorboard import to_tensorboard

            histograms = None if args.histograms == "none" else args.histograms
            out = to_tensorboard(
                args.run_file, args.logdir, histograms=histograms, steps=args.steps, overwrite=args.overwrite
            )
            print(f"wrote {out}\nview it with: tensorboard --logdir {args.logdir}")
            return 0
        from ._tidy import to_csv, to_parquet

        output = args.output or args.run_file.with_suffix(f".{args.format}")
        filters = {} if args.steps is None else {"steps": args.steps}
        if args.scalars and (args.hist or args.units or filters):
            raise InputError("--scalars cannot be combined with --hist, --units or --steps.")
        write = to_csv if args.format == "csv" else to_parquet
        out = write(
            args.run_file,
            output,
            table="scalars" if args.scalars else "summaries",
            hist=args.hist,
            units=args.units,
            overwrite=args.overwrite,
            **filters,
        )
        print(f"wrote {out}")
        return 0
    except ImportError as exc:  # an optional dependency is missing; the message says what to install
        print(f"gradsight export {args.format}: error: {exc}", file=sys.stderr)
        return 2
