"""Every zoo scenario x 5 seeds x both frameworks yields its finding; injected NaNs are located.

These train real (tiny) models: ~1 s per PyTorch run and ~3 s per Keras run (mostly graph tracing) on a CPU.
"""

import warnings

import pytest

from gradsight import zoo

SEEDS = range(5)
SCENARIOS = zoo.list_scenarios()


def _check(result):
    problems = result.problems()
    assert not problems, "\n".join(problems) + "\nfindings:\n" + "\n".join(f.to_text() for f in result.findings)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", SCENARIOS)
def test_torch_scenario(name, seed, tmp_path):
    pytest.importorskip("torch")
    _check(zoo.run_scenario(name, framework="torch", seed=seed, path=tmp_path / "run.db"))


@pytest.mark.slow
@pytest.mark.keras
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", SCENARIOS)
def test_keras_scenario(name, seed, tmp_path):
    pytest.importorskip("keras")
    _check(zoo.run_scenario(name, framework="keras", seed=seed, path=tmp_path / "run.db"))


INJECTIONS = [
    zoo.NaNInjection("fc2", "forward", step=3),
    zoo.NaNInjection("fc2", "backward", step=3),
    zoo.NaNInjection("fc1", "forward", step=6),
    zoo.NaNInjection("out", "backward", step=5),
]


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "keras"])
@pytest.mark.parametrize("inject", INJECTIONS, ids=lambda i: f"{i.layer}-{i.phase}-{i.step}")
def test_injected_nan_is_located(framework, inject, tmp_path):
    pytest.importorskip(framework)
    result = zoo.run_scenario(
        "healthy-mlp", framework=framework, seed=1, steps=12, inject=inject, path=tmp_path / "r.db"
    )
    _check(result)
    f = result.findings[0]
    assert f.code == "non-finite" and f.severity == "error"
    assert f.first_step == inject.step and f.layers[0] == inject.layer
    origin = f.evidence["origin"]
    assert origin["step"] == inject.step and origin["layer"] == inject.layer
    assert origin["phase"] == inject.phase
    if inject.phase == "forward":
        # one NaN per sample in the first unit of the layer's output
        assert origin["kind"] == "output" and origin["nan"] == 32
        assert f"First non-finite value at step {inject.step}: the output of layer {inject.layer!r} (32 NaN of " in (
            f.message
        )
    else:
        # the gradient arriving at the layer is finite; what flows into its weights is not
        assert origin["kind"] == "grad"
        assert f"First non-finite value at step {inject.step}: the parameter gradient " in f.message
        assert f"of layer {inject.layer!r} (" in f.message and ", backward)" in f.message
        # layers after the injected one never see a non-finite value in that step's backward pass
        later = [
            s for s in f.evidence["spread"] if s["step"] == inject.step and s["layer"] and s["phase"] == "backward"
        ]
        names = [spec["name"] for spec in result.scenario.layers]
        assert all(names.index(s["layer"]) <= names.index(inject.layer) for s in later)


@pytest.mark.slow
@pytest.mark.torch
def test_torch_online_stops_on_nonfinite(tmp_path):
    torch = pytest.importorskip("torch")
    from gradsight._watch import watch
    from gradsight.diagnose import GradsightWarning, OnlineDiagnosis
    from gradsight.frameworks.torch._zoo import _loss, build

    s = zoo.get_scenario("log-zero")
    x, y = zoo.make_data(s, 0)
    torch.manual_seed(0)
    model = build(s)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = 0
    with watch(model, path=tmp_path / "r.db", optimizer=opt, every=1) as w:
        online = OnlineDiagnosis(w)
        for step in range(10):
            loss = _loss("ce-naive", model(xt[step * 32 : (step + 1) * 32]), yt[step * 32 : (step + 1) * 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
            steps += 1
            with pytest.warns(GradsightWarning, match="gradsight error non-finite at step 0: .*the loss"):
                online.check(step)
            if online.should_stop:
                break
    assert steps == 1
    assert online.stop_finding.layers[0] == "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert online.finish() == []


@pytest.mark.slow
@pytest.mark.keras
def test_keras_callback_stops_fit_on_nonfinite(tmp_path):
    keras = pytest.importorskip("keras")
    from gradsight._watch import watch
    from gradsight.frameworks.keras._diagnose import KerasDiagnosisCallback
    from gradsight.frameworks.keras._zoo import _loss, build
    from gradsight.store import load

    s = zoo.get_scenario("log-zero")
    x, y = zoo.make_data(s, 0)
    keras.utils.set_random_seed(0)
    model = build(s)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=_loss("ce-naive"))
    with watch(model, path=tmp_path / "r.db", every=1) as w:
        seen = []
        cb = KerasDiagnosisCallback(w, on_finding=seen.append)
        model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    assert cb.online.should_stop and [f.code for f in seen] == ["non-finite"]
    with load(tmp_path / "r.db") as run:
        assert run.steps == [0]  # fit stopped after the first batch
        assert [(e["step"], e["code"]) for e in run.events("finding")] == [(0, "non-finite")]
