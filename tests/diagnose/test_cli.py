import argparse
import json

from gradsight.diagnose._cli import add_arguments, run

from .conftest import healthy_step


def _run_cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="gradsight diagnose")
    add_arguments(parser)
    code = run(parser.parse_args(argv))
    return code, capsys.readouterr().out


def test_cli_text_most_severe_first_and_exit_1(synth, rng, capsys):
    s = synth()
    for step in range(20):
        healthy_step(s, step, rng, loss=1.0, nan_at=("output", "fc2") if step == 15 else None)
    s.run().close()
    code, out = _run_cli([str(s.path)], capsys)
    assert code == 1
    assert "finding(s) in" in out
    err = out.index("[ERROR] non-finite (step 15): First non-finite value at step 15")
    warn = out.index("[WARNING] loss-not-decreasing")
    assert err < warn
    assert "  try: " in out


def test_cli_json_and_exit_0(synth, rng, capsys):
    s = synth()
    for step in range(20):
        healthy_step(s, step, rng)
    s.run().close()
    code, out = _run_cli([str(s.path), "--json"], capsys)
    assert code == 0
    assert json.loads(out) == []
    code, out = _run_cli([str(s.path)], capsys)
    assert code == 0 and out.startswith("No findings in")


def test_cli_json_fields(synth, rng, capsys):
    s = synth()
    for step in range(12):
        s.scalars(step, loss=1.0)
    s.run().close()
    code, out = _run_cli([str(s.path), "--json"], capsys)
    assert code == 1
    (f,) = json.loads(out)
    assert set(f) == {
        "code",
        "severity",
        "layers",
        "first_step",
        "last_step",
        "evidence",
        "message",
        "explanation",
        "advice",
        "caused_by",
        "is_root",
    }
    assert f["code"] == "loss-not-decreasing" and f["first_step"] == 0 and f["last_step"] == 11
    assert f["evidence"]["loss_start"] == 1.0


def test_cli_threshold_override_and_skips(synth, capsys):
    s = synth()
    for step in range(12):
        s.scalars(step, loss=1.0)
    s.run().close()
    code, out = _run_cli([str(s.path), "--threshold", "loss_min_decrease=0"], capsys)
    assert code == 0
    assert "Skipped (data not recorded):" in out and "dead-units: needs 'output' summaries" in out


def test_cli_bad_threshold(synth, capsys):
    import pytest

    from gradsight import InputError

    s = synth()
    s.run().close()
    with pytest.raises(InputError, match="--threshold expects NAME=VALUE"):
        _run_cli([str(s.path), "--threshold", "vanish_ratio"], capsys)
    with pytest.raises(InputError, match=r"Thresholds.dead_fraction must be in \(0, 1\]"):
        _run_cli([str(s.path), "--threshold", "dead_fraction=2"], capsys)


def test_cli_text_never_reads_layer_names_as_rich_markup(synth, capsys):
    import numpy as np

    name = "[bold red]fc1[/] :smile:"
    s = synth(layers=[{"name": name, "type": "Linear"}])
    for step in range(3):
        s.log(step, "grad", name, np.array([[1.0, np.nan if step == 2 else 1.0]]))
    s.run().close()
    code, out = _run_cli([str(s.path)], capsys)
    assert code == 1
    assert "[ERROR] non-finite" in out and name in out and "\x1b" not in out
