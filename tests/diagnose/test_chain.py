"""One chain per cause: causal order, roots first, advice from the root, never both raising and lowering the LR."""

import dataclasses
import json

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from gradsight.diagnose import CODES, Finding, diagnose, sort_findings
from gradsight.diagnose._advice import lower_lr, lr_direction, raise_lr
from gradsight.diagnose._chain import CAUSAL_ORDER, EXPLAINS, link
from gradsight.diagnose._update_ratio import _LOW


def finding(code, severity="warning", layers=(), first=0, last=10, advice=("Do the thing.",), **evidence):
    return Finding(code, severity, tuple(layers), first, last, evidence=dict(evidence), advice=tuple(advice))


def test_every_code_has_a_causal_place_and_edges_point_forward():
    assert set(CODES) <= set(CAUSAL_ORDER)
    for cause, effects in EXPLAINS.items():
        for effect in effects:
            assert CAUSAL_ORDER.index(cause) < CAUSAL_ORDER.index(effect), (cause, effect)


def test_a_chain_roots_first_then_symptoms_in_causal_order():
    found = link(
        [
            finding("loss-not-decreasing", first=0, last=99),
            finding("update-ratio-low", layers=("fc1",), first=0, last=90, advice=_LOW["advice"]),
            finding("dead-units", "error", layers=("act1",), first=10, last=90),
            finding("learning-rate-too-high", first=0, last=10, advice=(lower_lr(" by 100x."),)),
        ]
    )
    assert [f.code for f in found] == [
        "learning-rate-too-high",
        "dead-units",
        "update-ratio-low",
        "loss-not-decreasing",
    ]
    root, dead, low, flat = found
    assert root.is_root and root.caused_by == () and root.severity == "error"  # as severe as what it explains
    assert root.evidence["explains"] == ["dead-units", "update-ratio-low", "loss-not-decreasing"]
    assert dead.caused_by == ("learning-rate-too-high",) and not dead.is_root
    assert low.caused_by == ("dead-units",)  # the nearest cause; the root is named in the advice
    assert flat.caused_by == ("update-ratio-low",)
    for symptom in (dead, low, flat):
        assert symptom.advice == (
            "Because of learning-rate-too-high (the root cause): see its advice; fixing it should resolve this too.",
        )
        assert symptom.evidence["root_causes"] == ["learning-rate-too-high"]
    # the symptom's own "raise the learning rate" is gone: advice comes from the root
    assert not any(lr_direction(a) > 0 for f in found for a in f.advice)


def test_a_cause_that_comes_after_its_would_be_effect_explains_nothing():
    found = link([finding("learning-rate-too-high", first=50, last=55), finding("dead-units", first=0, last=10)])
    assert all(f.is_root for f in found)


def test_info_findings_explain_nothing():
    found = link([finding("gradients-clipped", "info"), finding("loss-not-decreasing")])
    assert all(f.is_root for f in found)


def test_findings_made_outside_a_diagnosis_are_roots_and_serialise_the_chain():
    f = finding("dead-units")
    assert f.is_root and f.caused_by == ()
    d = json.loads(
        json.dumps(
            link([finding("bad-initialisation", layers=("fc1",)), finding("dead-units", layers=("fc1",))])[1].to_dict()
        )
    )
    assert d["caused_by"] == ["bad-initialisation"] and d["is_root"] is False
    assert (
        "because of: bad-initialisation"
        in link([finding("bad-initialisation", layers=("a",)), finding("dead-units", layers=("a",))])[1].to_text()
    )


def test_sort_findings_keeps_most_severe_first_for_plain_findings():
    plain = [finding("update-ratio-low"), finding("non-finite", "error"), finding("vanishing-gradients")]
    assert [f.code for f in sort_findings(plain)] == ["non-finite", "vanishing-gradients", "update-ratio-low"]


_ADVICE = [
    lower_lr(" (try 10x lower)."),
    raise_lr(", or use Adam."),
    "Increase the learning rate tenfold.",
    "Reduce the learning rate and add a warm-up.",
    "Use a higher learning rate for the head.",
    "Sweep the learning rate from 1e-4 to 1e-1.",
    "Clip gradients.",
]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(CODES),
            st.sampled_from(["warning", "error", "info"]),
            st.integers(0, 50),
            st.lists(st.sampled_from(_ADVICE), min_size=1, max_size=3),
            st.lists(st.sampled_from(["a", "b", "c"]), max_size=2),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_no_report_advises_both_raising_and_lowering_the_learning_rate(specs):
    found = link([finding(c, s, layers, first, first + 10, advice) for c, s, first, advice, layers in specs])
    directions = {lr_direction(a) for f in found for a in f.advice}
    assert not {-1, 1} <= directions
    lowering = any(lr_direction(a) < 0 for _, _, _, advice, _ in specs for a in advice)
    if lowering:  # the raising items were withheld, and the finding says so
        for f in found:
            for item in f.evidence.get("advice_withheld", []):
                assert lr_direction(item) > 0


def test_lr_direction_reads_the_lead_phrases_and_free_text():
    assert lr_direction(lower_lr(".")) == -1 and lr_direction(raise_lr(".")) == 1
    assert lr_direction("Lower the learning rate; large early steps are the usual way units die.") == -1
    assert lr_direction("Sweep the learning rate over a few orders of magnitude.") == 0
    assert lr_direction("Do not raise the learning rate: learning-rate-too-high advises lowering it.") == 0
    assert lr_direction("Check the weight scale: huge weights make any update relatively small.") == 0


def test_echo_layers_are_folded_into_the_dead_layer(synth, rng):
    layers = [
        {"name": "conv", "type": "Conv2d", "params": {"weight": [4, 1, 3, 3]}},
        {"name": "relu", "type": "ReLU"},
        {"name": "pool", "type": "MaxPool2d"},
        {"name": "flat", "type": "Flatten"},
        {"name": "fc", "type": "Linear", "params": {"weight": [2, 16]}},
    ]
    s = synth(layers=layers)
    for step in range(6):
        s.log(step, "output", "conv", rng.normal(size=(8, 4, 4, 4)), unit_axis=1)
        s.log(step, "output", "relu", np.zeros((8, 4, 4, 4)), unit_axis=1)
        s.log(step, "output", "pool", np.zeros((8, 4, 2, 2)), unit_axis=1)
        s.log(step, "output", "flat", np.zeros((8, 16)), unit_axis=-1)
        s.log(step, "output", "fc", rng.normal(size=(8, 2)), unit_axis=-1)
    (f,) = [f for f in diagnose(s.run()) if f.code == "dead-units"]
    assert f.layers == ("relu",)
    assert f.evidence["echoes"] == {"pool": "relu", "flat": "relu"}
    assert f.evidence["layers"]["relu"]["echoes"] == ["pool", "flat"]
    assert "'pool' (MaxPool2d), 'flat' (Flatten), pass its zeros on" in f.message


def test_a_layer_left_out_of_the_optimizer_explains_the_vanishing_it_is_the_reference_for():
    """Its .grad is never cleared by optimizer.zero_grad(): it adds up, and every earlier layer looks vanishing."""
    cause = finding("not-optimized", layers=("head",), first=0, last=99)
    vanishing = finding("vanishing-gradients", layers=("emb", "rnn"), first=0, last=90)
    assert all(f.is_root for f in link([cause, vanishing]))  # no common layer, no reference: unrelated
    measured = dataclasses.replace(vanishing, evidence={"layers": [{"layer": "emb", "downstream_layer": "head"}]})
    found = link([cause, measured])
    assert [f.code for f in found] == ["not-optimized", "vanishing-gradients"]
    assert found[1].caused_by == ("not-optimized",)


def test_a_weight_scale_initialisation_explains_dead_units_of_the_activation_after_its_layer(synth):
    """The weight-scale form names the weighted layers, the unit rules the activation after them."""
    from gradsight.diagnose import RunData

    s = synth(layers=[{"name": "conv2", "type": "Conv2d"}, {"name": "relu2", "type": "ReLU"}])
    s.log(0, "weight", "conv2", np.full((4, 3), 1e-3))
    data = RunData(s.run())
    cause = finding("bad-initialisation", "error", layers=("conv2",), first=0, last=0)
    found = link([cause, finding("dead-units", "error", layers=("relu2",), first=10, last=90)], data)
    assert [f.code for f in found] == ["bad-initialisation", "dead-units"]
    assert found[1].caused_by == ("bad-initialisation",)
