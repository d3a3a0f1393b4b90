"""Regression tests of explain: partial Keras logits losses, Keras masks, float32 inside float64, id-shape reads."""

from __future__ import annotations

import os

import numpy as np
import pytest

import gradsight
from gradsight import UnsupportedError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# ------------------------------------------------------------------------------------------------ keras helpers
@pytest.fixture
def keras64():
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    old, old_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # a global policy set by another test would override floatx
    yield keras
    keras.config.set_floatx(old)
    keras.config.set_dtype_policy(old_policy)


def _true_bias_grad(keras, model, x, y, loss):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        j = loss(y, model(x))
    return tape.gradient(j, model.layers[-1].bias).numpy()


def _focal(keras):
    return keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=0.3, gamma=1.5)


def _bce_plus_square(keras):
    return lambda yt, yp: keras.ops.mean(keras.losses.binary_crossentropy(yt, yp)) + 0.1 * keras.ops.mean(yp**2)


# ------------------------------------------------------------------ 1. a loss reading _keras_logits for part of J
@pytest.mark.parametrize("make_loss", [_focal, _bce_plus_square], ids=["focal", "bce+square"])
def test_keras_chain_loss_reading_logits_partly(keras64, make_loss):
    keras, L = keras64, keras64.layers
    rs = np.random.RandomState(0)
    keras.utils.set_random_seed(2)
    m = keras.Sequential([keras.Input((4,)), L.Dense(5, activation="tanh"), L.Dense(3, activation="sigmoid")])
    x, y = rs.randn(6, 4), (rs.rand(6, 3) > 0.5).astype("float64")
    loss = make_loss(keras)
    t = gradsight.explain(m, x, y, loss)
    assert t.ok, [f.name for f in t.failures]
    np.testing.assert_allclose(t["dJ/db2"].value, _true_bias_grad(keras, m, x, y, loss), rtol=1e-9, atol=1e-14)
    assert any("_keras_logits" in n and "plain copy" in n for n in t.notes)


def test_keras_graph_loss_reading_logits_partly(keras64):
    keras, L = keras64, keras64.layers
    rs = np.random.RandomState(0)
    keras.utils.set_random_seed(2)
    inp = keras.Input((4,))
    h = L.Dense(5, activation="tanh")(inp)
    m = keras.Model(inp, L.Dense(3, activation="sigmoid", name="out")(L.Add()([h, L.Dense(5)(h)])))
    x, y = rs.randn(6, 4), (rs.rand(6, 3) > 0.5).astype("float64")
    t = gradsight.explain(m, x, y, _focal(keras))
    assert t.tracer == "Keras functional graph"
    assert t.ok, [f.name for f in t.failures]
    assert any("plain copy" in n for n in t.notes)


def test_keras_logits_and_probability_forms_differ_is_noted(keras64):
    """Saturated sigmoid: the probability form clips Ŷ, the logits form does not; J differs and a note says so."""
    keras, L = keras64, keras64.layers
    rs = np.random.RandomState(0)
    keras.utils.set_random_seed(2)
    m = keras.Sequential([keras.Input((4,)), L.Dense(3, activation="sigmoid")])
    m.layers[-1].kernel.assign(np.full((4, 3), 0.0))
    m.layers[-1].bias.assign(np.array([25.0, -25.0, 0.3]))
    x, y = rs.randn(6, 4), (rs.rand(6, 3) > 0.5).astype("float64")
    t = gradsight.explain(m, x, y, _bce_plus_square(keras))
    assert any("The two differ" in n for n in t.notes)


# --------------------------------------------------------------------------------------------------- 2. masks
_IDS = np.array([[3, 5, 0, 0], [2, 0, 7, 1], [4, 4, 4, 0]])


def test_keras_sequential_mask_zero_refused(keras64):
    keras, L = keras64, keras64.layers
    keras.utils.set_random_seed(1)
    m = keras.Sequential(
        [keras.Input((4,), dtype="int32"), L.Embedding(8, 3, mask_zero=True), L.GlobalAveragePooling1D(), L.Dense(2)]
    )
    with pytest.raises(UnsupportedError, match=r"Keras mask.*mask_zero=False"):
        gradsight.explain(m, _IDS, np.random.RandomState(0).randn(3, 2), keras.losses.MeanSquaredError())


def _mha_on_masked_embedding(keras):
    L = keras.layers
    keras.utils.set_random_seed(1)
    inp = keras.Input((4,), dtype="int32")
    e = L.Embedding(8, 4, mask_zero=True)(inp)
    return keras.Model(inp, L.Dense(2)(L.MultiHeadAttention(2, 2)(e, e)))


def test_keras_mask_into_attention_refused(keras64):
    m = _mha_on_masked_embedding(keras64)
    y = np.random.RandomState(0).randn(3, 4, 2)
    with pytest.raises(UnsupportedError, match=r"embedding.*Keras mask"):
        gradsight.explain(m, _IDS, y, keras64.losses.MeanSquaredError())


def test_keras_masking_layer_refused(keras64):
    keras, L = keras64, keras64.layers
    keras.utils.set_random_seed(1)
    inp = keras.Input((4, 3))
    m = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling1D()(L.Masking(0.0)(inp))))
    rs = np.random.RandomState(0)
    x = np.concatenate([rs.randn(3, 2, 3), np.zeros((3, 2, 3))], 1)
    with pytest.raises(UnsupportedError, match=r"masking \(Masking\).*Keras mask"):
        gradsight.explain(m, x, rs.randn(3, 2), keras.losses.MeanSquaredError())


def test_keras_walk_not_reproducing_model_refused(keras64, monkeypatch):
    """The safety net: with the mask check switched off, the walk's J is not the model's, and that is refused."""
    from gradsight.frameworks.keras import _explain, _graph

    monkeypatch.setattr(_explain, "refuse_masks", lambda model: None, raising=False)
    monkeypatch.setattr(_graph, "refuse_masked_tensors", lambda tensors: None, raising=False)
    m = _mha_on_masked_embedding(keras64)
    y = np.random.RandomState(0).randn(3, 4, 2)
    with pytest.raises(UnsupportedError, match=r"does not reproduce the model: J = "):
        gradsight.explain(m, _IDS, y, keras64.losses.MeanSquaredError())


# ----------------------------------------------------------------------------- 3. float32 inside a float64 model
def test_torch_float32_inside_float64_model():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Norm32(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 5)
            self.b = nn.Linear(5, 3)

        def forward(self, x):
            h = self.a(x)
            h32 = h.to(torch.float32)
            h = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
            return self.b(torch.tanh(h))

    torch.manual_seed(0)
    m = Norm32().double()
    t = gradsight.explain(
        m, torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), nn.MSELoss()
    )
    assert t.ok, [(f.name, f.max_rel_err) for f in t.failures]
    assert any("float32" in n and "rtol" in n for n in t.notes)


def test_torch_llama_double_float32_norm():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    c = transformers.LlamaConfig(
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=1,
        intermediate_size=32,
        vocab_size=20,
        max_position_embeddings=8,
        attn_implementation="eager",
    )
    m = transformers.LlamaModel(c).double().eval()
    ids = torch.tensor([[1, 5, 7, 2], [3, 3, 9, 0]])
    t = gradsight.explain(m, ids, torch.randn(2, 4, 16, dtype=torch.float64), torch.nn.MSELoss())
    assert t.ok, len(t.failures)


def test_keras_mha_float64_float32_scale(keras64):
    keras = keras64
    keras.utils.set_random_seed(1)
    rs = np.random.RandomState(0)
    inp = keras.Input((4, 6))
    m = keras.Model(inp, keras.layers.MultiHeadAttention(2, 3)(inp, inp))
    t = gradsight.explain(m, rs.randn(2, 4, 6), rs.randn(2, 4, 6), keras.losses.MeanSquaredError())
    assert t.ok, [f.name for f in t.failures]
    assert any("MultiHeadAttention" in n and "float32" in n for n in t.notes)


# -------------------------------------------------------------------------------------- 4. reading ids' shape
def test_torch_position_ids_from_shape_and_embedding_bag():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class PosEmb(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.p, self.o = nn.Embedding(10, 5), nn.Embedding(6, 5), nn.Linear(5, 2)

        def forward(self, ids):
            return self.o(self.e(ids) + self.p(torch.arange(ids.shape[1]).unsqueeze(0)))

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.o = nn.EmbeddingBag(7, 4, mode="mean"), nn.Linear(4, 2)

        def forward(self, ids):
            return self.o(self.e(ids))

    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 3], [3, 3, 6]])
    t = gradsight.explain(PosEmb().double(), ids, torch.randn(2, 3, 2, dtype=torch.float64), nn.MSELoss())
    assert t.ok
    t = gradsight.explain(Bag().double(), ids, torch.randn(2, 2, dtype=torch.float64), nn.MSELoss())
    assert t.ok


def test_torch_float32_softmax_in_float64_attention_zero_gradient():
    """dJ/d(key bias) is exactly 0 in closed form; float32 softmax leaves ~1e-9 noise in autodiff: not a ✗."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            s = self.q(x) @ self.k(x).transpose(-1, -2) / 2.0
            p = torch.softmax(s, dim=-1, dtype=torch.float32).to(x.dtype)
            return p @ self.v(x)

    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    t = gradsight.explain(Attn().double(), x, y, nn.MSELoss())
    assert t.ok, [(f.name, f.max_rel_err) for f in t.failures]


def test_keras_training_notes_name_what_ran(keras64):
    keras, L = keras64, keras64.layers
    keras.utils.set_random_seed(1)
    rs = np.random.RandomState(0)
    inp = keras.Input((4,))
    h = L.Dense(5)(inp)
    m = keras.Model(inp, L.Dense(2)(L.Add()([L.Dropout(0.5, name="drop")(h), h])))
    t = gradsight.explain(m, rs.randn(5, 4), rs.randn(5, 2), keras.losses.MeanSquaredError(), training=True)
    assert not any("BatchNormalization" in n for n in t.notes)
    assert any("drop ran at inference" in n for n in t.notes)
