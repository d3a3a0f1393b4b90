"""Explain never returns a silently wrong result and never lets a raw framework traceback through.

Each case either checks the exact right result against a reference written here (a plain backward, the model's
own loss in float64) or pins the gradsight error class and the key words of its message.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gradsight import InputError, UnsupportedError
from gradsight.explain import check_loss, depth_sweep, explain, jacobian_vs_gradient

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# ------------------------------------------------------------------------------------------ shared modules
def test_torch_shared_module_sums_per_use_gradients(torch):
    from torch import nn

    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    trace = explain(model, x, y, nn.MSELoss(), finite_differences=True)
    # reference: the model's own loss and a plain backward, in float64
    loss = nn.MSELoss()(model(x), y)
    loss.backward()
    assert trace.ok and len(trace.layers) == 3
    assert trace["J"].value == pytest.approx(float(loss.detach()), abs=1e-14)
    np.testing.assert_allclose(trace["dJ/dW[0]"].value, lin.weight.grad.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(trace["dJ/db[0]"].value, lin.bias.grad.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(trace["dJ/dW1"].value + trace["dJ/dW2"].value, lin.weight.grad.numpy(), atol=1e-14)
    # per-use terms are checked (autodiff through each call alone, and finite differences at that use only)
    for name in ("dJ/dW1", "dJ/dW2"):
        assert trace[name].mark == "✓" and trace[name].fd.ok and "one use of module '0'" in trace[name].note
    assert "dJ/dW1 + dJ/dW2" in trace["dJ/dW[0]"].formula
    assert any("shares W and b with layer(s) [2]" in r for r in trace.layers[0].remarks)


def test_keras_shared_layer_sums_per_use_gradients(keras):
    import tensorflow as tf

    d = keras.layers.Dense(3, activation="tanh", dtype="float64")
    model = keras.Sequential([keras.Input((3,), dtype="float64"), d, d, keras.layers.Dense(2, dtype="float64")])
    x = np.random.default_rng(0).normal(size=(4, 3))
    y = np.random.default_rng(1).normal(size=(4, 2))
    loss = keras.losses.MeanSquaredError(dtype="float64")
    trace = explain(model, x, y, loss)
    with tf.GradientTape() as tape:
        j = loss(y, model(x))
    gk = tape.gradient(j, d.kernel)
    assert trace.ok
    assert trace["J"].value == pytest.approx(float(j), abs=1e-14)
    np.testing.assert_allclose(trace[f"dJ/dW[{d.name}]"].value, gk.numpy(), rtol=1e-12, atol=1e-14)


def test_keras_functional_layer_called_twice_is_a_graph_with_the_shared_gradient_summed(keras):
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    inp = keras.Input((3,), dtype="float64")
    d = keras.layers.Dense(3, dtype="float64", name="d")
    model = keras.Model(inp, keras.layers.Dense(2, dtype="float64")(d(d(inp))))
    x, y = np.random.default_rng(0).normal(size=(2, 3)), np.ones((2, 2))
    trace = explain(model, x, y, keras.losses.MeanSquaredError())
    with tf.GradientTape() as tape:
        j = tf.reduce_mean(tf.square(model(x) - y))  # in float64 (a Keras loss object would compute in float32)
    (g,) = tape.gradient(j, [d.kernel])
    assert trace.ok
    np.testing.assert_allclose(trace["dJ/dW[d]"].value, g.numpy(), rtol=1e-10, atol=1e-12)
    assert "d#2" in trace["dJ/dW[d]"].formula  # the sum over both uses is written out


# ------------------------------------------------------------------------------------------------ frozen
def test_torch_frozen_layer_checked_and_flags_restored(torch):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    model[0].requires_grad_(False)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    trace = explain(model, x, y, nn.MSELoss())
    ref = model[0].weight.detach().clone().requires_grad_(True)
    j = nn.MSELoss()(model[2](torch.relu(x @ ref.T + model[0].bias)), y)
    (g,) = torch.autograd.grad(j, ref)
    assert trace.ok and trace["dJ/dW1"].mark == "✓"
    np.testing.assert_allclose(trace["dJ/dW1"].value, g.numpy(), rtol=1e-12, atol=1e-14)
    assert "frozen" in trace["dJ/dW1"].note and any("frozen" in r for r in trace.layers[0].remarks)
    assert not model[0].weight.requires_grad and not model[0].bias.requires_grad
    assert model[2].weight.requires_grad and model[0].weight.grad is None


def test_keras_frozen_layer_checked(keras):
    model = keras.Sequential(
        [keras.Input((3,), dtype="float64"), keras.layers.Dense(4, "tanh", dtype="float64"), keras.layers.Dense(2)]
    )
    model.layers[0].trainable = False
    trace = explain(model, np.ones((3, 3)), np.zeros((3, 2)), "mse")
    assert trace.ok and trace["dJ/dW1"].mark == "✓" and "frozen" in trace["dJ/dW1"].note
    assert model.layers[0].trainable is False


# ------------------------------------------------------------------------------------------ size guards
def test_torch_wide_softmax_without_jacobians(torch):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 20000), nn.Softmax(dim=-1)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.rand(4, 20000, dtype=torch.float64)
    trace = explain(model, x, y, nn.MSELoss())
    assert trace.ok and trace["S1"].shape == (4, 20000) and "probe" in trace["S1"].layout
    z = x.requires_grad_(False) @ model[0].weight.detach().T + model[0].bias.detach()
    s = torch.softmax(z, -1)
    g = 2 * (s - y) / s.numel()
    np.testing.assert_allclose(trace["dJ/dZ1"].value, (s * (g - (g * s).sum(-1, keepdim=True))).numpy(), atol=1e-18)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0, 5), {}, r"widths must be one positive width.*got 0"),
        ((3, 0), {}, r"depths must be a positive depth.*got 0"),
        ((-2, 3), {}, r"positive.*got -2"),
        ((10**6, 3), {}, r"GB of float64 arrays.*limit"),
        ((3, 2000), {}, r"above the limit of 1000"),
        ((3, 2), {"n": 0}, r"n \(the batch size\) must be a positive integer"),
        ((3, 2), {"init": "zeros"}, r"init must be one of"),
    ],
)
def test_depth_sweep_bad_sizes(args, kwargs, match):
    with pytest.raises(InputError, match=match):
        depth_sweep(*args, **kwargs)


def test_jacobian_vs_gradient_guards(torch):
    with pytest.raises(InputError, match=r"full Jacobian.*would take.*limit"):
        jacobian_vs_gradient(torch.sin, np.ones((3000, 3)), framework="torch")
    with pytest.raises(InputError, match=r"non-empty array of finite numbers"):
        jacobian_vs_gradient(torch.sin, np.array([[np.nan, 1.0]]), framework="torch")
    with pytest.raises(InputError, match=r"target_fn 'boom' failed on a float64 tensor of shape \(2, 2\)"):

        def boom(t):
            raise RuntimeError("nope")

        jacobian_vs_gradient(boom, np.ones((2, 2)), framework="torch")


# ------------------------------------------------------------------------------------------- bad inputs
def test_torch_loss_class_refused(torch):
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(InputError, match=r"class 'MSELoss'.*pass an instance: nn\.MSELoss\(\)"):
        explain(model, torch.ones(2, 3), torch.ones(2, 2), nn.MSELoss)
    with pytest.raises(InputError, match=r"pass an instance: nn\.MSELoss\(\)"):
        check_loss(nn.MSELoss, np.ones((2, 2)), np.ones((2, 2)))


def test_keras_loss_class_refused(keras):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(InputError, match=r"pass an instance: keras\.losses\.MeanSquaredError\(\)"):
        explain(model, np.ones((2, 3), "float32"), np.ones((2, 2), "float32"), keras.losses.MeanSquaredError)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_low_precision_explained_on_float64_copy(torch, dtype):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(getattr(torch, dtype))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    trace = explain(model, x, y, nn.MSELoss())
    ref = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    j = nn.MSELoss()(ref(x.to(getattr(torch, dtype)).double()), y.to(getattr(torch, dtype)).double())
    j.backward()
    assert trace.ok and trace.dtype == "float64" and trace.model_dtype == dtype
    assert trace["J"].value == pytest.approx(float(j.detach()), rel=1e-12)
    np.testing.assert_allclose(trace["dJ/dW1"].value, ref[0].weight.grad.numpy(), rtol=1e-10, atol=1e-14)
    assert any(f"model is {dtype}" in n for n in trace.notes)
    assert next(model.parameters()).dtype == getattr(torch, dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_keras_low_precision_uses_dtype_tolerance(keras, dtype):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, dtype=dtype)])
    trace = explain(model, np.ones((3, 3)), np.zeros((3, 2)), "mse")
    assert trace.ok and trace.dtype == dtype and any("tolerance" in n for n in trace.notes)


def test_torch_wrong_feature_count(torch):
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(InputError, match=r"layer 1 .*expects inputs with 3 features.*shape \(4, 5\)"):
        explain(model, torch.ones(4, 5), torch.ones(4, 2))


def test_keras_wrong_feature_count(keras):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(InputError, match=r"layer 1 .*expects inputs with 3 features.*shape \(4, 5\)"):
        explain(model, np.ones((4, 5), "float32"), np.ones((4, 2), "float32"))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_torch_under_no_grad_and_inference_mode(torch, mode):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with getattr(torch, mode)():
        trace = explain(model, x, y, nn.MSELoss())
    expected = 2 / 8 * (x @ model[0].weight.detach().T + model[0].bias.detach() - y)
    assert trace.ok
    np.testing.assert_allclose(trace["dJ/dW1"].value, (expected.T @ x).numpy(), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.keras
def test_keras_on_torch_backend_refused():
    pytest.importorskip("tensorflow")
    pytest.importorskip("torch")
    code = textwrap.dedent(
        """
        import numpy as np, keras
        from gradsight import UnsupportedError
        from gradsight.explain import explain
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        try:
            explain(m, np.ones((2, 3), "float32"), np.ones((2, 2), "float32"))
        except UnsupportedError as e:
            print("REFUSED:", e)
        """
    )
    env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "REFUSED:" in out.stdout, out.stderr[-2000:]
    assert "'torch' backend" in out.stdout and "KERAS_BACKEND=tensorflow" in out.stdout


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.ones((4, 3), np.int64), np.ones((4, 2)), r"x has dtype int64.*x\.float\(\)"),
        (np.full((4, 3), np.nan), np.ones((4, 2)), r"12 NaN or infinite values \(in samples \[0, 1, 2, 3\]\).*Fix"),
        (np.ones((4, 3)), np.full((4, 2), np.inf), r"y contains 8 NaN or infinite.*Fix"),
        (np.ones((0, 3)), np.ones((0, 2)), r"empty batch.*Fix"),
        (np.ones((4, 3)), np.ones((4, 3)), r"y has shape \(4, 3\) but the model's output ŷ has shape \(4, 2\)"),
        (
            np.ones((4, 3)),
            np.ones((5, 2)),
            r"one target per sample, along x.s first axis \(the batch\): x has 4 samples",
        ),
    ],
)
def test_torch_bad_batches(torch, x, y, match):
    from torch import nn

    with pytest.raises(InputError, match=match):
        explain(nn.Sequential(nn.Linear(3, 2)), x, y, nn.MSELoss())


def test_torch_sparse_targets_wrong_shape(torch):
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 4))
    # (integer y with more than one column could be K-dimensional targets, which torch accepts for (N, C, d1, ...)
    # logits: explain hands it to the loss itself, and says what the loss made of it)
    with pytest.raises(InputError, match=r"failed on ŷ of shape \(4, 4\).*y of shape \(4, 2\).*class indices"):
        explain(model, torch.ones(4, 3), torch.zeros(4, 2, dtype=torch.long), nn.CrossEntropyLoss())


def test_torch_class_numbers_as_floats_are_named_not_called_a_shape_error(torch):
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 4))
    y = torch.tensor([0.0, 1.0, 3.0, 2.0])
    with pytest.raises(
        InputError, match=r"y holds class numbers as floating point \(torch.float32, shape \(4,\)\).*Pass y.long\(\)"
    ):
        explain(model, torch.ones(4, 3), y, nn.CrossEntropyLoss())
    with pytest.raises(InputError, match="would broadcast them"):  # not class numbers: still the shape error
        explain(model, torch.ones(4, 3), y + 0.5, nn.CrossEntropyLoss())
    trace = explain(model.double(), torch.ones(4, 3, dtype=torch.float64), y.long(), nn.CrossEntropyLoss())
    assert trace.ok


@pytest.mark.parametrize("weighted", [False, True])
def test_torch_a_batch_with_nothing_to_average_is_refused_not_explained_as_nan(torch, weighted):
    """Every target ignored (or weighted 0): torch's mean is 0/0 = NaN; explain said ✗ on NaN terms with warnings."""
    import warnings

    from torch import nn

    model = nn.Sequential(nn.Linear(3, 4))
    if weighted:
        loss, y = nn.CrossEntropyLoss(weight=torch.tensor([0.0, 1.0, 1.0, 1.0])), torch.zeros(4, dtype=torch.long)
        why = "the class weights of its targets sum to 0"
    else:
        loss, y = nn.CrossEntropyLoss(), torch.full((4,), -100)
        why = r"every target equals ignore_index \(-100\)"
    assert torch.isnan(loss(model(torch.ones(4, 3)), y))  # the reference: the framework's own NaN
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no RuntimeWarning from a 0/0 on the way
        with pytest.raises(InputError, match=f"nothing to average: {why}.*at least one target that counts"):
            explain(model, torch.ones(4, 3), y, loss)


def test_torch_dropout_that_is_not_a_dropout_module_runs_at_inference_too(torch):
    """A MultiheadAttention's dropout and F.dropout(x, p, self.training) kept their random masks in training mode:
    explain returned a different J at every call, each marked ✓ (the opaque nodes borrowed torch's values)."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h, _ = self.attn(x, x, x)
            h = nn.functional.dropout(h, 0.5, self.training)
            return self.out(h.mean(1))

    torch.manual_seed(0)
    model = Block().double().train()
    x, y = torch.randn(4, 5, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    model.eval()
    with torch.no_grad():
        reference = float(nn.CrossEntropyLoss()(model(x), y))  # the inference value, deterministic
    model.train()
    values = [explain(model, x, y, nn.CrossEntropyLoss())["J"].value for _ in range(3)]
    assert values == [pytest.approx(reference, abs=1e-14)] * 3
    assert model.training and model.attn.training  # the flags are restored


def test_keras_sequential_with_batchnorm_in_training_mode_is_derived_on_batch_statistics(keras):
    """explain(..., training=True) on a Sequential was silently derived in inference mode (and marked verified)."""
    import tensorflow as tf

    L = keras.layers
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="float64"),
            L.Dense(6, dtype="float64"),
            L.BatchNormalization(dtype="float64"),
            L.Dense(3, dtype="float64"),
        ]
    )
    x = np.random.default_rng(0).normal(size=(6, 5))
    y = np.random.default_rng(1).normal(size=(6, 3))
    loss = keras.losses.MeanSquaredError(dtype="float64")
    before = [v.numpy().copy() for v in model.variables]
    trace = explain(model, x, y, loss, training=True)
    after = [v.numpy().copy() for v in model.variables]
    with tf.GradientTape() as tape:  # the reference, on batch statistics
        j = loss(y, model(x, training=True))
    kernel = model.layers[0].kernel
    g = tape.gradient(j, kernel)
    for a, b in zip(before, after, strict=True):  # explain left the moving statistics as they were
        np.testing.assert_array_equal(a, b)
    assert trace.ok and trace["J"].value == pytest.approx(float(j), abs=1e-13)
    np.testing.assert_allclose(trace[f"dJ/dW[{model.layers[0].name}]"].value, g.numpy(), atol=1e-13)
    assert float(j) != pytest.approx(float(loss(y, model(x, training=False))))  # the two modes differ here


def test_torch_layer_with_parameters_other_than_weight_and_bias_names_each_one(torch):
    """A leaf with (shift, scale, gate) in a Sequential: the chain labelled shift as dJ/dW2, scale as dJ/db2 and
    dropped gate. It now goes to the graph explainer, which names every parameter."""
    from torch import nn

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.shift = nn.Parameter(torch.randn(4, dtype=torch.float64))
            self.scale = nn.Parameter(torch.randn(4, dtype=torch.float64))
            self.gate = nn.Parameter(torch.randn(4, dtype=torch.float64))

        def forward(self, x):
            return (x + self.shift) * self.scale * torch.sigmoid(self.gate)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Gated(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    trace = explain(model, x, y, nn.MSELoss())
    grads = dict(
        zip(
            ("shift", "scale", "gate"),
            torch.autograd.grad(nn.MSELoss()(model(x), y), list(model[1].parameters())),
            strict=True,
        )
    )
    assert trace.ok
    for term, name in (("dJ/dW[1.shift]", "shift"), ("dJ/dW[1]", "scale"), ("dJ/dW[1.gate]", "gate")):
        np.testing.assert_allclose(trace[term].value, grads[name].numpy(), rtol=1e-12, atol=1e-14)


def test_keras_recurrent_layer_in_a_sequential_names_every_variable(keras):
    """A Keras LSTM in a Sequential: the chain labelled its recurrent kernel dJ/db1 and dropped its bias."""
    import tensorflow as tf

    L = keras.layers
    model = keras.Sequential(
        [keras.Input((4, 3), dtype="float64"), L.LSTM(6, dtype="float64"), L.Dense(2, dtype="float64")]
    )
    x = np.random.default_rng(0).normal(size=(5, 4, 3))
    y = np.random.default_rng(1).normal(size=(5, 2))
    loss = keras.losses.MeanSquaredError(dtype="float64")
    trace = explain(model, x, y, loss)
    with tf.GradientTape() as tape:
        j = loss(y, model(x))
    cell = model.layers[0].cell
    g = dict(
        zip(
            ("kernel", "recurrent", "bias"),
            tape.gradient(j, [cell.kernel, cell.recurrent_kernel, cell.bias]),
            strict=True,
        )
    )
    base = f"{model.layers[0].name}.{cell.name}"
    assert trace.ok
    np.testing.assert_allclose(trace[f"dJ/dW[{base}]"].value, g["kernel"].numpy(), atol=1e-13)
    np.testing.assert_allclose(trace[f"dJ/dW[{base}.recurrent_kernel]"].value, g["recurrent"].numpy(), atol=1e-13)
    np.testing.assert_allclose(trace[f"dJ/db[{base}]"].value, g["bias"].numpy(), atol=1e-13)


def test_torch_meta_device_model_is_refused_with_the_fix(torch):
    from torch import nn

    for model in (nn.Sequential(nn.Linear(3, 2)), nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))):
        with pytest.raises(InputError, match=r"on the 'meta' device.*model.to_empty\(device='cpu'\)"):
            explain(model.to("meta"), torch.ones(4, 3), torch.ones(4, 2), nn.MSELoss())


def test_torch_embedding_max_norm_leaves_the_users_weights_as_they_were(torch):
    """Embedding(max_norm=...) renormalises the rows it looks up in place: explain changed the user's weights."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Flatten(), nn.Linear(12, 2)).double()
    before = model[0].weight.detach().clone()
    ids, y = torch.tensor([[1, 2, 3], [5, 0, 1]]), torch.randn(2, 2, dtype=torch.float64)
    trace = explain(model, ids, y, nn.MSELoss())
    assert torch.equal(model[0].weight, before)
    with torch.no_grad():  # the reference: torch's own forward (which renormalises the rows, as explain's did)
        j = nn.MSELoss()(model(ids), y)
    assert trace["J"].value == pytest.approx(float(j), abs=1e-14)
    assert any("max_norm" in n for n in trace.notes)


def test_check_loss_with_float32_class_weights(torch):
    from torch import nn

    loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))  # float32, the usual case
    y_true, y_pred = torch.tensor([0, 1, 2, 1]), torch.randn(4, 3)
    report = check_loss(loss, y_true, y_pred)
    assert report.ok
    reference = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert report.value == pytest.approx(float(reference(y_pred.double(), y_true)), rel=1e-12)
    assert loss.weight.dtype == torch.float32  # the user's loss is left as it was


def test_torch_common_input_mistakes_name_the_real_problem(torch):
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 1)).double()  # logits, not probabilities
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(InputError, match=r"takes probabilities, but the model's output.*nn.BCEWithLogitsLoss"):
        explain(model, x, torch.ones(4, 1, dtype=torch.float64), nn.BCELoss())
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).double()
    ids = torch.tensor([[1, 2, 30], [0, 1, 2]])
    with pytest.raises(InputError, match=r"ids from 0 to 30, and the model's nn.Embedding tables have 10 rows"):
        explain(emb, ids, torch.ones(2, 2, dtype=torch.float64), nn.MSELoss())


def test_torch_opaque_node_fed_an_input_and_tensors_computed_from_it(torch):
    """mha(x, k(x), v(x)): torch's VJP of the attention into x is the total derivative, through k(x) and v(x) too,
    which the explainer also adds along k and v: dJ/dA[x] was counted twice on those paths (marked ✗)."""
    from torch import nn

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=4)
            self.k, self.v, self.o = nn.Linear(8, 6), nn.Linear(8, 4), nn.Linear(8, 3)

        def forward(self, x):
            return self.o(self.m(x, self.k(x), self.v(x))[0].mean(1))

    torch.manual_seed(0)
    model = M().double()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 3, dtype=torch.float64)
    (gx,) = torch.autograd.grad(nn.MSELoss()(model(x), y), x)
    trace = explain(model, x.detach(), y, nn.MSELoss())
    term = trace["dJ/dA[x]"]
    assert term.mark == "✓" and trace.ok
    np.testing.assert_allclose(term.value, gx.numpy(), rtol=1e-12, atol=1e-15)


def test_keras_embedding_with_a_padding_mask_is_refused_for_its_mask(keras):
    """Embedding(mask_zero=True) was refused with 'put a keras.layers.Embedding before it', which it had."""
    inp = keras.Input((6,), dtype="int32")
    e = keras.layers.Embedding(20, 8, mask_zero=True)(inp)
    model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(e)))
    ids = np.array([[3, 4, 5, 0, 0, 0], [1, 2, 0, 0, 0, 0]])
    with pytest.raises(UnsupportedError, match=r"Embedding\(mask_zero=True\) computes a padding mask.*mask_zero=False"):
        explain(model, ids, np.zeros((2, 3)), keras.losses.MeanSquaredError())


def test_torch_opaque_node_fed_several_outputs_of_one_op(torch):
    """q, k, v = qkv(x).chunk(3) fed to an op without a rule: the three share one grad_fn, and the search for
    inputs computed from other inputs escaped as a bare StopIteration."""
    from torch import nn

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.head = nn.Linear(8, 24), nn.Linear(8, 2)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return self.head(torch.addcmul(q, k, v))

    torch.manual_seed(0)
    model = M().double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 2, dtype=torch.float64)
    (gx,) = torch.autograd.grad(nn.MSELoss()(model(x), y), x)
    trace = explain(model, x.detach(), y, nn.MSELoss())
    assert trace.ok
    np.testing.assert_allclose(trace["dJ/dA[x]"].value, gx.numpy(), rtol=1e-12, atol=1e-15)


def test_torch_unsupported_modules(torch):
    from torch import nn

    with pytest.raises(UnsupportedError, match=r"output is a tuple.*nn.LSTM / nn.GRU return \(output, state\)"):
        explain(nn.Sequential(nn.LSTM(3, 2)), torch.ones(4, 3), torch.ones(4, 2))


def test_torch_sequential_subclass_overriding_forward_is_traced_through_its_forward(torch):
    from torch import nn

    class MySeq(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    model = MySeq(nn.Linear(3, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    trace = explain(model, x, y, nn.MSELoss())
    j = nn.MSELoss()(model(x), y)
    (g,) = torch.autograd.grad(j, model[0].weight)
    j = j.detach()
    assert trace.ok and trace["J"].value == pytest.approx(j.item(), rel=1e-12)  # the override's * 2 is in it
    (key,) = [k for k in trace.names if k.startswith("dJ/dW[")]
    np.testing.assert_allclose(trace[key].value, g.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("train", [True, False])
def test_torch_dropout_train_and_eval_mode(torch, train):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    model.train(train)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    trace = explain(model, x, y, nn.MSELoss())
    model.eval()
    j = float(nn.MSELoss()(model(x), y).detach())
    model.train(train)
    assert trace.ok and trace["J"].value == pytest.approx(j, rel=1e-12)
    assert model.training is train and any("dropout" in n for n in trace.notes) is train


def test_list_x_and_callable_loss_match_loss_object(torch):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = [[0.1, 0.2, 0.3], [0.4, -0.5, 0.6]]
    y = np.array([[1.0, 0.0], [0.0, 1.0]])
    t_obj = explain(model, x, y, nn.MSELoss())
    t_fn = explain(model, np.asarray(x), y, lambda p, t: ((p - t) ** 2).mean())
    assert t_obj.ok and t_fn.ok
    np.testing.assert_allclose(t_obj["dJ/dW1"].value, t_fn["dJ/dW1"].value, rtol=1e-12)


@pytest.mark.parametrize(
    ("loss", "reduction", "match"),
    [
        ("mse", "avg", r"reduction must be 'mean' or 'sum', got 'avg'"),
        ("mse", None, r"reduction must be 'mean' or 'sum', got None"),
        ("mean_squared", "mean", r"unknown loss name 'mean_squared'"),
        (42, "mean", r"loss must be a loss object.*got 42"),
    ],
)
def test_bad_loss_arguments(torch, loss, reduction, match):
    from torch import nn

    with pytest.raises(InputError, match=match):
        explain(nn.Sequential(nn.Linear(3, 2)), torch.ones(2, 3), torch.ones(2, 2), loss, reduction=reduction)


def test_reduction_conflicting_with_loss_object(torch):
    from torch import nn

    with pytest.raises(InputError, match=r"reduction='sum' applies only to a loss given by name.*reduction 'mean'"):
        explain(nn.Sequential(nn.Linear(3, 2)), torch.ones(2, 3), torch.ones(2, 2), nn.MSELoss(), reduction="sum")
    with pytest.raises(InputError, match=r"reduction='avg'.*Fix: nn\.MSELoss\(reduction='mean'\)"):
        explain(nn.Sequential(nn.Linear(3, 2)), torch.ones(2, 3), torch.ones(2, 2), nn.MSELoss(reduction="avg"))


def test_check_loss_bad_inputs(torch):
    from torch import nn

    with pytest.raises(InputError, match=r"y_true contains 1 NaN"):
        check_loss(nn.MSELoss(), np.array([[np.nan, 1.0]]), np.ones((1, 2)))
    with pytest.raises(InputError, match=r"y_true must be a non-empty batch"):
        check_loss(nn.MSELoss(), np.ones((0, 2)), np.ones((1, 2)))
    with pytest.raises(InputError, match=r"failed on y_true of shape \(3, 2\).*y_pred of shape \(3, 4\)"):
        check_loss(nn.MSELoss(), np.ones((3, 2)), np.ones((3, 4)))


def test_fd_samples_validated(torch):
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 2))
    for bad, match in ((0, r"positive number"), (1.5, r"positive number"), (10**6, r"limit is 10000")):
        with pytest.raises(InputError, match=match):
            explain(model, torch.ones(2, 3), torch.ones(2, 2), finite_differences=True, fd_samples=bad)


# ------------------------------------------------------------------ what tracing cannot see (torch graphs)
def _graph_case(torch, kind):
    from torch import nn

    class Case(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            if kind == "no-grad":
                with torch.no_grad():
                    t = self.b(x)
                return self.a(x) * t
            if kind == "slice-write":  # symbolic_trace fails on item assignment; torch.export drops the write
                h = self.a(x).clone()
                h[:, 2] = self.b(x)[:, 0] * 2
                return h
            if kind == "hook":
                return self.a(x) + self.b(x)
            h = self.a(x)  # "random": functional dropout with training=True, whatever the mode
            return nn.functional.dropout(h, 0.5, training=True) + self.b(x)

    model = Case().double()
    if kind == "hook":
        model.b.register_forward_hook(lambda module, args, out: out * 2)
    return model


@pytest.mark.parametrize("kind", ["no-grad", "slice-write"])
def test_a_graph_that_does_not_reproduce_the_model_is_refused(torch, kind):
    """Each of these traced to a graph whose J or dJ/dW differs from the model's, and every term was marked ✓."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedError, match="does not reproduce the model"):
        explain(_graph_case(torch, kind), x, y, torch.nn.MSELoss())


def test_a_forward_hook_is_named_where_its_terms_disagree(torch):
    """Autodiff runs the hook, the closed form does not: the ✗ terms get a note that says why."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    trace = explain(_graph_case(torch, "hook"), x, y, torch.nn.MSELoss())
    assert not trace.ok and any("['b'] have forward hooks" in n for n in trace.notes), trace.notes


def test_random_ops_in_forward_are_checked_with_the_same_draws_and_leave_the_rng_alone(torch):
    torch.manual_seed(0)
    model = _graph_case(torch, "random")
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    state = torch.get_rng_state()
    trace = explain(model, x, y, torch.nn.MSELoss())
    assert torch.equal(torch.get_rng_state(), state)
    torch.set_rng_state(state)  # the model's own loss with the draws explain used
    loss = torch.nn.MSELoss()(model(x), y)
    loss.backward()
    assert trace["J"].value == pytest.approx(float(loss.detach()), rel=1e-12)
    np.testing.assert_allclose(trace["dJ/dW[a]"].value, model.a.weight.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("op", ["cat-chunk", "stack-unbind"])
def test_cat_of_a_tuple_valued_node_is_derived(torch, op):
    from torch import nn

    class Case(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)

        def forward(self, x):
            h = self.a(x)
            return torch.cat(h.chunk(3, -1)[::-1], -1) if op == "cat-chunk" else torch.stack(h.unbind(-1), -1)

    torch.manual_seed(0)
    model = Case().double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    trace = explain(model, x, y, nn.MSELoss())
    loss = nn.MSELoss()(model(x), y)
    loss.backward()
    assert trace.ok
    np.testing.assert_allclose(trace["dJ/dW[a]"].value, model.a.weight.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_a_training_mode_branch_is_noted(torch):
    from torch import nn

    class Case(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x)
            return h * 0.5 if self.training else h

    model = Case().double().train()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    trace = explain(model, x, y, nn.MSELoss())
    own = nn.MSELoss()(model(x), y).item()  # the training-mode loss: the branch halves the output
    note = [n for n in trace.notes if "takes its eval branch" in n]
    assert model.training and note and f"the model gives J = {own:.6g}" in note[0], trace.notes
    assert trace["J"].value == pytest.approx(nn.MSELoss()(model.eval()(x), y).item(), rel=1e-12)
    plain = explain(nn.Sequential(nn.Linear(4, 3)).double().train(), x, y, nn.MSELoss())  # same in either mode
    assert not [n for n in plain.notes if "eval branch" in n], plain.notes


@pytest.mark.parametrize("wrapped", [False, True], ids=["sequential", "graph"])
def test_a_layer_subclass_with_its_own_forward_is_not_given_the_layers_rule(torch, wrapped):
    """``class Scaled(nn.Linear)`` returning ``super().forward(x) * 3``: the term named after it is its output."""
    from torch import nn

    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 3.0

    class Wrap(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    net = nn.Sequential(Scaled(4, 5), nn.Tanh(), nn.Linear(5, 2))
    model = (Wrap(net) if wrapped else net).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    trace = explain(model, x, y, nn.MSELoss())
    loss = nn.MSELoss()(model(x), y)
    loss.backward()
    first = "net.0" if wrapped else "0"
    assert trace.ok, [t.name for t in trace.failures]
    assert trace["J"].value == pytest.approx(loss.item(), rel=1e-12)
    np.testing.assert_allclose(trace[f"dJ/dW[{'net.2' if wrapped else '2'}]"].autodiff, net[2].weight.grad.numpy())
    assert any(first in n and "no rule" in n for n in trace.notes), trace.notes


def test_a_loss_of_the_other_framework_and_a_non_bool_flag_are_refused(torch):
    keras = pytest.importorskip("keras")
    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(InputError, match="is a Keras loss, but PyTorch would evaluate it"):
        explain(model, x, y, keras.losses.MeanSquaredError())
    with pytest.raises(InputError, match="finite_differences must be True or False, got 'no'"):
        explain(model, x, y, torch.nn.MSELoss(), finite_differences="no")
