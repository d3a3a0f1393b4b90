"""Tell which framework an object belongs to, without importing any framework."""

from __future__ import annotations

from typing import Any, Literal

Framework = Literal["torch", "keras"]

__all__ = ["Framework", "framework_of"]


def framework_of(obj: Any) -> Framework | None:
    """Return ``"torch"`` or ``"keras"`` for an object of that framework, else ``None``.

    The decision reads the modules of the object's class hierarchy, so it never imports torch or TensorFlow.

    Args:
        obj: any object, typically a model, layer, tensor or loss.

    Returns:
        The framework name, or ``None`` when the object belongs to neither.
    """
    for cls in type(obj).__mro__:
        root = (cls.__module__ or "").split(".", 1)[0]
        if root == "torch":
            return "torch"
        if root in ("keras", "tensorflow", "tf_keras"):
            return "keras"
    return None
