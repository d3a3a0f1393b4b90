"""Bad input gets documentary errors; nothing the user owns is mutated; layers without a rule are traced."""

from __future__ import annotations

import numpy as np
import pytest

from gradsight import InputError, UnsupportedError
from gradsight.explain import check_loss, explain


# ------------------------------------------------------------------------------------------------- torch
def test_torch_branching_module_is_explained_as_a_graph(torch):
    """Formerly refused ("single chain"); issue #15: a residual module is a graph, its skip sum written out."""
    from torch import nn

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return x + self.lin(x)

    trace = explain(Residual().double(), torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
    assert trace.ok and [g.name for g in trace.graph if g.op not in ("param",)] == ["x", "lin", "add"]
    assert trace["dJ/dA[x]"].formula.startswith("dJ/dA[x] = dJ/dA[add] (skip) + dJ/dA[lin]·W[lin] (branch)")


def test_torch_data_dependent_control_flow_refused(torch):
    from torch import nn

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:  # a branch on a tensor's value: no single graph
                return self.lin(x)
            return x

    with pytest.raises(
        UnsupportedError, match=r"cannot trace 'Gate'.*Gate \(test_errors.py:\d+: `if x.sum\(\) > 0:.*torch\.where"
    ):
        explain(Gate().double(), torch.ones(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))


def test_torch_bad_inputs(torch):
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(InputError, match=r"x has dtype int64.*x\.float\(\)"):
        explain(model, torch.ones(4, 3, dtype=torch.long), torch.randn(4, 2))
    with pytest.raises(InputError, match=r"empty batch"):
        explain(model, torch.ones(0, 3), torch.ones(0, 2))
    with pytest.raises(InputError, match=r"1 NaN or infinite"):
        x = torch.ones(4, 3)
        x[1, 2] = float("nan")
        explain(model, x, torch.randn(4, 2))
    with pytest.raises(InputError, match=r"one target per sample, along x.s first axis \(the batch\): x has 4 samples"):
        explain(model, torch.ones(4, 3), torch.randn(5, 2))
    with pytest.raises(InputError, match=r"y looks flattened over x's first two axes \(4 x 3 = 12 targets\)"):
        explain(model, torch.ones(4, 3, dtype=torch.long), torch.randn(12))  # token ids (n, T), targets (n*T,)
    with pytest.raises(InputError, match=r"if x is sequence-first \(T, n, ...\), put the batch first"):
        explain(model, torch.ones(4, 3, 3), torch.randn(3, 2))
    with pytest.raises(InputError, match=r"the same batch \(y\[:4\] if y holds more samples\)\.$"):
        explain(model, torch.ones(4, 3), torch.randn(3, 2))  # tabular x: no layout guess
    with pytest.raises(InputError, match=r"y has shape \(4, 1\).*ŷ has shape \(4, 2\).*check_loss"):
        explain(model, torch.ones(4, 3), torch.randn(4, 1), nn.MSELoss())
    with pytest.raises(InputError, match=r"returned \(4, 2\).*not a scalar"):
        explain(model, torch.ones(4, 3), torch.randn(4, 2), nn.MSELoss(reduction="none"))
    with pytest.raises(InputError, match=r"x must be a numeric array"):
        explain(model, "hello", torch.randn(4, 2))
    with pytest.raises(InputError, match=r"unknown loss name 'msee'"):
        explain(model, torch.ones(4, 3), torch.randn(4, 2), "msee")


def test_integer_targets_fine_for_sparse_ce(torch):
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 4)).double()
    trace = explain(model, torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 3, 1, 2, 0]), nn.CrossEntropyLoss())
    assert trace.ok and "1/n" in trace["dJ/dY_hat"].formula


def test_non_model_objects_refused():
    with pytest.raises(UnsupportedError, match=r"explain needs a torch\.nn\.Module or a Keras model, got 42"):
        explain(42, np.ones((2, 3)), np.ones((2, 1)))


def test_torch_nothing_mutated(torch):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.5), nn.Sequential(nn.Linear(4, 2))).double()
    model.train()
    model[3].eval()  # a mixed state must come back exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    x = torch.randn(6, 3, dtype=torch.float64)
    x_before = x.clone()
    trace = explain(model, x, torch.randn(6, 2, dtype=torch.float64), nn.MSELoss())
    assert trace.ok  # dropout traced at inference (identity)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert model[3][0].weight.grad is None
    assert torch.equal(x, x_before) and not x.requires_grad


def test_torch_layer_without_rule_is_autodiff_only(torch):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2), nn.Tanh()).double()
    trace = explain(
        model, torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64), finite_differences=True
    )
    assert trace.ok
    assert trace.layers[1].has_rule is False and "LayerNorm" in trace.layers[1].reason
    assert trace["A2"].value is None and trace["A2"].autodiff is not None and "autodiff only" in trace["A2"].note
    assert trace["dJ/dW2"].value is None  # LayerNorm's own weight: autodiff only
    assert "framework's A of layer(s) [2]" in trace["Z3"].note
    assert "through layer(s) [2]" in trace["dJ/dW1"].note  # backward borrowed dJ/dA1 from torch
    assert trace["dJ/dW1"].ok and trace["dJ/dW1"].value is not None
    assert trace["dJ/dW3"].fd is not None and trace["dJ/dW3"].fd.ok
    assert trace["dJ/dW1"].fd is None and "finite differences not available" in trace["dJ/dW1"].note


def test_torch_unsupported_conv_config_autodiff_only(torch):
    from torch import nn

    model = nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2), nn.Flatten()).double()
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    trace = explain(model, x, torch.randn(2, 8, dtype=torch.float64))
    assert trace.ok and "dilation" in trace.layers[0].reason


def test_arbitrary_callable_loss(torch):
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 2)).double()
    trace = explain(
        model,
        torch.randn(4, 3, dtype=torch.float64),
        torch.randn(4, 2, dtype=torch.float64),
        lambda p, t: ((p - t) ** 4).mean(),
    )
    assert trace.ok and trace["dJ/dY_hat"].value is None and "autodiff" in trace["dJ/dY_hat"].note
    assert trace["dJ/dW1"].value is not None and "autodiff dJ/dŶ" in trace["dJ/dW1"].note


# ------------------------------------------------------------------------------------------------- keras
def test_keras_branching_is_a_graph_multi_input_refused(keras):
    """Formerly refused ("single chain"); issue #15: a residual functional model is explained as a graph."""
    inp = keras.Input((3,), dtype="float64", name="x")
    a = keras.layers.Dense(3, dtype="float64", name="d")(inp)
    out = keras.layers.Add(dtype="float64", name="add")([inp, a])
    trace = explain(keras.Model(inp, out), np.ones((2, 3)), np.zeros((2, 3)))
    assert trace.ok and trace["dJ/dA[x]"].formula == "dJ/dA[x] = dJ/dA[add] (skip) + dJ/dA[d]·W[d]ᵀ (branch)"
    i1, i2 = keras.Input((3,)), keras.Input((3,))
    two = keras.Model([i1, i2], keras.layers.Concatenate()([i1, i2]))
    with pytest.raises(UnsupportedError, match=r"2 inputs and 1 outputs"):
        explain(two, np.ones((2, 3), "float32"), np.ones((2, 6), "float32"))

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    sub = Sub()
    sub(np.ones((1, 3), "float32"))
    with pytest.raises(UnsupportedError, match=r"subclassed Keras model 'Sub'"):
        explain(sub, np.ones((2, 3), "float32"), np.ones((2, 2), "float32"))


def test_keras_functional_chain_accepted(keras):
    inp = keras.Input((3,), dtype="float64")
    h = keras.layers.Dense(4, activation="tanh", dtype="float64")(inp)
    out = keras.layers.Dense(2, dtype="float64")(h)
    trace = explain(keras.Model(inp, out), np.random.default_rng(0).normal(size=(3, 3)), np.zeros((3, 2)))
    assert trace.ok and len(trace.layers) == 2


def test_keras_non_scalar_loss_and_unbuilt(keras):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(InputError, match=r"returned \(4,\), not a scalar.*MeanSquaredError\(\)"):
        explain(model, np.ones((4, 3), "float32"), np.ones((4, 2), "float32"), keras.losses.mean_squared_error)
    with pytest.raises(InputError, match=r"not built yet"):
        explain(keras.Sequential([keras.layers.Dense(2)]), np.ones((4, 3), "float32"), np.ones((4, 2), "float32"))


def test_keras_nothing_mutated_and_opaque(keras):
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(4, dtype="float64"),
            keras.layers.BatchNormalization(dtype="float64"),
            keras.layers.Dropout(0.5, dtype="float64"),
            keras.layers.Dense(2, activation="sigmoid", dtype="float64"),
        ]
    )
    before = [w.copy() for w in model.get_weights()]
    trace = explain(
        model,
        np.random.default_rng(0).normal(size=(5, 3)),
        np.random.default_rng(1).uniform(size=(5, 2)),
        keras.losses.BinaryCrossentropy(dtype="float64"),
    )
    assert trace.ok
    assert not trace.layers[1].has_rule and "BatchNormalization" in trace.layers[1].reason
    for a, b in zip(before, model.get_weights(), strict=False):
        np.testing.assert_array_equal(a, b)
    assert any("_keras_logits" in n for n in trace.notes)  # sigmoid + BCE: Keras used the logits


def test_check_loss_needs_framework_for_plain_functions():
    with pytest.raises(InputError, match=r"framework='torch'"):
        check_loss(lambda a, b: 0.0, np.ones((2, 1)), np.ones((2, 1)))
