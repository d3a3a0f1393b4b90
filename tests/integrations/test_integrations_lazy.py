"""Importing gradsight and its integration modules never imports the integrated libraries."""

import subprocess
import sys

import pytest

import gradsight.integrations


def test_import_never_imports_lightning_transformers_tensorboard_or_frameworks():
    code = (
        "import sys, gradsight, gradsight.integrations, gradsight.export; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'tensorboard', 'torch', "
        "'tensorflow', 'keras') if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        gradsight.integrations.Nope  # noqa: B018


def test_lazy_names_are_listed():
    assert {"GradsightLightningCallback", "GradsightTrainerCallback", "LiveTensorBoard"} <= set(
        dir(gradsight.integrations)
    )
