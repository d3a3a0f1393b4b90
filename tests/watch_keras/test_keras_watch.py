"""The Keras watch: in-fit summaries against the numpy reference, and the faults around fit."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradsight
from gradsight import InputError, UnsupportedError, WatchError, load
from gradsight._watch import watch
from gradsight.frameworks.keras._watch import GradsightKerasCallback, watch_tape
from gradsight.store import RunWriter
from gradsight.summary import summarize

pytestmark = pytest.mark.keras

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def functional(hidden=16, lr=0.1, frozen=False):
    inp = keras.Input((8,), name="x")
    h = keras.layers.Dense(hidden, activation="relu", name="d1", trainable=not frozen)(inp)
    h2 = keras.layers.Dense(hidden, activation="tanh", name="d2")(h)
    out = keras.layers.Dense(3, name="head")(h2)
    m = keras.Model(inp, out)
    m.compile(keras.optimizers.SGD(lr, momentum=0.9), LOSS)
    return m


def assert_close(got, ref, rtol=1e-4):
    """In-fit summary vs the numpy reference of independently computed float32 tensors.

    The graph and the test's eager tape may round the last float32 bit differently (other reduction order), so:
    counts exact; min/max/sum/sum_sq within the float32 tolerance of the tensor's scale; histograms may differ
    only by elements that crossed a power of two (at most 2 moved counts).
    """
    for k in ("count", "nan", "posinf", "neginf", "zeros", "positive", "units_total"):
        assert getattr(got, k) == getattr(ref, k), (k, got, ref)
    scale = max(abs(ref.min), abs(ref.max), 1e-30)
    for k, sc in (("min", scale), ("max", scale), ("sum", scale * ref.count), ("sum_sq", scale * scale * ref.count)):
        assert abs(getattr(got, k) - getattr(ref, k)) <= rtol * sc, (k, got, ref)
    assert np.abs(got.hist - ref.hist).sum() <= 2, (got.hist, ref.hist)
    if ref.units_active is not None:
        assert np.array_equal(got.units_active, ref.units_active)


def test_fit_summaries_equal_numpy_reference_on_an_independent_tape(tmp_path, data):
    x, y = data[0][:16], data[1][:16]
    m = functional()
    m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)  # one plain step: momentum is non-zero now
    w0 = [v.numpy().copy() for v in m.trainable_variables]
    paths = [v.path for v in m.trainable_variables]
    # independent reference: call the layers ourselves under our own tape, same batch, same weights
    with tf.GradientTape() as tape:
        h1 = m.get_layer("d1")(x)
        h2 = m.get_layer("d2")(h1)
        out = m.get_layer("head")(h2)
        loss = LOSS(y, out)
    g = tape.gradient(loss, [*m.trainable_variables, h1, h2, out])
    grads, ogs = g[:6], dict(zip(["d1", "d2", "head"], g[6:], strict=True))
    outs = {"d1": h1, "d2": h2, "head": out}

    with watch(m, path=tmp_path / "run.db", preset="full") as w:
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        w1 = [v.numpy() for v in m.trainable_variables]
        run = load(w.path)
        for p, a, gr, b in zip(paths, w0, grads, w1, strict=True):
            # same values: counts, bins, min/max exact; float64 sums to summation-order rounding
            assert run.summary(p, "weight", 0).approx_equal(summarize(a), rtol=1e-12)
            assert_close(run.summary(p, "grad", 0), summarize(gr.numpy()))
            assert_close(run.summary(p, "update", 0), summarize(b - a), rtol=1e-3)
        for name in outs:
            assert_close(run.summary(name, "output", 0), summarize(outs[name].numpy(), unit_axis=-1))
            assert_close(run.summary(name, "output_grad", 0), summarize(ogs[name].numpy(), unit_axis=-1))
        sc = run.scalars
        assert math.isclose(sc.loc[0, "loss"], float(loss), rel_tol=1e-5)
        assert math.isclose(sc.loc[0, "lr"], 0.1, rel_tol=1e-6)
        gn = math.sqrt(sum(float(np.sum(np.square(t.numpy().astype(np.float64)))) for t in grads))
        assert math.isclose(sc.loc[0, "grad_norm"], gn, rel_tol=1e-5)
        assert sc.loc[0, "grad_nonfinite"] == 0
        meta = run.meta
        assert meta["framework"] == "keras" and meta["backend"] == "tensorflow"
        assert {"tensorflow", "keras", "python", "gradsight"} <= set(meta["versions"])
        assert [la["name"] for la in meta["model"]["layers"]][1:] == ["d1", "d2", "head"]
        assert not m.run_eagerly
        run.close()
    assert "train_step" not in vars(m) and "fit" not in vars(m)  # restored


def test_same_columns_as_the_store_defines(tmp_path, data):
    m = functional()
    with watch(m, path=tmp_path / "k.db", every=2) as w:
        m.fit(*data, batch_size=16, epochs=1, verbose=0)
    with RunWriter(tmp_path / "ref.db") as rw:
        tid = rw.tensor_id("0.weight", "0", "weight", (2,), "float32")
        rw.log_summaries(0, [(tid, summarize(np.ones(2, np.float32)))])
    kdf, rdf = load(w.path).to_pandas(units=True), load(tmp_path / "ref.db").to_pandas(units=True)
    assert list(kdf.columns) == list(rdf.columns)
    assert sorted(kdf["step"].unique()) == [0, 2]
    assert set(kdf["kind"]) == {"weight", "grad", "update", "output", "output_grad"}


def test_sequential_deferred_build_and_subclassed(tmp_path, data):
    seq = keras.Sequential([keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)])
    seq.compile("adam", LOSS)
    assert not seq.built
    with watch(seq, path=tmp_path / "s.db", every=1) as w:
        seq.fit(*data, batch_size=32, epochs=1, verbose=0)
        df = w.to_pandas()
    assert set(df["kind"]) == {"weight", "grad", "update", "output", "output_grad"}
    assert sorted(df.loc[df.kind == "output", "tensor"].unique()) == sorted(la.name for la in seq.layers)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.a = keras.layers.Dense(5, activation="relu")
            self.b = keras.layers.Dense(3)

        def call(self, x):
            return self.b(self.a(x))

    sub = Sub()
    sub.compile("sgd", LOSS)
    with watch(sub, path=tmp_path / "sub.db", every=1) as w:
        sub.fit(*data, batch_size=32, epochs=1, verbose=0)
        run = load(w.path)
        assert set(run.to_pandas()["kind"]) == {"weight", "grad", "update"}
        assert "subclassed" in run.meta["notes"][0]
        run.close()


def test_validation_data_and_steps_per_execution(tmp_path, data):
    x, y = data
    m = functional()
    m.compile(keras.optimizers.SGD(0.05), LOSS, steps_per_execution=3)
    with watch(m, path=tmp_path / "spe.db", every=2) as w:
        hist = m.fit(x[:40], y[:40], batch_size=4, epochs=1, validation_data=(x[40:], y[40:]), verbose=0)
        assert "val_loss" in hist.history
        run = load(w.path)
        assert list(run.scalars.index) == list(range(10))  # 10 steps in executions of 3, 3, 3, 1
        assert run.steps == [0, 2, 4, 6, 8]
        ups = [run.summary(m.trainable_variables[0].path, "update", s).l2 for s in run.steps]
        assert all(u > 0 for u in ups) and len(set(ups)) == len(ups)  # each step its own slot
        run.close()


def test_mixed_precision_records_unscaled_gradients(tmp_path, data):
    keras.mixed_precision.set_global_policy("mixed_float16")
    m = functional()
    assert isinstance(m.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = data[0][:16], data[1][:16]
    m.fit(x, y, batch_size=16, epochs=1, verbose=0)  # builds the optimizer
    with tf.GradientTape() as tape:
        loss = LOSS(y, m(x))
    ref = tape.gradient(loss, m.trainable_variables)
    with watch(m, path=tmp_path / "mp.db", every=1) as w:
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        run = load(w.path)
        out = run.to_pandas(kind="output")
        assert set(t.dtype for t in run.tensors if t.kind == "output") == {"float16"}
        assert (out["count"] == 16 * out["tensor"].map({"d1": 16, "d2": 16, "head": 3})).all()
        for v, g in zip(m.trainable_variables, ref, strict=True):
            got = run.summary(v.path, "grad", 0)
            assert math.isclose(got.l2, float(tf.norm(tf.cast(g, tf.float64))), rel_tol=2e-2)
            # the histogram is of the unscaled values too (not shifted by log2(loss_scale))
            top = int(np.flatnonzero(got.hist)[-1])
            assert abs(top - (int(np.floor(np.log2(np.max(np.abs(g.numpy()))))) + 127)) <= 1
        run.close()


def test_nan_gradients_are_counted_not_dropped(tmp_path, data):
    x, y = data[0][:16].copy(), data[1][:16]
    x[3, 2] = np.nan
    m = functional()
    with watch(m, path=tmp_path / "nan.db", every=1) as w:
        m.fit(x, y, batch_size=16, epochs=1, verbose=0)
        run = load(w.path)
        k = run.summary("d1/kernel", "grad", 0)
        assert k.nan > 0 and k.count == 8 * 16
        assert run.scalars.loc[0, "grad_nonfinite"] > 0
        run.close()


def test_ctrl_c_mid_epoch_leaves_a_valid_file(tmp_path, data):
    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:
                raise KeyboardInterrupt

    m = functional()
    w = watch(m, path=tmp_path / "int.db", every=1, commit_every=0.05)
    with pytest.raises(KeyboardInterrupt):
        m.fit(*data, batch_size=4, epochs=1, verbose=0, callbacks=[Interrupt()])
    run = load(tmp_path / "int.db")  # readable while the watch is still open
    assert run.steps == [0, 1, 2, 3]
    run.close()
    w.close()
    assert load(tmp_path / "int.db").steps == [0, 1, 2, 3]


def test_fit_twice_continues_the_step_count(tmp_path, data):
    m = functional()
    with watch(m, path=tmp_path / "twice.db", every=1) as w:
        m.fit(*data, batch_size=32, epochs=1, verbose=0)
        m.fit(*data, batch_size=32, epochs=1, verbose=0)
        assert w.steps == [0, 1, 2, 3]
    # a new watch appending to the same file continues after the stored steps
    with watch(m, path=tmp_path / "twice.db", every=1, if_exists="append") as w:
        m.fit(*data, batch_size=32, epochs=1, verbose=0)
        assert w.steps == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("change", ["freeze", "unfreeze"])
def test_a_layer_frozen_or_unfrozen_between_fits_trains_as_without_the_watch(tmp_path, data, change):
    """Regression: the watched step kept differentiating and updating the variables of the first fit, so a layer
    frozen before the second fit went on training and an unfrozen one never trained."""

    def run(watched):
        keras.utils.set_random_seed(0)
        m = functional(frozen=change == "unfreeze")
        w = watch(m, path=tmp_path / f"{change}.db", every=1) if watched else None
        m.fit(*data, batch_size=32, epochs=1, shuffle=False, verbose=0)  # steps 0, 1
        m.get_layer("d1").trainable = change == "unfreeze"
        m.compile(keras.optimizers.SGD(0.1, momentum=0.9), LOSS)
        m.fit(*data, batch_size=32, epochs=1, shuffle=False, verbose=0)  # steps 2, 3
        weights = [v.numpy() for v in m.weights]
        if w is None:
            return weights, None
        with w:
            df = w.to_pandas()
            scalars = w.scalars
        return weights, (df, scalars)

    plain, _ = run(False)
    watched, (df, scalars) = run(True)
    for a, b in zip(plain, watched, strict=True):
        np.testing.assert_array_equal(a, b)
    grads = df[df.kind == "grad"]
    d1_steps = sorted(set(grads.loc[grads.tensor == "d1/kernel", "step"]))
    assert d1_steps == ([0, 1] if change == "freeze" else [2, 3])
    assert sorted(set(grads.loc[grads.tensor == "head/kernel", "step"])) == [0, 1, 2, 3]
    trained = scalars["update_norm/d1/kernel"].notna()
    assert trained[trained].index.tolist() == d1_steps


def test_a_layer_called_twice_is_not_recorded_from_its_first_call_alone(tmp_path, data):
    """Regression: Keras 3 gives a shared layer's first call as its ``output``, so the run recorded that call's
    outputs and gradients as the layer's, without a note. Such layers are skipped, and the run says so."""
    inp = keras.Input((8,))
    shared = keras.layers.Dense(8, activation="relu", name="shared")
    out = keras.layers.Dense(3, name="head")(shared(keras.layers.Dense(8, name="mid")(shared(inp))))
    m = keras.Model(inp, out)
    m.compile(keras.optimizers.SGD(0.1), LOSS)
    with watch(m, path=tmp_path / "r.db", every=1) as w:
        m.fit(*data, batch_size=32, epochs=1, verbose=0)
        df = w.to_pandas()
        notes = w.meta["notes"]
    recorded = set(df.loc[df.kind == "output", "tensor"])
    assert recorded == {"mid", "head"}
    assert any("called more than once" in n and "'shared'" in n for n in notes)
    assert {"shared/kernel", "shared/bias"} <= set(df.loc[df.kind == "grad", "tensor"])


def test_callback_form_and_non_trainable_layer(tmp_path, data):
    m = functional(frozen=True)
    with GradsightKerasCallback(tmp_path / "cb.db", every=1) as cb:
        m.fit(*data, batch_size=32, epochs=1, verbose=0, callbacks=[cb])
        df = cb.watch.to_pandas()
    assert "d1/kernel" not in set(df.loc[df.kind == "grad", "tensor"])
    assert "d1" in set(df.loc[df.kind == "output", "tensor"])


def test_both_callback_forms_read_the_device_buffer_at_each_epochs_end(tmp_path, data):
    """At the end of an epoch every step run so far has left the device (a crash after it loses none of them), with
    the watch's own callback and with GradsightKerasCallback, whose hooks pass the epoch's end on."""
    seen = {}

    class Probe(keras.callbacks.Callback):  # after the watch's callback: sees what its on_epoch_end did
        def __init__(self, key, get):
            super().__init__()
            self.key, self.get = key, get

        def on_epoch_end(self, epoch, logs=None):
            seen.setdefault(self.key, []).append(self.get()._seen)

    x, y = data[0][:40], data[1][:40]  # 5 steps of 8 per epoch: fewer than the buffer's rows
    m = functional()
    with watch(m, path=tmp_path / "own.db") as w:
        m.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[Probe("own", lambda: w)])
    m = functional()
    with GradsightKerasCallback(tmp_path / "cb.db") as cb:
        m.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb, Probe("cb", lambda: cb.watch)])
    assert seen == {"own": [5, 10], "cb": [5, 10]}


def test_tuple_output_layer_and_jit_compile(tmp_path, data):
    class Split(keras.layers.Layer):
        def call(self, x):
            return x[:, :4], x[:, 4:]

        def compute_output_spec(self, x):
            return (keras.KerasTensor((x.shape[0], 4)), keras.KerasTensor((x.shape[0], 4)))

    inp = keras.Input((8,))
    a, b = Split(name="split")(inp)
    out = keras.layers.Dense(3, name="head")(keras.layers.Concatenate(name="cat")([a, b * 2.0]))
    m = keras.Model(inp, out)
    m.compile("sgd", LOSS, jit_compile=True)
    with watch(m, path=tmp_path / "t.db", every=1) as w:
        m.fit(*data, batch_size=32, epochs=1, verbose=0)
        names = set(w.to_pandas(kind="output")["tensor"])
    assert {"split/0", "split/1", "cat", "head"} <= names


def test_gradient_tape_loop_helper(tmp_path):
    w1 = tf.Variable([[1.0, 0.5, 0.25], [0.75, 0.5, 0.3], [0.9, 0.3, 0.1]])
    w2 = tf.Variable(tf.ones((3, 3)))
    x = tf.ones((7, 3))
    opt = keras.optimizers.SGD(0.1)
    with watch_tape(tmp_path / "tape.db") as rec:
        for _ in range(3):
            with tf.GradientTape() as tape:
                z1 = tf.matmul(x, w1)
                z2 = tf.matmul(tf.nn.relu(z1), w2)
                loss = tf.reduce_mean(z2)
            g1, g2, gz1 = tape.gradient(loss, [w1, w2, z1])
            before = [w1.numpy(), w2.numpy()]
            with rec.record_step(
                [g1, g2],
                {"W1": w1, "W2": w2},
                outputs={"Z1": z1},
                output_grads={"Z1": gz1},
                loss=loss,
                lr=opt.learning_rate,
            ):
                opt.apply([g1, g2], [w1, w2])
        rec.flush()
        run = load(rec.path)
        assert run.steps == [0, 1, 2]
        assert run.summary("W1", "weight", 2).approx_equal(summarize(before[0]), rtol=1e-12)
        assert run.summary("W2", "grad", 2).approx_equal(summarize(g2.numpy()), rtol=1e-12)
        assert run.summary("Z1", "output", 2).approx_equal(summarize(z1.numpy(), unit_axis=-1), rtol=1e-12)
        assert run.summary("Z1", "output_grad", 2).approx_equal(summarize(gz1.numpy(), unit_axis=-1), rtol=1e-12)
        assert_close(run.summary("W1", "update", 2), summarize(w1.numpy() - before[0]))
        assert math.isclose(run.scalars.loc[2, "lr"], 0.1, rel_tol=1e-6)
        with pytest.raises(InputError, match=r"got 1 gradients for 2 variables"):
            rec.record_step([g1], [w1, w2])
        run.close()
    with pytest.raises(WatchError, match=r"is closed"):
        rec.record_step([g1], [w1])


def test_bad_inputs_have_documentary_messages(tmp_path, monkeypatch):
    with pytest.raises(UnsupportedError, match=r"expects a keras.Model, got Dense .*wrap it"):
        watch(keras.layers.Dense(2), path=tmp_path / "a.db")

    class Custom(keras.Model):
        def train_step(self, data):
            return {}

    with pytest.raises(UnsupportedError, match=r"overrides train_step"):
        watch(Custom(), path=tmp_path / "b.db")
    m = functional()
    with pytest.raises(InputError, match=r"every must be a non-negative int .* got -1"):
        watch(m, path=tmp_path / "c.db", every=-1)
    with pytest.raises(InputError, match=r"unknown preset 'fast'"):
        watch(m, path=tmp_path / "c.db", preset="fast")
    with watch(m, path=tmp_path / "d.db"), pytest.raises(WatchError, match=r"already watched"):
        watch(m, path=tmp_path / "e.db")
    with pytest.raises(gradsight.StoreError, match=r"already exists"):
        watch(m, path=tmp_path / "d.db")
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(UnsupportedError, match=r"needs the TensorFlow backend, but Keras runs on 'jax'"):
        watch(m, path=tmp_path / "f.db")


def test_model_without_trainable_weights_is_refused(tmp_path, data):
    m = functional()
    m.trainable = False
    m.compile("sgd", LOSS)
    with watch(m, path=tmp_path / "frozen.db"), pytest.raises(UnsupportedError, match=r"no trainable weights"):
        m.fit(*data, batch_size=32, epochs=1, verbose=0)


@pytest.mark.parametrize(("kind", "value"), [("clipnorm", 0.05), ("global_clipnorm", 0.05), ("clipvalue", 0.01)])
def test_grad_summaries_and_norms_are_of_the_gradient_the_optimizer_applies(tmp_path, kind, value):
    """Regression: the ``grad`` summaries were of the gradients before the optimizer's clipping, while
    ``grad_norm`` (and torch's ``grad``) are after it; and an embedding's gradient, which Keras clips by the norm
    of its ``IndexedSlices`` values (rows of repeated ids not summed), had its clipped norm computed from the
    dense gradient. With SGD at learning rate 1 and no momentum, ``W_before - W_after`` is the applied gradient."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(8, 6)).astype("int32")  # 48 lookups into 5 rows: repeated ids
    y = rng.integers(0, 3, size=8)
    inp = keras.Input((6,), dtype="int32")
    h = keras.layers.Flatten()(keras.layers.Embedding(5, 4, name="emb")(inp))
    out = keras.layers.Dense(3, name="head")(keras.layers.Dense(8, activation="tanh", name="d1")(h))
    m = keras.Model(inp, out)
    m.compile(keras.optimizers.SGD(1.0, **{kind: value}), LOSS)
    names = [v.path for v in m.trainable_variables]
    before = [v.numpy().astype(np.float64) for v in m.trainable_variables]
    with watch(m, path=tmp_path / "r.db", every=1) as w:
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        applied = [b - v.numpy().astype(np.float64) for b, v in zip(before, m.trainable_variables, strict=True)]
        scalars = w.scalars.loc[0]
        for name, g in zip(names, applied, strict=True):
            assert scalars[f"grad_norm/{name}"] == pytest.approx(np.linalg.norm(g), rel=1e-5)
            assert_close(w.summary(name, "grad", 0), summarize(g.astype(np.float32)))
        assert scalars["grad_norm"] == pytest.approx(math.sqrt(sum(np.sum(g * g) for g in applied)), rel=1e-5)
        assert scalars["grad_norm_preclip"] > scalars["grad_norm"] * 1.5  # the rule bit, at every variable here


@pytest.mark.parametrize("with_input", [True, False], ids=["functional", "sequential-without-input"])
def test_channels_first_layers_count_units_along_the_channel_axis(tmp_path, with_input):
    """Regression: units were always counted along the last axis (Keras' default layout), so a dead channel of a
    ``data_format="channels_first"`` convolution was invisible. Its output, a batch normalization over axis 1
    and the activation after them count along axis 1 now; dense layers along the last."""
    layers = [
        keras.layers.Conv2D(4, 3, data_format="channels_first", name="conv"),
        keras.layers.BatchNormalization(axis=1, name="bn"),
        keras.layers.Activation("relu", name="act"),
        keras.layers.Flatten(data_format="channels_first", name="flat"),
        keras.layers.Dense(3, name="head"),
    ]
    m = keras.Sequential(([keras.Input((2, 6, 7))] if with_input else []) + layers)
    m.compile(keras.optimizers.SGD(0.0), LOSS)
    x = np.random.default_rng(0).normal(size=(4, 2, 6, 7)).astype("float32")
    y = np.array([0, 1, 2, 0])
    m.build((None, 2, 6, 7))
    bn = m.get_layer("bn")
    bn.beta.assign(np.array([0.0, 0.0, -100.0, 0.0], "float32"))  # channel 2 is dead after the activation
    with watch(m, path=tmp_path / "r.db", every=1) as w:
        m.fit(x, y, batch_size=4, epochs=1, verbose=0)
        got = {name: w.summary(name, "output", 0) for name in ("conv", "bn", "act", "head")}
    h = x
    ref = {}
    for layer in m.layers:
        h = layer(h, training=True)
        ref[layer.name] = np.asarray(h)
    for name in ("conv", "bn", "act"):
        a = ref[name]
        assert got[name].units_active.tolist() == (a != 0).sum(axis=(0, 2, 3)).tolist(), name
        assert got[name].units_total == a.size // a.shape[1]
    assert got["act"].units_active[2] == 0
    assert got["head"].units_active.tolist() == (ref["head"] != 0).sum(axis=0).tolist()
