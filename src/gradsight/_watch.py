"""``gradsight.watch``: the one entry point for every framework; it dispatches on the model's type."""

from __future__ import annotations

import importlib
from typing import Any

from ._errors import InputError, UnsupportedError
from ._frameworks import framework_info, framework_of

__all__ = ["watch"]


def watch(model: Any, **kwargs: Any) -> Any:
    """Record per-step statistics of a model's weights, gradients, updates, layer outputs and output gradients.

    Dispatches on the model's framework: a ``torch.nn.Module`` goes to the PyTorch adapter
    (:func:`gradsight.frameworks.torch._dispatch.watch_torch`), a Keras 3 model to the Keras adapter
    (:func:`gradsight.frameworks.keras._watch.watch_keras`). Their keyword arguments are the same where the
    frameworks allow: ``path``, ``preset`` (``"cheap"``, ``"default"`` or ``"full"``), ``config`` and the schedule
    settings (``every``, ``kinds``, ``cheap``, ``anomaly``, ``if_exists``, ...; see
    :func:`gradsight._schedule.schedule`); PyTorch adds ``optimizer``, ``scaler``, ``batch_size`` and
    ``rank_paths``. The framework modules are imported here, on first use, so that ``import gradsight`` imports
    neither torch nor TensorFlow.

    Args:
        model: a ``torch.nn.Module`` or a ``keras.Model``.
        **kwargs: passed to the framework adapter (``path``, ``optimizer``, ``preset``, ``every``, ...).

    Returns:
        A watch: a context manager with ``close()``, ``log(...)`` and the read API of :class:`gradsight.Run`.

    Raises:
        UnsupportedError: the model belongs to neither framework (e.g. a list of parameters).
        InputError: a model class instead of an instance, or a framework object that is not a model.
    """
    fw = framework_of(model)
    if isinstance(model, type):
        if fw is not None:
            raise InputError(
                f"gradsight.watch expects a model instance, got the class {model.__module__}.{model.__qualname__} "
                f"itself. Create the model first and watch that object, e.g. model = {model.__name__}(...); "
                "gradsight.watch(model, ...)."
            )
    else:
        info = framework_info(fw) if fw is not None else None
        if info is not None and info.watch:
            module, _, function = info.watch.partition(":")
            return getattr(importlib.import_module(module), function)(model, **kwargs)
    given = f"{type(model).__name__} ({type(model).__module__})"
    if isinstance(model, (list, tuple, dict)) or hasattr(model, "__next__"):
        items = list(model.values()) if isinstance(model, dict) else model
        first = next(iter(items), None) if isinstance(items, (list, tuple)) else None
        if first is not None and framework_of(first) is not None:
            given += f" of {type(first).__name__} ({framework_of(first)})"
    raise UnsupportedError(
        f"gradsight.watch expects a torch.nn.Module or a keras.Model, got {given}: {model!r:.60}. Pass "
        "the model itself, e.g. gradsight.watch(model, optimizer=opt), not its output, its parameters or a "
        "list of layers (wrap layers in torch.nn.Sequential(...) or keras.Sequential([...]) first)."
    )
