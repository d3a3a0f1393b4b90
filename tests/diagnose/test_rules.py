import dataclasses
import math
import re
import sqlite3

import numpy as np
import pytest

from gradsight import InputError
from gradsight.diagnose import (
    CODE_DESCRIPTIONS,
    CODES,
    DeadUnitsRule,
    ExplodingGradientsRule,
    LogitsAsProbabilitiesRule,
    LossNotDecreasingRule,
    NonFiniteRule,
    RunData,
    SaturatedUnitsRule,
    Thresholds,
    UpdateRatioRule,
    VanishingGradientsRule,
    diagnose,
    skipped_rules,
)
from gradsight.diagnose._base import recent
from gradsight.store import RunWriter

from .conftest import healthy_step


def codes(findings):
    return [f.code for f in findings]


def test_healthy_run_has_no_findings(synth, rng):
    s = synth()
    for step in range(30):
        healthy_step(s, step, rng)
    assert diagnose(s.run()) == []


def test_findings_use_known_codes_and_are_sorted(synth, rng):
    s = synth()
    for step in range(30):
        healthy_step(s, step, rng, loss=2.0, nan_at=("output", "act1") if step == 20 else None)
    found = diagnose(s.run())
    assert set(codes(found)) <= set(CODES)
    assert found[0].code == "non-finite" and found[0].severity == "error"
    ranks = [f.rank for f in found]
    assert ranks == sorted(ranks, reverse=True)


# ---- non-finite ---------------------------------------------------------------------------------------------
def test_nonfinite_forward_origin_comes_first(synth, rng):
    s = synth()
    for step in range(6):
        healthy_step(s, step, rng)
    # step 6: NaN appears in act1's output, spreads to fc2's output, the loss and every gradient
    a = np.ones((8, 4), np.float32)
    a[0, :2] = np.nan
    s.log(6, "output", "fc1", np.ones((8, 4)))
    s.log(6, "output", "act1", a)
    s.log(6, "output", "fc2", np.full((8, 2), np.nan))
    s.log(6, "output_grad", "fc2", np.full((8, 2), np.nan))
    s.log(6, "grad", "fc2", np.full((2, 4), np.nan))
    s.log(6, "grad", "fc1", np.full((4, 3), np.nan))
    s.scalars(6, loss=float("nan"))
    f = diagnose(s.run(), rules=[NonFiniteRule()])[0]
    assert f.code == "non-finite"
    assert f.first_step == 6 and f.last_step == 6
    assert f.layers == ("act1", "fc2", "fc1")
    assert f.evidence["origin"] == {
        "step": 6,
        "layer": "act1",
        "kind": "output",
        "phase": "forward",
        "tensor": "act1",
        "nan": 2,
        "posinf": 0,
        "neginf": 0,
        "count": 32,
        "source": "summary",
    }
    assert "step 6" in f.message
    assert "the output of layer 'act1' (2 NaN of 32 values, forward)" in f.message
    assert "spread to 2 more layer(s) by step 6" in f.message


def test_nonfinite_backward_origin_is_the_last_layer_reached(synth, rng):
    s = synth()
    for step in range(3):
        healthy_step(s, step, rng)
    healthy_step(s, 3, rng)  # forward finite at step 4 too
    for layer, shape in (("fc1", (8, 4)), ("act1", (8, 4)), ("fc2", (8, 2))):
        s.log(4, "output", layer, np.ones(shape))
    g = np.zeros((8, 4), np.float32)
    g[1, 1] = np.inf
    s.log(4, "output_grad", "fc2", np.ones((8, 2)))
    s.log(4, "output_grad", "act1", g)
    s.log(4, "output_grad", "fc1", np.full((8, 4), np.nan))
    s.log(4, "grad", "fc2", np.ones((2, 4)))
    s.log(4, "grad", "fc1", np.full((4, 3), np.nan))
    s.log(5, "weight", "fc1", np.full((4, 3), np.nan))
    s.scalars(4, loss=1.0)
    f = diagnose(s.run(), rules=[NonFiniteRule()])[0]
    assert f.first_step == 4 and f.last_step == 5
    assert f.layers == ("act1", "fc1")
    assert f.evidence["origin"]["kind"] == "output_grad"
    assert f.evidence["origin"]["phase"] == "backward"
    assert "the output gradient of layer 'act1' (1 +Inf of 32 values, backward)" in f.message
    assert "gradient" in f.explanation


def test_nonfinite_loss_origin(synth, rng):
    s = synth()
    for step in range(2):
        healthy_step(s, step, rng)
    for layer, shape in (("fc1", (8, 4)), ("act1", (8, 4)), ("fc2", (8, 2))):
        s.log(2, "output", layer, np.ones(shape))
    s.log(2, "output_grad", "fc2", np.full((8, 2), np.nan))
    s.log(2, "grad", "fc1", np.full((4, 3), np.nan))
    s.scalars(2, loss=float("nan"))  # stored as NULL
    f = diagnose(s.run(), rules=[NonFiniteRule()])[0]
    assert f.first_step == 2
    assert f.evidence["origin"]["kind"] == "loss"
    assert f.layers[0] == "fc2"
    assert "First non-finite value at step 2: the loss (1 NaN, forward)" in f.message
    assert "log(0)" in f.explanation
    assert any("from_logits" in a for a in f.advice)


def test_nonfinite_infinite_loss(synth, rng):
    s = synth()
    s.scalars(0, loss=1.0)
    s.scalars(1, loss=float("inf"))
    f = diagnose(s.run())[0]
    assert f.code == "non-finite" and f.first_step == 1
    assert "(1 +Inf, forward)" in f.message


def test_nonfinite_scalars_give_an_earlier_step_than_summaries(synth, rng):
    s = synth()
    healthy_step(s, 0, rng)
    for step in range(1, 10):
        s.scalars(step, loss=1.0, grad_nonfinite=0 if step < 7 else 12)
    healthy_step(s, 10, rng, nan_at=("grad", "fc1"))
    f = diagnose(s.run(), rules=[NonFiniteRule()])[0]
    assert f.first_step == 7
    assert f.evidence["origin"]["source"] == "grad_nonfinite"
    assert "step 7" in f.message and "(12 NaN, backward)" in f.message
    assert "the first step with summaries, 10, places it in the parameter gradient 'fc1.weight' of layer 'fc1'" in (
        f.message
    )
    assert f.layers == ("fc1",)


def test_nonfinite_rule_skips_an_empty_run(synth):
    r = synth().run()
    assert NonFiniteRule().applies(r) is False
    assert diagnose(r) == []
    assert set(skipped_rules(r)) == {
        "non-finite",
        "exploding-gradients",
        "vanishing-gradients",
        "dead-units",
        "saturated-units",
        "update-ratio",
        "loss-not-decreasing",
        "gradients-accumulating",
        "no-gradient",
        "not-optimized",
        "bad-initialisation",
        "learning-rate-too-high",
        "gradients-clipped",
        "double-softmax",
        "loss-unbounded",
        "logits-as-probabilities",
        "nll-on-probabilities",
    }


# ---- exploding / vanishing ------------------------------------------------------------------------------------
def test_exploding_gradients_over_time(synth, rng):
    s = synth()
    for step in range(10):
        scale = 1.0 if step < 4 else 10.0 ** (step - 3)  # 1, 1, 1, 1, 10, 100, ... 1e6
        s.log(step, "grad", "fc1", np.full((4, 3), 0.01 * scale))
        s.log(step, "grad", "fc2", np.full((2, 4), 0.02))
    f = diagnose(s.run(), rules=[ExplodingGradientsRule()])[0]
    assert f.code == "exploding-gradients"
    assert f.layers == ("fc1",)
    assert f.first_step == 5  # 100x baseline
    assert f.severity == "error"  # 1e6 >= 100**2
    g = f.evidence["global"]
    # global norm: sqrt(12 * (0.01 s)^2 + 8 * 0.02^2)
    base = math.sqrt(12 * 1e-4 + 8 * 4e-4)
    peak = math.sqrt(12 * (0.01 * 1e6) ** 2 + 8 * 4e-4)
    assert g["baseline_norm"] == pytest.approx(base, rel=1e-6)
    assert g["peak_norm"] == pytest.approx(peak, rel=1e-6)
    assert f"grew {peak / base:.3g}x, from {base:.3g}" in f.message
    assert f"to {peak:.3g} at step 9 (threshold 100x)" in f.message


def test_exploding_uses_grad_norm_scalar(synth):
    s = synth()
    for step in range(8):
        s.scalars(step, grad_norm=1.0 if step < 5 else 500.0)
    f = diagnose(s.run())[0]
    assert f.code == "exploding-gradients" and f.layers == () and f.first_step == 5
    assert "grew 500x, from 1 " in f.message


def test_exploding_threshold_is_respected(synth):
    s = synth()
    for step in range(8):
        s.scalars(step, grad_norm=1.0 if step < 5 else 50.0)
    r = s.run()
    assert diagnose(r, rules=[ExplodingGradientsRule()]) == []
    assert codes(diagnose(r, thresholds={"explode_growth": 40})) == ["exploding-gradients"]


def _depth_run(s, rms_by_layer, steps=4):
    for step in range(steps):
        for layer, rms in rms_by_layer.items():
            s.log(step, "grad", layer, np.full((3, 3), rms))


LAYERS4 = [{"name": n, "type": "Linear"} for n in ("l1", "l2", "l3", "l4")]


def test_vanishing_gradients(synth):
    s = synth(layers=LAYERS4)
    _depth_run(s, {"l1": 1e-7, "l2": 5e-4, "l3": 0.2, "l4": 1.0})
    f = diagnose(s.run(), rules=[VanishingGradientsRule()])[0]
    assert f.code == "vanishing-gradients" and f.severity == "warning"
    assert f.layers == ("l1", "l2")
    assert f.first_step == 0 and f.last_step == 3
    assert "layer 'l1' has a median gradient RMS of 1e-07, 1e-07x that of the largest later layer ('l4', 1)" in (
        f.message
    )
    assert "over 4 logged steps; 2 layer(s) below the threshold 0.001x" in f.message


def test_vanishing_threshold_and_zero_gradients(synth):
    s = synth(layers=LAYERS4)
    _depth_run(s, {"l1": 0.0, "l2": 5e-4, "l3": 0.2, "l4": 1.0})
    r = s.run()
    f = diagnose(r, rules=[VanishingGradientsRule()])[0]
    assert f.layers == ("l2",)  # l1's exactly-zero gradient is not "vanishing"
    assert diagnose(r, rules=[VanishingGradientsRule()], thresholds=Thresholds(vanish_ratio=1e-4)) == []


def test_exploding_through_depth(synth):
    s = synth(layers=LAYERS4)
    _depth_run(s, {"l1": 5e3, "l2": 1.0, "l3": 1.0, "l4": 1.0})
    f = diagnose(s.run(), rules=[ExplodingGradientsRule()])[0]
    assert f.layers == ("l1",)
    assert "layer 'l1' has a median gradient RMS of 5e+03, 5e+03x that of the largest later layer" in f.message


# ---- units ----------------------------------------------------------------------------------------------------
def test_dead_units(synth, rng):
    s = synth()
    for step in range(8):
        a = np.maximum(rng.normal(size=(16, 10)), 0).astype(np.float32)
        if step >= 2:
            a[:, :7] = 0.0  # 7 of 10 units dead from step 2
        s.log(step, "output", "act1", a, unit_axis=-1)
        s.log(step, "output", "fc2", rng.normal(size=(16, 2)), unit_axis=-1)
    f = diagnose(s.run(), rules=[DeadUnitsRule()])[0]
    assert f.code == "dead-units" and f.severity == "warning"
    assert f.layers == ("act1",)
    assert f.first_step == 2 and f.last_step == 7
    assert f.evidence["layers"]["act1"]["dead_units"] == list(range(7))
    # eight logged steps: the later half, 4 steps of 16 samples (recent_steps=5 would reach back to step 3)
    assert "7 of 10 units (70%) of layer 'act1' were zero for every one of 64 samples over logged steps 4–7" in (
        f.message
    )


def test_dead_units_of_a_short_run_are_judged_after_its_initial_state(synth, rng):
    """Logged steps 0, 100, 200 (a 250-step run, default preset): units alive at initialisation, dead from step 100."""
    s = synth()
    for step in (0, 100, 200):
        a = np.maximum(rng.normal(size=(32, 8)), 0).astype(np.float32)
        if step:
            a[:] = 0.0
        s.log(step, "output", "act1", a, unit_axis=-1)
    f = diagnose(s.run(), rules=[DeadUnitsRule()])[0]
    assert f.code == "dead-units" and f.severity == "error"
    assert "8 of 8 units (100%) of layer 'act1' were zero for every one of 64 samples over logged steps 100–200" in (
        f.message
    )
    assert recent([0, 100, 200], Thresholds()) == [100, 200]
    assert recent([0], Thresholds()) == [0]
    assert recent(range(20), Thresholds()) == [15, 16, 17, 18, 19]


def test_dead_units_of_a_record_whose_width_changes_between_steps(synth, rng):
    """A softmax over each batch's sequence length has T units, a different T per batch: the pool crashed
    (np.stack of unequal arrays) and took `diagnose`, `show` and `report` down with it."""
    s = synth()
    for step, width in enumerate((5, 7, 6, 7, 7)):
        a = np.maximum(rng.normal(size=(8, width)), 0).astype(np.float32)
        a[:, 0] = 0.0  # one unit dead: below the threshold
        if step >= 3:
            a[:, : width - 1] = 0.0  # all but one dead at the last two steps (width 7)
        s.log(step, "output", "sm", a, unit_axis=-1)
    f = diagnose(s.run(), rules=[DeadUnitsRule()])[0]
    ev = f.evidence["layers"]["sm"]
    assert ev["units"] == 7 and ev["dead"] == 6 and ev["window_steps"] == [3, 4]  # the later half: steps 2-4


@pytest.mark.parametrize("x_rms", [100.0, 1.0])
def test_dead_units_behind_unnormalised_inputs_advise_normalising_them_first(synth, rng, x_rms):
    """Pixels 0-255 fed to a ReLU MLP: the root named the dead units, with "normalise inputs" as its last advice.
    The inputs' RMS is estimated from the first layer at step 0: rms(W·x) = rms(W) · sqrt(fan_in) · rms(x)."""
    layers = [{"name": "fc1", "type": "Linear"}, {"name": "act", "type": "ReLU"}, {"name": "out", "type": "Linear"}]
    s = synth(layers=layers)
    w = rng.normal(0, 0.1, size=(8, 16))
    x = rng.normal(size=(256, 16)) * x_rms
    for step in range(3):
        s.log(step, "weight", "fc1", w, tensor="fc1.weight")
        z = x @ w.T
        s.log(step, "output", "fc1", z, unit_axis=-1)
        s.log(step, "output", "act", np.maximum(z, 0) if step == 0 else np.zeros_like(z), unit_axis=-1)
        s.log(step, "output", "out", rng.normal(size=(256, 2)), unit_axis=-1)
    f = next(f for f in diagnose(s.run()) if f.code == "dead-units")
    scale = f.evidence["input_scale"]
    if x_rms == 1.0:
        # alive at step 0, dead after it: the advice starts from the steps that killed them
        assert scale is None and f.advice[0].startswith("Lower the learning rate: the units of 'act' were alive")
        return
    assert scale["layer"] == "fc1" and scale["step"] == 0
    assert scale["input_rms"] == pytest.approx(x_rms, rel=0.1)  # the estimate, against the inputs' true RMS
    assert f.advice[0].startswith("Normalise the inputs first: at step 0 the first layer 'fc1'")


def test_dead_units_all_dead_is_an_error_and_threshold(synth):
    s = synth()
    for step in range(3):
        s.log(step, "output", "act1", np.zeros((4, 6)), unit_axis=-1)
    r = s.run()
    f = diagnose(r)[0]
    assert f.code == "dead-units" and f.severity == "error"
    assert "6 of 6 units (100%)" in f.message


@pytest.mark.parametrize("alive_at_start", [True, False])
def test_dead_unit_advice_starts_from_what_killed_them(synth, rng, alive_at_start):
    """Units alive at the first logged step that died in training point at the steps, not the initialisation."""
    s = synth()
    for step in range(0, 60, 10):
        dead = step > 0 or not alive_at_start
        a = np.zeros((16, 6)) if dead else np.maximum(rng.normal(size=(16, 6)), 0) + 0.1
        s.log(step, "output", "act1", a, unit_axis=-1)
    (f,) = diagnose(s.run(), rules=[DeadUnitsRule()])
    if alive_at_start:
        assert f.advice[0].startswith("Lower the learning rate: the units of 'act1' were alive at step 0")
        assert f.advice[1].startswith("Initialise biases")
    else:
        assert f.advice[0].startswith("Initialise biases")


def test_dead_units_skip_without_unit_counts(synth):
    s = synth()
    s.log(0, "output", "act1", np.zeros((4, 6)))  # no unit_axis -> no units_active
    r = s.run()
    assert DeadUnitsRule().applies(r) is False
    assert "per-unit activity counts" in skipped_rules(r)["dead-units"][0]


@pytest.mark.parametrize(
    ("act", "layers"),
    [("tanh", [{"name": "h", "type": "Tanh"}]), ("sigmoid", [{"name": "h", "type": "Dense", "activation": "sigmoid"}])],
)
def test_saturated_units_gain_is_exact(synth, rng, act, layers):
    s = synth(layers=[*layers, {"name": "out", "type": "Linear"}])
    gains = []
    for step in range(6):
        z = rng.normal(0, 6.0, size=(32, 16))
        a = (np.tanh(z) if act == "tanh" else 1 / (1 + np.exp(-z))).astype(np.float32)
        a64 = a.astype(np.float64)
        gains.append(np.mean(1 - a64**2) if act == "tanh" else 4 * np.mean(a64 * (1 - a64)))
        s.log(step, "output", "h", a)
        s.log(step, "output", "out", rng.normal(size=(32, 2)))
    f = diagnose(s.run(), rules=[SaturatedUnitsRule()])[0]
    expected = float(np.median(gains[-3:]))  # six logged steps: the later half (recent_steps=5 would reach back to 1)
    assert f.code == "saturated-units" and f.layers == ("h",)
    assert f.evidence["layers"]["h"]["gain"] == pytest.approx(expected, rel=1e-9)
    assert f"the {act} layer 'h' passes back on average {expected:.3g} of the maximal gradient" in f.message
    assert "logged steps 3–5; threshold 0.25" in f.message
    assert ("of its outputs at |a| >= 0.5" in f.message) is (act == "tanh")  # a sigmoid's outputs are all >= 0


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_a_saturated_output_layer_is_a_confident_model_not_a_fault(synth, rng, act):
    """Dense(1, activation='sigmoid') with binary cross-entropy at 99 % accuracy: the output saturates on purpose
    (and the loss passes back p - y undiminished). It was a warning that made `gradsight diagnose` exit 1."""
    s = synth(layers=[{"name": "h", "type": "Linear"}, {"name": "out", "type": "Dense", "activation": act}])
    for step in range(6):
        s.log(step, "output", "h", rng.normal(size=(32, 8)))
        z = rng.normal(0, 8.0, size=(32, 1))
        s.log(step, "output", "out", (np.tanh(z) if act == "tanh" else 1 / (1 + np.exp(-z))).astype(np.float32))
    assert diagnose(s.run(), rules=[SaturatedUnitsRule()]) == []


@pytest.mark.parametrize("loss_falls", [True, False])
def test_units_that_saturate_while_the_loss_falls_are_info(synth, rng, loss_falls):
    """A BERT pooler's tanh grows confident as the classifier learns: info. Stalled, it stays a warning."""
    s = synth(layers=[{"name": "h", "type": "Tanh"}, {"name": "out", "type": "Linear"}])
    for step in range(60):
        if step % 10 == 0:
            spread = 1.0 if step == 0 else 8.0  # in range at the first logged step, saturated later
            s.log(step, "output", "h", np.tanh(rng.normal(0, spread, size=(32, 16))))
            s.log(step, "output", "out", rng.normal(size=(32, 2)))
        s.scalars(step, loss=2.0 * 0.98**step if loss_falls else 2.0 + 0.01 * rng.normal())
    (f,) = diagnose(s.run(), rules=[SaturatedUnitsRule()])
    assert f.code == "saturated-units" and f.severity == ("info" if loss_falls else "warning")
    if loss_falls:
        assert "saturated during training" in f.message and f.evidence["loss_end"] < f.evidence["loss_start"]
        assert f.evidence["layers"]["h"]["gain_first_logged"] > 0.25


def test_saturation_healthy_tanh_and_unknown_activation(synth, rng):
    s = synth(layers=[{"name": "h", "type": "Tanh"}, {"name": "lin", "type": "Linear"}])
    for step in range(6):
        s.log(step, "output", "h", np.tanh(rng.normal(0, 1.0, size=(32, 16))))
        s.log(step, "output", "lin", np.tanh(rng.normal(0, 8.0, size=(32, 16))))  # not identifiable: ignored
    assert diagnose(s.run(), rules=[SaturatedUnitsRule()]) == []


def test_saturation_skips_without_identifiable_activation(synth):
    s = synth(layers=[{"name": "lin", "type": "Linear"}])
    s.log(0, "output", "lin", np.ones((2, 2)))
    r = s.run()
    assert SaturatedUnitsRule().applies(r) is False
    assert diagnose(r, rules=[SaturatedUnitsRule()]) == []


# ---- update ratio -------------------------------------------------------------------------------------------
def test_update_ratio_high_and_low(synth):
    s = synth()
    for step in range(5):
        s.log(step, "weight", "fc1", np.full((4, 3), 0.5))
        s.log(step, "update", "fc1", np.full((4, 3), 0.25))  # ratio 0.5
        s.log(step, "weight", "fc2", np.full((2, 4), 1.0))
        s.log(step, "update", "fc2", np.full((2, 4), 1e-7))  # ratio 1e-7
    found = diagnose(s.run(), rules=[UpdateRatioRule()])
    assert codes(found) == ["update-ratio-high", "update-ratio-low"]
    hi, lo = found
    assert hi.layers == ("fc1",) and lo.layers == ("fc2",)
    assert (
        "layer 'fc1' moves by 0.5 of its weight norm per step (median over 5 logged steps), above the "
        "threshold 0.1" in hi.message
    )
    assert "layer 'fc2' moves by 1e-07 of its weight norm" in lo.message
    assert "below the threshold 1e-06" in lo.message


def test_update_ratio_skips_without_updates(synth):
    s = synth()
    s.log(0, "weight", "fc1", np.ones((2, 2)))
    r = s.run()
    assert UpdateRatioRule().missing(RunData(r)) == ["'update' summaries"]
    assert UpdateRatioRule().applies(r) is False
    assert skipped_rules(r)["update-ratio"] == ["'update' summaries"]


# ---- loss -----------------------------------------------------------------------------------------------------
def test_loss_not_decreasing(synth):
    s = synth()
    for step in range(20):
        s.scalars(step, loss=1.0 + 0.001 * (step % 3))
    f = diagnose(s.run())[0]
    assert f.code == "loss-not-decreasing" and f.layers == ()
    assert f.evidence["window"] == 4
    assert "median of the last 4 logged values is 1 against 1 for the first 4" in f.message


def test_loss_rising_and_decreasing(synth, tmp_path):
    s = synth()
    for step in range(20):
        s.scalars(step, loss=1.0 + step)
    f = diagnose(s.run())[0]
    # first 4: 1..4 median 2.5, last 4: 17..20 median 18.5 -> +640 %
    assert "is 18.5 against 2.5 for the first 4 (+640 %" in f.message
    s2 = synth("b.db")
    for step in range(20):
        s2.scalars(step, loss=1.0 / (1 + step))
    assert diagnose(s2.run()) == []


def test_loss_too_short_is_silent(synth):
    s = synth()
    for step in range(5):
        s.scalars(step, loss=1.0)
    assert diagnose(s.run(), rules=[LossNotDecreasingRule()]) == []


@pytest.mark.parametrize(("dtype", "first"), [("torch.float16", True), ("torch.bfloat16", False), ("float32", False)])
def test_nan_from_the_update_of_float16_parameters_advises_float32_master_weights_first(synth, dtype, first):
    """model.half() + Adam: the first NaN/Inf comes from the update; a lower learning rate cannot fix that."""
    s = synth()
    for step in range(3):
        s.log(step, "weight", "fc1", np.full((4, 3), 0.1), dtype=dtype)
        s.log(step, "grad", "fc1", np.full((4, 3), 1e-3), dtype=dtype)
        s.log(step, "update", "fc1", np.full((4, 3), np.nan if step == 0 else 0.0), dtype=dtype)
    f = next(f for f in diagnose(s.run()) if f.code == "non-finite")
    assert f.evidence["origin"]["kind"] == "update"
    assert f.advice[0].startswith("The parameters are float16: keep them") is first
    assert any(a.startswith("Lower the learning rate") for a in f.advice)


@pytest.mark.parametrize("recovers", [True, False])
def test_gradients_a_loss_scaler_skipped_are_not_a_fault_when_training_went_on(synth, recovers):
    """mixed_float16 / GradScaler: the first steps' scaled gradients overflow, the scaler skips them and lowers its
    scale. That was an error root ('first non-finite value at step 0') advising the loss scaler already in use."""
    s = synth()
    for step in range(12):
        skipped = step < 3 or (not recovers and step >= 6)
        values = {"loss": 2.0 - 0.05 * step, "step_skipped": 1.0 if skipped else 0.0}
        values["grad_nonfinite"] = 4.0 if skipped else 0.0
        values["grad_norm"] = math.inf if skipped else 1.0
        s.writer.log_scalars(step, values)
        g = np.full((4, 3), np.inf if skipped else 0.1)
        s.log(step, "output_grad", "fc1", g)
    found = [f for f in diagnose(s.run()) if f.code == "non-finite"]
    if recovers:
        assert found == []
    else:  # skipping to the end: the scaler never recovered, the overflow is real
        assert found and found[0].first_step == 6 and found[0].severity == "error"


def test_a_nan_loss_at_a_skipped_step_is_still_a_fault(synth):
    s = synth()
    for step in range(8):
        s.writer.log_scalars(step, {"loss": math.nan if step == 2 else 1.0, "step_skipped": float(step == 2)})
    (f,) = [f for f in diagnose(s.run()) if f.code == "non-finite"]
    assert f.first_step == 2 and f.evidence["origin"]["kind"] == "loss"


# ---- thresholds -----------------------------------------------------------------------------------------------
def test_thresholds_validation():
    with pytest.raises(InputError, match=r"unknown threshold\(s\) \['vanish'\]"):
        Thresholds.coerce({"vanish": 1})
    with pytest.raises(InputError, match=r"Thresholds.vanish_ratio must be a finite, non-negative number, got -1"):
        Thresholds(vanish_ratio=-1)
    with pytest.raises(InputError, match="update_ratio_low"):
        Thresholds(update_ratio_low=1.0, update_ratio_high=0.5)
    with pytest.raises(InputError, match="thresholds must be"):
        diagnose("x.db", thresholds=3)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="rules must be"):
        diagnose(__import__("pathlib").Path(__file__), rules=["x"])  # type: ignore[list-item]


def test_thresholds_unknown_keyword_is_explained_not_a_type_error():
    hint = r"unknown threshold\(s\) \['dead_fractoin'\] \('dead_fractoin': did you mean 'dead_fraction'\?\)"
    with pytest.raises(InputError, match=hint):
        Thresholds(dead_fractoin=0.3)  # type: ignore[call-arg]
    n = len(dataclasses.fields(Thresholds))
    with pytest.raises(InputError, match=f"at most {n} values"):
        Thresholds(*range(1, n + 2))  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"\['baseline_steps'\] both by position and by name"):
        Thresholds(3, baseline_steps=4)  # type: ignore[misc]
    assert Thresholds(dead_fraction=0.3).dead_fraction == 0.3  # the dataclass' own init still runs


@pytest.mark.parametrize(
    ("name", "value", "interval"),
    [
        ("dead_fraction", 2.0, "(0, 1]"),
        ("dead_fraction", 0.0, "(0, 1]"),
        ("saturation_gain", 1.5, "[0, 1]"),
        ("accumulate_fit", 1.01, "[0, 1]"),
        ("vanish_ratio", 3.0, "(0, 1]"),
        ("explode_growth", 0.5, "(1, inf)"),
        ("damage_loss_rise", 1.0, "(1, inf)"),
        ("init_scale_factor", 1.0, "(1, inf)"),
        ("lr_step_ratio", 0.0, "(0, inf)"),
    ],
)
def test_thresholds_out_of_their_meaningful_range_are_refused(name, value, interval):
    """A fraction above 1 or a growth factor at or below 1 would silently turn a rule off (or always on)."""
    with pytest.raises(InputError, match=rf"Thresholds\.{name} must be in {re.escape(interval)} .*got {value!r}"):
        Thresholds(**{name: value})
    with pytest.raises(InputError, match=rf"Thresholds\.{name}"):
        Thresholds.coerce({name: value})


def test_thresholds_at_the_edges_of_their_range_are_accepted():
    t = Thresholds(dead_fraction=1.0, saturation_gain=0.0, accumulate_fit=1.0, vanish_ratio=1.0, explode_growth=1.5)
    assert (t.dead_fraction, t.saturation_gain, t.vanish_ratio) == (1.0, 0.0, 1.0)


def test_exploding_in_a_short_run_is_the_root_of_its_nan(synth):
    s = synth()
    for step, v in enumerate([1.0, 30.0, 5000.0]):  # diverges within three steps
        s.scalars(step, grad_norm=v)
    s.scalars(3, grad_norm=float("nan"), grad_nonfinite=7)
    found = diagnose(s.run())
    # the explosion explains the NaN that follows it: root first (an error now: it ends in NaN), then the symptom
    assert codes(found) == ["exploding-gradients", "non-finite"]
    root, nan = found
    assert root.is_root and root.severity == "error" and not nan.is_root and nan.caused_by == ("exploding-gradients",)
    assert root.evidence["global"]["baseline_norm"] == 1.0  # step 2 against the level before it, not its own
    assert "grew 5e+03x, from 1 (the lowest of its running medians before step 2) to 5e+03 at step 2" in root.message
    assert "NaN/Inf followed at step 3" in root.message


# ---- no-steps-recorded --------------------------------------------------------------------------------------------
def test_no_steps_recorded_is_an_error_with_evidence_and_the_fix(synth):
    s = synth()
    s.writer.log_event(0, "no-optimizer-step", {"backward_passes": 3, "optimizer": None, "message": "..."})
    found = diagnose(s.run())
    assert codes(found) == ["no-steps-recorded"] and "no-steps-recorded" in CODES and CODE_DESCRIPTIONS[found[0].code]
    f = found[0]
    assert f.severity == "error" and f.first_step is None
    assert f.evidence["backward_passes"] == 3 and f.evidence["recorded_steps"] == 0
    assert "3 backward pass(es)" in f.message and "optimizer=None" in f.message
    assert any("optimizer=opt" in a for a in f.advice) and any("watch.step()" in a for a in f.advice)


def test_no_steps_recorded_names_an_optimizer_that_was_never_stepped(synth):
    s = synth()
    s.writer.log_event(0, "no-optimizer-step", {"backward_passes": 100, "optimizer": "Adam"})
    (f,) = diagnose(s.run())
    assert "(Adam) was never stepped" in f.message and f.evidence["optimizer"] == "Adam"


def test_diagnose_reads_a_run_without_any_metadata(tmp_path):
    # A run killed right after creation: the file exists, its meta table is empty.
    path = tmp_path / "bare.db"
    RunWriter(path).close()
    with sqlite3.connect(path) as con:
        con.execute("DELETE FROM meta")
    con.close()
    assert diagnose(path) == [] and isinstance(skipped_rules(path), dict)


def test_an_infinite_gradient_norm_without_non_finite_entries_is_not_a_nan_step(tmp_path):
    """Regression: float32 runs recorded an overflowing gradient norm (finite entries of ~1e21) as Inf, and the
    diagnosis counted that step as the first NaN/Inf while the loss turned Inf only a step later."""
    from gradsight.diagnose._series import nonfinite_steps

    with RunWriter(tmp_path / "r.db", meta={"framework": "torch"}) as w:
        for step in range(6):
            inf_norm = step == 3  # overflowed, no non-finite entry
            w.log_scalars(
                step,
                {
                    "loss": math.inf if step >= 4 else 1.0 + step,
                    "grad_norm": math.inf if inf_norm or step >= 4 else 10.0**step,
                    "grad_nonfinite": 5.0 if step >= 4 else 0.0,
                },
            )
    assert nonfinite_steps(RunData(tmp_path / "r.db")) == [4, 5]
    found = [f for f in diagnose(tmp_path / "r.db") if f.code == "non-finite"]
    assert found and "step 4" in found[0].message and "step 3" not in found[0].message


def test_update_ratio_from_per_step_norms_says_steps_not_logged_steps(tmp_path):
    """Regression: the finding said 'median over N logged steps' where N counted every step (the per-step
    norms), e.g. 'over 200 logged steps' for a run with 2 logged steps."""
    torch = pytest.importorskip("torch")
    import gradsight

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db", every=100) as w:
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(16, 4)).square().mean().backward()
            opt.step()
    low = [f for f in diagnose(w.path) if f.code == "update-ratio-low"]
    assert low and "(median over 6 steps" in low[0].message and "logged" not in low[0].message


@pytest.mark.parametrize("kind", ["Embedding", "Linear"])
def test_an_embedding_tables_diluted_gradient_is_not_vanishing(synth, rng, kind):
    """A batch reaches a few rows of a 1000-row table: its RMS is 1e-4 of the next layer's, but no row's is."""
    s = synth(layers=[{"name": "emb", "type": kind}, {"name": "fc", "type": "Linear"}])
    for step in range(5):
        table = np.zeros((1000, 8))
        table[:1] = rng.normal(0, 1e-4, size=(1, 8))
        s.log(step, "grad", "emb", table)
        s.log(step, "grad", "fc", rng.normal(0, 1.0, size=(8, 8)))
    found = diagnose(s.run(), rules=[VanishingGradientsRule()])
    assert [f.code for f in found] == ([] if kind == "Embedding" else ["vanishing-gradients"])


def test_all_zero_weights_are_named_not_a_zero_bias(synth):
    """Regression: kernel_initializer='zeros': 'the bias of fc1 has mean 0 ... initialise the bias at 0'."""
    from gradsight.diagnose import BadInitialisationRule

    s = synth(
        layers=[{"name": "fc1", "type": "Dense", "activation": "relu"}, {"name": "out", "type": "Dense"}],
        framework="keras",
    )
    s.log(0, "weight", "fc1", np.zeros((8, 16)), tensor="fc1/kernel")
    s.log(0, "weight", "fc1", np.zeros(16), tensor="fc1/bias")
    s.log(0, "output", "fc1", np.zeros((32, 16)), unit_axis=-1)
    s.log(0, "output", "out", np.zeros((32, 2)), unit_axis=-1)
    s.scalars(0, loss=2.3)
    (f,) = diagnose(s.run(), rules=[BadInitialisationRule()])
    assert f.evidence["layers"]["fc1"]["parameter"] == "weight", f.evidence["layers"]


# ---- logits-as-probabilities --------------------------------------------------------------------------------------
def _keras_run(synth, name, values, *, loss=None, outputs=("fc2",), framework="keras"):
    """A Keras-like run: the compiled loss and the output layer in the metadata, the output layer's values logged."""
    loss = [{"name": "sparse_categorical_crossentropy", "from_logits": False}] if loss is None else loss
    model = {"layers": [{"name": "fc1", "type": "Dense"}, {"name": "fc2", "type": "Dense", "activation": "linear"}]}
    s = synth(name, framework=framework, model={**model, "output_layers": list(outputs)}, loss=loss)
    for step, v in enumerate(values):
        s.log(step, "output", "fc2", v)
    return s.run()


def test_logits_as_probabilities_from_the_recorded_output_range(synth, rng):
    scores = [rng.normal(size=(8, 4)) for _ in range(3)]
    f = diagnose(_keras_run(synth, "a.db", scores), rules=[LogitsAsProbabilitiesRule()])
    assert [x.code for x in f] == ["logits-as-probabilities"] and f[0].severity == "error"
    lo, hi = min(s.min() for s in scores), max(s.max() for s in scores)
    assert f[0].evidence["output_min"] == pytest.approx(lo, rel=1e-6)
    assert f[0].evidence["output_max"] == pytest.approx(hi, rel=1e-6)
    assert f[0].evidence["steps_outside_0_1"] == 3 and f[0].first_step == 0 and f[0].layers == ("fc2",)
    assert "SparseCategoricalCrossentropy(from_logits=True)" in f[0].advice[0]
    # only the last step leaves [0, 1]: the finding starts there
    probs = [rng.dirichlet(np.ones(4), size=8) for _ in range(2)] + [scores[0]]
    g = diagnose(_keras_run(synth, "b.db", probs), rules=[LogitsAsProbabilitiesRule()])
    assert g[0].first_step == 2 and g[0].evidence["steps_outside_0_1"] == 1


@pytest.mark.parametrize(
    "case",
    ["probabilities", "from_logits", "unknown_loss", "squared_error", "two_losses", "no_output_layer", "torch"],
)
def test_logits_as_probabilities_stays_silent_without_all_its_evidence(synth, rng, case):
    values = [rng.normal(size=(8, 4)) for _ in range(3)]
    kw = {}
    if case == "probabilities":
        values = [rng.dirichlet(np.ones(4), size=8) for _ in range(3)]  # rows of a softmax: inside [0, 1]
    elif case == "from_logits":
        kw["loss"] = [{"name": "sparse_categorical_crossentropy", "from_logits": True}]
    elif case == "unknown_loss":
        kw["loss"] = [{"name": "sparse_categorical_crossentropy", "from_logits": None}]
    elif case == "squared_error":
        kw["loss"] = [{"name": "mean_squared_error", "from_logits": None}]
    elif case == "two_losses":
        kw["loss"] = [{"name": "binary_crossentropy", "from_logits": False}] * 2
    elif case == "no_output_layer":
        kw["outputs"] = ()
    else:
        kw["framework"] = "torch"
    assert diagnose(_keras_run(synth, "r.db", values, **kw), rules=[LogitsAsProbabilitiesRule()]) == []
