"""``gradsight show``, ``gradsight report`` and ``gradsight demo``, through the real dispatcher."""

import importlib.util
import io
import time

import pytest
from _synthetic import XSS

from gradsight import InputError, cli
from gradsight.show._cli_demo import ProgressBar

COMMANDS = {
    "show": ("gradsight.show._cli_show", "print a summary table of a run"),
    "report": ("gradsight.show._cli_report", "write the HTML report of a run"),
    "demo": ("gradsight.show._cli_demo", "train, watch and diagnose a built-in scenario"),
}


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    """Register the commands as the lead will in cli._COMMANDS (a no-op once they are registered there)."""
    monkeypatch.setattr(cli, "_COMMANDS", {**cli._COMMANDS, **COMMANDS})


def test_show_prints_the_layer_table_and_findings(make_run, capsys):
    path = make_run(layers=["dense", XSS], steps=6, dead_layer=0)
    assert cli.main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "framework torch" in out and "6 logged, 0 to 5" in out
    assert "grad RMS" in out and XSS in out
    assert "findings" in out


def test_show_shortens_long_names(make_run, capsys):
    path = make_run(layers=["x" * 100, "y"], steps=2)
    assert cli.main(["show", str(path), "--width", "20"]) == 0
    assert "xxxxxxxxx…xxxxxxxxxx" in capsys.readouterr().out


def test_show_width_below_its_minimum_is_refused_not_clamped(make_run, capsys):
    path = make_run(layers=["x" * 100], steps=2)
    assert cli.main(["show", str(path), "--width", "3"]) == 2
    assert "--width must be an integer of at least 8" in capsys.readouterr().err
    from gradsight.show import render_show

    for bad in (0, 7, 8.5, True):
        with pytest.raises(InputError, match=f"width must be an integer of at least 8.*got {bad!r}; e.g. width=20"):
            render_show(path, findings=[], width=bad)
    assert "xxx…xxxx" in render_show(path, findings=[], width=8)  # the minimum itself: both ends kept


def test_report_writes_the_file_and_prints_its_path(make_run, tmp_path, capsys):
    path = make_run(steps=4)
    out = tmp_path / "r.html"
    assert cli.main(["report", str(path), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_missing_run_file_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["show", str(tmp_path / "nope.db")]) == 2
    assert "no run file at" in capsys.readouterr().err


def test_progress_bar_follows_the_run_file(make_run, tmp_path):
    stream = io.StringIO()
    path = make_run(steps=8)
    with ProgressBar(path, 8, label="training", stream=stream, interval=0.01):
        time.sleep(0.1)
    text = stream.getvalue()
    assert "8/8 steps" in text and "training 0/8 steps" in text
    assert "\x1b" not in text and "\r" not in text  # not a terminal: plain lines only
    assert len(text.splitlines()) <= 6  # 0 %, each further quarter, the end


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_is_a_rich_bar(make_run, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    stream = _Terminal()
    path = make_run(steps=8)
    with ProgressBar(path, 8, label="training", stream=stream, interval=0.01):
        time.sleep(0.1)
    text = stream.getvalue()
    assert "training" in text and "8/8" in text and "steps" in text
    assert "\x1b[" in text  # drawn in place with escape sequences
    assert "━" in text  # rich's bar


RICH_MARKUP = "[bold red]boom[/] :smile:"


def test_show_never_reads_names_as_rich_markup(make_run, capsys):
    path = make_run(layers=["dense", RICH_MARKUP], steps=4)
    assert cli.main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert RICH_MARKUP in out and "\x1b" not in out


def test_show_on_a_terminal_is_coloured_and_still_escaped(make_run, monkeypatch):
    from gradsight._cli_support import console
    from gradsight.show._show import show_renderables

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    stream = _Terminal()
    out = console(stream, width=200)
    for part in show_renderables(make_run(layers=["fc\x1b[2J", RICH_MARKUP], steps=4, dead_layer=0), width=40):
        out.print(part)
    text = stream.getvalue()
    assert "\x1b[1m" in text  # bold header: rich is colouring
    assert RICH_MARKUP in text and "fc\\x1b[2J" in text and "\x1b[2J" not in text


def test_import_gradsight_does_not_import_rich():
    import subprocess
    import sys

    code = "import sys, gradsight, gradsight.show, gradsight.diagnose; print('rich' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == (
        "False"
    )


HAS_ZOO = importlib.util.find_spec("gradsight.zoo") is not None


@pytest.mark.skipif(not HAS_ZOO, reason="gradsight.zoo (the fault zoo) has not landed in this checkout yet")
def test_demo_lists_the_scenarios(capsys):
    assert cli.main(["demo", "--list"]) == 0
    assert "(default)" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ZOO, reason="gradsight.zoo (the fault zoo) has not landed in this checkout yet")
def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--steps", "30"]) == 0
    captured = capsys.readouterr()
    (folder,) = tmp_path.glob("gradsight-demo-*")
    assert (folder / "run.db").is_file() and (folder / "report.html").is_file()
    assert f"report:   {folder / 'report.html'}" in captured.out
    assert "Findings" in captured.out
    assert "30/30 steps" in captured.err
    # a non-empty folder is never reused
    assert cli.main(["demo", "--steps", "5", "--out", str(folder)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_ZOO, reason="gradsight.zoo (the fault zoo) has not landed in this checkout yet")
def test_demo_unknown_scenario_is_explained(tmp_path, capsys):
    assert cli.main(["demo", "--scenario", "nope", "--out", str(tmp_path / "d")]) == 2
    assert "unknown scenario 'nope'" in capsys.readouterr().err
