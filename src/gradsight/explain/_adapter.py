"""What the explain core needs from a framework, and where to find it: the adapter protocol and registry.

The core reaches a framework only through an object satisfying :class:`ExplainAdapter` (the adapter modules
``gradsight.frameworks._*_explain`` do, structurally). Framework differences travel as data
(:class:`~gradsight.explain._spec.Conventions`), never as checks on a module's name. Adapters are found by
framework name in a registry; the built-in module paths are named in exactly one place,
:func:`_register_builtins`. A new framework is one adapter module plus one :func:`register_adapter` call.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._errors import InputError, UnsupportedError
from ._spec import Conventions, FrameworkRun

__all__ = [
    "AdapterInfo",
    "ExplainAdapter",
    "adapter",
    "adapter_info",
    "default_framework",
    "framework_of_module",
    "register_adapter",
]


@runtime_checkable
class ExplainAdapter(Protocol):
    """What an explain adapter provides (a module with these names satisfies it).

    Attributes:
        CONVENTIONS: the framework's layouts, words and loss convention, as data.
    """

    CONVENTIONS: Conventions

    def run_explain(self, model: Any, x: np.ndarray, y: np.ndarray, loss: Any, reduction: str) -> FrameworkRun:
        """Layer specs and the framework's autodiff value of every term (see :class:`FrameworkRun`)."""

    def loss_probe(self, loss: Any, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
        """``{"value", "grad" (of the sum), "warnings", "spec", "display"}`` of a loss on given arrays."""

    def jacobian_and_gradient(self, fn: Callable, source: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(target, full Jacobian, autodiff's gradient of the sum)`` of ``fn`` at ``source``."""

    def matmul_target(self, s: np.ndarray) -> Callable:
        """``Z ↦ Z·S`` written with the framework's ops."""

    def build_dense_model(
        self,
        weights: list[np.ndarray],
        biases: list[np.ndarray | None] | None = None,
        activations: list[str | None] | None = None,
        dtype: str = "float64",
    ) -> Any:
        """A model of dense layers from ``(in, out)`` kernels."""

    def example_loss(self) -> tuple[Any, str]:
        """The framework's usual MSE loss, as a training loop calls it, and its display text (an example)."""


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter.

    Attributes:
        name: the framework name (``Trace.framework``), e.g. ``"torch"``.
        module: the adapter module's import path.
        requires: the package that must be importable for the adapter to work.
        aliases: other names accepted for it, e.g. ``("tensorflow", "tf")``.
        module_roots: top-level package names of the framework's objects (to tell a loss's framework).
        extra: the pip extra that installs it, e.g. ``"tensorflow"``.
        loss_example: how an instance of a loss class ``{name}`` is written, e.g. ``"nn.{name}()"``.
    """

    name: str
    module: str
    requires: str
    aliases: tuple[str, ...] = ()
    module_roots: tuple[str, ...] = ()
    extra: str = ""
    loss_example: str = "{name}()"


_REGISTRY: dict[str, AdapterInfo] = {}


def register_adapter(info: AdapterInfo) -> None:
    """Register an adapter under its name and aliases (the first registered is the default framework)."""
    for key in (info.name, *info.aliases):
        _REGISTRY[key] = info


def _register_builtins() -> None:
    """The one place that names the built-in adapter modules."""
    register_adapter(
        AdapterInfo(
            "torch",
            "gradsight.frameworks._torch_explain",
            requires="torch",
            module_roots=("torch",),
            extra="torch",
            loss_example="nn.{name}()",
        )
    )
    register_adapter(
        AdapterInfo(
            "keras",
            "gradsight.frameworks._keras_explain",
            requires="tensorflow",
            aliases=("tensorflow", "tf"),
            module_roots=("keras", "tensorflow", "tf_keras"),
            extra="tensorflow",
            loss_example="keras.losses.{name}()",
        )
    )


_register_builtins()


def adapter_info(framework: str) -> AdapterInfo:
    """The registered adapter of ``framework`` (a name or an alias).

    Raises:
        InputError: no adapter of that name.
    """
    info = _REGISTRY.get(framework)
    if info is None:
        raise InputError(f"unknown framework {framework!r}; expected 'torch' or 'tensorflow' (alias 'keras')")
    return info


def adapter(framework: str) -> ExplainAdapter:
    """Import the adapter of ``framework`` (``"torch"``, ``"keras"``/``"tensorflow"``) lazily.

    Raises:
        InputError: an unknown framework.
        UnsupportedError: the framework is not installed.
    """
    info = adapter_info(framework)
    try:
        module = importlib.import_module(info.module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UnsupportedError(
            f"framework {framework!r} is not installed ({exc}); pip install 'gradsight[{info.extra}]'"
        ) from exc
    return module  # type: ignore[return-value]  # a module satisfying ExplainAdapter structurally


def default_framework() -> str:
    """The first registered framework that is installed (else the first registered)."""
    infos = list(dict.fromkeys(_REGISTRY.values()))
    for info in infos:
        if importlib.util.find_spec(info.requires) is not None:
            return info.name
    return infos[-1].name


def framework_of_module(module: str) -> str | None:
    """The framework whose objects live in ``module`` (e.g. ``"torch.nn.modules.loss"`` → ``"torch"``)."""
    root = (module or "").split(".", 1)[0]
    return next((i.name for i in _REGISTRY.values() if root in i.module_roots), None)
