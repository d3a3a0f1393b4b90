"""Rules ``no-gradient`` and ``not-optimized``: parameters cut off from the loss, and ones that never move.

Which parameters the optimizer holds is read from what the watch records for them: the per-step
``weight_norm/<t>`` and ``update_norm/<t>`` signals exist for exactly the parameters the optimizer holds (see
:mod:`gradsight._schedule`); without them, the update summaries (recorded for the parameters whose updates are
measured: the optimizer's). Which parameters receive a gradient is read from ``grad_norm/<t>`` (present at a step
only for parameters that have a gradient then), else from the grad summaries. A run that records neither is not
judged.

* ``no-gradient`` (warning): a parameter the optimizer holds that, at every recorded step, had **no** gradient
  (never in the gradient record: frozen with ``requires_grad=False`` / ``trainable=False``, or not on the path
  from the loss — a ``detach()``, ``.data``, ``torch.no_grad()``, an unused branch) or an **exactly zero** one
  (on the path, but every route to it is multiplied by zero: dead units after it, a zero mask or weight), while
  other parameters did receive a gradient. Parameters the metadata lists as frozen (``meta["frozen"]``:
  ``requires_grad=False`` when the watch opened) are named as such; it stays a warning, because the run cannot
  tell a layer frozen on purpose for fine-tuning from one frozen by mistake, and in both cases the optimizer holds
  parameters that can never move (the advice says how to leave them out when intended).
* ``not-optimized`` (warning): a parameter that received a non-zero gradient but is not held by the optimizer
  (while it holds others), or is held but never moved (its update norm 0 at every step at which an update was
  expected: a learning rate of 0 for its group; see :func:`_never_moved` for why an update too small for float32
  to represent is not counted). The torch watch's metadata ``optimizer_params`` (parameters
  held, of the model's) is quoted as evidence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._base import Rule, RunData, Thresholds, ordered
from ._finding import Finding
from ._series import held_tensors, lr, per_tensor, tensor_grad_norms, update_norms, weight_norms
from ._why import why_small

__all__ = ["NoGradientRule", "NotOptimizedRule"]


def _grad_state(data: RunData) -> tuple[dict[str, str], str]:
    """Per tensor with any gradient record: ``"nonzero"`` or ``"zero"``; tensors never recorded are absent."""
    g, source = tensor_grad_norms(data)
    out: dict[str, str] = {}
    for t in g.columns:
        col = g[t].to_numpy(dtype="float64")
        seen = col[~np.isnan(col)]
        if seen.size == 0:
            continue
        out[str(t)] = "nonzero" if (np.abs(seen) > 0).any() else "zero"
    return out, source


def _has_grad_data(data: RunData) -> bool:
    return "grad" in data.kinds or bool(per_tensor(data, "grad_norm").shape[1])


#: The advice of a no-gradient finding where no parameter got any non-zero gradient.
_EVERYTHING_ZERO_ADVICE = (
    "If the model computes in float16 (model.half(), autocast to float16): scale the loss, with "
    "torch.amp.GradScaler or Keras' LossScaleOptimizer, or compute in bfloat16, whose range does not underflow.",
    "Check that the loss is computed from the model's output with nothing cut in between (detach(), .item(), "
    ".numpy(), torch.no_grad()) and is not multiplied by zero (a zero loss weight, a mask that drops every sample).",
    "If the units before the output are all dead (see dead-units), fix those first.",
)


#: The advice of a no-gradient finding for parameters cut off from the loss, by framework.
_CUT_OFF_ADVICE = {
    "torch": (
        "If these parameters should learn: set requires_grad=True and remove any detach(), .data or no_grad() "
        "between them and the loss; print [n for n, p in model.named_parameters() if p.grad is None] after "
        "backward() to see which are cut off.",
        "If they are frozen on purpose, leave them out of the optimizer: torch.optim.Adam([p for p in "
        "model.parameters() if p.requires_grad]) (this also saves the optimizer's state for them).",
    ),
    "keras": (
        "If these variables should learn: remove any tf.stop_gradient (or a Lambda layer around one) and any "
        "path that leaves TensorFlow (.numpy(), NumPy functions) between them and the loss; with a "
        "tf.GradientTape, [v.name for v, g in zip(model.trainable_variables, tape.gradient(loss, "
        "model.trainable_variables)) if g is None] lists the ones cut off.",
        "If they are frozen on purpose, set layer.trainable = False and compile again: Keras then leaves them out "
        "of the optimizer.",
    ),
}


class NoGradientRule(Rule):
    """Parameters the optimizer holds that never get a non-zero gradient (``no-gradient``).

    Some of them while others do (a cut-off or dead branch), or all of them, with exactly zero gradients (a loss
    that does not depend on them, underflow); a run without any gradient recorded is left to other rules.
    """

    name = "no-gradient"
    codes = ("no-gradient",)

    def missing(self, data: RunData) -> list[str]:
        """Needs gradient records and to know which parameters the optimizer holds."""
        out = []
        if not _has_grad_data(data) and not _no_gradient_at_all(data):
            out.append("'grad' summaries or per-step 'grad_norm/<tensor>' signals")
        if not held_tensors(data)[0]:
            out.append(
                "per-step 'weight_norm/<tensor>' signals or 'update' summaries (which parameters the optimizer holds)"
            )
        return out

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        held, held_source = held_tensors(data)
        state, grad_source = _grad_state(data)
        absent = [t for t in held if t not in state]
        zero = [t for t in held if state.get(t) == "zero"]
        everything = not any(v == "nonzero" for v in state.values())
        none_at_all = not state and _no_gradient_at_all(data)  # steps taken, never a gradient: a detached loss
        if everything and not zero and not none_at_all:
            return []  # no gradient recorded at all: not a matter of some parameters (see no-steps)
        if not absent and not zero:
            return []
        frozen = set(map(str, data.meta.get("frozen") or []))
        steps = sorted(int(s) for s in tensor_grad_norms(data)[0].index)
        if none_at_all:
            steps = sorted(int(s) for s in weight_norms(data)[0].index)
        tensors = absent + zero
        layers = ordered([data.tensor_layer(t) for t in tensors], data)
        parts = []
        if absent:
            parts.append(f"{len(absent)} never had a gradient ({_names(absent)})")
        if zero:
            parts.append(f"{len(zero)} had an exactly zero gradient at every recorded step ({_names(zero)})")
        if everything:
            head = f"none of the {len(held)} parameter tensors the optimizer holds received a non-zero gradient"
            tail = ": "
        else:
            head = f"{len(tensors)} of the {len(held)} parameter tensors the optimizer holds received no non-zero "
            head += "gradient"
            tail = ", while the others did: "
        msg = f"No gradient: {head} over {len(steps)} recorded step(s){tail}" + "; ".join(parts) + "."
        if frozen & set(tensors):
            msg += (
                f" {len(frozen & set(tensors))} of them had requires_grad=False when the watch opened (frozen), yet "
                "the optimizer holds them."
            )
        explanation, why = _explain_no_gradient(data, absent, zero, everything, th)
        return [
            Finding(
                code="no-gradient",
                severity="warning",
                layers=tuple(layers),
                first_step=steps[0] if steps else None,
                last_step=steps[-1] if steps else None,
                evidence={
                    "absent": absent,
                    "zero": zero,
                    "held": len(held),
                    "held_source": held_source,
                    "grad_source": grad_source,
                    "frozen": sorted(frozen & set(tensors)),
                    "why": why,
                },
                message=msg,
                explanation=" ".join(explanation),
                advice=(_EVERYTHING_ZERO_ADVICE[1],)  # never any gradient: cut off, not underflowed
                if none_at_all
                else _EVERYTHING_ZERO_ADVICE
                if everything
                else _CUT_OFF_ADVICE.get(str(data.meta.get("framework")), _CUT_OFF_ADVICE["torch"]),
            )
        ]


def _no_gradient_at_all(data: RunData) -> bool:
    """Optimizer steps with per-step weight norms, and not one gradient norm or summary: nothing got a gradient.

    The per-step signals record the gradient norms at every step that has gradients: a run with the weight norms
    of two steps or more and no gradient norm at all never had a gradient (a loss computed from detached outputs).
    """
    if "grad" in data.kinds or "grad_norm" in data.scalars.columns:
        return False
    w, _ = weight_norms(data)
    return len(w.index) >= 2 and w.shape[1] > 0


def _explain_no_gradient(
    data: RunData, absent: list[str], zero: list[str], everything: bool, th: Thresholds
) -> tuple[list[str], dict[str, Any]]:
    """The explanation's sentences of a no-gradient finding, and the near-zero gradients' explanations by layer."""
    explanation = []
    if absent:
        explanation.append(
            "A parameter without any gradient is not on the path from the loss: it is frozen "
            "(requires_grad=False / trainable=False), or the graph to it is cut (detach(), .data, "
            "torch.no_grad(), a branch the forward never uses, a tensor re-created inside forward)."
        )
    why: dict[str, Any] = {}
    if zero:
        explanation.append(
            "A parameter with an exactly zero gradient is on the path, but every route from the loss to it is "
            "multiplied by zero: dead units after it (a ReLU layer that never fires), a zero mask, a zero "
            "weight or scale after it."
        )
        for layer in ordered([data.tensor_layer(t) for t in zero], data):
            why[layer] = why_small(data, layer, th)
            if why[layer]["verdict"] != "unknown":
                explanation.append(why[layer]["sentence"])
        if why:
            explanation.append(next(iter(why.values()))["exact"])
    if everything:
        explanation.insert(
            0,
            "No parameter at all got a non-zero gradient: the loss does not depend on the parameters (it is "
            "multiplied by zero, or computed from detached tensors), or the gradients underflowed to zero "
            "(float16 without a loss scaler: torch.amp.GradScaler, Keras LossScaleOptimizer), or the units "
            "before the output are all dead. A larger learning rate cannot help: every update is zero.",
        )
    return explanation, why


class NotOptimizedRule(Rule):
    """Parameters with gradients that never move (``not-optimized``).

    Not held by the optimizer, or never updated by it.
    """

    name = "not-optimized"
    codes = ("not-optimized",)

    def missing(self, data: RunData) -> list[str]:
        """Needs gradient records and to know which parameters the optimizer holds."""
        return NoGradientRule().missing(data)

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        held, held_source = held_tensors(data)
        state, grad_source = _grad_state(data)
        outside = [t for t, v in state.items() if v == "nonzero" and t not in held and not _weights_moved(data, t)]
        still = _never_moved(data, [t for t in held if state.get(t) == "nonzero"])
        if not outside and not still:
            return []
        tensors = outside + still
        layers = ordered([data.tensor_layer(t) for t in tensors], data)
        g, _ = tensor_grad_norms(data)
        steps = sorted(int(s) for s in g.index)
        parts = []
        if outside:
            parts.append(f"{len(outside)} are not held by the optimizer ({_names(outside)})")
        if still:
            parts.append(f"{len(still)} are held but their update was 0 at every step ({_names(still)})")
        opt = data.meta.get("optimizer_params") or {}
        held_text = ""
        if isinstance(opt, dict) and opt.get("model_params") is not None:
            held_text = (
                f" The optimizer holds {opt.get('model_params_held')} of the model's {opt.get('model_params')} "
                "parameter tensors."
            )
        msg = (
            f"Not optimized: {len(tensors)} parameter tensor(s) receive a gradient but never move: "
            + "; ".join(parts)
            + "."
            + held_text
        )
        return [
            Finding(
                code="not-optimized",
                severity="warning",
                layers=tuple(layers),
                first_step=steps[0] if steps else None,
                last_step=steps[-1] if steps else None,
                evidence={
                    "not_held": outside,
                    "never_moved": still,
                    "held": len(held),
                    "held_source": held_source,
                    "grad_source": grad_source,
                    "optimizer_params": opt,
                },
                message=msg,
                explanation=(
                    "Backpropagation computes their gradients (at full cost), but the optimizer never applies them: "
                    "it was built from a subset of the parameters (a list made before layers were added, one "
                    "sub-module's parameters, a copy of the model), or their parameter group has a learning rate "
                    "of 0. These layers keep their initial random weights for the whole run."
                ),
                advice=_NOT_OPTIMIZED_ADVICE.get(str(data.meta.get("framework")), _NOT_OPTIMIZED_ADVICE["torch"]),
            )
        ]


#: The advice of a not-optimized finding, by framework.
_NOT_OPTIMIZED_ADVICE = {
    "torch": (
        "Build the optimizer from all trainable parameters, after the model is complete: "
        "torch.optim.Adam(model.parameters(), ...); check len(opt.param_groups[i]['params']).",
        "If they should stay fixed, set requires_grad=False on them so that no gradient is computed.",
    ),
    "keras": (
        "Apply the gradients of every trainable variable: optimizer.apply(grads, model.trainable_variables) (in a "
        "custom train_step, self.trainable_variables), with the gradients taken for the same list.",
        "If they should stay fixed, set layer.trainable = False so that no gradient is computed for them.",
    ),
}

#: An update is representable when it changes a float32 weight: the smallest relative change float32 resolves is
#: 2**-24 ≈ 6e-8 per element; a step whose expected relative size lr·‖g‖/‖W‖ is below 1e-6 (16x that, for the
#: spread of element sizes) may vanish in rounding, so an update norm of exactly 0 proves nothing there.
_REPRESENTABLE = 1e-6


def _weights_moved(data: RunData, tensor: str) -> bool:
    """Whether the tensor's weight summaries differ between logged steps: something updates it.

    A parameter the watched optimizer does not hold may be trained by another one (a GAN's discriminator under
    its own optimizer, a Lightning module's second optimizer): it is not "not optimized".
    """
    if "weight" not in data.kinds:
        return False
    f = data.frame("weight")
    rows = f[f["tensor"] == tensor][["sum", "sum_sq", "min", "max"]]
    return len(rows) > 1 and bool((rows.nunique() > 1).any())


def _never_moved(data: RunData, tensors: list[str]) -> list[str]:
    """Of ``tensors``, those whose update norm was exactly 0 at every step at which an update was expected.

    An update is expected where the learning rate is recorded and was 0 at every step (the group's rate itself: the
    clearest case; a warm-up that starts at 0 is not it), or where it was positive and ``lr·‖g‖/‖W‖`` (plain SGD's
    relative step; adaptive optimizers step more)
    is at least :data:`_REPRESENTABLE` — so a weight whose update rounds away in float32 (a vanishing gradient) is
    not called "not optimized". Without a recorded learning rate nothing is expected: the rule stays silent.
    """
    u, _ = update_norms(data)
    g, _ = tensor_grad_norms(data)
    w, _ = weight_norms(data)
    rate = lr(data)
    out = []
    for t in tensors:
        if t not in u.columns or t not in g.columns or rate.empty:
            continue
        steps = u.index[u[t].notna()].intersection(g.index[g[t].notna()]).intersection(rate.index)
        if not len(steps):
            continue
        upd = u.loc[steps, t].to_numpy(dtype="float64")
        grad = g.loc[steps, t].to_numpy(dtype="float64")
        lrs = rate.loc[steps].to_numpy(dtype="float64")
        wn = w[t].reindex(steps).to_numpy(dtype="float64") if t in w.columns else np.full(len(steps), np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(wn > 0, lrs * grad / wn, np.inf)
        frozen_by_rate = bool((lrs == 0).all())  # a rate of 0 throughout, not one warm-up step that starts at 0
        expected = (grad > 0) & (((lrs == 0) & frozen_by_rate) | (relative >= _REPRESENTABLE))
        if expected.any() and not (np.abs(upd[expected]) > 0).any():
            out.append(t)
    return out


def _names(tensors: list[str], limit: int = 6) -> str:
    shown = ", ".join(map(repr, tensors[:limit]))
    return shown + (f" and {len(tensors) - limit} more" if len(tensors) > limit else "")
