"""Finite differences: dJ/dW and dJ/db checked against float64 central differences of the closed-form loss."""

from __future__ import annotations

import numpy as np

from .._tolerance import Tolerance, tolerance_for
from ._graph import GraphRun, downstream, forward_node
from ._spec import FrameworkRun
from ._trace import FiniteDifference, Trace
from .rules import evaluate_loss, forward_layer, logits_variant, resolve

__all__ = ["FD_MAX_SAMPLES", "FD_STEP", "FD_TOL", "finite_differences", "graph_finite_differences"]

#: finite differences: relative step per entry, and the normwise tolerance of the comparison.
FD_STEP = 1e-6
FD_TOL = Tolerance(rtol=1e-5, atol=1e-7)
#: the most entries finite differences check per parameter tensor (two forward passes each).
FD_MAX_SAMPLES = 10_000


def _loss_from(run: FrameworkRun, l: int, a_prev: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> float:
    """J recomputed in float64 from layer l on, with layer l's parameters replaced by (w, b)."""
    z = None
    for ls in run.layers[l - 1 :]:
        if ls.index == l:
            z, a_prev = forward_layer(run, ls, a_prev, w, b)
        else:
            z, a_prev = forward_layer(run, ls, a_prev, ls.weight, ls.bias)
    if run.keras_logits:
        return evaluate_loss(logits_variant(run.loss), z, run.y).value
    return evaluate_loss(run.loss, a_prev, run.y).value


def _unavailable(run: FrameworkRun, l: int, opaque: list[int]) -> str:
    if run.loss is None:
        return "the loss is an arbitrary callable (no closed-form J to difference)"
    if any(k >= l for k in opaque):
        return f"layer(s) {[k for k in opaque if k >= l]} at or after layer {l} have no rule"
    return ""


def _differences(run: FrameworkRun, l: int, which: str, a_prev: np.ndarray, entries: list[int]) -> np.ndarray:
    """Central differences of J along each entry of layer l's W or b."""
    ls = run.layers[l - 1]
    p = (ls.weight if which == "W" else ls.bias).astype(np.float64)
    flat = p.ravel()
    vals = np.empty(len(entries))
    work = flat.copy()  # perturbed in place, one entry at a time: no per-entry copies of the tensor
    for k, e in enumerate(entries):
        h = FD_STEP * max(1.0, abs(flat[e]))
        js = []
        for step in (h, -h):
            work[e] = flat[e] + step
            pw = work.reshape(p.shape)
            js.append(
                _loss_from(run, l, a_prev, pw, ls.bias) if which == "W" else _loss_from(run, l, a_prev, ls.weight, pw)
            )
        work[e] = flat[e]
        vals[k] = (js[0] - js[1]) / (2 * h)
    return vals


def finite_differences(run: FrameworkRun, trace: Trace, acts: list[np.ndarray], samples: int, seed: int) -> None:
    """Attach a :class:`FiniteDifference` to every dJ/dW and dJ/db term of ``trace`` (or say why not)."""
    rng = np.random.default_rng(seed)
    opaque = [ls.index for ls in run.layers if resolve(ls)[0] is None]
    tol = Tolerance(max(FD_TOL.rtol, tolerance_for(run.dtype).rtol), max(FD_TOL.atol, tolerance_for(run.dtype).atol))
    kinks = ""
    if any(x.activation in ("relu", "leaky_relu") for x in run.layers):
        kinks = "ReLU-type kinks within h of a pre-activation make FD unreliable there"
    for ls in run.layers:
        if ls.weight is None:
            continue
        l = ls.index
        for which in ("W", "b"):
            name = f"dJ/d{which}{l}"
            if name not in trace:
                continue
            term = trace[name]
            reason = _unavailable(run, l, opaque)
            if reason:
                term.note = (term.note + "; " if term.note else "") + f"finite differences not available: {reason}"
                continue
            size = (ls.weight if which == "W" else ls.bias).size
            entries = (
                list(range(size))
                if size <= samples
                else sorted(int(i) for i in rng.choice(size, samples, replace=False))
            )
            vals = _differences(run, l, which, acts[l - 1], entries)
            ref_full = term.autodiff if term.autodiff is not None else term.value
            ref = np.asarray(ref_full, dtype=np.float64).ravel()[entries]
            err = float(np.max(np.abs(vals - ref))) if len(entries) else 0.0
            ok = tol.allows(err, float(np.max(np.abs(ref))) if ref.size else 0.0)
            term.fd = FiniteDifference(entries, vals, ref, err, ok, kinks)


# ------------------------------------------------------------------------------------------------- graphs
def _graph_loss(run: GraphRun, values: dict[str, np.ndarray], nodes: list) -> float:
    """J recomputed in float64 after re-running ``nodes`` (the ones downstream of a perturbed parameter)."""
    vals = dict(values)
    for nd in nodes:
        vals[nd.name] = forward_node(nd, vals)
    return evaluate_loss(run.loss, vals[run.output], run.y).value


def graph_finite_differences(
    run: GraphRun, trace: Trace, values: dict[str, np.ndarray], reasons: dict[str, str], samples: int, seed: int
) -> None:
    """Attach a :class:`FiniteDifference` to every parameter term of a graph trace (or say why not).

    Each sampled entry of a parameter is moved by ±h and J recomputed through the closed-form forward of the
    nodes downstream of it (the others keep their values), so only the derivation is differenced, never the
    framework.
    """
    rng = np.random.default_rng(seed)
    tol = Tolerance(max(FD_TOL.rtol, tolerance_for(run.dtype).rtol), max(FD_TOL.atol, tolerance_for(run.dtype).atol))
    kinks = ""
    if any(nd.op == "act" and nd.attrs.get("name") in ("relu", "leaky_relu") for nd in run.nodes) or any(
        nd.op in ("max", "pool") for nd in run.nodes
    ):
        kinks = "ReLU-type kinks and max ties within h of an entry make FD unreliable there"
    for nd in run.nodes:
        if nd.op != "param" or nd.grad_term not in trace:
            continue
        term = trace[nd.grad_term]
        down = downstream(run.nodes, nd.name)
        blocked = [d.name for d in down if reasons.get(d.name)]
        reason = (
            "the loss is an arbitrary callable (no closed-form J to difference)"
            if run.loss is None or run.loss.reduction == "none"
            else (f"node(s) {blocked} downstream of it have no rule" if blocked else "")
        )
        if reason:
            term.note = (term.note + "; " if term.note else "") + f"finite differences not available: {reason}"
            continue
        p = np.asarray(values[nd.name], dtype=np.float64)
        flat = p.ravel()
        # an embedding's padding_idx row: torch gives it no gradient by convention (the closed form follows
        # torch), while J does depend on it; differencing it would fail a correct term, so it is left out
        pads = {
            int(c.attrs["padding_idx"]) % p.shape[0]
            for c in run.nodes
            if c.op == "embedding" and c.attrs.get("padding_idx") is not None and nd.name in c.inputs[1:]
        }
        candidates = np.arange(flat.size)
        if pads and p.ndim == 2:
            candidates = candidates[~np.isin(candidates // p.shape[1], sorted(pads))]
            term.note = (term.note + "; " if term.note else "") + (
                f"finite differences leave out row(s) {sorted(pads)} (padding_idx: no gradient by convention)"
            )
        entries = (
            [int(i) for i in candidates]
            if candidates.size <= samples
            else sorted(int(i) for i in rng.choice(candidates, samples, replace=False))
        )
        work = flat.copy()
        vals = np.empty(len(entries))
        for k, e in enumerate(entries):
            h = FD_STEP * max(1.0, abs(flat[e]))
            js = []
            for step in (h, -h):
                work[e] = flat[e] + step
                js.append(_graph_loss(run, {**values, nd.name: work.reshape(p.shape)}, down))
            work[e] = flat[e]
            vals[k] = (js[0] - js[1]) / (2 * h)
        ref_full = term.autodiff if term.autodiff is not None else term.value
        ref = np.asarray(ref_full, dtype=np.float64).ravel()[entries]
        err = float(np.max(np.abs(vals - ref))) if len(entries) else 0.0
        ok = tol.allows(err, float(np.max(np.abs(ref))) if ref.size else 0.0)
        term.fd = FiniteDifference(entries, vals, ref, err, ok, kinks)
