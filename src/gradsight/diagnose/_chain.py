"""One chain per cause: which finding of a diagnosis explains which, the roots first, advice from the roots.

Rules judge one thing each; this module relates their findings. A finding B is *explained by* a finding A when
the edge ``A -> B`` is in :data:`EXPLAINS` and its condition holds for the two findings (typically: A began no
later than B ended, and they concern the same layers or A's layers lie upstream of B's). Edges only go forward in
:data:`CAUSAL_ORDER`, so the relation has no cycle. Then:

* ``caused_by`` of a finding lists its direct causes present in the diagnosis (after transitive reduction: a
  cause that is itself explained by another listed cause is dropped — the chain reads root -> ... -> symptom),
  nearest first; a finding without causes is a root (``is_root``).
* A root is at least as severe as anything it explains: it is what has to be fixed to fix its symptoms.
* A symptom's advice is replaced by a pointer to its root(s): "Because of learning-rate-too-high (the root
  cause): see its advice." — so advice comes from the roots only.
* The learning rate is never advised both ways: when any finding advises lowering it, the items advising to
  raise it are withheld (listed in that finding's evidence under ``advice_withheld``). Lowering wins because a
  learning rate that is too high destroys the run (dead units, NaN, divergence), one that is too low only slows
  it down, and a lowered rate that turns out too small shows as a low update ratio on the next run.
* Only warnings and errors explain other findings; an info finding is never a cause.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from ._advice import lr_direction
from ._base import RunData
from ._finding import SEVERITIES, Finding
from ._layers import param_layers, producer

__all__ = ["CAUSAL_ORDER", "EXPLAINS", "link", "sort_chain"]

#: Codes from most fundamental to most symptomatic; an edge may only point forward in this order.
CAUSAL_ORDER: tuple[str, ...] = (
    "no-steps-recorded",
    "gradients-accumulating",
    "not-optimized",
    "loss-unbounded",
    "double-softmax",
    "logits-as-probabilities",
    "nll-on-probabilities",
    "bad-initialisation",
    "learning-rate-too-high",
    "gradients-clipped",
    "exploding-gradients",
    "non-finite",
    "dead-units",
    "saturated-units",
    "vanishing-gradients",
    "no-gradient",
    "update-ratio-high",
    "update-ratio-low",
    "loss-not-decreasing",
)

Condition = Callable[[Finding, Finding, RunData | None], bool]


def _order(code: str) -> int:
    return CAUSAL_ORDER.index(code) if code in CAUSAL_ORDER else len(CAUSAL_ORDER)


def _before(cause: Finding, effect: Finding, data: RunData | None = None) -> bool:
    """The cause began no later than the effect ended (unknown steps never rule an edge out)."""
    if cause.first_step is None or effect.last_step is None:
        return True
    return cause.first_step <= effect.last_step


def _from_start(cause: Finding, effect: Finding, data: RunData | None = None) -> bool:
    """The cause began no later than the effect began: the effect came with it or after it."""
    if cause.first_step is None or effect.first_step is None:
        return True
    return cause.first_step <= effect.first_step


def _index(data: RunData | None, layer: str) -> int:
    return data.layer_index(layer) if data is not None else 0


def _overlap(cause: Finding, effect: Finding, data: RunData | None = None) -> bool:
    """They name a common layer (or either names none: a run-wide finding)."""
    if not cause.layers or not effect.layers:
        return _before(cause, effect)
    return bool(set(cause.layers) & set(effect.layers)) and _before(cause, effect)


def _overlap_or_reference(cause: Finding, effect: Finding, data: RunData | None = None) -> bool:
    """:func:`_overlap`, or a vanishing layer measured against one of the cause's layers.

    A layer the optimizer does not hold keeps its ``.grad`` when ``optimizer.zero_grad()`` clears the others, so
    its gradient adds up step after step; against it, every earlier layer looks vanishing.
    """
    per = effect.evidence.get("layers")
    refs = {r.get("downstream_layer") for r in per if isinstance(r, dict)} if isinstance(per, list) else set()
    return _overlap(cause, effect, data) or (bool(refs & set(cause.layers)) and _before(cause, effect))


def _upstream(cause: Finding, effect: Finding, data: RunData | None = None) -> bool:
    """Some layer of the effect lies at, before, or right after (the next layer with parameters) a cause's layer.

    A layer whose units are dead or saturated passes (almost) no gradient back to everything before it, and its
    zero or constant output starves the weights of the next layer with parameters of their input.
    """
    if not cause.layers or not effect.layers or data is None:
        return _before(cause, effect)
    last = max(_index(data, n) for n in cause.layers)
    limit = last
    for name in data.layers[last + 1 :]:
        limit = data.layer_index(name)
        if name in param_layers(data):
            break
    return any(_index(data, n) <= limit for n in effect.layers) and _before(cause, effect)


def _zero_grads_upstream(cause: Finding, effect: Finding, data: RunData | None = None) -> bool:
    """A no-gradient finding whose tensors got exactly-zero (not absent) gradients, upstream of the cause."""
    if effect.evidence.get("absent"):
        return False
    return _upstream(cause, effect, data)


def _upstream_moving(cause: Finding, effect: Finding, data: RunData | None = None) -> bool:
    """:func:`_upstream`, for an update-ratio-low finding with a layer that moved at all.

    Saturated units shrink the gradient they pass back, never to exactly zero: layers that did not move at any
    step (a frozen or cut-off parameter) are not their doing.
    """
    per = effect.evidence.get("layers")
    if isinstance(per, dict) and per and all(v.get("max_ratio") == 0 for v in per.values() if isinstance(v, dict)):
        return False
    return _upstream(cause, effect, data)


def _dead_after(cause: Finding, effect: Finding, data: RunData | None = None) -> bool:
    """Units died (or saturated) at or after the cause's first step."""
    return _from_start(cause, effect)


def _init_overlap(cause: Finding, effect: Finding, data: RunData | None = None) -> bool:
    """A bad initialisation of the layers the unit finding names, or of the weighted layers that feed them.

    The weight-scale form names the weighted layers (``conv2``), the unit rules the activation after them
    (``relu2``): a layer's producer (:func:`gradsight.diagnose._layers.producer`) links the two.
    """
    if set(cause.layers) & set(effect.layers):
        return True
    return data is not None and any(producer(data, layer) in cause.layers for layer in effect.layers)


def _init_large(cause: Finding, effect: Finding, data: RunData | None = None) -> bool:
    """Weights initialised too large: the huge first gradients make the first steps huge."""
    return cause.evidence.get("direction") == "large" and _before(cause, effect)


def _nonfinite_after(cause: Finding, effect: Finding, data: RunData | None = None) -> bool:
    """The non-finite value appeared at or after the cause's first step, and not at the very first step."""
    return _from_start(cause, effect) and (effect.first_step or 0) > 0


def _clipped_rising(cause: Finding, effect: Finding, data: RunData | None = None) -> bool:
    """Clipping at almost every step while the loss rose: steps too large, whose damage units show."""
    return bool(cause.evidence.get("loss_rose")) and _before(cause, effect)


#: cause -> {effect: condition}. Read: "a <cause> finding explains an <effect> finding when <condition>".
EXPLAINS: dict[str, dict[str, Condition]] = {
    "gradients-accumulating": {
        "learning-rate-too-high": _before,
        "gradients-clipped": _before,
        "exploding-gradients": _before,
        "non-finite": _nonfinite_after,
        "dead-units": _dead_after,
        "saturated-units": _dead_after,
        "no-gradient": _zero_grads_upstream,
        "update-ratio-high": _before,
        "update-ratio-low": _before,
        "loss-not-decreasing": _before,
    },
    "not-optimized": {
        "exploding-gradients": _overlap,
        "vanishing-gradients": _overlap_or_reference,
        "update-ratio-low": _overlap,
        "loss-not-decreasing": _before,
    },
    "loss-unbounded": {
        "learning-rate-too-high": _before,
        "gradients-clipped": _before,
        "exploding-gradients": _before,
        "non-finite": _nonfinite_after,
        "dead-units": _dead_after,
        "saturated-units": _dead_after,
        "vanishing-gradients": _before,
        "update-ratio-high": _before,
        "update-ratio-low": _before,
    },
    "double-softmax": {
        "vanishing-gradients": _before,
        "update-ratio-low": _before,
        "loss-not-decreasing": _before,
    },
    "logits-as-probabilities": {
        "exploding-gradients": _before,
        "non-finite": _nonfinite_after,
        "vanishing-gradients": _before,
        "update-ratio-high": _before,
        "update-ratio-low": _before,
        "loss-not-decreasing": _before,
    },
    "nll-on-probabilities": {
        "vanishing-gradients": _before,
        "update-ratio-low": _before,
        "loss-not-decreasing": _before,
    },
    "bad-initialisation": {
        "learning-rate-too-high": _init_large,
        "exploding-gradients": _upstream,
        "dead-units": _init_overlap,
        "saturated-units": _init_overlap,
        "no-gradient": _zero_grads_upstream,
        "vanishing-gradients": _upstream,
        "update-ratio-low": _upstream,
        "loss-not-decreasing": _before,
    },
    "learning-rate-too-high": {
        "gradients-clipped": _before,
        "exploding-gradients": _before,
        "non-finite": _nonfinite_after,
        "dead-units": _dead_after,
        "saturated-units": _dead_after,
        "no-gradient": _zero_grads_upstream,
        "vanishing-gradients": _before,
        "update-ratio-high": _before,
        "update-ratio-low": _before,
        "loss-not-decreasing": _before,
    },
    "gradients-clipped": {
        "dead-units": _clipped_rising,
        "saturated-units": _clipped_rising,
        "update-ratio-high": _before,
        "update-ratio-low": _clipped_rising,
        "loss-not-decreasing": _before,
    },
    "exploding-gradients": {
        "non-finite": _nonfinite_after,
        "dead-units": _dead_after,
        "saturated-units": _dead_after,
        "no-gradient": _zero_grads_upstream,
        "update-ratio-high": _before,
        "update-ratio-low": _before,
        "loss-not-decreasing": _before,
    },
    "non-finite": {
        "dead-units": _from_start,
        "saturated-units": _from_start,
        "update-ratio-high": _from_start,
        "update-ratio-low": _from_start,
        "loss-not-decreasing": _before,
    },
    "dead-units": {
        "no-gradient": _zero_grads_upstream,
        "vanishing-gradients": _upstream,
        "update-ratio-low": _upstream,
        "loss-not-decreasing": _before,
    },
    "saturated-units": {
        "no-gradient": _zero_grads_upstream,
        "vanishing-gradients": _upstream,
        "update-ratio-low": _upstream_moving,
        "loss-not-decreasing": _before,
    },
    "no-gradient": {
        "update-ratio-low": _overlap,
        "loss-not-decreasing": _before,
    },
    "vanishing-gradients": {
        "no-gradient": _zero_grads_upstream,
        "update-ratio-low": _overlap,
        "loss-not-decreasing": _before,
    },
    "update-ratio-high": {
        "loss-not-decreasing": _before,
    },
    "update-ratio-low": {
        "loss-not-decreasing": _before,
    },
}


def _check_edges() -> None:
    for cause, effects in EXPLAINS.items():
        for effect in effects:
            if not _order(cause) < _order(effect):  # pragma: no cover - a programming error, caught by the tests
                raise AssertionError(f"edge {cause} -> {effect} points backwards in CAUSAL_ORDER")


_check_edges()


def _explains(cause: Finding, effect: Finding, data: RunData | None) -> bool:
    if cause is effect or cause.rank < SEVERITIES.index("warning"):
        return False
    condition = EXPLAINS.get(cause.code, {}).get(effect.code)
    return condition is not None and bool(condition(cause, effect, data))


def _reachable(start: int, edges: dict[int, set[int]]) -> set[int]:
    seen: set[int] = set()
    todo = list(edges.get(start, ()))
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            todo.extend(edges.get(i, ()))
    return seen


def link(findings: Sequence[Finding], data: RunData | None = None) -> list[Finding]:
    """Relate the findings of one diagnosis (see the module docstring); returns them sorted by :func:`sort_chain`.

    Args:
        findings: the rules' findings (their ``caused_by`` / ``is_root`` are recomputed).
        data: the run they came from (layer order for the upstream conditions); optional.
    """
    found = list(findings)
    n = len(found)
    parents: dict[int, set[int]] = {i: set() for i in range(n)}  # effect -> causes
    children: dict[int, set[int]] = {i: set() for i in range(n)}
    for i, cause in enumerate(found):
        for j, effect in enumerate(found):
            if i != j and _explains(cause, effect, data):
                parents[j].add(i)
                children[i].add(j)
    # transitive reduction: drop a cause that explains another cause of the same finding (it acts through it)
    reach = {i: _reachable(i, children) for i in range(n)}
    direct: dict[int, set[int]] = {}
    for j, causes in parents.items():
        direct[j] = {i for i in causes if not any(k in reach[i] for k in causes if k != i)}
    roots_of: dict[int, list[int]] = {}
    for j in range(n):
        tops = [i for i in range(n) if not parents[i] and j in reach[i]]
        roots_of[j] = sorted(tops, key=lambda i: (_order(found[i].code), -found[i].rank))
    out: list[Finding] = []
    for j, f in enumerate(found):
        causes = sorted(direct[j], key=lambda i: (-_order(found[i].code), found[i].code))
        changes: dict[str, Any] = {"caused_by": tuple(found[i].code for i in causes), "is_root": not parents[j]}
        if parents[j]:
            roots = [found[i].code for i in roots_of[j]]
            changes["advice"] = tuple(
                f"Because of {root} (the root cause): see its advice; fixing it should resolve this too."
                for root in dict.fromkeys(roots)
            )
            changes["evidence"] = {**f.evidence, "root_causes": list(dict.fromkeys(roots))}
        else:
            below = reach[j]
            worst = max([f.rank] + [found[k].rank for k in below])
            if worst > f.rank:
                changes["severity"] = SEVERITIES[worst]
            if below:
                changes["evidence"] = {
                    **f.evidence,
                    "explains": list(
                        dict.fromkeys(found[k].code for k in sorted(below, key=lambda k: _order(found[k].code)))
                    ),
                }
        out.append(dataclasses.replace(f, **changes))
    return sort_chain(one_lr_direction(out))


def one_lr_direction(findings: Sequence[Finding]) -> list[Finding]:
    """Withhold every advice item that raises the learning rate when any item of the diagnosis lowers it."""
    lowering = [f.code for f in findings if any(lr_direction(a) < 0 for a in f.advice)]
    if not lowering:
        return list(findings)
    out = []
    for f in findings:
        raising = [a for a in f.advice if lr_direction(a) > 0]
        if not raising:
            out.append(f)
            continue
        kept = tuple(a for a in f.advice if lr_direction(a) <= 0)
        note = (
            f"Do not raise the learning rate: {', '.join(dict.fromkeys(lowering))} advises lowering it, and a "
            "learning rate that is too high does more harm than one that is too low."
        )
        out.append(dataclasses.replace(f, advice=(*kept, note), evidence={**f.evidence, "advice_withheld": raising}))
    return out


def _depth(f: Finding, by_code: dict[str, list[Finding]], seen: frozenset[str] = frozenset()) -> int:
    if not f.caused_by or f.code in seen:
        return 0
    depths = [1 + _depth(c, by_code, seen | {f.code}) for code in f.caused_by for c in by_code.get(code, [])[:1]]
    return max(depths, default=1)


#: Root codes that state a fact of the training set-up rather than a statistical judgement: among roots of one
#: severity they come first (a frozen embedding is a certain defect; a saturated tanh beside it may be normal).
_FACTS = frozenset({"no-steps-recorded", "gradients-accumulating", "not-optimized", "no-gradient"})


def sort_chain(findings: Sequence[Finding]) -> list[Finding]:
    """Roots first, then the symptoms in causal order.

    Roots: most severe first, then the facts of the set-up (:data:`_FACTS`: a parameter that gets no gradient or
    is not optimized, gradients summed over steps, no step recorded) before the statistical judgements, then in
    causal order, then by first step. Symptoms: by their distance from a root, then by :data:`CAUSAL_ORDER`, then
    by first step.
    """
    by_code: dict[str, list[Finding]] = {}
    for f in findings:
        by_code.setdefault(f.code, []).append(f)

    def key(f: Finding) -> tuple[Any, ...]:
        step = f.first_step if f.first_step is not None else float("inf")
        if f.is_root and not f.caused_by:
            return (0, -f.rank, f.code not in _FACTS, _order(f.code), step, f.code)
        return (1, _depth(f, by_code), _order(f.code), step, f.code)

    return sorted(findings, key=key)
