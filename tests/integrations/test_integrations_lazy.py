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


#: The integration modules: glue between a library and gradsight, built on gradsight's public API only.
INTEGRATIONS = ("torch/_lightning.py", "torch/_hf.py", "keras/_diagnose.py")


@pytest.mark.parametrize("filename", INTEGRATIONS)
def test_integrations_use_public_gradsight_names_only(filename):
    # Public: a module path with no _private part (gradsight, gradsight.diagnose, gradsight.store, ...), and a
    # name without a leading underscore. Relative imports would reach the private siblings in frameworks/.
    import ast
    from pathlib import Path

    path = Path(gradsight.integrations.__file__).parent / "frameworks" / filename
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            bad.append(f"line {node.lineno}: relative import from {'.' * node.level}{node.module or ''}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "gradsight":
            private = [p for p in node.module.split(".") if p.startswith("_")]
            private += [a.name for a in node.names if a.name.startswith("_")]
            if private:
                bad.append(f"line {node.lineno}: from {node.module} import {private}")
        elif isinstance(node, ast.Import):
            bad += [
                f"line {node.lineno}: import {a.name}"
                for a in node.names
                if a.name.split(".")[0] == "gradsight" and any(p.startswith("_") for p in a.name.split("."))
            ]
    assert not bad, f"{filename} reaches into gradsight's private modules:\n" + "\n".join(bad)
