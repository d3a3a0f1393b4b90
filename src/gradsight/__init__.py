"""gradsight: see, verify and understand the gradients inside deep neural networks.

Importing gradsight never imports PyTorch or TensorFlow; the framework adapters import them lazily when a model
of theirs is first handed in. Everything public is re-exported here; every other module is private.
"""

from __future__ import annotations

from ._errors import GradsightError, InputError, StoreError, UnsupportedError, WatchError

__version__ = "0.1.0"

__all__ = [
    "GradsightError",
    "InputError",
    "StoreError",
    "UnsupportedError",
    "WatchError",
    "__version__",
]
