"""Bad input to the public API gets a gradsight error that names what was given, what was expected and the fix —
never a raw traceback from numpy/torch/pandas/sqlite, never a silently wrong number, never a watch's own signal
overwritten by a user's value.
"""

from __future__ import annotations

import math
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import gradsight
from gradsight import InputError, load
from gradsight.diagnose import GradsightWarning, OnlineDiagnosis, Thresholds
from gradsight.explain import jacobian_vs_gradient
from gradsight.store import RunWriter
from gradsight.summary import merge, summarize

torch = pytest.importorskip("torch")
nn = torch.nn


@pytest.fixture(autouse=True)
def _seed_and_one_thread(torch_seeded_one_thread):
    yield


def _train(path, steps=6, loss=None, **log):
    """A small watched run; ``loss(step, l)`` replaces the logged loss, ``log`` adds scalars at every step."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradsight.watch(model, path=path, optimizer=opt, every=1) as run:
        for s in range(steps):
            opt.zero_grad()
            lv = nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 2))
            lv.backward()
            opt.step()
            run.log(loss=lv if loss is None else loss(s, lv), **log)
    return path


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    torch.manual_seed(0)
    return _train(tmp_path_factory.mktemp("runs") / "run.db")


# -- 1. log() refuses the watch's own signal names ------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["grad_norm", "lr", "clip_ratio", "step_skipped", "weight_norm/0.weight", "grad_norm/0.bias", "lr/1"]
)
def test_log_refuses_reserved_names(tmp_path, name):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradsight.watch(model, path=tmp_path / "r.db", optimizer=opt) as run:
        model(torch.randn(3, 2)).sum().backward()
        opt.step()
        with pytest.raises(InputError, match="records itself") as e:
            run.log(loss=1.0, **{name: 5.0})
        assert "another name" in str(e.value)
        run.log(loss=1.0, my_lr=123.0, grad_norm_custom=2.0)  # other names are fine


def test_reserved_names_keep_measured_values(tmp_path):
    """Regression: log(grad_norm=5.0, lr=123.0) replaced the measured values in Run.scalars."""
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    with gradsight.watch(model, path=tmp_path / "r.db", optimizer=opt) as run:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            norms.append(float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))))
            opt.step()
            with pytest.raises(InputError, match="records itself"):
                run.log(loss=1.0, grad_norm=5.0, lr=123.0)
    sc = load(tmp_path / "r.db").scalars
    assert np.allclose(sc["lr"], 0.1) and np.allclose(sc["grad_norm"], norms, rtol=1e-6)


def test_a_loop_without_an_optimizer_may_log_its_learning_rate(tmp_path):
    """The watch records no lr without an optimizer: the user's is the only one, and must not be refused."""
    model = nn.Linear(4, 2)
    with gradsight.watch(model, path=tmp_path / "r.db") as run:
        for step in range(3):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
            run.step()
            run.log(loss=1.0, lr=0.1 / (step + 1))
        with pytest.raises(InputError, match="records itself"):
            run.log(grad_norm=1.0)  # that one it records
    assert load(tmp_path / "r.db").scalars["lr"].tolist() == pytest.approx([0.1, 0.05, 0.1 / 3])


# -- 2. OnlineDiagnosis of a model, a missing file, bad options -----------------------------------------------------
def test_online_refuses_a_model():
    with pytest.raises(InputError, match=r"gradsight\.watch"):
        OnlineDiagnosis(nn.Linear(2, 2))


def test_online_refuses_a_keras_model(keras):
    m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(InputError, match=r"gradsight\.watch"):
        OnlineDiagnosis(m)


def test_online_missing_path_warns_at_first_check(tmp_path):
    od = OnlineDiagnosis(tmp_path / "typo.db")
    with pytest.warns(GradsightWarning, match="does not exist"):
        assert od.check() == []


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"stop_on": None}, "stop_on must be a collection"),
        ({"stop_on": 3}, "stop_on must be a collection"),
        ({"rules": ["x"]}, "rules must be gradsight.diagnose.Rule instances"),
        ({"rules": 5}, "rules must be a list"),
    ],
)
def test_online_bad_options(run_path, kw, match):
    with pytest.raises(InputError, match=re.escape(match)):
        OnlineDiagnosis(run_path, **kw)


# -- 3. diagnose(steps=...) is checked as the exports check it -------------------------------------------------------
@pytest.mark.parametrize("steps", [(3, 1), (-5, -1), "0:5", (1, 2, 3), ("a", "b"), (True, 3)])
def test_diagnose_malformed_steps(run_path, steps):
    with pytest.raises(InputError, match="steps"):
        gradsight.diagnose(run_path, steps=steps)


def test_diagnose_window_without_steps(run_path):
    with pytest.raises(InputError, match="selects no step") as e:
        gradsight.diagnose(run_path, steps=(100, 200))
    assert "diagnose every step" in str(e.value)
    assert isinstance(gradsight.diagnose(run_path, steps=(0, None)), list)


# -- 4. a loss that is NaN at every step ----------------------------------------------------------------------------
def test_all_nan_loss_is_float_and_diagnosed(tmp_path):
    path = _train(tmp_path / "nan.db", loss=lambda s, lv: float("nan"))
    sc = load(path).scalars
    assert sc["loss"].dtype == np.float64 and sc["loss"].isna().all()
    assert "non-finite" in [f.code for f in gradsight.diagnose(path)]


def test_online_all_nan_loss_during_training(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradsight.watch(model, path=tmp_path / "o.db", optimizer=opt, every=1) as run:
        od = OnlineDiagnosis(run, full_every=1, on_finding=None)
        for _ in range(4):
            opt.zero_grad()
            nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 2)).backward()
            opt.step()
            run.log(loss=float("nan"))
            od.check()
    assert "non-finite" in [f.code for f in od.findings]


# -- 5. Thresholds' counts are whole numbers within reach ------------------------------------------------------------
@pytest.mark.parametrize(
    "kw", [{"baseline_steps": 2.5}, {"reference_steps": 2.5}, {"reference_steps": 10**30}, {"loss_min_steps": 0}]
)
def test_threshold_counts(kw):
    with pytest.raises(InputError, match="whole number"):
        Thresholds(**kw)


def test_threshold_whole_float_is_an_int():
    th = Thresholds(baseline_steps=3.0)
    assert th.baseline_steps == 3 and isinstance(th.baseline_steps, int)


# -- 6. seeds ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["x", -1, 1.5, 2**70, True])
def test_depth_sweep_seed(seed):
    with pytest.raises(InputError, match="seed"):
        gradsight.depth_sweep(3, 3, seed=seed)


@pytest.mark.parametrize("seed", [-1, "a", 2**70])
def test_run_scenario_seed(seed, tmp_path):
    from gradsight import zoo

    with pytest.raises(InputError, match="seed"):
        zoo.run_scenario("dead-relu", seed=seed, path=tmp_path / "z.db")
    assert not (tmp_path / "z.db").exists()


# -- 7/8. summarize and merge -----------------------------------------------------------------------------------------
def test_summarize_torch_tensors():
    w = nn.Linear(3, 4).weight  # requires grad
    assert summarize(w) == summarize(w.detach().numpy())
    b = torch.randn(5, 3).bfloat16()
    assert summarize(b) == summarize(b.float().numpy())
    sp = torch.randn(4, 4).to_sparse()
    assert summarize(sp) == summarize(sp.to_dense().numpy())


def test_summarize_refuses_meta_and_bad_axis():
    with pytest.raises(InputError, match="meta"):
        summarize(torch.empty(3, device="meta"))
    with pytest.raises(InputError, match="unit_axis"):
        summarize(np.ones((2, 2), np.float32), unit_axis="1")


@pytest.mark.parametrize("other", [None, "x", np.ones(3)])
def test_merge_refuses_non_summaries(other):
    with pytest.raises(InputError, match="TensorSummary"):
        merge(summarize(np.ones(2)), other)


def test_merge_refuses_a_tensor():
    with pytest.raises(InputError, match="TensorSummary"):
        merge(torch.randn(3), summarize(np.ones(2)))


# -- 9. jacobian_vs_gradient ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("matrix", ["abc", [[1, 2], [3]]])
def test_jvg_bad_matrix(matrix):
    with pytest.raises(InputError, match="matrix"):
        jacobian_vs_gradient(matrix=matrix, framework="torch")


def test_jvg_detached_target():
    with pytest.raises(InputError, match="does not require grad"):
        jacobian_vs_gradient(lambda z: z.detach() * 2, framework="torch")


# -- 10. depth_sweep: no overflow, no misleading ✗ beyond float64, generators ----------------------------------------
def test_depth_sweep_closed_form_does_not_overflow():
    from gradsight.explain._depth import _predicted

    assert _predicted("ones", "identity", [3] * 42, 1) == pytest.approx(2 / 3 * 3.0**40, rel=1e-15)
    assert _predicted("ones", "identity", [1000] * 9, 1) == pytest.approx(2e18, rel=1e-15)


def test_depth_sweep_beyond_float64_is_refused():
    with pytest.raises(InputError, match="deepest stack that works for these widths is 33"):
        gradsight.depth_sweep(3, range(30, 42))
    with pytest.raises(InputError, match="is 5"):
        gradsight.depth_sweep(1000, [8], n=1)
    r = gradsight.depth_sweep(3, [33])
    assert r.ok and r.rows[0]["grad_rms"] == pytest.approx(2 / 3 * 3.0**32, rel=1e-15)


def test_depth_sweep_accepts_a_generator():
    r = gradsight.depth_sweep(3, (d for d in [1, 2]))
    assert sorted({row["depth"] for row in r.rows}) == [1, 2] and r.ok


# -- 11. RunWriter -----------------------------------------------------------------------------------------------------
def test_run_writer_checks_at_the_call(tmp_path):
    with pytest.raises(InputError, match="meta"):
        RunWriter(tmp_path / "m.db", meta="x")
    w = RunWriter(tmp_path / "w.db")
    try:
        for step, values, match in [
            ("a", {"x": 1.0}, "expects a step number"),
            (0, {"a": "x"}, "mapped to numbers, got 'a': 'x'"),
            (0, None, "expects values as a mapping"),
            (-1, {"a": 1.0}, "non-negative step number, got -1"),
            (0, {1: 2.0}, "mapped to numbers, got 1: 2.0"),
        ]:
            with pytest.raises(InputError, match=re.escape(match)):
                w.log_scalars(step, values)
        with pytest.raises(InputError, match="TensorSummary"):
            w.log_summaries(0, "junk")
        with pytest.raises(InputError, match="step"):
            w.log_summaries(-1, [])
        w.log_scalars(0, {"a": math.inf, "b": np.float32(2), "c": float("nan")})
    finally:
        w.close()  # nothing bad was queued: closes cleanly
    sc = load(tmp_path / "w.db").scalars
    assert list(sc.index) == [0] and sc.loc[0, "a"] == math.inf and math.isnan(sc.loc[0, "c"])


# -- 12. watch(config=...) --------------------------------------------------------------------------------------------
def test_watch_config_must_be_a_mapping(tmp_path):
    with pytest.raises(InputError, match="config"):
        gradsight.watch(nn.Linear(2, 2), path=tmp_path / "c.db", config="x")
    assert not (tmp_path / "c.db").exists()


def test_watch_tape_config_must_be_a_mapping(tmp_path, keras):
    from gradsight import watch_tape

    with pytest.raises(InputError, match="config"):
        watch_tape(tmp_path / "c.db", config="x")


# -- 13. to_pandas filters, export paths and keywords ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"kind": 3}, "kind=... expects a name or a list of names, got int 3"),
        ({"layer": 1.5}, "layer=... expects a name or a list of names, got float 1.5"),
        ({"tensor": [1]}, "tensor=... expects a name or a list of names, got list [1]"),
        ({"steps": "0:5"}, "steps must be an inclusive (first, last) pair"),
        ({"steps": (1, 2, 3)}, "steps must be an inclusive (first, last) pair"),
    ],
)
def test_to_pandas_bad_filters(run_path, kw, match):
    with load(run_path) as r, pytest.raises(InputError, match=re.escape(match)):
        r.to_pandas(**kw)


@pytest.mark.parametrize(("kw", "match"), [({"kind": 3}, "kind=... expects"), ({"steps": "0:5"}, "steps must be")])
def test_summaries_refuses_bad_filters_at_the_call_not_at_the_first_next(run_path, kw, match):
    """Regression: Run.summaries was a generator, so a bad filter raised only where the rows were first read."""
    with load(run_path) as r, pytest.raises(InputError, match=re.escape(match)):
        r.summaries(**kw)


def test_export_tensorboard_without_a_logdir(run_path, tmp_path):
    pytest.importorskip("tensorboard")
    with pytest.raises(InputError, match="logdir"):
        gradsight.export.to_tensorboard(run_path, None)


def test_export_csv_bad_path_and_keyword(run_path, tmp_path):
    with pytest.raises(InputError, match=r"to_csv\(\) got unknown keyword"):
        gradsight.export.to_csv(run_path, tmp_path / "x.csv", bogus=1)
    with pytest.raises(InputError, match="path"):
        gradsight.export.to_csv(run_path, None)
    assert not (tmp_path / "x.csv").exists()


def test_an_existing_file_that_is_not_a_run_gets_no_append_or_overwrite_advice(tmp_path):
    """Regression: the message offered if_exists='append' / 'overwrite', both refused for a file that is not a run."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(gradsight.StoreError, match="is not a gradsight run file") as err:
        RunWriter(notes, meta={})
    assert "if_exists" not in str(err.value) and notes.read_text() == "my notes"
