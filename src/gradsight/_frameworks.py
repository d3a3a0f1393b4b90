"""The framework registry: which frameworks gradsight knows, and how to tell an object's framework.

This is the one place that names the adapter modules (as strings: nothing here imports a framework). A new
framework is one adapter package plus one :func:`register` call below. The framework-free rooms (explain,
diagnose, show, export, the store) reach adapters only through this registry.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

__all__ = ["FrameworkInfo", "default_framework", "framework_info", "framework_of", "frameworks", "register"]


@dataclass(frozen=True)
class FrameworkInfo:
    """A registered framework.

    Attributes:
        name: the framework's name in gradsight (``"torch"``, ``"keras"``), as recorded in run files and traces.
        module_roots: top-level package names of the framework's objects (models, layers, losses, tensors).
        requires: the package that must be importable for the adapters to work.
        extra: the pip extra that installs it, e.g. ``"tensorflow"``.
        aliases: other names accepted for it (``--framework tf``), e.g. ``("tensorflow", "tf")``.
        watch: ``"module:function"`` that :func:`gradsight.watch` hands a model of this framework to.
        explain: the import path of the explain adapter (satisfies ``gradsight.explain``'s adapter protocol).
        loss_example: how an instance of a loss class ``{name}`` is written in this framework, for messages.
    """

    name: str
    module_roots: tuple[str, ...]
    requires: str
    extra: str
    aliases: tuple[str, ...] = ()
    watch: str = ""
    explain: str = ""
    loss_example: str = "{name}()"

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every name accepted for it, for help texts: the package it needs, the other aliases, gradsight's name."""
        names = (self.requires, *self.aliases, self.name)
        return tuple(dict.fromkeys(names))


_REGISTRY: dict[str, FrameworkInfo] = {}


def register(info: FrameworkInfo) -> None:
    """Register a framework under its name and aliases (the first registered is the default framework)."""
    for key in (info.name, *info.aliases):
        _REGISTRY[key] = info


register(
    FrameworkInfo(
        "torch",
        module_roots=("torch",),
        requires="torch",
        extra="torch",
        aliases=("pytorch",),
        watch="gradsight.frameworks.torch._dispatch:watch_torch",
        explain="gradsight.frameworks.torch._explain",
        loss_example="nn.{name}()",
    )
)
register(
    FrameworkInfo(
        "keras",
        module_roots=("keras", "tensorflow", "tf_keras"),
        requires="tensorflow",
        extra="tensorflow",
        aliases=("tensorflow", "tf"),
        watch="gradsight.frameworks.keras._watch:watch_keras",
        explain="gradsight.frameworks.keras._explain",
        loss_example="keras.losses.{name}()",
    )
)


def frameworks() -> list[FrameworkInfo]:
    """The registered frameworks, in registration order (each once)."""
    return list(dict.fromkeys(_REGISTRY.values()))


def framework_info(name: str) -> FrameworkInfo | None:
    """The registered framework of ``name`` (a name or an alias, any case), or ``None``."""
    return _REGISTRY.get(str(name).strip().lower())


def default_framework() -> str | None:
    """The first registered framework whose package is installed (checked without importing it), or ``None``."""
    import importlib.util

    return next((info.name for info in frameworks() if importlib.util.find_spec(info.requires) is not None), None)


def framework_of(obj: Any) -> str | None:
    """Return the name of the framework an object belongs to (``"torch"``, ``"keras"``), else ``None``.

    The decision reads module names only — of the object's class hierarchy, or, for a class or a plain function,
    of the class or function itself — so it never imports a framework.

    Args:
        obj: any object, typically a model, layer, tensor, loss object, loss class or loss function.

    Returns:
        The framework name, or ``None`` when the object belongs to no registered framework.
    """
    if isinstance(obj, type):
        modules = [c.__module__ for c in obj.__mro__]
    elif isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        modules = [getattr(obj, "__module__", None) or ""]
    else:
        modules = [c.__module__ for c in type(obj).__mro__]
    for module in modules:
        root = (module or "").split(".", 1)[0]
        for info in frameworks():
            if root in info.module_roots:
                return info.name
    return None
