"""``gradsight.watch``: the one entry point for every framework; it dispatches on the model's type."""

from __future__ import annotations

from typing import Any

from ._errors import UnsupportedError
from ._frameworks import framework_of

__all__ = ["watch"]


def watch(model: Any, **kwargs: Any) -> Any:
    """Record per-step statistics of a model's weights, gradients, updates, layer outputs and output gradients.

    Dispatches on the model's framework: a ``torch.nn.Module`` goes to the PyTorch adapter, a Keras 3 model to
    the Keras adapter. See those adapters' ``watch`` docstrings (and the README) for the keyword arguments,
    which are the same for both where the frameworks allow.

    Args:
        model: a ``torch.nn.Module`` or a ``keras.Model``.
        **kwargs: passed to the framework adapter (``path``, ``optimizer``, ``every``, ...).

    Returns:
        A watch: a context manager with ``close()``, ``log(...)`` and the read API of :class:`gradsight.Run`.

    Raises:
        UnsupportedError: the model belongs to neither framework.
    """
    fw = framework_of(model)
    if fw == "torch":
        from .frameworks._torch_watch import watch_torch

        return watch_torch(model, **kwargs)
    if fw == "keras":
        from .frameworks._keras_watch import watch_keras

        return watch_keras(model, **kwargs)
    raise UnsupportedError(
        f"gradsight.watch expects a torch.nn.Module or a keras.Model, got {type(model).__name__} "
        f"({type(model).__module__}). Pass the model itself, e.g. gradsight.watch(model), not its output or "
        "its parameters."
    )
