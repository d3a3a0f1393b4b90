"""No silent wrong result, no raw traceback: the command line on bad, hostile and unusual inputs.

Each case runs ``gradsight.cli.main`` in-process (or ``python -m gradsight`` where the process matters) and checks
the exit status, that no traceback reaches stderr, and the key words of the message — or the exact right result.
Run files are written with :class:`gradsight.RunWriter` (numpy only), never by training.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradsight import RunWriter, summarize
from gradsight.cli import main
from gradsight.store import is_run_file

ANSI = "fc\x1b[31m\x1b[2J\r\x00"  # colour, clear-screen, carriage return, NUL


def write_run(path: Path, *, layers=("fc1", "fc2"), steps=(0, 1, 2, 3), nan_layer: str | None = None) -> Path:
    """A small run file: weight/grad/output summaries per layer, a loss per step."""
    rng = np.random.default_rng(0)
    with RunWriter(path, meta={"framework": "torch", "scenario": "test"}) as w:
        for step in steps:
            rows = []
            for layer in layers:
                weight = rng.normal(size=(4, 4))
                grad = rng.normal(size=(4, 4)) * 1e-2
                if layer == nan_layer and step >= 2:
                    grad[0, 0] = np.nan
                rows.append((w.tensor_id(f"{layer}.weight", layer, "weight", (4, 4), "float32"), summarize(weight)))
                rows.append((w.tensor_id(f"{layer}.weight", layer, "grad", (4, 4), "float32"), summarize(grad)))
                out = np.maximum(rng.normal(size=(8, 4)), 0)
                rows.append((w.tensor_id(layer, layer, "output", (8, 4), "float32"), summarize(out, unit_axis=-1)))
            w.log_summaries(step, rows)
            w.log_scalars(step, {"loss": 1.0 / (step + 1)})
    return path


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; argparse's usage errors (SystemExit) count as their exit status."""
    try:
        code = main([os.fspath(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


@pytest.fixture
def run_file(tmp_path) -> Path:
    return write_run(tmp_path / "run.db")


@pytest.fixture
def other_run(tmp_path) -> Path:
    return write_run(tmp_path / "other.db", steps=(0, 1))


# ---- 1. outputs never overwrite a run file ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["export", "csv", "{run}", "-o", "{run}", "--overwrite"], "is the run file itself"),
        (["export", "parquet", "{run}", "-o", "{run}", "--overwrite"], "is the run file itself"),
        (["export", "csv", "{run}", "-o", "{other}", "--overwrite"], "is a gradsight run file"),
        (["export", "parquet", "{run}", "-o", "{other}"], "is a gradsight run file"),
        (["report", "{run}", "-o", "{other}"], "is a gradsight run file"),
        (["report", "{run}", "-o", "{run}"], "is the run file itself"),
        (["export", "tensorboard", "{run}", "--logdir", "{other}", "--overwrite"], "is a gradsight run file"),
    ],
    ids=["csv-onto-input", "parquet-onto-input", "csv-onto-other-run", "parquet-onto-other-run",
         "report-onto-other-run", "report-onto-input", "tensorboard-logdir-is-a-run"],
)  # fmt: skip
def test_outputs_never_replace_a_run_file(argv, words, run_file, other_run, capsys):
    argv = [a.format(run=run_file, other=other_run) for a in argv]
    code, _, err = cli(argv, capsys)
    assert code == 2
    assert words in err and "error:" in err
    assert is_run_file(run_file) and is_run_file(other_run)


# ---- 2. step ranges --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("steps", "words"),
    [
        ("10:5", "empty range"),
        ("a:b", "whole step numbers"),
        ("--steps=-3:5", "count from 0"),
        ("-3:5", "count from 0"),  # regression: as a separate argument, argparse said only "expected one argument"
        ("-5:", "count from 0"),
        (":", "FIRST:LAST"),
        ("7", "FIRST:LAST"),
        ("100:", "selects no step"),
        ("10:20", "from 0 to 3"),
    ],
)
def test_bad_step_ranges_are_errors(steps, words, run_file, tmp_path, capsys):
    flag = [steps] if steps.startswith("--") else ["--steps", steps]
    code, _, err = cli(["export", "tensorboard", run_file, "--logdir", tmp_path / "tb", *flag], capsys)
    assert code == 2 and words in err
    assert not list((tmp_path / "tb").glob("events.*")) if (tmp_path / "tb").exists() else True


def test_csv_step_range_selecting_nothing_names_the_recorded_steps(run_file, tmp_path, capsys):
    code, _, err = cli(["export", "csv", run_file, "-o", tmp_path / "x.csv", "--steps", "50:60"], capsys)
    assert code == 2 and "selects no step" in err and "from 0 to 3" in err
    assert not (tmp_path / "x.csv").exists()


def test_open_ended_step_range_exports_those_steps(run_file, tmp_path, capsys):
    import pandas as pd

    code, _, _ = cli(["export", "csv", run_file, "-o", tmp_path / "x.csv", "--steps", "2:"], capsys)
    assert code == 0
    assert sorted(pd.read_csv(tmp_path / "x.csv")["step"].unique()) == [2, 3]


def test_python_api_rejects_inverted_steps(run_file, tmp_path):
    from gradsight import InputError
    from gradsight.export import to_csv, to_tensorboard

    with pytest.raises(InputError, match="empty range"):
        to_tensorboard(run_file, tmp_path / "tb", steps=(10, 5))
    with pytest.raises(InputError, match="count from 0"):
        to_csv(run_file, tmp_path / "x.csv", steps=(-1, 2))
    with pytest.raises(InputError, match="selects no step"):
        to_csv(run_file, tmp_path / "x.csv", steps=(8, None))
    assert not (tmp_path / "x.csv").exists() and not list(tmp_path.glob("tb/events.*"))


# ---- 3. control characters never reach the terminal raw ---------------------------------------------------------
@pytest.mark.parametrize("command", ["show", "diagnose"])
def test_control_characters_are_escaped(command, tmp_path, capsys):
    path = write_run(tmp_path / "run.db", layers=(ANSI, "fc2"), nan_layer=ANSI)
    code, out, _ = cli([command, path], capsys)
    assert code in (0, 1)
    assert not any(c in out for c in "\x1b\r\x00")
    assert "fc\\x1b[31m\\x1b[2J\\x0d\\x00" in out


# ---- 5. a folder stands for the one run file inside --------------------------------------------------------------
@pytest.mark.parametrize("command", [["show"], ["diagnose"], ["diagnose", "--json"]])
def test_folder_gives_the_same_output_as_its_run_file(command, tmp_path, capsys):
    folder = tmp_path / "gradsight-demo-x"
    folder.mkdir()
    path = write_run(folder / "run.db", nan_layer="fc1")
    (folder / "report.html").write_text("<html></html>")
    code_file, out_file, _ = cli([*command, path], capsys)
    code_dir, out_dir, _ = cli([*command, folder], capsys)
    assert (code_dir, out_dir) == (code_file, out_file)


def test_report_and_export_of_a_folder_write_next_to_its_run(tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    write_run(folder / "run.db")
    assert cli(["report", folder], capsys)[0] == 0
    assert cli(["export", "csv", folder], capsys)[0] == 0
    assert (folder / "run.html").is_file() and (folder / "run.csv").is_file()


@pytest.mark.parametrize(
    ("files", "words"),
    [([], "it is empty"), (["notes.txt"], "'notes.txt'"), (["a.db", "b.db"], "2 run files ('a.db', 'b.db')")],
)
def test_folder_without_exactly_one_run_is_explained(files, words, tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    for name in files:
        write_run(folder / name) if name.endswith(".db") else (folder / name).write_text("x")
    code, _, err = cli(["show", folder], capsys)
    assert code == 2 and words in err and "gradsight show" in err


# ---- 6. one spelling of --framework ------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["explain", "demo"])
@pytest.mark.parametrize("spelling", ["torch", "pytorch", "tensorflow", "tf", "keras", "TF"])
def test_framework_synonyms_are_accepted(command, spelling, capsys):
    code, out, _ = cli([command, "--framework", spelling, "--list"], capsys)
    assert code == 0 and out.strip()


@pytest.mark.parametrize("command", ["explain", "demo"])
def test_unknown_framework_lists_the_choices(command, capsys):
    code, _, err = cli([command, "--framework", "jax", "--list"], capsys)
    assert code == 2 and "torch, pytorch, tensorflow, tf, keras" in err


@pytest.mark.parametrize("command", ["explain", "demo"])
def test_help_shows_the_same_framework_choices(command, capsys):
    code, out, _ = cli([command, "--help"], capsys)
    assert code == 0 and "{torch,pytorch,tensorflow,tf,keras}" in out


# ---- 4 and 7. unwritable outputs, odd paths, interrupts and our own bugs ----------------------------------------
def test_report_into_a_missing_folder(run_file, tmp_path, capsys):
    code, _, err = cli(["report", run_file, "-o", tmp_path / "nope" / "r.html"], capsys)
    assert code == 2 and "does not exist" in err


def test_report_into_an_unwritable_place(run_file, capsys):
    code, _, err = cli(["report", run_file, "-o", "/proc/gradsight-report.html"], capsys)
    assert code == 2 and "cannot write" in err and "/proc/gradsight-report.html" in err


def test_non_utf8_paths_work(run_file, tmp_path, capsys):
    folder = tmp_path / os.fsdecode(b"r\xffn")
    folder.mkdir()
    shutil.copy(run_file, folder / "run.db")
    out_html = folder / os.fsdecode(b"rep\xff.html")
    code, out, _ = cli(["report", folder, "-o", out_html], capsys)
    assert code == 0 and out_html.is_file() and "\\xff" in out
    code, out, _ = cli(["export", "csv", folder], capsys)
    assert code == 0 and (folder / "run.csv").is_file()
    code, out, _ = cli(["show", folder], capsys)
    assert code == 0 and "r\\xffn" in out


def test_a_failed_report_leaves_nothing_behind(run_file, tmp_path, capsys, monkeypatch):
    import gradsight.show._html as html_mod

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(html_mod.Path, "write_bytes", boom)
    code, _, err = cli(["report", run_file, "-o", tmp_path / "r.html"], capsys)
    assert code == 2 and "No space left on device" in err
    assert sorted(p.name for p in tmp_path.iterdir() if "html" in p.name) == []


def test_a_failed_demo_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    from gradsight import zoo

    def fail(name, *, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zoo, "run_scenario", fail)
    out = tmp_path / "demo-out"
    code, _, err = cli(["demo", "--out", out, "--framework", "torch"], capsys)
    assert code == 2 and "No space left on device" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("exc", "status", "words"),
    [
        (KeyboardInterrupt(), 130, "interrupted"),
        (PermissionError(13, "Permission denied", "/some/where"), 2, "Permission denied"),
        (UnicodeEncodeError("ascii", "é", 0, 1, "ordinal not in range"), 2, "could not be encoded"),
        (ZeroDivisionError("division by zero"), 1, "bug in gradsight"),
    ],
    ids=["ctrl-c", "oserror", "unicode", "our-bug"],
)
def test_unexpected_exceptions_become_one_paragraph(exc, status, words, run_file, capsys, monkeypatch):
    import gradsight.show._show as show_mod

    def raise_it(*a, **k):
        raise exc

    monkeypatch.setattr(show_mod, "print_show", raise_it)
    monkeypatch.delenv("GRADSIGHT_DEBUG", raising=False)
    code, _, err = cli(["show", run_file], capsys)
    assert code == status and words in err
    assert err.count("\n") == 1  # one paragraph
    if status == 1:
        assert "ZeroDivisionError" in err and "GRADSIGHT_DEBUG=1" in err


def test_debug_mode_shows_our_bugs_traceback(run_file, monkeypatch):
    import gradsight.show._show as show_mod

    monkeypatch.setattr(show_mod, "print_show", lambda *a, **k: 1 / 0)
    monkeypatch.setenv("GRADSIGHT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["show", str(run_file)])


def test_a_missing_run_file_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gradsight", "show", str(tmp_path / "missing.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "missing.db" in proc.stderr
