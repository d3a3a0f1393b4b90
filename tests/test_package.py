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


HEAVY = ("torch", "tensorflow", "keras", "pandas", "matplotlib", "pyarrow", "tensorboard", "scipy")


def _heavy_modules_after(code: str) -> dict[str, str]:
    """Run ``code`` in a fresh interpreter; map each heavy module it imported to the gradsight module that did."""
    probe = (
        "import builtins, sys\n"
        "first = {}\n"
        "real = builtins.__import__\n"
        "def spy(name, globals=None, *a, **k):\n"
        f"    root = name.split('.')[0]\n"
        f"    if root in {HEAVY!r} and root not in sys.modules and root not in first:\n"
        "        first[root] = (globals or {}).get('__name__', '?')\n"
        "    return real(name, globals, *a, **k)\n"
        "builtins.__import__ = spy\n"
        f"{code}\n"
        f"print({{m: first.get(m, '?') for m in {HEAVY!r} if m in sys.modules}})"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])  # a dict literal printed by the probe


def test_import_gradsight_imports_no_heavy_dependency():
    # pandas, matplotlib and every framework are imported lazily, when a function that needs them runs.
    heavy = _heavy_modules_after("import gradsight")
    assert heavy == {}, f"`import gradsight` imported {heavy} (module -> the gradsight module that imported it)"


def test_cli_help_imports_no_heavy_dependency():
    heavy = _heavy_modules_after("from gradsight.cli import _parser; _parser().format_help()")
    assert heavy == {}, f"building the CLI's --help imported {heavy}"


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
