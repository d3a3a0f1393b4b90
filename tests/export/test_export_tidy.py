"""CSV and Parquet exports round-trip to exactly what Run.to_pandas() returns."""

import argparse
import sys

import numpy as np
import pandas as pd
import pytest

from gradsight import InputError, StoreError, load
from gradsight.export import _cli as export_cli
from gradsight.export import read_csv, to_csv, to_parquet
from gradsight.export._tidy import PYARROW_HINT


def _assert_same(got, want):
    assert list(got.columns) == list(want.columns)
    for col in want.columns:
        if col in ("hist", "units_active"):
            for a, b in zip(got[col], want[col], strict=True):
                assert (a is None and b is None) or np.array_equal(a, b), col
        else:
            pd.testing.assert_series_equal(got[col], want[col], check_dtype=False, check_exact=True, obj=col)


@pytest.mark.parametrize("extra", [{}, {"hist": True, "units": True}])
def test_csv_round_trip_equals_to_pandas(synthetic_run, tmp_path, extra):
    out = to_csv(synthetic_run.path, tmp_path / "run.csv", **extra)
    with load(synthetic_run.path) as run:
        want = run.to_pandas(**extra)
    got = read_csv(out)
    _assert_same(got, want)
    assert (got["layer"] == "").sum() == (want["layer"] == "").sum() > 0  # the root module's "" survives
    assert np.isinf(pd.read_csv(out)["max"]).sum() == 0  # plain readers see plain numbers
    broken = got[(got.step == 2) & (got.tensor == "fc1.weight") & (got.kind == "grad")].iloc[0]
    assert (broken.nan, broken.posinf, broken.neginf, broken.nonfinite) == (1, 1, 1, 3)


def test_csv_filters_and_scalars_table(synthetic_run, tmp_path):
    out = to_csv(synthetic_run.path, tmp_path / "g.csv", kind="grad", steps=(1, 2))
    df = pd.read_csv(out)
    assert set(df.kind) == {"grad"} and set(df.step) == {1, 2}
    scalars = pd.read_csv(to_csv(synthetic_run.path, tmp_path / "s.csv", table="scalars"))
    assert list(scalars.columns) == ["step", "name", "value"]
    assert scalars[(scalars.step == 5) & (scalars.name == "loss")].value.isna().all()  # NaN loss kept as NaN
    assert len(scalars) == len(synthetic_run.scalars)


def test_csv_never_overwrites_silently(synthetic_run, tmp_path):
    to_csv(synthetic_run.path, tmp_path / "run.csv")
    with pytest.raises(StoreError, match=r"already exists.*overwrite=True"):
        to_csv(synthetic_run.path, tmp_path / "run.csv")
    to_csv(synthetic_run.path, tmp_path / "run.csv", overwrite=True)


def test_parquet_round_trip_equals_to_pandas(synthetic_run, tmp_path):
    pytest.importorskip("pyarrow")
    out = to_parquet(synthetic_run.path, tmp_path / "run.parquet", hist=True, units=True)
    with load(synthetic_run.path) as run:
        want = run.to_pandas(hist=True, units=True)
    _assert_same(pd.read_parquet(out), want)


def test_parquet_without_pyarrow_says_what_to_do(monkeypatch, synthetic_run, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"needs the 'pyarrow' package.*pip install pyarrow.*export csv"):
        to_parquet(synthetic_run.path, tmp_path / "run.parquet")
    assert not (tmp_path / "run.parquet").exists()
    parser = argparse.ArgumentParser()
    export_cli.add_arguments(parser)
    args = parser.parse_args(["parquet", str(synthetic_run.path)])
    assert export_cli.run(args) == 2


def test_cli_csv_defaults_next_to_the_run(synthetic_run, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    export_cli.add_arguments(parser)
    assert export_cli.run(parser.parse_args(["csv", str(synthetic_run.path), "--hist"])) == 0
    out = synthetic_run.path.with_suffix(".csv")
    assert f"wrote {out}" in capsys.readouterr().out
    with load(synthetic_run.path) as run:
        _assert_same(read_csv(out), run.to_pandas(hist=True))
    with pytest.raises(InputError, match="--scalars cannot be combined with --hist"):
        export_cli.run(parser.parse_args(["csv", str(synthetic_run.path), "--scalars", "--hist", "-o", "x.csv"]))


def test_cli_rejects_a_bad_step_range():
    parser = argparse.ArgumentParser()
    export_cli.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["csv", "run.db", "--steps", "3"])


def test_pyarrow_hint_is_documentary():
    assert "pip install pyarrow" in PYARROW_HINT and "csv" in PYARROW_HINT


def test_hist_export_of_a_tensor_without_finite_values(tmp_path):
    from gradsight import RunWriter, summarize

    with RunWriter(tmp_path / "nan.db") as w:
        a = w.tensor_id("a", "l", "grad", (3,), "float32")
        b = w.tensor_id("b", "l", "grad", (3,), "float32")
        w.log_summaries(0, [(a, summarize(np.ones(3))), (b, summarize(np.full(3, np.nan)))])
    df = read_csv(to_csv(tmp_path / "nan.db", tmp_path / "nan.csv", hist=True))
    assert df["hist"][1].sum() == 0 and df["nan"][1] == 3


def test_read_csv_refuses_what_gradsight_did_not_write(tmp_path):
    """Regression: a missing file raised pandas' FileNotFoundError and a foreign CSV came back as a one-column
    DataFrame, without an error."""
    from gradsight import InputError

    with pytest.raises(InputError, match="no file at"):
        read_csv(tmp_path / "missing.csv")
    notes = tmp_path / "notes.csv"
    notes.write_text("precious notes\nline,2\n")
    with pytest.raises(InputError, match="is not a gradsight export"):
        read_csv(notes)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InputError, match="is not a CSV file"):
        read_csv(empty)
    with pytest.raises(InputError, match="expects the path of a CSV file"):
        read_csv(3)
