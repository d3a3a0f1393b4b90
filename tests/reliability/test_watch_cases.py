"""No silent wrong result, no raw traceback: each way of (mis)using a watch gives the right result or a gradsight
error whose message says what was given, what was expected and the fix.

Results are checked against an independent recomputation in the test (plain forward hooks of the test's own,
numpy on float32 upcasts), never against the watch itself.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import gradsight
from gradsight import GradsightWarning, InputError, StoreError, UnsupportedError, WatchError, load
from gradsight.summary import summarize

torch = pytest.importorskip("torch")
nn = torch.nn


# ---- PyTorch -------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _seed_and_one_thread(torch_seeded_one_thread):
    yield


def mlp(dtype=torch.float32):
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


class Capture:
    """The test's own forward hook on layer ``0``: every output it produced, in order."""

    def __init__(self, module):
        self.outputs = []
        self.handle = module.register_forward_hook(lambda m, i, o: self.outputs.append(o.detach().clone()))


def step(model, opt, x):
    opt.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    return loss


def assert_summary(s, ref):
    assert s.count == ref.count
    np.testing.assert_allclose([s.sum, s.sum_sq, s.min, s.max], [ref.sum, ref.sum_sq, ref.min, ref.max], rtol=1e-6)


# -- 1. forwards without a backward pass are not merged into the step's output statistics ---------------------------
def _validation_with_grad(model, opt, x_val):
    model.eval()
    model(x_val)  # gradients enabled, never backpropagated
    model.train()


def _train_then_backprop_two_forwards(model, opt, x):
    opt.zero_grad()
    a, b = model(x[:2]), model(x[2:])  # two forwards, one backward through both (e.g. a siamese loss)
    (a.square().mean() + b.square().mean()).backward()
    opt.step()


@pytest.mark.parametrize(
    ("pattern", "trained"),
    [
        ("val-before", [1]),
        ("val-after", [0]),
        ("val-between-fwd-and-step", [0]),
        ("eval-backprop", [0]),
        ("two-fwd", [0, 1]),
    ],
)
def test_only_forwards_that_get_a_backward_count(tmp_path, pattern, trained):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cap = Capture(model[0])
    x, x_val = torch.randn(4, 12), torch.randn(100, 12)
    with gradsight.watch(model, path=tmp_path / "r.db", optimizer=opt, every=1) as run:
        step(model, opt, torch.randn(4, 12))  # step 0
        cap.outputs.clear()
        if pattern == "val-before":
            _validation_with_grad(model, opt, x_val)
            step(model, opt, x)
        elif pattern == "val-after":
            step(model, opt, x)
            _validation_with_grad(model, opt, x_val)
            step(model, opt, torch.randn(4, 12))  # step 2
        elif pattern == "val-between-fwd-and-step":
            opt.zero_grad()
            model(x).square().mean().backward()
            _validation_with_grad(model, opt, x_val)
            opt.step()
        elif pattern == "eval-backprop":  # rare but legitimate: an eval-mode forward whose loss is trained on
            model.eval()
            step(model, opt, x)
            model.train()
        else:
            _train_then_backprop_two_forwards(model, opt, x)
        out = run.summary("0", "output", 1)
    expected = torch.cat([cap.outputs[i] for i in trained])
    assert out.count == expected.numel() == 4 * 8  # not 4*8 + 100*8
    assert_summary(out, summarize(expected.numpy()))


def test_gradient_accumulation_micro_batches_all_count(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cap = Capture(model[0])
    with gradsight.watch(model, path=tmp_path / "r.db", optimizer=opt, every=1) as run:
        for _ in range(3):
            model(torch.randn(4, 12)).square().mean().backward()
        model.eval()
        model(torch.randn(50, 12))  # a validation forward with gradients enabled, in the middle
        model.train()
        opt.step()
        out = run.summary("0", "output", 0)
        grads = run.summary("0", "output_grad", 0)
    trained = torch.cat(cap.outputs[:3])
    assert out.count == trained.numel() == 3 * 4 * 8 and grads.count == 3 * 4 * 8
    assert_summary(out, summarize(trained.numpy()))


def test_failed_forward_leaves_the_watch_working(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cap = Capture(model[0])
    with gradsight.watch(model, path=tmp_path / "r.db", optimizer=opt, every=1) as run:
        with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied"):  # torch's own error
            model(torch.randn(4, 11))
        with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied"):
            nn.Sequential(*model[:2], nn.Linear(7, 3))(torch.randn(4, 12))  # fails after layer 0 recorded
        cap.outputs.clear()
        step(model, opt, torch.randn(4, 12))
        out = run.summary("0", "output", 0)
    assert out.count == 4 * 8
    assert_summary(out, summarize(cap.outputs[0].numpy()))


# -- 2. optimizer omitted or of another model ----------------------------------------------------------------------
def test_optimizer_of_another_model_is_refused(tmp_path):
    model, other = mlp(), mlp()
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(InputError, match=r"holds 4 parameter tensor\(s\), but none of them belongs to the watched"):
        gradsight.watch(model, path=tmp_path / "r.db", optimizer=opt)
    assert not os.path.exists(tmp_path / "r.db") or load(tmp_path / "r.db").steps == []
    with gradsight.watch(model, path=tmp_path / "ok.db", optimizer=torch.optim.SGD(model.parameters())):
        pass  # the model is free again


def test_optimizer_holding_some_parameters_is_fine(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with gradsight.watch(model, path=tmp_path / "r.db", optimizer=opt, every=1) as run:
        step(model, opt, torch.randn(4, 12))
        meta = run.meta["optimizer_params"]
        updates = {t.name for t in run.tensors if t.kind == "update"}
    assert meta == {
        "type": "SGD",
        "params_held": 2,
        "model_params_held": 2,
        "model_params": 4,
        "not_held": ["2.weight", "2.bias"],
    }
    assert updates == {"0.weight", "0.bias"}


@pytest.mark.parametrize("given", [None, "never-stepped"])
def test_backward_without_any_step_warns_and_diagnose_reports_it(tmp_path, given):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {} if given is None else {"optimizer": opt}
    expected = "optimizer=None" if given is None else r"\(SGD\) was never stepped"
    warned = pytest.warns(GradsightWarning, match=rf"recorded no step: .* saw 3 backward pass\(es\).*{expected}")
    with warned, gradsight.watch(model, path=tmp_path / "r.db", every=1, **kwargs):
        for _ in range(3):
            model(torch.randn(4, 12)).sum().backward()
            with torch.no_grad():  # a hand-written update: the watch cannot know about it
                for p in model.parameters():
                    p -= 0.1 * p.grad
    run = load(tmp_path / "r.db")
    assert run.steps == [] and run.events("no-optimizer-step")[0]["backward_passes"] == 3
    (finding,) = gradsight.diagnose(run)
    assert finding.code == "no-steps-recorded" and finding.severity == "error"
    assert "optimizer=opt" in " ".join(finding.advice)


def test_no_step_warning_comes_during_training(tmp_path, monkeypatch):
    from gradsight.frameworks.torch import _watch as _torch_watch

    monkeypatch.setattr(_torch_watch, "NO_STEP_WARN_AFTER", 3)
    model = mlp()
    with gradsight.watch(model, path=tmp_path / "r.db") as run:
        for i in range(5):
            if i == 2:
                with pytest.warns(GradsightWarning, match=r"saw 3 backward pass\(es\)"):
                    model(torch.randn(4, 12)).sum().backward()
            else:  # once only
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    model(torch.randn(4, 12)).sum().backward()
        assert len(run.events("no-optimizer-step")) == 1


def test_manual_steps_do_not_warn(tmp_path):
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradsight.watch(model, path=tmp_path / "r.db", every=1) as run:
            for _ in range(2):
                model(torch.randn(4, 12)).sum().backward()
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.1 * p.grad
                run.step()
            assert run.steps == [0, 1] and run.events("no-optimizer-step") == []


# -- 3. compiled models ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["torch.compile", "Module.compile"])
def test_compiled_model_is_watched_without_graph_breaks(tmp_path, how):
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = mlp()
    frames = CompileCounter()  # the eager backend, counting the frames dynamo compiles
    compiled = torch.compile(model, backend=frames) if how == "torch.compile" else model
    if how == "Module.compile":
        model.compile(backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = []
    with pytest.warns(GradsightWarning, match=rf"outputs .* not recorded: the model is compiled \({how}\)"):
        run = gradsight.watch(compiled, path=tmp_path / "r.db", optimizer=opt, every=1)
    with run:
        for _ in range(10):  # more steps than dynamo's recompile limit (8)
            weights.append(model[0].weight.detach().clone())
            step(compiled, opt, torch.randn(4, 12))
        w5 = run.summary("0.weight", "weight", 5)
        meta = run.meta
        kinds = {t.kind for t in run.tensors}
    assert dict(counters["graph_break"]) == {}
    if how == "torch.compile":  # compiled once: the logged steps (all 10) cause no recompilation
        assert frames.frame_count == 1
    assert run.steps == list(range(10)) and kinds == {"weight", "grad", "update"}
    assert_summary(w5, summarize(weights[5].numpy()))
    assert meta["compiled"] == how and "not recorded" in meta["notes"][0]
    if how == "Module.compile":
        assert model._compiled_call_impl is not None and type(model._compiled_call_impl).__name__ != "_CompiledCall"
    with gradsight.watch(model, path=tmp_path / "again.db", optimizer=opt, kinds=["weight", "grad"]):
        pass  # closed and released; no warning when no output kinds are asked for


def test_model_compiled_after_the_watch_opened_warns_that_outputs_are_missing(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradsight.watch(model, path=tmp_path / "r.db", optimizer=opt, every=1) as run:
        model.compile(backend="eager")
        with pytest.warns(GradsightWarning, match=r"outputs are not recorded from step 0: .*compiled .*after the"):
            step(model, opt, torch.randn(4, 12))
        for _ in range(9):
            step(model, opt, torch.randn(4, 12))
        assert "compiled" in run.meta["notes"][0] and {t.kind for t in run.tensors} == {"weight", "grad", "update"}
    assert dict(counters["graph_break"]) == {} and run.steps == list(range(10))


def test_log_inside_a_compiled_function_breaks_no_graph_regression(tmp_path):
    """Regression: log(loss) read a CPU loss with item() at once, which Dynamo cannot trace: a graph break per call
    when the compiled function itself logs. Under tracing the loss is kept as a tensor, as before."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = mlp()
    compiled = torch.compile(model, backend=CompileCounter())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(GradsightWarning, match="not recorded"):
        run = gradsight.watch(compiled, path=tmp_path / "r.db", optimizer=opt)

    @torch.compile(backend="eager")
    def forward_and_log(x: torch.Tensor) -> torch.Tensor:
        loss = compiled(x).pow(2).mean()
        run.log(loss)
        return loss

    with run:
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = forward_and_log(torch.randn(4, 12))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        logged = run.scalars["loss"].dropna()
    assert dict(counters["graph_break"]) == {}
    assert set(logged.tolist()) <= set(losses) and len(logged) >= 1


def test_watching_compiled_and_original_is_watching_twice(tmp_path):
    model = mlp()
    compiled = torch.compile(model, backend="eager")
    refused = pytest.raises(WatchError, match=r"already watched, recording to .*a\.db")
    with gradsight.watch(compiled, path=tmp_path / "a.db", kinds="grad"), refused:
        gradsight.watch(model, path=tmp_path / "b.db")


# -- 4. dtypes, non-models, bad arguments, misuse ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_records_exact_statistics(tmp_path, dtype):
    model = mlp(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 12).to(dtype)
    with gradsight.watch(model, path=tmp_path / "r.db", optimizer=opt, every=1) as run:
        w0 = model[0].weight.detach().float().numpy().copy()
        opt.zero_grad()
        model(x).float().square().mean().backward()
        g0 = model[0].weight.grad.float().numpy().copy()
        opt.step()
        w, g = run.summary("0.weight", "weight", 0), run.summary("0.weight", "grad", 0)
        dtypes = {t.dtype for t in run.tensors if t.name == "0.weight"}
    assert_summary(w, summarize(w0))  # the float32 upcast of a 16-bit float is exact
    assert_summary(g, summarize(g0))
    assert dtypes == {str(dtype)}


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: torch.randn(3), InputError, r"expects a torch\.nn\.Module .*got a tensor.*not a tensor"),
        (lambda: list(mlp().parameters()), UnsupportedError, r"got list \(builtins\) of Parameter \(torch\)"),
        (lambda: nn.Linear, InputError, r"got the class torch\.nn\.modules\.linear\.Linear itself.*model = Linear"),
        (lambda: [nn.Linear(2, 2)], UnsupportedError, r"got list.*wrap layers in torch\.nn\.Sequential"),
    ],
    ids=["tensor", "param-list", "module-class", "layer-list"],
)
def test_not_a_model(tmp_path, make, error, match):
    with pytest.raises(error, match=match):
        gradsight.watch(make(), path=tmp_path / "r.db")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": -1}, r"every must be a non-negative int .*got -1"),
        ({"every": "10"}, r"every must be a non-negative int .*got '10'"),
        ({"kinds": ["bogus"]}, r"unknown kind\(s\) \['bogus'\].*expected any of"),
        ({"optimizer": "adam"}, r"optimizer must be a torch\.optim\.Optimizer, got str"),
    ],
    ids=["every=-1", "every='10'", "kinds=bogus", "optimizer=str"],
)
def test_bad_keyword_values(tmp_path, kwargs, match):
    model = mlp()
    with pytest.raises(InputError, match=match):
        gradsight.watch(model, path=tmp_path / "r.db", **kwargs)
    assert not os.path.exists(tmp_path / "r.db")
    with gradsight.watch(model, path=tmp_path / "ok.db"):  # nothing left attached
        pass


def test_every_zero_records_only_the_cheap_checks(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradsight.watch(model, path=tmp_path / "r.db", optimizer=opt, every=0) as run:
        step(model, opt, torch.randn(4, 12))
        norm = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])))
        assert run.tensors == [] and run.scalars.loc[0, "grad_norm"] == pytest.approx(norm, rel=1e-6)


def test_path_to_a_directory_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match=str(tmp_path.name)):
        gradsight.watch(mlp(), path=tmp_path)


def test_writer_failure_reaches_the_user_at_the_next_step(tmp_path, monkeypatch):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = gradsight.watch(model, path=tmp_path / "r.db", optimizer=opt, every=1)

    def fail(*args, **kwargs):
        raise StoreError("disk full (simulated)")

    monkeypatch.setattr(run._writer, "log_summaries", fail)
    with pytest.raises(StoreError, match="simulated"):
        step(model, opt, torch.randn(4, 12))
    monkeypatch.setattr(run._writer, "log_scalars_many", fail, raising=False)
    monkeypatch.setattr(run._writer, "log_scalars", fail)
    monkeypatch.setattr(run._writer, "log_signals", fail)  # the per-step signals of the step
    with pytest.raises(StoreError, match="simulated"):
        run.close()
    assert run.closed


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda w: w.log(loss=torch.ones(2)), InputError, r"one-element tensor, got a tensor of shape \(2,\)"),
        (lambda w: w.log(loss=1.0, step=-1), InputError, r"non-negative step number, got -1"),
        (lambda w: w.log(loss=1.0, step="3"), InputError, r"expects a step number.*got str '3'"),
        (lambda w: w.log(loss=1.0, step=torch.tensor(1.5)), InputError, r"expects a step number"),
        (lambda w: w.log(loss="low"), InputError, r"expects a number or a one-element tensor, got str 'low'"),
    ],
    ids=["2-element", "step=-1", "step=str", "step=float-tensor", "loss=str"],
)
def test_log_misuse(tmp_path, call, error, match):
    with gradsight.watch(mlp(), path=tmp_path / "r.db") as run:
        with pytest.raises(error, match=match):
            call(run)
        run.log(loss=torch.tensor(2.0), step=np.int64(3))
        assert run.scalars.loc[3, "loss"] == 2.0


@pytest.mark.parametrize(
    "when",
    [
        "after-step",
        "after-eval-forward",
        "after-no-grad-eval",
        "before-backward",
        "eval-mode-training",
        "eval-from-step-2",
    ],
)
def test_log_records_at_the_step_whose_forward_it_follows(tmp_path, when):
    """A validation forward with gradients on, between the step and ``log``, does not move the log to the next step.

    Forwards in the mode of the training forwards (those a backward pass went through) still do: ``log`` before
    backward records at the step in progress, also for a model trained in eval mode.
    """
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if when == "eval-mode-training":
        model.eval()
    expected = {}
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db", preset="full") as run:
        for step in range(4):
            if when == "eval-from-step-2" and step == 2:
                model.eval()  # e.g. BatchNorm statistics frozen from here on
            opt.zero_grad()
            loss = model(torch.randn(5, 12)).pow(2).mean()
            expected[step] = loss.item()
            if when in ("before-backward", "eval-mode-training"):
                run.log(loss=loss)
            loss.backward()
            if when == "eval-from-step-2":
                run.log(loss=loss)  # between backward and step
            opt.step()
            if when == "after-eval-forward":
                model.eval()
                model(torch.randn(5, 12))  # gradients enabled, never backpropagated
                model.train()
            elif when == "after-no-grad-eval":
                with torch.no_grad():
                    model(torch.randn(5, 12))
            if when not in ("before-backward", "eval-mode-training", "eval-from-step-2"):
                run.log(loss=loss)
    recorded = load(tmp_path / "r.db").scalars["loss"].dropna().to_dict()
    assert recorded == pytest.approx(expected)


def test_watching_twice_and_logging_after_close(tmp_path):
    model = mlp()
    refused = pytest.raises(WatchError, match=r"already watched.*close that one first")
    with gradsight.watch(model, path=tmp_path / "a.db") as run, refused:
        gradsight.watch(model, path=tmp_path / "b.db")
    with pytest.raises(WatchError, match=r"cannot log: the watch recording to .* is closed.*if_exists='append'"):
        run.log(loss=1.0)


# ---- Keras ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def keras():
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    yield keras
    keras.backend.clear_session()


def dense_model(keras):
    inp = keras.Input((8,), name="x")
    h = keras.layers.Dense(6, activation="relu", name="d1")(inp)
    out = keras.layers.Dense(1, name="head")(h)
    m = keras.Model(inp, out)
    m.compile(keras.optimizers.SGD(0.05), "mse")
    return m


@pytest.mark.keras
def test_keras_validation_is_not_merged_into_training_outputs(tmp_path, keras):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 8)).astype("float32"), rng.normal(size=(16, 1)).astype("float32")
    xv, yv = rng.normal(size=(40, 8)).astype("float32"), rng.normal(size=(40, 1)).astype("float32")
    model = dense_model(keras)
    d1 = keras.Model(model.input, model.get_layer("d1").output)
    first = d1(x[:8]).numpy()  # what the first training batch produces, before any update
    with gradsight.watch(model, path=tmp_path / "r.db", every=1) as run:
        model.fit(x, y, batch_size=8, epochs=2, validation_data=(xv, yv), verbose=0, shuffle=False)
        out = run.summary("d1", "output", 0)
        assert run.steps == [0, 1, 2, 3]
    assert out.count == 8 * 6  # the training batch only, not the 40 validation rows
    assert_summary(out, summarize(first))


@pytest.mark.keras
def test_keras_custom_train_step_advice_works(tmp_path, keras):
    import tensorflow as tf

    holder = {}

    class Custom(keras.Model):
        def __init__(self):
            super().__init__()
            self.d1, self.d2 = keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)

        def call(self, x):
            return self.d2(self.d1(x))

        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = keras.ops.mean((self(x, training=True) - y) ** 2)
            grads = tape.gradient(loss, self.trainable_variables)
            with holder["w"].record_step(grads, self.trainable_variables, loss=loss):  # the advice, verbatim
                self.optimizer.apply(grads, self.trainable_variables)
            return {"loss": loss}

    model = Custom()
    with pytest.raises(UnsupportedError, match=r"overrides train_step .*gradsight\.watch_tape\(path\).*run_eagerly"):
        gradsight.watch(model, path=tmp_path / "refused.db")
    holder["w"] = w = gradsight.watch_tape(tmp_path / "r.db")
    model.compile(optimizer=keras.optimizers.SGD(0.1), run_eagerly=True)
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    model.fit(x, x.sum(1, keepdims=True), batch_size=8, epochs=1, verbose=0)
    w.close()
    run = load(tmp_path / "r.db")
    assert run.steps == [0, 1, 2, 3]
    assert {t.kind for t in run.tensors} == {"weight", "grad", "update"}
    assert np.isfinite(run.scalars["loss"]).all() and len(run.scalars) == 4


@pytest.mark.keras
@pytest.mark.parametrize("what", ["layer-class", "layer", "model-class"])
def test_keras_not_a_model(tmp_path, keras, what):
    make, error, match = {
        "layer-class": (lambda: keras.layers.Dense, InputError, r"got the class keras\..*Dense itself"),
        "layer": (lambda: keras.layers.Dense(3), UnsupportedError, r"expects a keras\.Model, got Dense.*wrap it"),
        "model-class": (lambda: keras.Sequential, InputError, r"got the class .*Sequential itself"),
    }[what]
    with pytest.raises(error, match=match):
        gradsight.watch(make(), path=tmp_path / "r.db")


@pytest.mark.keras
def test_keras_misuse(tmp_path, keras):
    model = dense_model(keras)
    with gradsight.watch(model, path=tmp_path / "a.db") as run:
        with pytest.raises(WatchError, match=r"already watched.*Close the first watch"):
            gradsight.watch(model, path=tmp_path / "b.db")
        with pytest.raises(InputError, match=r"non-negative step number, got -1"):
            run.log(val_loss=0.3, step=-1)
        with pytest.raises(InputError, match=r"one-element tensor, got ndarray"):
            run.log(val_loss=np.ones(2))
        run.log(val_loss=np.float32(0.25), step=2)
        assert run.scalars.loc[2, "val_loss"] == 0.25
    with pytest.raises(WatchError, match=r"cannot log: the watch recording to .* is closed"):
        run.log(val_loss=0.3)


@pytest.mark.keras
def test_keras_writer_failure_reaches_the_user_after_fit(tmp_path, keras, monkeypatch):
    model = dense_model(keras)
    x = np.zeros((8, 8), "float32")
    run = gradsight.watch(model, path=tmp_path / "r.db", every=1)

    def fail(*args, **kwargs):
        raise StoreError("disk full (simulated)")

    monkeypatch.setattr(run._writer, "flush", fail)
    with pytest.raises(StoreError, match="simulated"):
        model.fit(x, x[:, :1], batch_size=8, verbose=0)
    monkeypatch.undo()
    run.close()


# -- an optimizer replaced during training ----------------------------------------------------------------------------
def test_an_optimizer_replaced_during_training_is_reported_and_the_advice_continues_the_run_regression(tmp_path):
    """Regression: after a new optimizer took over, nothing more was recorded and nothing said so (every later
    log(loss) overwrote the last recorded step's loss)."""
    from gradsight.frameworks.torch._watch import NO_STEP_WARN_AFTER

    torch.manual_seed(0)
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "r.db"
    run = gradsight.watch(model, path=path, optimizer=sgd)
    for _ in range(3):
        run.log(step(model, sgd, torch.randn(4, 12)))
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(NO_STEP_WARN_AFTER - 1):
        step(model, adam, torch.randn(4, 12))
    said = r"another optimizer \(Adam\) has updated .* 100 times in a row .* \(SGD\)\. .* from step 3 on"
    with pytest.warns(GradsightWarning, match=said):
        step(model, adam, torch.randn(4, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        step(model, adam, torch.randn(4, 12))
    run.close()
    (event,) = load(path).events("foreign-optimizer")
    assert event["step"] == 3 and event["optimizer"] == "Adam" and event["watched_optimizer"] == "SGD"
    (finding,) = [f for f in gradsight.diagnose(path) if f.code == "no-steps-recorded"]
    assert finding.severity == "error" and finding.first_step == 3 and "Adam" in finding.message
    # the advice: a watch with the new optimizer continues the same file
    with gradsight.watch(model, path=path, optimizer=adam, if_exists="append") as again:
        for _ in range(2):
            again.log(step(model, adam, torch.randn(4, 12)))
    scalars = load(path).scalars
    assert list(scalars.index) == [0, 1, 2, 3, 4] and scalars["loss"].notna().all()  # 3 and 4: the new watch's


def test_optimizers_that_wrap_or_share_the_watched_one_are_not_foreign(tmp_path):
    """No report for an optimizer that steps the watched one inside its own step (a wrapper), for one that steps other
    parameters, nor for a second optimizer of watched parameters that steps between the watched one's steps."""

    class Wrapper(torch.optim.Optimizer):
        def __init__(self, inner):
            self.inner = inner
            super().__init__(inner.param_groups, {})

        def step(self, closure=None):
            return self.inner.step(closure)

    torch.manual_seed(0)
    model, other = mlp(), mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    critic = torch.optim.SGD(model[2].parameters(), lr=0.01)  # WGAN-like: several steps per watched step
    elsewhere = torch.optim.SGD(other.parameters(), lr=0.01)
    wrapped = Wrapper(torch.optim.SGD(model.parameters(), lr=0.01))
    for given, extra in ((inner, [critic] * 5), (inner, [elsewhere] * 150), (wrapped, [])):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with gradsight.watch(model, path=tmp_path / f"{id(given)}-{len(extra)}.db", optimizer=given) as run:
                for _ in range(30):
                    step(model, given, torch.randn(4, 12))
                    for opt in extra:
                        step(other if opt is elsewhere else model, opt, torch.randn(4, 12))
        assert run.steps[:1] == [0] and load(run.path).events("foreign-optimizer") == []
        assert len(load(run.path).scalars) == 30
