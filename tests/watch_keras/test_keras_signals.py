"""The Keras watch's per-step signals (gradsight._schedule's table) and its in-graph anomaly capture.

Every expected value is computed here independently of the watch: weights copied by a callback, gradients from
the test's own tape, the clipping done here in numpy, learning rates from the schedule itself, and the capture
decisions from the framework-free rule (:class:`gradsight._anomaly.Anomalies`) fed with the recorded scalars.
"""

import math
import time

import numpy as np
import pytest

from gradsight import load
from gradsight._anomaly import Anomalies
from gradsight._watch_core import anomaly_values

pytestmark = pytest.mark.keras


@pytest.fixture
def tf(keras):
    import tensorflow

    return tensorflow


@pytest.fixture
def watch(keras):
    from gradsight._watch import watch

    return watch


def data(n, features=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype("float32"), rng.integers(0, classes, size=n)


def dense(keras, optimizer, hidden=16):
    inp = keras.Input((8,), name="x")
    h = keras.layers.Dense(hidden, activation="tanh", name="d1")(inp)
    out = keras.layers.Dense(3, name="head")(h)
    m = keras.Model(inp, out)
    m.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def norm64(a):
    return math.sqrt(float(np.sum(np.square(np.asarray(a, np.float64)))))


def rows(run):
    """``{step: {name: value}}`` from the run's scalar rows (absent stays absent; a stored NaN is NaN)."""
    out = {}
    for step, name, value in run.scalar_rows():
        out.setdefault(step, {})[name] = math.nan if value is None else value
    return out


def host_decisions(run, names, sched):
    """What the framework-free rule decides from the recorded scalars alone: (events, captured steps).

    Fed exactly as every adapter feeds it: :func:`gradsight._watch_core.anomaly_values` of each step's scalars
    (the update norms in the variables' order).
    """
    judge = Anomalies(
        factor=sched.anomaly_factor,
        window=sched.anomaly_window,
        steps=sched.anomaly_steps,
        cooldown=sched.anomaly_cooldown,
    )
    events, captured = [], set()
    for step, sc in sorted(rows(run).items()):
        ordered = {k: v for k, v in sc.items() if not k.startswith("update_norm/")}
        ordered.update((f"update_norm/{n}", sc[f"update_norm/{n}"]) for n in names if f"update_norm/{n}" in sc)
        payload = judge.observe(step, anomaly_values(ordered))
        if payload is not None:
            events.append(payload)
        if payload is not None or judge.capturing(step):
            captured.add(step)
    return events, captured


def same_event(recorded, expected):
    return {k: v for k, v in recorded.items() if k != "kind"} == expected


def weights_callback(keras):
    """A callback that copies the trainable weights (float64) at the start and end of every batch."""

    class Weights(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.begin, self.end = [], []

        def on_train_batch_begin(self, batch, logs=None):
            self.begin.append([v.numpy().astype(np.float64) for v in self.model.trainable_variables])

        def on_train_batch_end(self, batch, logs=None):
            self.end.append([v.numpy().astype(np.float64) for v in self.model.trainable_variables])

    return Weights()


# ---- weight and update norms ------------------------------------------------------------------------------------
def test_weight_and_update_norms_equal_norms_of_independently_copied_weights(keras, watch, tmp_path):
    x, y = data(48)
    m = dense(keras, keras.optimizers.SGD(0.1, momentum=0.9))
    cb = weights_callback(keras)
    with watch(m, path=tmp_path / "w.db", every=3) as w:
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
        run = load(w.path)
        paths = [v.path for v in m.trainable_variables]
        sc = rows(run)
        assert sorted(sc) == list(range(6))
        for s in range(6):
            for p, a, b in zip(paths, cb.begin[s], cb.end[s], strict=True):
                assert math.isclose(sc[s][f"weight_norm/{p}"], norm64(a), rel_tol=1e-6)
                assert math.isclose(sc[s][f"update_norm/{p}"], norm64(b - a), rel_tol=1e-5)
                assert sc[s][f"update_norm/{p}"] > 0
            assert "step_skipped" not in sc[s] and sc[s]["grad_nonfinite"] == 0
        # logged steps: the weight and update summaries are of the same tensors as the per-step norms
        assert run.steps == [0, 3]
        for s in run.steps:
            for p, a, b in zip(paths, cb.begin[s], cb.end[s], strict=True):
                assert math.isclose(run.summary(p, "weight", s).l2, norm64(a), rel_tol=1e-9)
                assert math.isclose(run.summary(p, "update", s).l2, norm64(b - a), rel_tol=1e-5)
        run.close()


def test_steps_read_from_the_device_in_batches_are_all_recorded_at_their_step(keras, watch, tmp_path):
    """With one step per call the host reads the device buffers every few steps (``RING_STEPS``, or sooner for
    large buffer rows), and at the end of each epoch. Over an epoch of 81 steps and one of 10 (neither a multiple
    of the ring) every step must be recorded once at its own number, with weight norms of the weights that step
    started from; the step count must advance at every batch; a scalar the user logs mid-fit must land at its
    step; and a read mid-fit must see every step run so far."""
    from gradsight.frameworks.keras import _watch as kw

    x, y = data(81 * 4)
    m = dense(keras, keras.optimizers.SGD(0.05))
    cb = weights_callback(keras)

    class User(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.current, self.seen_mid_fit = [], None

        def on_train_batch_end(self, batch, logs=None):
            self.current.append(w.current_step)
            w.log(mine=float(len(self.current)))
            if len(self.current) == 70:
                self.seen_mid_fit = w.steps, sorted(rows(load(w.path)))

    user = User()
    with watch(m, path=tmp_path / "ring.db", every=20) as w:
        m.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[cb, user])
        m.fit(x[:40], y[:40], batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[cb, user])
        assert w._ring == kw.RING_STEPS and 81 % w._ring and 91 % w._ring  # the case: a ring that wraps
        run = load(w.path)
        paths = [v.path for v in m.trainable_variables]
        sc = rows(run)
        assert sorted(sc) == list(range(91))
        for s in range(91):
            for p, a in zip(paths, cb.begin[s], strict=True):
                assert math.isclose(sc[s][f"weight_norm/{p}"], norm64(a), rel_tol=1e-6), (s, p)
            assert sc[s]["mine"] == s + 1  # logged after step s closed: at step s, as the count said
            assert "loss" in sc[s] and sc[s]["lr"] == pytest.approx(0.05)
        assert user.current == list(range(1, 92))
        assert run.steps == [0, 20, 40, 60, 80]
        assert user.seen_mid_fit == ([0, 20, 40, 60], list(range(70)))
        run.close()


def test_buffer_rows_follow_the_steps_per_call_and_the_memory_bound(keras):
    from gradsight.frameworks.keras._watch import RING_BYTES, RING_STEPS, _ring_rows

    assert _ring_rows(1, 1000) == RING_STEPS
    assert _ring_rows(1, RING_BYTES // 4) == 4  # large rows: fewer of them
    assert _ring_rows(1, 10 * RING_BYTES) == 1  # one row larger than the bound: read after every step
    assert _ring_rows(8, 1000) == 8  # several steps per call: one row each, read after every call


# ---- gradients before and after the optimizer's clipping --------------------------------------------------------
def clip_numpy(kind, c, grads):
    """The optimizer's clipping, done here in float64 numpy (keras.optimizers.Optimizer._clip_gradients)."""
    if kind == "clipnorm":
        return [g * c / max(norm64(g), c) for g in grads]
    if kind == "global_clipnorm":
        total = math.sqrt(sum(norm64(g) ** 2 for g in grads))
        return [g * c / max(total, c) for g in grads]
    return [np.clip(g, -c, c) for g in grads]


@pytest.mark.parametrize(("kind", "c"), [("clipnorm", 0.5), ("global_clipnorm", 0.5), ("clipvalue", 0.2)])
def test_clipped_gradients_are_what_the_optimizer_receives(keras, tf, watch, tmp_path, kind, c):
    x, y = data(48)
    m = dense(keras, keras.optimizers.SGD(0.05, **{kind: c}))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    class TapeGrads(keras.callbacks.Callback):
        """The gradient of each batch, from the test's own tape on the weights the step starts from."""

        def __init__(self):
            super().__init__()
            self.grads = []

        def on_train_batch_begin(self, batch, logs=None):
            xb, yb = x[batch * 8 : (batch + 1) * 8], y[batch * 8 : (batch + 1) * 8]
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, self.model(xb, training=True))
            g = tape.gradient(loss, self.model.trainable_variables)
            self.grads.append([t.numpy().astype(np.float64) for t in g])

    cb = TapeGrads()
    with watch(m, path=tmp_path / "c.db") as w:
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
        run = load(w.path)
        paths = [v.path for v in m.trainable_variables]
        sc = rows(run)
        clipped_steps, seen = [], set()
        for s, grads in enumerate(cb.grads):
            pre = math.sqrt(sum(norm64(g) ** 2 for g in grads))
            clipped = clip_numpy(kind, c, grads)
            post = math.sqrt(sum(norm64(g) ** 2 for g in clipped))
            bites = {
                "clipnorm": [norm64(g) > c for g in grads],
                "global_clipnorm": [pre > c] * len(grads),
                "clipvalue": [bool(np.any(np.abs(g) > c)) for g in grads],
            }[kind]
            seen.update(bites)
            assert math.isclose(sc[s]["grad_norm_preclip"], pre, rel_tol=1e-5)
            assert math.isclose(sc[s]["grad_norm"], post, rel_tol=1e-5)
            if any(bites):
                clipped_steps.append(s)
                assert sc[s]["grad_norm"] < sc[s]["grad_norm_preclip"]
                assert sc[s]["clip_ratio"] == pytest.approx(post / pre, rel=1e-5)
            else:
                assert sc[s]["grad_norm"] == sc[s]["grad_norm_preclip"] and "clip_ratio" not in sc[s]
            for p, g, gc, bit in zip(paths, grads, clipped, bites, strict=True):
                assert math.isclose(sc[s][f"grad_norm/{p}"], norm64(gc), rel_tol=1e-5)
                if bit:  # this tensor was clipped: its pre-clip norm is recorded too
                    assert sc[s][f"grad_norm/{p}"] < sc[s][f"grad_norm_preclip/{p}"]
                    assert math.isclose(sc[s][f"grad_norm_preclip/{p}"], norm64(g), rel_tol=1e-5)
                else:
                    assert f"grad_norm_preclip/{p}" not in sc[s]
        assert clipped_steps and (kind == "global_clipnorm" or seen == {True, False})  # both cases were seen
        assert run.meta["clipping"] == {"first_step": clipped_steps[0]}
        run.close()


def test_without_clipping_grad_norm_is_the_preclip_norm_and_nothing_else_is_recorded(keras, watch, tmp_path):
    x, y = data(32)
    m = dense(keras, keras.optimizers.SGD(0.05, clipnorm=1e6))  # set, never biting
    with watch(m, path=tmp_path / "n.db") as w:
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        run = load(w.path)
        sc = rows(run)
        assert len(sc) == 4
        for v in sc.values():
            assert v["grad_norm"] == v["grad_norm_preclip"] > 0
            assert not any(k.startswith("grad_norm_preclip/") or k == "clip_ratio" for k in v)
        assert "clipping" not in run.meta
        run.close()


# ---- the learning rate this step's update used -------------------------------------------------------------------
def test_lr_under_a_schedule_is_the_rate_of_this_steps_update(keras, watch, tmp_path):
    x, y = data(80)
    sched = keras.optimizers.schedules.PiecewiseConstantDecay([4], [0.1, 0.01])  # iterations 0..4: 0.1, then 0.01
    m = dense(keras, keras.optimizers.SGD(sched))
    cb = weights_callback(keras)
    with watch(m, path=tmp_path / "lr.db") as w:
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
        sc = rows(load(w.path))
    assert [sc[s]["lr"] for s in range(10)] == pytest.approx([float(sched(s)) for s in range(10)], rel=1e-7)
    assert sc[4]["lr"] == pytest.approx(0.1) and sc[5]["lr"] == pytest.approx(0.01)
    # and it is the rate the update used: plain SGD moves each weight by lr * grad (weights copied by the callback)
    p = m.trainable_variables[0].path
    ratio = [norm64(cb.end[s][0] - cb.begin[s][0]) / sc[s][f"grad_norm/{p}"] for s in (4, 5)]
    assert ratio == pytest.approx([0.1, 0.01], rel=1e-4)


# ---- step_skipped under dynamic loss scaling ------------------------------------------------------------------
def test_a_step_the_loss_scale_optimizer_skipped_has_no_update(keras, watch, tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = data(160)
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**24)
    m = dense(keras, opt)
    cb = weights_callback(keras)
    with watch(m, path=tmp_path / "mp.db") as w:
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
        sc = rows(load(w.path))
    paths = [v.path for v in m.trainable_variables]
    unchanged = [all(np.array_equal(a, b) for a, b in zip(cb.begin[s], cb.end[s], strict=True)) for s in range(20)]
    skipped = [sc[s].get("step_skipped") == 1.0 for s in range(20)]
    assert skipped == unchanged  # exactly the steps whose weights the optimizer left alone
    assert 3 <= sum(skipped) < 20  # some skipped (the scale starts far too high), then training goes on
    for s in range(20):
        has_update = [f"update_norm/{p}" in sc[s] for p in paths]
        assert has_update == [not skipped[s]] * len(paths)
        assert all(f"weight_norm/{p}" in sc[s] for p in paths)
        if skipped[s]:
            assert not math.isfinite(sc[s]["grad_norm"])
    assert int(opt.iterations.numpy()) == 20 - sum(skipped)


# ---- anomaly capture -----------------------------------------------------------------------------------------------
def test_graph_judge_decides_as_the_host_rule_on_random_signals(keras, tf):
    from gradsight.frameworks.keras._summary import GraphAnomalies

    rng = np.random.default_rng(7)
    k, steps = 5, 600
    rule = Anomalies(factor=4.0, window=6, steps=2, cooldown=3)
    graph = GraphAnomalies(Anomalies(factor=4.0, window=6, steps=2, cooldown=3), k)
    observe = tf.function(graph.observe)
    values = rng.lognormal(size=(steps, k))
    values[rng.random((steps, k)) < 0.04] *= 60.0  # jumps
    values[rng.random((steps, k)) < 0.02] = np.nan
    values[rng.random((steps, k)) < 0.01] = np.inf
    values[rng.random((steps, k)) < 0.01] = 0.0
    values[:, 4] = rng.normal(size=steps)  # a signal that goes negative (a loss can): median <= 0 never jumps
    present = rng.random((steps, k)) > 0.1
    reasons = []
    for s in range(steps):
        a = observe(tf.constant(s, tf.int64), tf.constant(values[s]), tf.constant(present[s]))
        payload = rule.observe(s, {f"s{i}": values[s, i] for i in range(k) if present[s, i]})
        assert bool(a["start"]) == (payload is not None), s
        assert bool(a["captured"]) == (payload is not None or rule.capturing(s)), s
        if payload is not None:
            reasons.append(payload["reason"])
            assert f"s{int(a['signal'])}" == payload["signal"]
            assert ("non-finite" if int(a["reason"]) else "jump") == payload["reason"]
            assert int(a["suppressed"]) == payload["suppressed"] and int(a["last"]) == payload["captured"][1]
            v = float(a["value"])
            assert (v if math.isfinite(v) else str(v)) == payload["value"]
            b = float(a["baseline"])
            assert (math.isnan(b) and payload["baseline"] is None) or b == payload["baseline"]
    assert len(reasons) >= 8 and set(reasons) == {"jump", "non-finite"}  # both reasons, many windows


def jump_schedule(keras, at, base, factor):
    class Jump(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return keras.ops.where(keras.ops.greater_equal(step, at), base * factor, base)

        def get_config(self):
            return {}

    return Jump()


def test_lr_times_1000_at_step_57_is_captured_at_step_57(keras, watch, tmp_path):
    x, y = data(64 * 8)
    m = dense(keras, keras.optimizers.SGD(jump_schedule(keras, 57, 0.01, 1000.0)))
    with watch(m, path=tmp_path / "a.db") as w:
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        run = load(w.path)
        sched = w.schedule
        names = [v.path for v in m.trainable_variables]
        events = run.events("anomaly")
        # the update of step 57 is the first with the new rate: its update norms jump at step 57 itself
        assert len(events) == 1, events
        (e,) = events
        assert e["step"] == 57 and e["reason"] == "jump" and e["signal"].startswith("update_norm/")
        assert e["captured"] == [57, 57 + sched.anomaly_steps] and e["value"] > sched.anomaly_factor * e["baseline"]
        assert run.steps == [0, *range(57, 58 + sched.anomaly_steps)]  # every=100 logs step 0 only
        kinds = {(s, i.kind) for s, i, _ in run.summaries(steps=(57, 57 + sched.anomaly_steps))}
        assert kinds == {(s, k) for s in range(57, 58 + sched.anomaly_steps) for k in sched.kinds}
        # the host rule agrees, from the recorded scalars alone
        expected, captured = host_decisions(run, names, sched)
        assert len(expected) == 1 and same_event(e, expected[0])
        assert captured | {0} == set(run.steps)
        run.close()


def test_non_finite_gradients_at_every_step_are_rate_limited(keras, tf, watch, tmp_path):
    x, y = data(300)
    x[:, 3] = np.nan  # every batch: NaN loss and gradients from step 0 on
    m = dense(keras, keras.optimizers.SGD(0.01))
    with tf.GradientTape() as tape:  # step 0's gradients, independently
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y[:1], m(x[:1], training=True))
    bad = [int(np.sum(~np.isfinite(g.numpy()))) for g in tape.gradient(loss, m.trainable_variables)]
    with watch(m, path=tmp_path / "nan.db") as w:
        m.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0)
        run = load(w.path)
        sc0 = rows(run)[0]
        assert sc0["grad_nonfinite"] == sum(bad) > 0
        assert [sc0.get(f"grad_nonfinite/{v.path}", 0) for v in m.trainable_variables] == bad
        sched = w.schedule
        events = run.events("anomaly")
        bound = 1 + math.log2(1 + 300 / sched.anomaly_cooldown)  # gradsight._anomaly's documented bound
        assert 2 <= len(events) <= bound
        assert [e["step"] for e in events] == [0, 26, 72, 158]  # gaps of 20, 40, 80: the anomaly persists
        assert all(e["reason"] == "non-finite" and e["signal"] == "loss" and e["value"] == "nan" for e in events)
        assert [e["suppressed"] for e in events] == [0, 25, 45, 85]  # the window's own steps count too
        expected, captured = host_decisions(run, [v.path for v in m.trainable_variables], sched)
        assert len(expected) == len(events) and all(map(same_event, events, expected))
        assert set(run.steps) == captured | {0, 100, 200}
        run.close()


def test_adam_lr_50_blow_up_is_in_the_weight_norms_and_captured(keras, watch, tmp_path):
    x, y = data(32 * 40)
    m = dense(keras, keras.optimizers.Adam(50.0))
    with watch(m, path=tmp_path / "adam.db") as w:
        m.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        run = load(w.path)
        sc = rows(run)
        kernel = "weight_norm/" + m.get_layer("d1").kernel.path
        assert sc[1][kernel] > 50 * sc[0][kernel]  # the first update blows the weights up
        assert sc[1]["loss"] > 10 * sc[0]["loss"]
        events = run.events("anomaly")
        assert events[0]["step"] == 1 and events[0]["signal"] == "loss"  # the first step with a baseline
        assert set(range(1, 2 + w.schedule.anomaly_steps)) <= set(run.steps)
        expected, captured = host_decisions(run, [v.path for v in m.trainable_variables], w.schedule)
        assert len(expected) == len(events) and all(map(same_event, events, expected))
        assert set(run.steps) == captured | {0}
        run.close()


def test_anomaly_machinery_is_off_for_full_cheap_every_1_and_without_per_step_signals(keras, watch, tmp_path):
    x, y = data(64 * 8)
    settings = ({"preset": "full"}, {"preset": "cheap"}, {"every": 1}, {"anomaly": False}, {"cheap": False})
    for i, kw in enumerate(settings):
        keras.utils.set_random_seed(0)
        m = dense(keras, keras.optimizers.SGD(jump_schedule(keras, 57, 0.01, 1000.0)))
        with watch(m, path=tmp_path / f"off{i}.db", **kw) as w:
            m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
            assert w.events("anomaly") == [], kw
            assert w._graph_anomalies is None
            expected = list(range(64)) if w.schedule.every == 1 else [0] if w.schedule.every else []
            assert w.steps == expected, kw
            sc = rows(w)
            assert len(sc) == 64
            if not w.schedule.cheap:  # loss and lr only; the update summary of step 0 is still there
                assert all(set(v) == {"loss", "lr"} for v in sc.values())
                assert w.summary(m.trainable_variables[0].path, "update", 0).l2 > 0
            else:
                assert sc[57]["lr"] == pytest.approx(10.0) and sc[56]["lr"] == pytest.approx(0.01)


def test_capture_with_steps_per_execution(keras, watch, tmp_path):
    x, y = data(64 * 8)
    m = dense(keras, keras.optimizers.SGD(jump_schedule(keras, 57, 0.01, 1000.0)))
    m.compile(m.optimizer, m.loss, steps_per_execution=4)
    with watch(m, path=tmp_path / "spe.db", every=50) as w:
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        run = load(w.path)
        assert [e["step"] for e in run.events("anomaly")] == [57]
        assert run.steps == [0, 50, *range(57, 63)]
        ups = [run.summary(m.trainable_variables[0].path, "update", s).l2 for s in range(57, 63)]
        assert len(set(ups)) == len(ups)  # each captured step its own slot
        run.close()


def test_capture_under_jit_compile(keras, watch, tmp_path):
    x, y = data(8 * 8)
    m = dense(keras, keras.optimizers.SGD(jump_schedule(keras, 5, 0.01, 1000.0)))
    m.compile(m.optimizer, m.loss, jit_compile=True, steps_per_execution=2)
    with watch(m, path=tmp_path / "xla.db", anomaly_steps=1) as w:
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        run = load(w.path)
        assert [(e["step"], e["signal"][:12]) for e in run.events("anomaly")] == [(5, "update_norm/")]
        assert run.steps == [0, 5, 6]
        ups = [run.summary(m.trainable_variables[0].path, "update", s).l2 for s in (5, 6)]
        assert ups[0] != ups[1] and min(ups) > 0
        run.close()
        # compiled once: a second fit (4 executions) takes milliseconds; it took seconds when the buffer slot,
        # computed from the step variable, was a compile-time constant to XLA (~1.4 s of compiling per execution)
        t = time.perf_counter()
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        assert time.perf_counter() - t < 2.0


def test_tape_loop_records_the_same_signals(keras, tf, tmp_path):
    from gradsight.frameworks.keras._watch import watch_tape

    rng = np.random.default_rng(3)
    W = tf.Variable(rng.normal(size=(4, 2)).astype("float32"), name="W")
    b = tf.Variable(np.zeros(2, "float32"), name="b")
    x = tf.constant(rng.normal(size=(16, 4)).astype("float32"))
    opt = keras.optimizers.SGD(keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.5, 0.05]), clipnorm=0.1)
    with watch_tape(tmp_path / "tape.db", preset="default", every=2) as w:
        seen = []
        for _ in range(4):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(x @ W + b))
            grads = tape.gradient(loss, [W, b])
            before = [W.numpy().astype(np.float64), b.numpy().astype(np.float64)]
            with w.record_step(grads, {"W": W, "b": b}, loss=loss, optimizer=opt):
                opt.apply(grads, [W, b])
            seen.append((before, [g.numpy().astype(np.float64) for g in grads]))
        sc = rows(w)  # the watch's reader: everything recorded so far, committed first
        assert w.steps == [0, 2]
    for s, ((wb, _bb), (gw, gb)) in enumerate(seen):
        assert sc[s]["lr"] == pytest.approx([0.5, 0.5, 0.05, 0.05][s])
        assert sc[s]["weight_norm/W"] == pytest.approx(norm64(wb), rel=1e-6)
        assert sc[s]["grad_norm_preclip"] == pytest.approx(math.hypot(norm64(gw), norm64(gb)), rel=1e-5)
        assert sc[s]["grad_norm/W"] == pytest.approx(min(norm64(gw), 0.1), rel=1e-5)
        assert sc[s]["update_norm/W"] == pytest.approx(sc[s]["lr"] * min(norm64(gw), 0.1), rel=1e-4)


def test_tape_loop_with_a_loss_scale_optimizer_records_skipped_steps(keras, tf, tmp_path):
    from gradsight.frameworks.keras._watch import watch_tape

    rng = np.random.default_rng(4)
    W = tf.Variable(rng.normal(size=(4, 2)).astype("float32"), name="W")
    x = tf.constant(rng.normal(size=(16, 4)).astype("float32"))
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**127)
    with watch_tape(tmp_path / "lso.db", preset="cheap") as w:
        changed, true_norms = [], []
        for _ in range(6):
            with tf.GradientTape(persistent=True) as tape:
                loss = tf.reduce_mean(tf.square(x @ W))
                scaled = opt.scale_loss(loss)  # inf while the scale is near float32's maximum
            grads = tape.gradient(scaled, [W])
            true_norms.append(norm64(tape.gradient(loss, W).numpy()))
            before = W.numpy().copy()
            with w.record_step(grads, {"W": W}, loss=loss, optimizer=opt):
                opt.apply(grads, [W])
            changed.append(not np.array_equal(before, W.numpy()))
        sc = rows(w)
    assert changed[0] is False and changed[-1] is True  # skipped at first, then the scale came down
    for s in range(6):
        assert (sc[s].get("step_skipped") == 1.0) == (not changed[s])
        assert ("update_norm/W" in sc[s]) == changed[s]
        if changed[s]:  # unscaled: the norm of the loss's own gradient, not of the scaled one
            assert sc[s]["grad_norm"] == pytest.approx(true_norms[s], rel=1e-5)
            assert sc[s]["update_norm/W"] == pytest.approx(0.1 * true_norms[s], rel=1e-4)
        else:
            assert not math.isfinite(sc[s]["grad_norm"])


def test_finite_gradients_too_large_for_a_float32_square_sum_have_finite_norms(keras, tf, watch, tmp_path):
    """Regression: gradient entries of ~1e21 are finite in float32 but their float32 sum of squares is not; the
    norms were recorded as Inf (a NaN/Inf step before any value was non-finite)."""
    x, y = data(16)
    m = dense(keras, keras.optimizers.SGD(1e-30))
    m.compile(m.optimizer, loss=lambda yt, yp: 1e21 * keras.losses.sparse_categorical_crossentropy(yt, yp, True))
    batch = tf.constant(x[:8]), tf.constant(y[:8])
    with tf.GradientTape() as tape:
        loss = m.compute_loss(x=batch[0], y=batch[1], y_pred=m(batch[0], training=True))
    grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, m.trainable_variables)]
    assert max(np.abs(g).max() for g in grads) > 1e19  # squares overflow float32
    with watch(m, path=tmp_path / "r.db", every=1) as w:
        m.fit(x[:8], y[:8], batch_size=8, epochs=1, shuffle=False, verbose=0)
        row = rows(load(w.path))[0]
    for v, g in zip(m.trainable_variables, grads, strict=True):
        assert math.isclose(row[f"grad_norm/{v.path}"], norm64(g), rel_tol=1e-5)
    assert math.isclose(row["grad_norm"], math.sqrt(sum(norm64(g) ** 2 for g in grads)), rel_tol=1e-5)
    assert row["grad_nonfinite"] == 0
