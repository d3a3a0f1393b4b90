"""The chain in ``gradsight diagnose`` and in online diagnosis: root first, then "because of"."""

import argparse
import warnings

import numpy as np

from gradsight.diagnose import GradsightWarning, OnlineDiagnosis
from gradsight.diagnose._cli import add_arguments, run

LAYERS = [{"name": "fc1", "type": "Dense", "activation": "relu"}, {"name": "out", "type": "Dense"}]


def _dead_bias_step(s, step, rng):
    s.log(step, "weight", "fc1", rng.normal(0, 0.3, (3, 8)), tensor="fc1/kernel")
    s.log(step, "weight", "fc1", np.full(8, -10.0), tensor="fc1/bias")
    s.log(step, "output", "fc1", np.zeros((16, 8)), unit_axis=-1)
    s.log(step, "weight", "out", rng.normal(0, 0.3, (8, 2)), tensor="out/kernel")
    s.log(step, "output", "out", rng.normal(size=(16, 2)), unit_axis=-1)


def test_cli_prints_the_root_first_and_the_symptoms_because_of_it(synth, rng, capsys):
    s = synth(layers=LAYERS, framework="keras")
    for step in range(6):
        _dead_bias_step(s, step, rng)
    s.run().close()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(s.path)])) == 1
    out = capsys.readouterr().out
    roots, symptoms = out.index("Root causes:"), out.index("Symptoms (because of the root causes above):")
    assert roots < out.index("bad-initialisation (step 0): Bad initialisation: the bias of 'fc1'") < symptoms
    assert symptoms < out.index("[ERROR] dead-units") < out.index("  because of: bad-initialisation")
    assert "try: Because of bad-initialisation (the root cause): see its advice" in out


def test_online_reports_the_root_first_and_says_what_a_symptom_is_because_of(synth, rng):
    s = synth(layers=LAYERS, framework="keras")
    seen = []
    online = OnlineDiagnosis(s.writer, on_finding=seen.append, full_every=6, stop_on=())
    for step in range(6):
        _dead_bias_step(s, step, rng)
        online.check(step)
    assert [(f.code, f.is_root) for f in seen] == [("bad-initialisation", True), ("dead-units", False)]
    assert seen[1].caused_by == ("bad-initialisation",)
    s2 = synth("b.db", layers=LAYERS, framework="keras")
    online = OnlineDiagnosis(s2.writer, full_every=6, stop_on=())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(6):
            _dead_bias_step(s2, step, rng)
            online.check(step)
    texts = [str(w.message) for w in caught if issubclass(w.category, GradsightWarning)]
    assert texts[0].startswith("gradsight error bad-initialisation at step 0: Bad initialisation")
    assert texts[1].startswith("gradsight error dead-units at step 0 (because of bad-initialisation): Dead units")
    online.close()
