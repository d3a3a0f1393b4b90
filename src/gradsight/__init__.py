"""gradsight: see, verify and understand the gradients inside deep neural networks.

Importing gradsight never imports PyTorch, TensorFlow, matplotlib or pandas; the framework adapters import
their framework lazily when a model of theirs is first handed in. Everything public is re-exported here;
every other module is private.
"""

from __future__ import annotations

from ._errors import GradsightError, InputError, StoreError, UnsupportedError, WatchError
from ._version import __version__
from ._watch import watch
from .diagnose import Finding, GradsightWarning, OnlineDiagnosis, Thresholds, TrainingStopped, diagnose
from .explain import Term, Trace, check_loss, depth_sweep, explain, jacobian_vs_gradient
from .store import Run, RunWriter, TensorInfo, load
from .summary import TensorSummary, merge, summarize

#: Public names resolved on first access (PEP 562): those whose modules import a framework, and the figures and
#: report (gradsight.show), so that ``import gradsight`` stays light.
_LAZY = {
    "plot_depth_profile": "gradsight.show",
    "plot_histograms": "gradsight.show",
    "plot_overview": "gradsight.show",
    "report": "gradsight.show",
    "GradsightKerasCallback": "gradsight.frameworks.keras._watch",
    "KerasDiagnosisCallback": "gradsight.frameworks.keras._diagnose",
    "watch_tape": "gradsight.frameworks.keras._watch",
}


def __getattr__(name: str) -> object:
    if name == "zoo":  # the fault zoo, a submodule: loaded on first use, so `import gradsight` stays light
        import importlib

        return importlib.import_module("gradsight.zoo")
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module 'gradsight' has no attribute {name!r}")


__all__ = [
    "Finding",
    "GradsightError",
    "GradsightKerasCallback",
    "GradsightWarning",
    "InputError",
    "KerasDiagnosisCallback",
    "OnlineDiagnosis",
    "Run",
    "RunWriter",
    "StoreError",
    "TensorInfo",
    "TensorSummary",
    "Term",
    "Thresholds",
    "Trace",
    "TrainingStopped",
    "UnsupportedError",
    "WatchError",
    "__version__",
    "check_loss",
    "depth_sweep",
    "diagnose",
    "explain",
    "jacobian_vs_gradient",
    "load",
    "merge",
    "plot_depth_profile",
    "plot_histograms",
    "plot_overview",
    "report",
    "summarize",
    "watch",
    "watch_tape",
    "zoo",
]
