"""Tidy export: a run's summaries as CSV or Parquet, in the long format of :meth:`gradsight.Run.to_pandas`.

One row per (step, tensor, kind) with the columns of ``to_pandas()``: ``step``, ``tensor``, ``layer``,
``kind``, the stored fields, the derived ``finite``, ``nonfinite``, ``mean``, ``std``, ``rms``, ``l2`` and,
when asked for, ``hist`` (256 ``log2|x|`` bin counts) and ``units_active``/``units_total``.

* CSV: plain text any tool reads. ``±inf`` (``min``/``max`` of a tensor without finite elements) is written as
  ``inf``/``-inf``, NaN as an empty field; array columns are JSON lists. :func:`read_csv` reads a file back into
  exactly the DataFrame ``to_pandas()`` returns.
* Parquet: typed columns, array columns as ``list<int64>``; needs ``pyarrow`` (``pip install pyarrow``).
  ``pandas.read_parquet`` reads it back.

``table="scalars"`` exports the run's scalars instead, long too: ``step``, ``name``, ``value``.

Outputs are written to a temporary file in the same folder and renamed into place, so a failed export leaves
nothing behind; an output that is a gradsight run file (or the run being read) is refused even with
``overwrite=True``. A ``steps`` range must be well-formed and select at least one recorded step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._cli_support import atomic_output, check_output
from .._errors import InputError, StoreError
from ..store import Run, check_steps, load

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "PYARROW_HINT",
    "check_filters",
    "check_path",
    "check_steps",
    "read_csv",
    "require_steps",
    "tidy_frame",
    "to_csv",
    "to_parquet",
]

StepRange = tuple[int | None, int | None]

Table = Literal["summaries", "scalars"]
_ARRAY_COLUMNS = ("hist", "units_active")
#: The keyword filters of the table exports (those of :meth:`gradsight.Run.to_pandas`).
_FILTERS = ("kind", "layer", "tensor", "steps")

#: The message of the ImportError raised when Parquet is asked for without pyarrow.
PYARROW_HINT = (
    "Parquet export needs the 'pyarrow' package, which is not installed. Install it with: "
    "pip install pyarrow  (or pip install 'gradsight[parquet]'), or export CSV instead: "
    "gradsight export csv RUN"
)


def require_steps(run: Run, steps: StepRange, *, scalars: bool = False, fix: str = "export every step") -> None:
    """Raise when the range ``steps`` selects none of the run's recorded steps.

    Args:
        run: the open run.
        steps: a range from :func:`check_steps`.
        scalars: count steps that have only scalars (the TensorBoard export writes those too).
        fix: what leaving the range out does, for the message ("leave the range out to <fix>").

    Raises:
        InputError: no recorded step lies in the range; the message names the run's recorded steps.
    """
    lo, hi = steps
    if lo is None and hi is None:
        return
    recorded = set(run.steps)
    if scalars:
        recorded.update(step for step, _, _ in run.scalar_rows())
    if any((lo is None or s >= lo) and (hi is None or s <= hi) for s in recorded):
        return
    shown = f"{'' if lo is None else lo}:{'' if hi is None else hi}"
    if recorded:
        have = f"it has {len(recorded)} recorded step(s), from {min(recorded)} to {max(recorded)}"
    else:
        have = "it has no recorded steps at all"
    raise InputError(
        f"the step range {shown} selects no step of the run {str(run.path)!r}: {have}. "
        f"Pass a range that overlaps them, or leave the range out to {fix}."
    )


def check_filters(filters: dict[str, Any], function: str) -> None:
    """Refuse a keyword that is not one of the export filters, naming the function the user called.

    Raises:
        InputError: an unknown keyword.
    """
    unknown = sorted(set(filters) - set(_FILTERS))
    if unknown:
        raise InputError(
            f"{function}() got unknown keyword(s) {unknown!r}; the filters it takes are {', '.join(_FILTERS)} "
            "(as for gradsight.Run.to_pandas), e.g. kind='grad' or steps=(10, 50)."
        )


def tidy_frame(
    run: str | os.PathLike[str] | Run,
    *,
    table: Table = "summaries",
    hist: bool = False,
    units: bool = False,
    **filters: Any,
) -> pd.DataFrame:
    """The DataFrame that is exported: ``run.to_pandas(hist=, units=, **filters)`` or the long scalars table.

    Args:
        run: the run file or a :class:`gradsight.Run`.
        table: ``"summaries"`` (default) or ``"scalars"``.
        hist: include the ``hist`` column (summaries only).
        units: include ``units_active`` and ``units_total`` (summaries only).
        **filters: ``kind``, ``layer``, ``tensor``, ``steps`` as for :meth:`gradsight.Run.to_pandas`.
    """
    import pandas as pd

    check_filters(filters, "tidy_frame")
    if table not in ("summaries", "scalars"):
        raise InputError(f"table must be 'summaries' or 'scalars', not {table!r}.")
    if "steps" in filters:
        filters["steps"] = check_steps(filters["steps"])
    r = load(run)
    try:
        if table == "summaries":
            if "steps" in filters:
                require_steps(r, filters["steps"])
            return r.to_pandas(hist=hist, units=units, **filters)
        if hist or units or filters:
            raise InputError("hist, units and filters apply to table='summaries' only; the scalars table is small.")
        rows = r.scalar_rows()
        df = pd.DataFrame(rows, columns=["step", "name", "value"])
        df["value"] = df["value"].astype("float64")
        return df
    finally:
        if r is not run:
            r.close()


def check_path(value: Any, arg: str, example: str) -> Path:
    """An output path argument (``str`` or ``os.PathLike``) as an expanded, absolute :class:`~pathlib.Path`.

    Raises:
        InputError: ``value`` is not a path.
    """
    if not isinstance(value, (str, bytes, os.PathLike)):
        raise InputError(
            f"{arg} must be a file-system path (a str or pathlib.Path), got {value!r:.80}; e.g. {example}."
        )
    return Path(os.fsdecode(value)).expanduser().resolve()


def _target(path: str | os.PathLike[str], overwrite: bool, run: str | os.PathLike[str] | Run) -> Path:
    run_path = run.path if isinstance(run, Run) else run
    inputs = [run_path] if isinstance(run_path, (str, os.PathLike)) else []
    out = check_output(check_path(path, "path", "'run.csv'"), inputs=inputs, what="the output")
    if out.is_dir():
        raise StoreError(f"the output {str(out)!r} is a folder; pass a file path, e.g. {str(out / 'run.csv')!r}.")
    if out.exists() and not overwrite:
        raise StoreError(
            f"{str(out)!r} already exists and gradsight never overwrites silently. Pass another path, or "
            "overwrite=True (--overwrite on the command line)."
        )
    if not out.parent.is_dir():
        raise StoreError(f"cannot write {str(out)!r}: the directory {str(out.parent)!r} does not exist.")
    return out


def to_csv(
    run: str | os.PathLike[str] | Run,
    path: str | os.PathLike[str],
    *,
    table: Table = "summaries",
    hist: bool = False,
    units: bool = False,
    overwrite: bool = False,
    **filters: Any,
) -> Path:
    """Write the run's summaries (or scalars) as CSV in the long format of ``to_pandas()``.

    Args:
        run: the run file or a :class:`gradsight.Run`.
        path: the CSV file to write.
        table: ``"summaries"`` or ``"scalars"``.
        hist: include the 256-bin ``hist`` column, as JSON lists.
        units: include ``units_active`` (JSON lists, empty for tensors without unit counts) and ``units_total``.
        overwrite: replace ``path`` if it exists instead of refusing (never a run file, never the run read).
        **filters: ``kind``, ``layer``, ``tensor``, ``steps`` as for :meth:`gradsight.Run.to_pandas`; ``steps``
            must select at least one recorded step.

    Returns:
        The path written. :func:`read_csv` reads it back.

    Raises:
        InputError: a malformed or empty ``steps`` range, or ``path`` is a run file or the run itself.
        StoreError: ``path`` exists (and ``overwrite`` is False), or its folder does not.
    """
    check_filters(filters, "to_csv")
    out = _target(path, overwrite, run)
    df = _export_frame(run, table, hist, units, filters, lambda a: json.dumps(np.asarray(a).tolist()))
    with atomic_output(out) as tmp:
        df.to_csv(tmp, index=False)
    return out


def read_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a CSV written by :func:`to_csv` back into the DataFrame that ``to_pandas()`` returns.

    Array columns (``hist``, ``units_active``) become int64 arrays again (``None`` where none was recorded);
    ``units_total`` is an integer column when every row has one, else float with NaN, as in ``to_pandas()``.

    Raises:
        InputError: ``path`` is not a path, no file is there, or the file is not a CSV that gradsight wrote.
    """
    import pandas as pd

    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"read_csv expects the path of a CSV file, got {type(path).__name__} {path!r}.")
    file = Path(os.fsdecode(path)).expanduser()
    if not file.is_file():
        raise InputError(
            f"read_csv: there is no file at {str(file)!r}. Pass the path of a CSV written by "
            "gradsight.export.to_csv (or `gradsight export csv RUN -o FILE`)."
        )
    try:
        columns = pd.read_csv(file, nrows=0).columns
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise InputError(f"read_csv: {str(file)!r} is not a CSV file ({type(exc).__name__}: {exc}).") from None
    if not ({"step", "tensor", "kind"} <= set(columns) or {"step", "name", "value"} <= set(columns)):
        raise InputError(
            f"read_csv: {str(file)!r} is not a gradsight export: its columns are {list(columns)[:8]!r}, expected "
            "step, tensor, kind, ... (summaries) or step, name, value (scalars). Pass a CSV written by "
            "gradsight.export.to_csv (or `gradsight export csv`)."
        )
    path = file
    text = [c for c in ("tensor", "layer", "kind", "name", *_ARRAY_COLUMNS) if c in columns]
    # Only numbers have missing values; text stays text (a layer named "" or "nan" reads back as itself).
    df = pd.read_csv(
        path,
        keep_default_na=False,
        na_values={c: [""] for c in columns if c not in text},
        dtype=dict.fromkeys(text, str),
    )
    for col in _ARRAY_COLUMNS:
        if col in df.columns:
            df[col] = [None if v == "" else np.asarray(json.loads(v), dtype=np.int64) for v in df[col]]
    return df


def to_parquet(
    run: str | os.PathLike[str] | Run,
    path: str | os.PathLike[str],
    *,
    table: Table = "summaries",
    hist: bool = False,
    units: bool = False,
    overwrite: bool = False,
    **filters: Any,
) -> Path:
    """Write the run's summaries (or scalars) as Parquet in the long format of ``to_pandas()``; needs pyarrow.

    Arguments as for :func:`to_csv`; array columns are ``list<int64>``. ``pandas.read_parquet`` reads it back.

    Raises:
        ImportError: pyarrow is not installed (the message says how to install it, or to use CSV).
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(PYARROW_HINT) from exc
    check_filters(filters, "to_parquet")
    out = _target(path, overwrite, run)
    df = _export_frame(run, table, hist, units, filters, lambda a: np.asarray(a, dtype=np.int64).tolist())
    with atomic_output(out) as tmp:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), str(tmp))
    return out


def _export_frame(
    run: str | os.PathLike[str] | Run,
    table: Table,
    hist: bool,
    units: bool,
    filters: dict[str, Any],
    encode: Callable[[np.ndarray], Any],
) -> pd.DataFrame:
    """:func:`tidy_frame` with its array columns (``hist``, ``units_active``) encoded for a file format."""
    df = tidy_frame(run, table=table, hist=hist, units=units, **filters)
    for col in _ARRAY_COLUMNS:
        if col in df.columns:
            df[col] = [None if a is None else encode(a) for a in df[col]]
    return df
