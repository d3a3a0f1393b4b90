"""Framework-free tests of the zoo's scenario data and its expectation checks."""

import numpy as np
import pytest

from gradsight import InputError, zoo
from gradsight.diagnose import CODES, Finding


def test_scenarios_are_listed_with_their_expectations():
    assert zoo.list_scenarios() == [
        "healthy-mlp",
        "healthy-cnn",
        "deep-sigmoid",
        "dead-relu",
        "high-lr",
        "saturated-tanh",
        "log-zero",
    ]
    expected = {name: [e.code for e in zoo.get_scenario(name).expect] for name in zoo.list_scenarios()}
    assert expected == {
        "healthy-mlp": [],
        "healthy-cnn": [],
        "deep-sigmoid": ["vanishing-gradients"],
        "dead-relu": ["dead-units"],
        "high-lr": ["exploding-gradients", "non-finite"],
        "saturated-tanh": ["saturated-units"],
        "log-zero": ["non-finite"],
    }
    for s in zoo.SCENARIOS.values():
        assert all(e.code in CODES for e in s.expect)
        names = [spec["name"] for spec in s.layers]
        assert len(set(names)) == len(names)
        for e in s.expect:
            assert set(e.layers) <= set(names)


@pytest.mark.parametrize("name", list(zoo.SCENARIOS))
def test_make_data_is_seeded(name):
    s = zoo.get_scenario(name)
    x0, y0 = zoo.make_data(s, 0)
    x1, _ = zoo.make_data(s, 0)
    x2, _ = zoo.make_data(s, 1)
    assert np.array_equal(x0, x1) and not np.array_equal(x0, x2)
    assert x0.dtype == np.float32 and len(x0) == len(y0) == s.steps * s.batch


def test_run_scenario_argument_errors():
    with pytest.raises(InputError, match=r"unknown zoo scenario 'nope'; expected one of \['healthy-mlp'"):
        zoo.run_scenario("nope")
    with pytest.raises(InputError, match="framework must be 'torch' or 'keras', got 'jax'"):
        zoo.run_scenario("healthy-mlp", framework="jax")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"NaNInjection layer 'act1' is not a dense layer .* \['fc1', 'fc2', 'out'\]"):
        zoo.run_scenario("healthy-mlp", inject=zoo.NaNInjection("act1"))
    with pytest.raises(InputError, match=r"NaNInjection step 99 is outside the run.s steps 0\.\.39"):
        zoo.run_scenario("healthy-mlp", inject=zoo.NaNInjection("fc1", step=99))
    with pytest.raises(InputError, match="steps must be a positive int, got 0"):
        zoo.run_scenario("healthy-mlp", steps=0)


def _result(name, findings, inject=None):
    s = zoo.get_scenario(name)
    expect = (inject.expectation,) if inject else s.expect
    return zoo.ScenarioResult(s, "torch", 0, None, findings, expect, inject)  # type: ignore[arg-type]


def _f(code, layers, severity="warning", first_step=0, **evidence):
    return Finding(code, severity, tuple(layers), first_step, first_step, evidence)


def test_problems_reports_what_is_wrong():
    assert _result("healthy-mlp", [_f("dead-units", [], "info")]).ok
    assert _result("healthy-mlp", [_f("dead-units", ["act1"])]).problems() == [
        "healthy-mlp [torch, seed 0]: healthy scenario produced warning dead-units: "
    ]
    assert _result("dead-relu", [_f("dead-units", ["act1", "act2"])]).ok
    assert _result("dead-relu", [_f("dead-units", ["act2"])]).problems() == [
        "dead-relu [torch, seed 0]: dead-units finding lacks layers ['act1']; it names ['act2']",
        "dead-relu [torch, seed 0]: dead-units finding should start at 'act1', names ['act2']",
    ]
    assert _result("log-zero", []).problems() == ["log-zero [torch, seed 0]: expected a 'non-finite' finding, got []"]
    bad_origin = _f("non-finite", ["out"], "error", origin={"kind": "output"})
    assert _result("log-zero", [bad_origin]).problems() == [
        "log-zero [torch, seed 0]: non-finite origin kind is 'output', expected 'loss'"
    ]
    inj = zoo.NaNInjection("fc2", "backward", step=3)
    f = _f("non-finite", ["fc2", "fc1"], "error", first_step=4, origin={"kind": "grad", "phase": "backward"})
    assert _result("healthy-mlp", [f], inj).problems() == [
        "healthy-mlp [torch, seed 0]: NaN injected at step 3, first found at step 4"
    ]


def test_scenario_types_are_importable_from_the_zoo():
    # They live in a module of their own, gradsight._scenario, which the framework sides read without importing
    # the zoo back (tests/test_architecture.py checks there is no cycle); gradsight.zoo.Scenario stays the name.
    assert {"Scenario", "NaNInjection", "Expectation"} <= set(zoo.__all__)
    injection = zoo.NaNInjection("fc2", "backward", step=3)
    assert injection.expectation == zoo.Expectation("non-finite", first_layer="fc2", origin_kind=None)
    assert isinstance(zoo.get_scenario("healthy-mlp"), zoo.Scenario)
