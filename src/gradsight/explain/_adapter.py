"""What the explain core needs from a framework, and where to find it: the adapter protocol and its lookup.

The core reaches a framework only through an object satisfying :class:`ExplainAdapter` (the built-in adapter
modules do, structurally). Framework differences travel as data (:class:`~gradsight.explain._spec.Conventions`),
never as checks on a module's name. Adapters are found by framework name in gradsight's framework registry
(``gradsight._frameworks``: ``FrameworkInfo.explain`` is the adapter's import path), the one place that names
adapter modules.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._errors import InputError, UnsupportedError
from .._frameworks import FrameworkInfo, framework_info, framework_of, frameworks
from .._frameworks import default_framework as installed_framework
from ._graph import GraphRun
from ._spec import Conventions, FrameworkRun

__all__ = [
    "ExplainAdapter",
    "adapter",
    "adapter_info",
    "check_loss_framework",
    "default_framework",
]


@runtime_checkable
class ExplainAdapter(Protocol):
    """What an explain adapter provides (a module with these names satisfies it).

    Attributes:
        CONVENTIONS: the framework's layouts, words and loss convention, as data.
    """

    CONVENTIONS: Conventions

    def run_explain(
        self, model: Any, x: np.ndarray, y: np.ndarray, loss: Any, reduction: str, training: bool | None = None
    ) -> FrameworkRun | GraphRun:
        """Layer specs (a chain) or nodes (a graph) and the framework's autodiff value of every term."""

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

    def build_graph_example(self, name: str, seed: int = 0) -> tuple[Any, np.ndarray, np.ndarray, Any, str, dict]:
        """``(model, x, y, loss, description, explain options)`` of a built-in graph example."""


def adapter_info(framework: str) -> FrameworkInfo:
    """The registered adapter of ``framework`` (a name or an alias).

    Raises:
        InputError: no adapter of that name.
    """
    info = framework_info(framework)
    if info is None or not info.explain:
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
        module = importlib.import_module(info.explain)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UnsupportedError(
            f"framework {framework!r} is not installed ({exc}); pip install 'gradsight[{info.extra}]'"
        ) from exc
    return module  # type: ignore[return-value]  # a module satisfying ExplainAdapter structurally


def check_loss_framework(loss: Any, framework: str, *, where: str) -> None:
    """Refuse a loss that belongs to another framework than the one that will evaluate it.

    Without this check the other framework's loss fails on foreign tensors, and the error reads like a problem
    with ``y``'s shape. A plain function, a loss name or an object of no registered framework passes.

    Args:
        loss: the loss given.
        framework: the framework (a name or an alias) that will call it.
        where: what the user called, and how the framework was chosen, for the message (e.g.
            ``"explain on a torch model"``).

    Raises:
        InputError: the loss is another framework's.
    """
    own = framework_of(loss)
    target = adapter_info(framework)
    if own is None or own == target.name:
        return
    words = {"torch": "PyTorch", "keras": "Keras"}
    theirs, mine = words.get(own, own), words.get(target.name, target.name)
    example = target.loss_example.format(name="MSELoss" if target.name == "torch" else "MeanSquaredError")
    name = getattr(loss, "__name__", None) or type(loss).__name__
    raise InputError(
        f"{where}: the loss {name} is a {theirs} loss, but {mine} would evaluate it, and it cannot call "
        f"another framework's loss. Fix: pass a {mine} loss (e.g. {example}) or a loss name such as 'mse'"
    )


def default_framework() -> str:
    """The framework explain uses by default: the first registered one that is installed (else the last one)."""
    return installed_framework() or frameworks()[-1].name
