"""Keras fixes: output gradients under the logits shortcut, record_step's checks, a second callback, loss frameworks."""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradsight
from gradsight import InputError, WatchError, load
from gradsight._watch import watch
from gradsight.diagnose import GradsightWarning
from gradsight.frameworks.keras._watch import GradsightKerasCallback, watch_tape
from gradsight.summary import summarize

pytestmark = pytest.mark.keras

L = keras.layers


# ---- 1. output gradients of a softmax/sigmoid output read through its cached logits ------------------------------
def _heads(rng):
    n = 16
    return {
        "softmax-dense": ([L.Dense(4, activation="softmax", name="probs")], "sparse_categorical_crossentropy",
                          rng.integers(0, 4, n)),
        "softmax-layer": ([L.Dense(4, name="logits"), L.Activation("softmax", name="probs")],
                          "categorical_crossentropy", np.eye(4, dtype="float32")[rng.integers(0, 4, n)]),
        "sigmoid-dense": ([L.Dense(1, activation="sigmoid", name="probs")], "binary_crossentropy",
                          rng.integers(0, 2, (n, 1)).astype("float32")),
    }  # fmt: skip


@pytest.mark.parametrize("head", ["softmax-dense", "softmax-layer", "sigmoid-dense"])
@pytest.mark.parametrize("with_input", [True, False], ids=["tap-model", "layer-loop"])
def test_output_read_through_its_logits_has_no_output_grad_instead_of_zeros(tmp_path, rng, head, with_input):
    """Keras' cross-entropies (from_logits=False) read the logits a softmax/sigmoid caches on its output, so the tape
    has no gradient for the output itself: it is not recorded (a note and a warning say why), never as zeros."""
    layers, loss, y = _heads(rng)[head]
    x = rng.normal(size=(16, 10)).astype("float32")
    m = keras.Sequential(
        [*([keras.Input((10,))] if with_input else []), L.Dense(8, activation="relu", name="h"), *layers]
    )
    m.compile(keras.optimizers.SGD(0.1), loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with watch(m, path=tmp_path / "r.db", preset="full"):
            m.fit(x, y, batch_size=8, epochs=1, verbose=0)
            m.fit(x, y, batch_size=8, epochs=1, verbose=0)  # a second fit: warned once
    ours = [w for w in caught if issubclass(w.category, GradsightWarning) and "'probs'" in str(w.message)]
    assert len(ours) == 1 and "from_logits=True" in str(ours[0].message)
    run = load(tmp_path / "r.db")
    grads = {t.name for t in run.tensors if t.kind == "output_grad"}
    assert "probs" not in grads and "h" in grads
    assert "probs" in {t.name for t in run.tensors if t.kind == "output"}
    assert any("'probs'" in n and "logits" in n for n in run.meta["notes"])
    assert run.steps == list(range(4))
    h = run.summary("h", "output_grad", 3)
    assert h.count == 8 * 8 and h.sum_sq > 0
    if head == "softmax-layer":  # the logits' layer is on the differentiated path: its gradient is recorded
        assert run.summary("logits", "output_grad", 0).sum_sq > 0
    assert not {f.code for f in gradsight.diagnose(tmp_path / "r.db")} & {"no-gradient", "dead-units", "dead-relu"}


def test_output_read_by_the_loss_itself_keeps_its_output_grad(tmp_path, rng):
    """The same softmax output under MSE: the loss reads the output, its gradient is recorded (no note)."""
    x = rng.normal(size=(16, 10)).astype("float32")
    y = np.eye(4, dtype="float32")[rng.integers(0, 4, 16)]
    m = keras.Sequential(
        [keras.Input((10,)), L.Dense(8, activation="relu"), L.Dense(4, activation="softmax", name="p")]
    )
    m.compile(keras.optimizers.SGD(0.1), "mse")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradsightWarning)
        with watch(m, path=tmp_path / "r.db", preset="full"):
            m.fit(x, y, batch_size=16, epochs=1, verbose=0)
    run = load(tmp_path / "r.db")
    s = run.summary("p", "output_grad", 0)
    assert s.count == 64 and s.zeros < 64 and s.sum_sq > 0
    assert not run.meta["notes"]


# ---- 2/3. record_step's checks ------------------------------------------------------------------------------------
@pytest.fixture
def tape_watch(tmp_path):
    with watch_tape(tmp_path / "tape.db", every=1) as rec:
        yield rec


@pytest.fixture
def variables():
    return [tf.Variable(tf.ones((3, 2)), name="W"), tf.Variable(tf.zeros(2), name="b")]


FIT_W = r"gradient 0 does not fit variable 0 \('W', shape \[3, 2\]\): got shape"
FIT_B = r"gradient 1 does not fit variable 1 \('b', shape \[2\]\): got shape \[9\]"


@pytest.mark.parametrize(
    ("grads", "match"),
    [
        (lambda: [tf.ones((2, 2)), tf.ones(2)], FIT_W + r" \[2, 2\]"),
        (lambda: [tf.ones((5, 7)), tf.ones(2)], FIT_W + r" \[5, 7\]"),
        (lambda: [tf.ones((3, 2)), tf.ones(9)], FIT_B),
        (lambda: [np.ones((3, 2, 1)), None], FIT_W + r" \[3, 2, 1\]"),
    ],
)
def test_record_step_refuses_a_gradient_of_another_shape(tape_watch, variables, grads, match):
    with pytest.raises(InputError, match=match):
        tape_watch.record_step(grads(), variables)
    tape_watch.flush()
    assert load(tape_watch.path).steps == []  # nothing recorded, the step count unchanged
    with tape_watch.record_step([tf.ones((3, 2)), None], variables) as rec:
        pass
    assert rec.step == 0


def test_record_step_takes_an_embeddings_indexed_slices_gradient_and_checks_it(tape_watch):
    emb = tf.Variable(tf.ones((10, 4)), name="emb")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(emb, [1, 3, 3]))
    (g,) = tape.gradient(loss, [emb])
    assert isinstance(g, tf.IndexedSlices)
    with tape_watch.record_step([g], [emb], loss=loss):
        pass
    tape_watch.flush()
    assert load(tape_watch.path).summary("emb", "grad", 0).approx_equal(summarize(tf.convert_to_tensor(g).numpy()))
    bad = tf.IndexedSlices(tf.ones((2, 5)), tf.constant([1, 3]), tf.constant([10, 5]))
    with pytest.raises(InputError, match=r"gradient 0 does not fit variable 0 \('emb', shape \[10, 4\]\): got shape"):
        tape_watch.record_step([bad], [emb])


def test_record_step_argument_checks_are_input_errors(tape_watch, variables):
    torch = pytest.importorskip("torch")
    good = [tf.ones((3, 2)), tf.ones(2)]
    model = keras.Sequential([keras.Input((2,)), L.Dense(2)], name="mlp")
    step = tape_watch.record_step
    cases = [
        (lambda: step(None, variables), r"gradients must be a list .*got None"),
        (lambda: step(tf.ones((3, 2)), variables), r"gradients must be a list .*EagerTensor of shape"),
        (lambda: step(good, variables, loss="x"), r"loss must be a number or a scalar tensor, got str 'x'"),
        (lambda: step(good, variables, loss=[1.0, 2.0]), r"loss must be a number .*got list"),
        (lambda: step(good, variables, lr="fast"), r"lr must be a number"),
        (lambda: step(good, model), r"variables must be a list .*Keras Sequential \('mlp'\).*trainable_variables"),
        (lambda: step(good, list(torch.nn.Linear(2, 3).parameters())), r"must be a tf.Variable .*PyTorch Parameter"),
        (lambda: step([torch.ones(3, 2), torch.ones(2)], variables), r"gradient 0 .*PyTorch Tensor"),
        (lambda: step(good, [np.ones((3, 2)), np.ones(2)]), r"must be a tf.Variable or keras.Variable, got ndarray"),
    ]
    for call, match in cases:
        with pytest.raises(InputError, match=match):
            call()
    with tape_watch.record_step(good, variables, loss=np.float32(1.5), lr=tf.constant(0.1)) as rec:
        pass
    assert rec.step == 0  # the refused calls took no step number
    with tape_watch.record_step([tf.ones((2, 2)), tf.ones(2)], model.trainable_variables):
        pass
    tape_watch.flush()
    assert load(tape_watch.path).steps == [0, 1]


# ---- 4. a second fit with a fresh GradsightKerasCallback ------------------------------------------------------------
def _mlp():
    m = keras.Sequential([keras.Input((4,)), L.Dense(8, activation="relu"), L.Dense(2)])
    m.compile(keras.optimizers.SGD(0.05), "mse")
    return m


def test_a_new_callback_on_the_same_model_closes_the_earlier_one(tmp_path, rng):
    x, y = rng.random((32, 4)).astype("float32"), rng.random((32, 2)).astype("float32")
    m = _mlp()
    first = GradsightKerasCallback(tmp_path / "a.db", every=1)
    m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[first])
    m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[first])  # the same callback: appends
    assert load(tmp_path / "a.db").steps == list(range(8))
    assert os.path.exists(f"{tmp_path / 'a.db'}-lock")  # open between fits, as documented
    with pytest.raises(
        WatchError, match=r"already watched by a GradsightKerasCallback, recording to .*a\.db.*close\(\)"
    ):
        watch(m, path=tmp_path / "w.db")
    handover = pytest.warns(
        GradsightWarning, match=r"new GradsightKerasCallback .*earlier one's run .*a\.db.* is closed"
    )
    with handover, GradsightKerasCallback(tmp_path / "b.db", every=1) as second:
        m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[second])
    assert first.watch.closed and not os.path.exists(f"{tmp_path / 'a.db'}-lock")
    assert load(tmp_path / "a.db").steps == list(range(8))
    assert load(tmp_path / "b.db").steps == list(range(4))
    with pytest.raises(WatchError, match=r"this GradsightKerasCallback is closed .*a\.db.*if_exists='append'"):
        m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[first])
    # a watch of the user's own is not closed by a callback
    with watch(m, path=tmp_path / "c.db") as w, pytest.raises(WatchError, match=r"already watched"):
        m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[GradsightKerasCallback(tmp_path / "d.db")])
    assert w.closed


# ---- 5. a loss of the other framework ----------------------------------------------------------------------------
def test_a_loss_of_the_other_framework_is_named_as_such():
    torch = pytest.importorskip("torch")
    y = np.random.default_rng(0).random((4, 2)).astype("float32")
    with pytest.raises(InputError, match=r"MSELoss is a PyTorch loss, but Keras would evaluate it.*Fix: pass a Keras"):
        gradsight.check_loss(torch.nn.MSELoss(), y, y, framework="tensorflow")
    with pytest.raises(InputError, match=r"is a Keras loss, but PyTorch would evaluate it.*nn.MSELoss\(\)"):
        gradsight.check_loss(keras.losses.MeanSquaredError(), y, y, framework="torch")
    km = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    with pytest.raises(InputError, match=r"explain on a Keras model: the loss MSELoss is a PyTorch loss"):
        gradsight.explain(km, y[:, :1].repeat(3, 1), y, torch.nn.MSELoss())
    for bad in (None, 3):
        with pytest.raises(InputError, match=r"loss must be a loss object or function .*got"):
            gradsight.check_loss(bad, y, y)
    assert gradsight.check_loss("mse", y, y, framework="torch").framework == "torch"  # names still pass
