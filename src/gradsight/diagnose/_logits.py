"""Rule ``logits-as-probabilities``: raw scores trained with a Keras cross-entropy that reads probabilities.

Keras' cross-entropies (``sparse_categorical_crossentropy``, ``categorical_crossentropy``, ``binary_crossentropy``
and their focal variants) take the model's output as probabilities unless they are given ``from_logits=True``,
which is not their default. They clip it to ``[eps, 1 - eps]`` (``eps = 1e-7``) and take its log; the categorical
one first divides each row by its sum. A model whose last layer emits raw scores (``Dense(10)`` with no
activation) then trains on a different loss: every score at or below 0 or at or above 1 is clipped, its gradient
is zero, and the row sums of scores of either sign can be near zero. The loss stalls or swings, the gradients
spike, and no learning rate fixes it. It is the mirror image of ``double-softmax``.

Evidence, all of which must hold (Keras runs only; the watch records the compiled loss and the output layer):

* the model was compiled with exactly one loss, one of those above, with ``from_logits=False`` (configured, or the
  default of the string or function);
* the model has one output, and it is a layer's output (a ``Sequential`` or functional model whose last step is a
  layer, not ``keras.ops.softmax`` in a functional graph or a subclassed ``call()``), whose outputs were recorded;
* at a logged step that output held values outside ``[0, 1]`` (beyond float32 rounding), which probabilities
  never do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._base import Rule, RunData, Thresholds, fmt
from ._finding import Finding

__all__ = ["LogitsAsProbabilitiesRule"]

#: The Keras losses that read probabilities unless ``from_logits=True`` (names as the watch records them).
PROBABILITY_LOSSES = frozenset(
    {
        "sparse_categorical_crossentropy",
        "categorical_crossentropy",
        "binary_crossentropy",
        "categorical_focal_crossentropy",
        "binary_focal_crossentropy",
    }
)
#: Slack on ``[0, 1]``: a float32 softmax or sigmoid can round to a hair outside it.
_SLACK = 1e-6


def _probability_loss(data: RunData) -> str | None:
    """The name of the run's one loss when it reads probabilities (``from_logits=False``), else ``None``."""
    losses = data.meta.get("loss")
    if not isinstance(losses, list) or len(losses) != 1 or not isinstance(losses[0], Mapping):
        return None
    entry = losses[0]
    name = entry.get("name")
    return name if name in PROBABILITY_LOSSES and entry.get("from_logits") is False else None


class LogitsAsProbabilitiesRule(Rule):
    """Raw scores fed to a Keras cross-entropy with ``from_logits=False`` (see the module docstring). An error."""

    name = "logits-as-probabilities"
    codes = ("logits-as-probabilities",)
    kinds = ("output",)

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        if data.meta.get("framework") != "keras":
            return []
        loss_name = _probability_loss(data)
        outputs = (data.meta.get("model") or {}).get("output_layers")
        if loss_name is None or not isinstance(outputs, list) or len(outputs) != 1:
            return []
        layer = outputs[0]
        f = data.frame("output")
        rows = f[(f["layer"] == layer) & (f["finite"] > 0)].sort_values("step")
        outside = rows[(rows["min"] < -_SLACK) | (rows["max"] > 1 + _SLACK)]
        if outside.empty:
            return []
        lo, hi = float(rows["min"].min()), float(rows["max"].max())
        activation = data.layer_info(layer).get("activation")
        binary = loss_name.startswith("binary")
        squash = "sigmoid" if binary else "softmax"
        evidence: dict[str, Any] = {
            "layer": layer,
            "activation": activation,
            "loss": loss_name,
            "from_logits": False,
            "output_min": lo,
            "output_max": hi,
            "steps_outside_0_1": len(outside),
            "steps_recorded": len(rows),
        }
        made = f" (activation {activation!r})" if activation else ""
        loss_class = "".join(part.capitalize() for part in loss_name.split("_"))  # the keras.losses class
        return [
            Finding(
                code="logits-as-probabilities",
                severity="error",
                layers=(layer,),
                first_step=int(outside["step"].iloc[0]),
                last_step=int(rows["step"].iloc[-1]),
                evidence=evidence,
                message=(
                    f"The loss {loss_name} (from_logits=False) reads the model's output as probabilities, but the "
                    f"output layer {layer!r}{made} produced values from {fmt(lo)} to {fmt(hi)} "
                    f"({len(outside)} of {len(rows)} logged steps outside [0, 1]): these are not probabilities, "
                    "which lie in [0, 1], but raw scores (logits)."
                ),
                explanation=(
                    "With from_logits=False, Keras' cross-entropies clip the output to [1e-7, 1 - 1e-7] and take its "
                    "log (the categorical one first divides each row by its sum). Every score at or below 0 or at "
                    "or above 1 is clipped, so it gets no gradient, and the loss no longer measures how the scores "
                    "rank the classes: training stalls or swings, and gradient spikes follow, whatever the "
                    "learning rate."
                ),
                advice=(
                    f"Keep the last layer's raw scores and pass from_logits=True to the loss (e.g. "
                    f"keras.losses.{loss_class}(from_logits=True)): it applies the {squash} itself, in a "
                    f"numerically stable form. Or end the model with activation='{squash}' and keep "
                    "from_logits=False.",
                ),
            )
        ]
