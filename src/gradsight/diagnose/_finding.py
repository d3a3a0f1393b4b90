"""Finding: one diagnosis of a run, with its evidence, explanation and advice."""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["CODES", "CODE_DESCRIPTIONS", "SEVERITIES", "Finding"]

#: The finding codes gradsight emits. Codes are a public contract: new ones may be added, none renamed.
CODES = (
    "non-finite",
    "no-steps-recorded",
    "exploding-gradients",
    "vanishing-gradients",
    "dead-units",
    "saturated-units",
    "update-ratio-high",
    "update-ratio-low",
    "loss-not-decreasing",
    "learning-rate-too-high",
    "bad-initialisation",
    "gradients-accumulating",
    "no-gradient",
    "not-optimized",
    "gradients-clipped",
    "double-softmax",
    "loss-unbounded",
    "logits-as-probabilities",
    "nll-on-probabilities",
)
#: One line per code: what it means (the rule modules' docstrings hold the details).
CODE_DESCRIPTIONS: dict[str, str] = {
    "non-finite": "NaN or ±Inf values in gradients, weights, outputs or the loss; where they appeared first.",
    "no-steps-recorded": "the watch saw backward passes but no optimizer step (optimizer= omitted or never "
    "stepped), so it recorded nothing to judge.",
    "exploding-gradients": "gradient norms that grow far beyond their start, or grow layer by layer backwards.",
    "vanishing-gradients": "layers whose gradients are orders of magnitude below those of the layers after them.",
    "dead-units": "units of a layer that output exactly zero for every sample (e.g. dying ReLUs).",
    "saturated-units": "tanh/sigmoid layers whose units sit on their flat tails and pass almost no gradient.",
    "update-ratio-high": "updates that rewrite a large fraction of a layer's weights at every step.",
    "update-ratio-low": "updates so small relative to the weights that the layer is effectively frozen.",
    "loss-not-decreasing": "a loss that does not fall from the start of the run to its end.",
    "learning-rate-too-high": "steps so large that they damage the network: an update as large as the weights, "
    "followed by weights blowing up, the loss rising, gradients jumping or NaN; names the first such step.",
    "bad-initialisation": "a weight scale or bias that puts a layer's units out of range from step 0 (dead or "
    "saturated): names the parameter and its statistic.",
    "gradients-accumulating": "a gradient norm that grows steadily with the step count while the loss does not: "
    "gradients are summed across steps (a missing zero_grad()).",
    "no-gradient": "parameters the optimizer holds that never receive a non-zero gradient while others do "
    "(frozen, detached or cut off from the loss).",
    "not-optimized": "parameters that receive gradients but never move: the optimizer does not hold them.",
    "gradients-clipped": "gradient clipping was active (info, with the pre-clip norm); a warning when clipping "
    "hides an explosion of the pre-clip norm.",
    "loss-unbounded": "a loss far below zero and still falling: its formula has no lower bound (e.g. nll_loss "
    "fed raw scores, a sign error).",
    "double-softmax": "a model that ends in a softmax (a layer, or applied in the forward code), trained with a "
    "cross-entropy that applies softmax again: every loss value lies in the band that allows, and the loss can "
    "never fall below its floor.",
    "logits-as-probabilities": "a Keras model that emits raw scores (logits), trained with a cross-entropy that "
    "reads probabilities (from_logits=False): the loss clips the scores, and training stalls or swings.",
    "nll-on-probabilities": "a model that ends in a softmax, trained with nll_loss on its probabilities instead of "
    "their log: the loss is -mean(p_y), in [-1, 0], and learns slowly.",
}
#: Severities, least to most severe.
SEVERITIES = ("info", "warning", "error")

Severity = Literal["info", "warning", "error"]


@dataclass(frozen=True)
class Finding:
    """What a diagnosis rule found in a run.

    Attributes:
        code: what is wrong, one of :data:`CODES` (or a code added later).
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        layers: the layers concerned, origin first where order matters.
        first_step: the first logged step at which the condition held.
        last_step: the last logged step at which it held.
        evidence: the numbers that triggered it (JSON-serialisable; thresholds included).
        message: one sentence, with the key numbers.
        explanation: why this breaks learning, a few sentences.
        advice: concrete things to try, most likely first. A symptom's advice refers to its root cause.
        caused_by: the codes of the findings in the same diagnosis that explain this one (its direct causes,
            nearest first); empty for a root cause. Set by :func:`gradsight.diagnose.diagnose`.
        is_root: whether this finding is a root cause (nothing else in the diagnosis explains it). A finding made
            on its own, outside a diagnosis, is its own root.
    """

    code: str
    severity: Severity
    layers: tuple[str, ...]
    first_step: int | None
    last_step: int | None
    evidence: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    explanation: str = ""
    advice: tuple[str, ...] = ()
    caused_by: tuple[str, ...] = ()
    is_root: bool = True

    @property
    def rank(self) -> int:
        """Severity as an integer (0 info, 1 warning, 2 error) for sorting, most severe = highest."""
        return SEVERITIES.index(self.severity)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (non-finite floats become strings such as ``"nan"``)."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["advice"] = list(self.advice)
        d["caused_by"] = list(self.caused_by)
        d["evidence"] = _jsonable(self.evidence)
        return d

    def to_text(self) -> str:
        """Plain-text rendering, a few lines."""
        steps = _steps(self)
        lines = [f"[{self.severity.upper()}] {self.code}{steps}: {self.message}"]
        if self.caused_by:
            lines.append(f"  because of: {', '.join(self.caused_by)}")
        if self.layers:
            lines.append(f"  layers: {', '.join(self.layers)}")
        if self.explanation:
            lines.append(f"  why: {self.explanation}")
        lines.extend(f"  try: {a}" for a in self.advice)
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """Markdown rendering."""
        out = [f"**{self.severity.upper()} · `{self.code}`**{_steps(self)} — {self.message}", ""]
        if self.caused_by:
            out += ["Because of: " + ", ".join(f"`{c}`" for c in self.caused_by), ""]
        if self.layers:
            out.append("Layers: " + ", ".join(f"`{name}`" for name in self.layers))
            out.append("")
        if self.explanation:
            out += [self.explanation, ""]
        out += [f"- {a}" for a in self.advice]
        return "\n".join(out)

    def to_html(self) -> str:
        """HTML rendering; every string is escaped."""
        e = html.escape
        layers = ", ".join(f"<code>{e(name)}</code>" for name in self.layers)
        advice = "".join(f"<li>{e(a)}</li>" for a in self.advice)
        because = ", ".join(f"<code>{e(c)}</code>" for c in self.caused_by)
        role = "root" if self.is_root else "symptom"
        return (
            f'<div class="finding {e(self.severity)}" data-role="{role}"><p><b>{e(self.severity.upper())}</b> '
            f"<code>{e(self.code)}</code>{e(_steps(self))}: {e(self.message)}</p>"
            + (f'<p class="because">Because of {because}.</p>' if self.caused_by else "")
            + (f"<p>Layers: {layers}</p>" if self.layers else "")
            + (f"<p>{e(self.explanation)}</p>" if self.explanation else "")
            + (f"<ul>{advice}</ul>" if advice else "")
            + "</div>"
        )

    __str__ = to_text

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


def _steps(f: Finding) -> str:
    if f.first_step is None:
        return ""
    if f.last_step is None or f.last_step == f.first_step:
        return f" (step {f.first_step})"
    return f" (steps {f.first_step}–{f.last_step})"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return json.loads(json.dumps(obj, default=str))
