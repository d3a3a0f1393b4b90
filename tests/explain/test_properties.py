"""Property tests: every closed-form term matches the framework's autodiff, over random architectures.

Models are built here with each framework's own public API (not gradsight's helpers), so the reference is
independent of the code under test.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradsight.explain import explain

ACTS = [None, "relu", "leaky_relu", "elu", "gelu", "gelu_tanh", "sigmoid", "tanh", "softplus", "silu"]
LOSSES = ["mse", "mae", "bce", "bce_logits", "cce", "cce_logits", "sparse_cce", "sparse_cce_logits"]
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def architectures(draw):
    depth = draw(st.integers(1, 4))
    widths = [draw(st.integers(1, 5)) for _ in range(depth + 1)]
    loss = draw(st.sampled_from(LOSSES))
    acts = [draw(st.sampled_from(ACTS)) for _ in range(depth)]
    if loss in ("cce", "cce_logits", "sparse_cce", "sparse_cce_logits"):
        widths[-1] = max(widths[-1], 2)
    if loss in ("cce", "sparse_cce"):
        acts[-1] = "softmax"
    elif loss == "bce":
        acts[-1] = "sigmoid"
    elif draw(st.booleans()) and widths[-1] > 1 and loss in ("mse", "mae"):
        acts[-1] = "softmax"
    return {
        "widths": widths,
        "acts": acts,
        "bias": draw(st.booleans()),
        "loss": loss,
        "reduction": draw(st.sampled_from(["mean", "sum"])),
        "n": draw(st.integers(1, 5)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _data(arch, dtype):
    rng = np.random.default_rng(arch["seed"])
    w = arch["widths"]
    kernels = [rng.normal(0, 1 / np.sqrt(a), (a, b)) for a, b in itertools.pairwise(w)]
    biases = [rng.normal(0, 0.3, b) if arch["bias"] else None for b in w[1:]]
    x = rng.normal(size=(arch["n"], w[0])).astype(dtype)
    loss = arch["loss"]
    if loss.startswith("sparse"):
        y = rng.integers(0, w[-1], arch["n"])
    elif loss.startswith("cce"):
        y = rng.dirichlet(np.ones(w[-1]), arch["n"]).astype(dtype)
    elif loss.startswith("bce"):
        y = rng.uniform(size=(arch["n"], w[-1])).astype(dtype)
    else:
        y = rng.normal(size=(arch["n"], w[-1])).astype(dtype)
    return kernels, biases, x, y


def _torch_model(arch, dtype):
    import torch
    from torch import nn

    make = {
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(0.1),
        "elu": lambda: nn.ELU(0.7),
        "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "softplus": lambda: nn.Softplus(beta=1.5),
        "silu": nn.SiLU,
        "softmax": lambda: nn.Softmax(dim=-1),
    }
    kernels, biases, x, y = _data(arch, dtype)
    tdtype = getattr(torch, dtype)
    mods = []
    for k, b, act in zip(kernels, biases, arch["acts"], strict=False):
        lin = nn.Linear(*k.shape, bias=b is not None, dtype=tdtype)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(k.T))
            if b is not None:
                lin.bias.copy_(torch.tensor(b))
        mods.append(lin)
        if act is not None:
            mods.append(make[act]())
    red = arch["reduction"]
    loss = {
        "mse": nn.MSELoss(reduction=red),
        "mae": nn.L1Loss(reduction=red),
        "bce": nn.BCELoss(reduction=red),
        "bce_logits": nn.BCEWithLogitsLoss(reduction=red),
        "cce_logits": nn.CrossEntropyLoss(reduction=red),
        "sparse_cce_logits": nn.CrossEntropyLoss(reduction=red),
    }.get(arch["loss"], arch["loss"])
    return nn.Sequential(*mods), torch.tensor(x), torch.tensor(y), loss


def _keras_model(arch, dtype):
    import keras

    A = keras.activations
    kernels, biases, x, y = _data(arch, dtype)
    layers = [keras.Input((arch["widths"][0],), dtype=dtype)]
    for k, b, act in zip(kernels, biases, arch["acts"], strict=False):
        extra = None
        if act == "leaky_relu":  # as a separate layer: grouped into the Dense layer by the explainer
            activation, extra = None, keras.layers.LeakyReLU(negative_slope=0.1, dtype=dtype)
        elif act == "elu":
            activation = functools.partial(A.elu, alpha=0.7)
        elif act == "gelu_tanh":
            activation = functools.partial(A.gelu, approximate=True)
        else:
            activation = act
        layers.append(keras.layers.Dense(k.shape[1], activation=activation, use_bias=b is not None, dtype=dtype))
        if extra is not None:
            layers.append(extra)
    model = keras.Sequential(layers)
    dense = [ly for ly in model.layers if isinstance(ly, keras.layers.Dense)]
    for ly, k, b in zip(dense, kernels, biases, strict=False):
        ly.set_weights([k.astype(dtype)] + ([b.astype(dtype)] if b is not None else []))
    red = "sum" if arch["reduction"] == "sum" else "sum_over_batch_size"
    L = keras.losses
    loss = {
        "mse": L.MeanSquaredError(reduction=red, dtype=dtype),
        "mae": L.MeanAbsoluteError(reduction=red, dtype=dtype),
        "bce": L.BinaryCrossentropy(reduction=red, dtype=dtype),
        "bce_logits": L.BinaryCrossentropy(from_logits=True, reduction=red, dtype=dtype),
        "cce": L.CategoricalCrossentropy(reduction=red, dtype=dtype),
        "cce_logits": L.CategoricalCrossentropy(from_logits=True, reduction=red, dtype=dtype),
        "sparse_cce": L.SparseCategoricalCrossentropy(reduction=red, dtype=dtype),
        "sparse_cce_logits": L.SparseCategoricalCrossentropy(from_logits=True, reduction=red, dtype=dtype),
    }[arch["loss"]]
    return model, x, y, loss


def _check(trace, arch):
    assert trace.ok, "\n".join(str(t) for t in trace.failures) + f"\narch={arch}"
    L = len(arch["widths"]) - 1
    names = set(trace.names)
    for l in range(1, L + 1):
        assert {f"Z{l}", f"S{l}", f"A{l}", f"dJ/dW{l}", f"dJ/dZ{l}", f"dJ/dA{l}"} <= names
        assert (f"dJ/db{l}" in names) == arch["bias"]
    checked = [t for t in trace.terms if t.value is not None and t.autodiff is not None]
    assert len(checked) >= 5 * L


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_random_mlps_torch(torch, dtype):
    @SETTINGS
    @given(architectures())
    def run(arch):
        model, x, y, loss = _torch_model(arch, dtype)
        _check(explain(model, x, y, loss, reduction=arch["reduction"]), arch)

    run()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_random_mlps_keras(keras, dtype):
    @SETTINGS
    @given(architectures())
    def run(arch):
        model, x, y, loss = _keras_model(arch, dtype)
        trace = explain(model, x, y, loss)
        # sparse/cce/bce with sigmoid/softmax output: Keras takes the logits shortcut; dJ/dY_hat then n/a
        _check(trace, arch)

    run()


@pytest.mark.parametrize(
    ("stride", "padding", "kernel"),
    [
        (1, 0, 3),
        (2, 1, 3),
        ((1, 2), (1, 0), (2, 3)),
        (1, "same", 3),
        pytest.param(
            1,
            "same",
            (2, 4),
            # torch itself warns that even kernels with 'same' need a padded copy of the input
            marks=pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
        ),
        (1, "valid", 2),
        (2, 0, 2),
    ],
)
def test_conv2d_torch(torch, stride, padding, kernel):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel, stride=stride, padding=padding),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, bias=False),
        nn.Flatten(),
        nn.Dropout(0.3),
    ).double()
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    y = torch.randn_like(out)
    trace = explain(model, x, y, nn.MSELoss(), finite_differences=True, fd_samples=8)
    assert trace.ok, "\n".join(str(t) for t in trace.failures)
    assert trace["dJ/dW1"].shape == (3, 2) + ((kernel, kernel) if isinstance(kernel, int) else kernel)
    assert trace["dJ/dW1"].fd is not None and trace["dJ/dW1"].fd.ok
    assert "im2col" in trace["Z1"].formula and "col2im" in trace["dJ/dW1"].formula


@pytest.mark.parametrize(
    ("stride", "padding"), [(1, "valid"), (2, "valid"), (1, "same"), (2, "same"), ((2, 1), "same")]
)
def test_conv2d_keras(keras, stride, padding):
    rng = np.random.default_rng(0)
    model = keras.Sequential(
        [
            keras.Input((7, 6, 2), dtype="float64"),
            keras.layers.Conv2D(3, 3, strides=stride, padding=padding, activation="relu", dtype="float64"),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(2, activation="softmax", dtype="float64"),
        ]
    )
    x = rng.normal(size=(2, 7, 6, 2))
    y = np.array([0, 1])
    trace = explain(model, x, y, keras.losses.SparseCategoricalCrossentropy(dtype="float64"))
    assert trace.ok, "\n".join(str(t) for t in trace.failures)
    assert trace["dJ/dW1"].shape == (3, 3, 2, 3)
    assert trace["S3"].shape == (2, 2, 2)  # softmax: full per-sample Jacobian


def test_softmax_jacobian_values(torch):
    from torch import nn

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=-1)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    trace = explain(model, x, torch.rand(5, 4, dtype=torch.float64), "mse")
    s = trace["S1"].autodiff
    a = trace["A1"].autodiff
    naive = np.stack([np.diag(ai) - np.outer(ai, ai) for ai in a])
    np.testing.assert_allclose(s, naive, atol=1e-15)
    assert trace.ok


def test_float32_tolerance_is_documented(torch):
    from gradsight._tolerance import tolerance_for

    trace = explain(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.randn(4, 3), torch.randn(4, 2))
    assert trace.dtype == "float32" and trace.ok
    t = trace["dJ/dW1"]
    tol = tolerance_for("float32")
    assert t.max_abs_err <= tol.atol + tol.rtol * np.abs(t.value).max()
