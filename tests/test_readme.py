"""The README's Python examples run as written.

Every ```python block of README.md is run, in README order, each in a fresh interpreter, all in one temporary
folder (so a later block may read the run file an earlier one wrote, as a reader following along would). A block
is a fragment, and skipped, when its first line is ``# fragment`` or its code (outside comments) contains ``...``
(an elided part); a
block that imports keras needs TensorFlow and is skipped, saying so, only where TensorFlow is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[int, str]]:
    """(line number, code) of each ```python block."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def _is_fragment(code: str) -> bool:
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    return first.strip() == "# fragment" or any("..." in line.split("#", 1)[0] for line in code.splitlines())


BLOCKS = _blocks()
COMPLETE = [(line, code) for line, code in BLOCKS if not _is_fragment(code)]


def test_readme_has_complete_examples():
    assert len(COMPLETE) >= 4, "the README's runnable examples were not found"


def _missing_framework(code: str) -> str | None:
    if re.search(r"^\s*import keras|^\s*from keras", code, re.M) and importlib.util.find_spec("tensorflow") is None:
        return "a Keras example; it needs the tensorflow extra, which is not installed"
    if re.search(r"^\s*import torch|^\s*from torch", code, re.M) and importlib.util.find_spec("torch") is None:
        return "a PyTorch example; it needs the torch extra, which is not installed"
    return None


@pytest.mark.slow
def test_readme_blocks_run_in_order(tmp_path):
    # One test, not one per block: later blocks read what earlier ones wrote, and test order across pytest-xdist
    # workers is not guaranteed.
    env = {**os.environ, "MPLBACKEND": "agg", "TF_CPP_MIN_LOG_LEVEL": "2"}
    failures, skipped = [], []
    for line, code in COMPLETE:
        reason = _missing_framework(code)
        if reason is not None:
            skipped.append(f"README.md:{line} is {reason}")
            continue
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )
        if proc.returncode != 0:
            failures.append(f"README.md:{line} failed:\n{proc.stderr[-3000:]}")
    assert not failures, "\n\n".join(failures)
    if skipped:
        pytest.skip("; ".join(skipped))
