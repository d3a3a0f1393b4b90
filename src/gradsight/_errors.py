"""Exception classes raised by gradsight.

Every error gradsight raises on purpose derives from :class:`GradsightError`, so users can catch ours without
catching everything. Messages follow one pattern: what was given (echoed with ``!r``), what was expected, the
likely cause, and the fix.
"""

from __future__ import annotations

__all__ = [
    "GradsightError",
    "InputError",
    "StoreError",
    "UnsupportedError",
    "WatchError",
]


class GradsightError(Exception):
    """Base class of every error gradsight raises on purpose."""


class InputError(GradsightError, ValueError):
    """An argument has the wrong type, shape, dtype or value."""


class UnsupportedError(GradsightError, TypeError):
    """A model, layer, loss or framework that gradsight cannot handle (yet)."""


class WatchError(GradsightError, RuntimeError):
    """Misuse of a watch: watching a model twice, logging after close, and the like."""


class StoreError(GradsightError, OSError):
    """A run file that cannot be created, opened or read."""
