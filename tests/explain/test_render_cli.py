"""Rendering, finite differences, check_loss findings, depth_sweep outputs and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradsight import InputError
from gradsight.cli import main
from gradsight.explain import Term, Trace, check_loss, depth_sweep, explain


@pytest.fixture
def torch_trace(torch):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    return explain(model, x, torch.randn(5, 2, dtype=torch.float64), nn.MSELoss(), finite_differences=True)


def test_str_and_markdown(torch_trace):
    text = str(torch_trace)
    for name in torch_trace.names:
        assert name in text
    assert "✓" in text and "Forward pass" in text and "Backward pass" in text
    assert "dJ/dŶ = 2/(n·f_L)·(Ŷ − Y)" in text
    md = torch_trace.to_markdown()
    assert md == torch_trace._repr_markdown_() and "| ✓ | `dJ/dW2` |" in md
    assert "<pre>" in torch_trace._repr_html_()
    assert isinstance(torch_trace["dJ/dW1"], Term) and "dJ/dW1" in repr(torch_trace["dJ/dW1"])
    assert isinstance(torch_trace, Trace) and "ok=True" in repr(torch_trace)
    with pytest.raises(KeyError, match=r"no term named 'dJ/dW9'.*available: Z1"):
        torch_trace["dJ/dW9"]


def test_to_dict_json(torch_trace):
    d = torch_trace.to_dict()
    s = json.dumps(d)
    assert "value" not in d["terms"][0] and json.loads(s)["ok"] is True
    dv = torch_trace.to_dict(values=True)
    json.dumps(dv)
    term = next(t for t in dv["terms"] if t["name"] == "dJ/dW1")
    np.testing.assert_allclose(term["value"], torch_trace["dJ/dW1"].value)
    assert term["layout"] == "torch Linear weight (out, in)"
    # NaN → null: the loss terms of an arbitrary-callable loss have max_abs_err NaN
    assert dv["terms"][0]["fd"] is None


def test_finite_differences(torch_trace):
    for name in ("dJ/dW1", "dJ/db1", "dJ/dW2", "dJ/db2"):
        fd = torch_trace[name].fd
        assert fd is not None and fd.ok and fd.max_abs_err < 1e-7
        ref = torch_trace[name].autodiff.ravel()[fd.entries]
        np.testing.assert_allclose(fd.values, ref, rtol=1e-6, atol=1e-9)
    assert "finite differences on 12 entries" in str(torch_trace["dJ/dW1"])


def test_finite_differences_sampling(torch):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.Sigmoid()).double()
    t = explain(
        model,
        torch.randn(4, 20, dtype=torch.float64),
        torch.rand(4, 10, dtype=torch.float64),
        "bce",
        finite_differences=True,
        fd_samples=7,
        fd_seed=3,
    )
    fd = t["dJ/dW1"].fd
    assert len(fd.entries) == 7 and fd.entries == sorted(set(fd.entries)) and fd.ok
    t2 = explain(
        model,
        torch.randn(4, 20, dtype=torch.float64),
        torch.rand(4, 10, dtype=torch.float64),
        "bce",
        finite_differences=True,
        fd_samples=7,
        fd_seed=3,
    )
    assert t2["dJ/dW1"].fd.entries == fd.entries  # seeded


def test_nan_becomes_null(torch):
    from torch import nn

    model = nn.Sequential(nn.Linear(2, 1)).double()
    t = explain(
        model,
        torch.ones(3, 2, dtype=torch.float64),
        torch.ones(3, 1, dtype=torch.float64),
        lambda p, y: (p - y).pow(2).sum(),
    )
    d = json.loads(json.dumps(t.to_dict()))
    j = next(x for x in d["terms"] if x["name"] == "J")
    assert j["max_abs_err"] is None and j["applicable"] is False


def test_keras_sum_mse_scale(keras):
    model = keras.Sequential([keras.Input((3,), dtype="float64"), keras.layers.Dense(3, dtype="float64")])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    t = explain(model, x, y, keras.losses.MeanSquaredError(reduction="sum", dtype="float64"))
    assert t.ok and "2/f_L·(Ŷ − Y)" in t["dJ/dY_hat"].formula
    y_hat = t["A1"].autodiff
    np.testing.assert_allclose(t["dJ/dY_hat"].autodiff, 2 / 3 * (y_hat - y))  # naive: Keras averages f_L
    tm = explain(model, x, y, "mse")
    np.testing.assert_allclose(tm["dJ/dY_hat"].autodiff, 2 / 12 * (y_hat - y))
    assert "2/(n·f_L)·(Ŷ − Y)" in tm["dJ/dY_hat"].formula


def test_check_loss_names_a_keras_loss_function_by_its_public_name():
    keras = pytest.importorskip("keras")
    r = check_loss(keras.losses.mean_squared_error, np.ones((4, 2)), np.zeros((4, 2)))
    assert r.loss == "keras.losses.mean_squared_error"  # not its private module path, keras.src.losses.…


def test_check_loss_render_and_formulas(framework):
    if framework == "torch":
        import torch

        loss = torch.nn.MSELoss(reduction="sum")
    else:
        import keras

        loss = keras.losses.MeanSquaredError(reduction="sum")
    rng = np.random.default_rng(0)
    yt, yp = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    r = check_loss(loss, yt, yp)
    assert r.ok and r.findings[0].code == "gradient_scale"
    expected = "2" if framework == "torch" else "2/f"
    assert r.gradient_formula.startswith(f"dJ/dŶ = {expected}·(Ŷ − Y)")
    if framework == "torch":  # a constant factor: no "(n = 5, f = 4: 2 = 2)" after it
        assert r.gradient_formula == "dJ/dŶ = 2·(Ŷ − Y)"
    json.dumps(r.to_dict())
    assert "check_loss" in str(r) and "| · | `gradient_scale` |" in r.to_markdown()
    if framework == "tensorflow":
        assert "keras_last_axis_mean" in r.codes


def test_depth_sweep_outputs():
    s = depth_sweep(3, 3, init="normal", activation="tanh")
    assert all(r["predicted"] is None for r in s.rows) and s.ok
    df = s.to_pandas()
    assert list(df.columns)[:5] == ["depth", "layer", "fan_in", "fan_out", "grad_rms"] and len(df) == 6
    json.dumps(s.to_dict())
    assert "| depth |" in s.to_markdown() and "depth sweep" in str(s)
    fig = s.plot()
    assert fig.axes[0].get_yscale() == "log"
    import matplotlib.pyplot as plt

    plt.close(fig)
    with pytest.raises(InputError, match=r"init must be one of"):
        depth_sweep(3, 2, init="zeros")


def test_cli_list(capsys):
    assert main(["explain", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("default", "single-layer", "three-layer", "activation-matrix", "training-loop", "depth-sweep"):
        assert name in out


def test_cli_default(capsys, torch):
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    assert "Forward pass" in out and "dJ/dW3" in out and "✓" in out


def test_cli_json_and_fd(capsys, framework):
    assert (
        main(["explain", "--framework", framework, "--example", "three-layer", "--json", "--finite-differences"]) == 0
    )
    d = json.loads(capsys.readouterr().out)
    assert d["ok"] is True and d["result"]["sum_gradients"] == [5.0, 15.0, 45.0]


@pytest.mark.parametrize("example", ["single-layer", "activation-matrix", "training-loop", "depth-sweep"])
def test_cli_examples(capsys, framework, example):
    assert main(["explain", "--framework", framework, "--example", example]) == 0
    out = capsys.readouterr().out
    if example == "training-loop":
        assert "20.5925" in out and "13.7284" in out and "[broadcast]" in out


def test_cli_unknown_example(capsys):
    assert main(["explain", "--example", "nope"]) == 2
    assert "unknown example 'nope'" in capsys.readouterr().err
