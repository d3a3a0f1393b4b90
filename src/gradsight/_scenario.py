"""The fault zoo's plain-data types: a scenario, the findings it must produce, a NaN injection.

They live apart from :mod:`gradsight.zoo` (which re-exports them) so that the framework sides of the zoo
(``gradsight.frameworks.torch._zoo`` / ``_keras_zoo``) can read a scenario without importing the zoo that imports
them: data flows zoo -> framework side, never back. Only the standard library is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Expectation", "NaNInjection", "Scenario"]


@dataclass(frozen=True)
class Expectation:
    """A finding a scenario must produce.

    Attributes:
        code: the finding code.
        layers: layers that must all be among the finding's layers.
        first_layer: when set, the finding's first layer (its origin) must be this one.
        origin_kind: for ``non-finite``: the kind at the origin (``loss``, ``output``, ``grad``, ...).
    """

    code: str
    layers: tuple[str, ...] = ()
    first_layer: str | None = None
    origin_kind: str | None = None


@dataclass(frozen=True)
class Scenario:
    """One zoo scenario, as data.

    Attributes:
        name: its identifier.
        description: one sentence: what is wrong (or that nothing is).
        layers: the architecture, in order; each a dict with ``kind`` (``dense``, ``conv``, ``act``, ``flatten``,
            ``pool``), ``name`` and ``units`` / ``filters`` / ``fn`` (``relu``, ``tanh``, ``sigmoid``), and
            optional ``weight_std`` (normal initialisation of the weights) and ``bias`` (a constant bias).
        data: ``"classify"`` (10 features, 3 classes), ``"regress"`` (10 features, 1 target) or ``"images"``
            (8x8 single-channel images, 4 classes).
        loss: ``"ce"`` (cross-entropy from logits), ``"mse"`` or ``"ce-naive"`` (a hand-written
            ``-sum(onehot * log(softmax(logits)))``, which is NaN as soon as a probability underflows to 0).
        lr: SGD learning rate.
        momentum: SGD momentum.
        steps: training steps (one batch each).
        batch: batch size.
        expect: the findings it must produce; empty for a healthy scenario, which must produce no warning
            or error.
    """

    name: str
    description: str
    layers: tuple[dict[str, Any], ...]
    data: str = "classify"
    loss: str = "ce"
    lr: float = 0.05
    momentum: float = 0.9
    steps: int = 40
    batch: int = 32
    expect: tuple[Expectation, ...] = ()

    @property
    def healthy(self) -> bool:
        """Whether the scenario must produce no warning or error."""
        return not self.expect


@dataclass(frozen=True)
class NaNInjection:
    """Put a NaN into one layer at one step, in its forward or its backward pass.

    Forward: the layer's output gets a NaN in its first unit. Backward: the gradient flowing back *through*
    the layer (into its own weights and the layers before it) gets a NaN; the gradient arriving at the layer's
    output stays finite. Only ``dense`` layers can be chosen.

    Attributes:
        layer: the name of a ``dense`` layer of the scenario.
        phase: ``"forward"`` or ``"backward"``.
        step: the training step at which it happens (0-based).
    """

    layer: str
    phase: Literal["forward", "backward"] = "forward"
    step: int = 3

    @property
    def expectation(self) -> Expectation:
        """The non-finite finding it must produce: located at ``layer``, in the right pass."""
        return Expectation(
            "non-finite", first_layer=self.layer, origin_kind="output" if self.phase == "forward" else None
        )
