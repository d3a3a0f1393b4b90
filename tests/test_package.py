"""Package-level contracts: import cost, the public surface, the CLI shell."""

import subprocess
import sys

import pytest

import gradsight
from gradsight.cli import main


def test_import_does_not_import_any_framework():
    # Run in a fresh interpreter: this test process may already hold torch or tensorflow.
    code = (
        "import sys, gradsight; "
        "bad = [m for m in ('torch', 'tensorflow', 'keras', 'matplotlib') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_surface_is_explicit():
    for name in gradsight.__all__:
        assert hasattr(gradsight, name), name


def test_errors_share_one_base():
    for cls in (gradsight.InputError, gradsight.UnsupportedError, gradsight.WatchError, gradsight.StoreError):
        assert issubclass(cls, gradsight.GradsightError)


def test_cli_without_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: gradsight" in capsys.readouterr().out


def test_cli_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_watch_refuses_non_models():
    with pytest.raises(gradsight.UnsupportedError, match=r"expects a torch.nn.Module or a keras.Model, got list"):
        gradsight.watch([1, 2, 3])
