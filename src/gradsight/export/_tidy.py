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
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._errors import InputError, StoreError
from ..store import Run, load

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["PYARROW_HINT", "read_csv", "tidy_frame", "to_csv", "to_parquet"]

Table = Literal["summaries", "scalars"]
_ARRAY_COLUMNS = ("hist", "units_active")

#: The message of the ImportError raised when Parquet is asked for without pyarrow.
PYARROW_HINT = (
    "Parquet export needs the 'pyarrow' package, which is not installed. Install it with: "
    "pip install pyarrow  (or pip install 'gradsight[parquet]'), or export CSV instead: "
    "gradsight export csv RUN"
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

    if table not in ("summaries", "scalars"):
        raise InputError(f"table must be 'summaries' or 'scalars', not {table!r}.")
    r = load(run)
    try:
        if table == "summaries":
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


def _target(path: str | os.PathLike[str], overwrite: bool) -> Path:
    out = Path(path).expanduser().resolve()
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
        overwrite: replace ``path`` if it exists instead of refusing.
        **filters: ``kind``, ``layer``, ``tensor``, ``steps`` as for :meth:`gradsight.Run.to_pandas`.

    Returns:
        The path written. :func:`read_csv` reads it back.
    """
    out = _target(path, overwrite)
    df = _export_frame(run, table, hist, units, filters, lambda a: json.dumps(np.asarray(a).tolist()))
    df.to_csv(out, index=False)
    return out


def read_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a CSV written by :func:`to_csv` back into the DataFrame that ``to_pandas()`` returns.

    Array columns (``hist``, ``units_active``) become int64 arrays again (``None`` where none was recorded);
    ``units_total`` is an integer column when every row has one, else float with NaN, as in ``to_pandas()``.
    """
    import pandas as pd

    columns = pd.read_csv(path, nrows=0).columns
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
    out = _target(path, overwrite)
    df = _export_frame(run, table, hist, units, filters, lambda a: np.asarray(a, dtype=np.int64).tolist())
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), out)
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
