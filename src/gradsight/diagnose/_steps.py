"""Rule ``no-steps-recorded``: the watch saw training (backward passes) but no step closed, so nothing was recorded.

A watch closes a step at ``optimizer.step()`` (or at ``watch.step()`` in a loop without a torch optimizer). A
watch opened without ``optimizer=`` whose loop never calls ``watch.step()``, or given an optimizer that is never
stepped, records no summary and no cheap check; every other rule then has nothing to judge and the run would
look healthy. The PyTorch watch records an event of kind ``"no-optimizer-step"`` when it sees backward passes but
no step (after ``NO_STEP_WARN_AFTER`` of them, or at close); this rule turns that event into an error finding.
It also turns the event ``"foreign-optimizer"`` into one: another optimizer than the watched one kept updating
the model's parameters (an optimizer replaced during training), so no step was recorded after the one it names.
"""

from __future__ import annotations

from ._base import Rule, RunData, Thresholds
from ._finding import Finding

__all__ = ["NoStepsRule"]

#: The event kind the watch records (see ``gradsight.frameworks.torch._watch``).
EVENT = "no-optimizer-step"
#: The event the watch records when another optimizer updates the model and the watched one stops stepping.
FOREIGN = "foreign-optimizer"


class NoStepsRule(Rule):
    """Backward passes were seen but no step was recorded (error)."""

    name = "no-steps-recorded"
    codes = ("no-steps-recorded",)

    def check(self, data: RunData, th: Thresholds) -> list[Finding]:
        """See the module docstring."""
        events = data.events(EVENT)
        if not events:
            return [_foreign(e) for e in data.events(FOREIGN)[:1]]
        first = events[0]
        backwards = max(int(e.get("backward_passes") or 0) for e in events)
        optimizer = first.get("optimizer")
        steps = data.run.steps
        if optimizer is None:
            cause = "the watch was given no optimizer (optimizer=None) and watch.step() was never called"
        else:
            cause = f"the optimizer given to the watch ({optimizer}) was never stepped"
        return [
            Finding(
                code="no-steps-recorded",
                severity="error",
                layers=(),
                first_step=None,  # no step was recorded
                last_step=None,
                evidence={
                    "backward_passes": backwards,
                    "optimizer": optimizer,
                    "recorded_steps": len(steps),
                    "event": EVENT,
                    "step_counter": first.get("step"),
                },
                message=(
                    f"No training step was recorded although the watch saw {backwards} backward pass(es): {cause}."
                ),
                explanation=(
                    "gradsight closes a step, and records its weights, gradients, updates and outputs, at "
                    "optimizer.step() (or watch.step()). Without one the run holds no summaries, so no other rule "
                    "can judge it: an empty diagnosis of this run does not mean the training is healthy."
                ),
                advice=(
                    "Pass the optimizer that updates the model: gradsight.watch(model, optimizer=opt).",
                    "In a loop without a torch.optim optimizer, call watch.step() after each parameter update.",
                    "If the optimizer was created for another model or a copy of it, create it from "
                    "model.parameters() of the model you watch.",
                ),
            )
        ]


def _foreign(event: dict) -> Finding:
    """The finding of a ``foreign-optimizer`` event: steps stopped being recorded at the step it names."""
    step, other, given = event.get("step"), event.get("optimizer"), event.get("watched_optimizer")
    return Finding(
        code="no-steps-recorded",
        severity="error",
        layers=(),
        first_step=step,
        last_step=None,
        evidence={
            "optimizer": other,
            "watched_optimizer": given,
            "foreign_steps": event.get("steps"),
            "event": FOREIGN,
        },
        message=(
            f"No training step was recorded from step {step} on: another optimizer ({other}) kept updating the "
            f"model's parameters while the optimizer given to the watch ({given}) no longer stepped."
        ),
        explanation=(
            "gradsight closes a step at the watched optimizer's step(). An optimizer created during training (for "
            "a new phase, or by a library) is not watched, so the run stops at the last step of the old one; what "
            "follows it is not in the run, and the other rules judge only the steps before."
        ),
        advice=(
            "Close the watch and open one with the new optimizer, continuing the same file: "
            "gradsight.watch(model, optimizer=new_opt, path=run_path, if_exists='append').",
        ),
    )
