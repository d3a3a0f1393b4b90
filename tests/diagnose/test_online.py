import warnings

import numpy as np
import pytest

from gradsight import InputError
from gradsight.diagnose import GradsightWarning, OnlineDiagnosis, TrainingStopped

from .conftest import healthy_step


def test_online_reports_nonfinite_once_and_flags_stop(synth, rng):
    s = synth()
    online = OnlineDiagnosis(s.writer)
    for step in range(4):
        healthy_step(s, step, rng)
        assert online.check(step) == []
    assert not online.should_stop
    healthy_step(s, 4, rng, nan_at=("output", "act1"))
    with pytest.warns(
        GradsightWarning, match=r"gradsight error non-finite at step 4: First non-finite value at step 4"
    ):
        new = online.check(4)
    assert [f.code for f in new] == ["non-finite"]
    assert online.should_stop and online.stop_finding is new[0]
    # later steps keep the NaN: nothing is reported again, also on a full evaluation
    healthy_step(s, 5, rng, nan_at=("output", "fc2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert online.check(5) == []
        assert [f.code for f in online.check(6, full=True)] == []
    online.close()
    r = s.run()
    events = r.events("finding")
    assert [(e["step"], e["code"]) for e in events] == [(4, "non-finite")]
    assert events[0]["layers"] == ["act1"]


def test_online_raise_on_stop(synth, rng):
    s = synth()
    online = OnlineDiagnosis(s.writer, on_finding=None, raise_on_stop=True)
    healthy_step(s, 0, rng, nan_at=("grad", "fc1"))
    with pytest.raises(TrainingStopped, match="training stopped by gradsight: First non-finite value at step 0") as e:
        online.check(0)
    assert e.value.finding.layers == ("fc1",)


def test_online_callback_full_rules_once_each(synth, rng):
    s = synth()
    seen = []
    online = OnlineDiagnosis(s.writer, on_finding=seen.append, full_every=3, stop_on=())
    for step in range(12):
        a = np.maximum(rng.normal(size=(16, 10)), 0).astype(np.float32)
        a[:, :8] = 0.0
        s.log(step, "output", "act1", a, unit_axis=-1)
        if step >= 6:
            s.log(step, "output", "act2", np.zeros((16, 4)), unit_axis=-1)
        online.check(step)
    # dead units in act1 reported at the first full check (call 3), once more when act2 joins (call 9), never again
    assert [(f.code, f.layers) for f in seen] == [("dead-units", ("act1",)), ("dead-units", ("act1", "act2"))]
    assert not online.should_stop
    assert online.finish() == []


def test_online_on_a_path_before_the_file_exists_warns_once(tmp_path):
    online = OnlineDiagnosis(tmp_path / "missing.db")  # may be made before the watch creates the file
    with pytest.warns(GradsightWarning, match="does not exist"):  # a typo would never fill: said, once
        assert online.check() == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert online.check() == []


def test_online_argument_errors(synth):
    s = synth()
    with pytest.raises(InputError, match=r"stop_on names unknown finding code\(s\) \['nan'\]"):
        OnlineDiagnosis(s.writer, stop_on=("nan",))
    with pytest.raises(InputError, match="on_finding must be 'warn', a callable or None, got 'print'"):
        OnlineDiagnosis(s.writer, on_finding="print")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="full_every must be a positive integer, got 0"):
        OnlineDiagnosis(s.writer, full_every=0)
    with pytest.raises(InputError, match="has no 'path'"):
        OnlineDiagnosis(object()).check()


def test_check_args_raises_what_the_constructor_raises_without_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    OnlineDiagnosis.check_args()  # the defaults are valid
    OnlineDiagnosis.check_args(on_finding=None, stop_on=(), full_every=1, thresholds={"vanish_ratio": 1e-4})
    with pytest.raises(InputError, match=r"stop_on names unknown finding code\(s\) \['nan'\]"):
        OnlineDiagnosis.check_args(stop_on=("nan",))
    with pytest.raises(InputError, match="on_finding must be 'warn', a callable or None, got 'print'"):
        OnlineDiagnosis.check_args(on_finding="print")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="full_every must be a positive integer, got 0"):
        OnlineDiagnosis.check_args(full_every=0)
    with pytest.raises(InputError, match=r"unknown threshold\(s\) \['vanish'\]"):
        OnlineDiagnosis.check_args(thresholds={"vanish": 1.0})
    assert list(tmp_path.iterdir()) == []  # no run file, no directory


def test_stop_on_a_single_string_says_how_to_write_it(synth):
    with pytest.raises(InputError, match=r"got the string 'non-finite'; write stop_on=\('non-finite',\)"):
        OnlineDiagnosis(synth().writer, stop_on="non-finite")
    with pytest.raises(InputError, match="got the string 'non-finite'"):
        OnlineDiagnosis.check_args(stop_on="non-finite")


def test_stop_on_accepts_codes_of_custom_rules(synth):
    from gradsight.diagnose import DEFAULT_RULES, Rule

    class Custom(Rule):
        codes = ("my-code",)

    OnlineDiagnosis.check_args(rules=[*DEFAULT_RULES, Custom()], stop_on=("my-code",))
    with pytest.raises(InputError, match="unknown finding code"):
        OnlineDiagnosis.check_args(stop_on=("my-code",))
