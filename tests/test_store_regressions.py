"""Regression tests for the run store, each named after the bug it pins."""

import numpy as np

from gradsight import RunWriter, load, summarize


def test_to_pandas_hist_with_a_tensor_without_finite_nonzero_values(tmp_path):
    # hist_lo is NULL for such a tensor; pandas made the column float NaN and the decode slice failed.
    path = tmp_path / "r.db"
    with RunWriter(path) as w:
        a = w.tensor_id("a", "l", "grad", (3,), "float32")
        b = w.tensor_id("b", "l", "grad", (3,), "float32")
        w.log_summaries(0, [(a, summarize(np.ones(3))), (b, summarize(np.full(3, np.nan)))])
    df = load(path).to_pandas(hist=True)
    assert df["hist"][0].sum() == 3 and df["hist"][1].sum() == 0
    assert df["nan"].tolist() == [0, 3]
