"""``derive``: the framework-free half of explain — walk the rule table over an adapter's layer specs.

Forward: for each layer, look up its rule (:func:`gradsight.explain.rules.layer_rule`) and its activation's;
Z = rule.forward(A_{l-1}), A = activation(Z), with the terms Z, S, A (or A alone for a layer without an
activation). Loss: J and dJ/dŶ from the loss rule. Backward: dJ/dZ = activation.backward(Z, dJ/dA), then
(dJ/dW, dJ/db, dJ/dA_{l-1}) = rule.backward(dJ/dZ). Everything in float64 numpy, compared term by term with the
framework's values.

A layer whose kind or activation has no registered rule (including kind ``"opaque"``) is traced with its
autodiff values only ("autodiff only"): its terms have ``value=None`` and count as ok; the chain continues with
the framework's A through it (forward) and the framework's dJ/dA_{l-1} (backward), and every term computed from
those borrowed values says so in its ``note``. It never falls through to another rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._tolerance import Tolerance, tolerance_for
from ._fd import finite_differences as _finite_differences
from ._spec import FrameworkRun, LayerSpec
from ._trace import LayerInfo, Term, Trace
from .rules import Activation, LayerRule, evaluate_loss, layer_rule, logits_variant, resolve

__all__ = ["derive"]


# ------------------------------------------------------------------------------------------------- terms
def _term(name, layer, formula, latex, value, autodiff, note="", layout="") -> Term:
    shown = value if value is not None else autodiff
    shape = tuple(np.shape(shown)) if shown is not None else ()
    return Term(name, layer, formula, latex, shape, value, autodiff, note=note, layout=layout)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _compare(term: Term, tol: Tolerance) -> Term:
    v, a = term.value, term.autodiff
    if v is None or a is None:
        return term
    v = np.asarray(v, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    if v.shape != a.shape:
        term.max_abs_err = term.max_rel_err = float("inf")
        term.ok = False
        term.note = (term.note + "; " if term.note else "") + f"shape mismatch: autodiff has shape {a.shape}"
        return term
    if v.size == 0:
        term.max_abs_err = term.max_rel_err = 0.0
        return term
    diff = np.abs(v - a)
    err = float(np.max(diff)) if np.all(np.isfinite(diff)) else float("inf")
    ref = float(np.max(np.abs(a)))
    term.max_abs_err = err
    term.max_rel_err = err / ref if ref > 0 else (0.0 if err == 0 else float("inf"))
    term.ok = tol.allows(err, float(np.max(np.abs(v))))
    if not term.ok:
        worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if np.all(np.isfinite(diff)) else None
        n_bad = int(np.sum(diff > tol.atol + tol.rtol * np.max(np.abs(v))))
        term.note = (term.note + "; " if term.note else "") + (
            f"{n_bad} of {v.size} elements differ; worst at {worst}: closed form "
            f"{v[worst] if worst is not None else 'nan'!s:.10} vs autodiff "
            f"{a[worst] if worst is not None else 'nan'!s:.10}; allowed {tol.atol:g} + {tol.rtol:g}·max|value|"
        )
    return term


# ----------------------------------------------------------------------------------------- remarks, notes
def _act_layout(rule: LayerRule | None, ls: LayerSpec) -> str:
    if rule is not None and rule.act_layout is not None:
        return rule.act_layout(ls)
    return "(n, features)" if ls.a is None or np.ndim(ls.a) == 2 else f"{np.ndim(ls.a)}-D, framework layout"


def _remarks(run: FrameworkRun, ls: LayerSpec) -> list[str]:
    out = []
    if ls.frozen:
        out.append(
            f"frozen ({run.conventions.frozen_words}): its gradients are derived and checked, but the optimizer "
            "does not update it"
        )
    mine = [sp for sp in run.shared if ls.index in sp.layers and ls.shared.get(sp.which) == sp.key]
    if mine:
        others = sorted({k for sp in mine for k in sp.layers if k != ls.index})
        sums = ", ".join(f"dJ/d{sp.which}[{sp.module}]" for sp in mine)
        out.append(
            f"shares {' and '.join(sp.which for sp in mine)} with layer(s) {others}: module {mine[0].module!r} is "
            f"used {len(mine[0].layers)} times; its gradient is the sum over the uses ({sums})"
        )
    return out


def _param_note(run: FrameworkRun, ls: LayerSpec, which: str) -> str:
    """Per-use and frozen remarks on the dJ/dW / dJ/db term of layer ``ls``."""
    bits = []
    key = ls.shared.get(which)
    sp = next((p for p in run.shared if p.key == key and p.which == which), None) if key else None
    if sp is not None:
        bits.append(
            f"one use of module {sp.module!r} (layers {sp.layers}): this is this use's share of the parameter's "
            f"gradient; its autodiff value is {run.conventions.per_use_words}; the sum over the uses is the term "
            f"dJ/d{which}[{sp.module}]"
        )
    if ls.frozen:
        bits.append(f"frozen ({run.conventions.frozen_words}): derived and checked, not updated by the optimizer")
    return "; ".join(bits)


def _layer_info(run: FrameworkRun, ls: LayerSpec, rule: LayerRule | None, reason: str) -> LayerInfo:
    kind_rule = layer_rule(ls.kind)
    activation = ls.activation if kind_rule is not None and kind_rule.pre_activation else "—"
    return LayerInfo(
        ls.index,
        ls.kind,
        ls.name,
        ls.type_name,
        activation,
        rule is not None,
        reason,
        ls.weight_layout,
        _remarks(run, ls),
    )


# ------------------------------------------------------------------------------------------------- chain
@dataclass
class _Chain:
    """The derive loop's state: closed-form A_0..A_L and Z_1..Z_L, the terms so far, what was borrowed."""

    run: FrameworkRun
    resolved: list[tuple[LayerRule | None, Activation | None, str]]
    terms: list[Term] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    acts: list[np.ndarray] = field(default_factory=list)
    zs: list[np.ndarray | None] = field(default_factory=lambda: [None])
    borrowed: list[int] = field(default_factory=list)  # layers without a rule whose framework A was used
    used_fw_back: list[int] = field(default_factory=list)  # ... whose framework dJ/dA the backward used
    params_grad: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = field(default_factory=dict)
    loss_formula: str = "autodiff only (arbitrary callable)"
    chain_note: str = ""
    dj_dz_last: np.ndarray | None = None


def _forward_step(ch: _Chain, ls: LayerSpec) -> None:
    """Terms Z_l, S_l, A_l (or A_l alone) of one layer, and the closed-form A_l for the next."""
    l, conv = ls.index, ch.run.conventions
    rule, act, reason = ch.resolved[l - 1]
    fwd_note = f"uses the framework's A of layer(s) {ch.borrowed} (no rule there)" if ch.borrowed else ""
    z = None
    if rule is None:
        a = ls.a
        ch.terms.append(
            _term(
                f"A{l}",
                l,
                f"A{l} = {ls.type_name}(A{l - 1}) — autodiff only",
                r"A_l = g(A_{l-1})",
                None,
                ls.a,
                f"autodiff only: {reason}; the chain continues with the framework's A{l}",
            )
        )
        ch.borrowed.append(l)
    elif act is None:
        a = rule.forward(ls, ch.acts[-1], ls.weight, ls.bias, conv)
        text, latex = rule.text(ls, l, conv)
        ch.terms.append(_term(f"A{l}", l, text, latex, a, ls.a, fwd_note))
    else:
        layout = _act_layout(rule, ls)
        z = rule.forward(ls, ch.acts[-1], ls.weight, ls.bias, conv)
        a = act.forward(z)
        text, latex = rule.text(ls, l, conv)
        s_val, s_text, s_latex, s_layout = act.local(z)
        ch.terms += [
            _term(f"Z{l}", l, text, latex, z, ls.z, fwd_note, layout),
            _term(f"S{l}", l, f"S{l} = ∂A{l}/∂Z{l}: {s_text}", s_latex, s_val, ls.s, fwd_note, s_layout),
            _term(f"A{l}", l, f"A{l} = {ls.activation}(Z{l})", rf"A_{{{l}}} = f(Z_{{{l}}})", a, ls.a, fwd_note, layout),
        ]
    ch.zs.append(z)
    ch.acts.append(a)


def _loss_step(ch: _Chain) -> np.ndarray | None:
    """Terms J and dJ/dŶ; returns dJ/dA_L (None when J was computed from the logits Z_L)."""
    run, L = ch.run, len(ch.run.layers)
    spec = run.loss
    if spec is not None and spec.reduction == "none":  # pragma: no cover - adapters refuse non-scalar losses
        spec = None
    if spec is None:
        ch.terms += [
            _term(
                "J",
                0,
                f"J = {run.loss_display}(…) — autodiff only",
                "J",
                None,
                np.float64(run.j),
                "arbitrary callable: no closed form",
            ),
            _term(
                "dJ/dY_hat",
                0,
                "dJ/dŶ from autodiff (arbitrary callable)",
                r"\partial J/\partial\hat Y",
                None,
                run.dj_dyhat,
                "arbitrary callable: dJ/dŶ comes from autodiff; the backward chain starts from it",
            ),
        ]
        ch.chain_note = "starts from the autodiff dJ/dŶ (arbitrary loss)"
        return run.dj_dyhat
    if run.keras_logits:
        lspec = logits_variant(spec)
        res = evaluate_loss(lspec, ch.zs[-1], run.y)
        ch.loss_formula = res.formula
        note = (
            f"{run.conventions.display} computed {spec.kind} from the logits Z{L} ({run.conventions.logits_reason}), "
            f"so J does not depend on Ŷ; the closed form is the {lspec.kind} rule at Z{L}"
        )
        ch.terms.append(_term("J", 0, res.formula, res.latex, np.float64(res.value), np.float64(run.j), note))
        ch.terms.append(_term("dJ/dY_hat", 0, "not defined: J is computed from Z_L", r"—", None, None, note))
        ch.dj_dz_last = res.grad
        ch.notes.append(note)
        return None
    res = evaluate_loss(spec, ch.acts[-1], run.y)
    ch.loss_formula = res.formula
    tail_note = f"uses the framework's A of layer(s) {ch.borrowed}" if ch.borrowed else ""
    ch.terms.append(_term("J", 0, res.formula, res.latex, np.float64(res.value), np.float64(run.j), tail_note))
    grad_text = f"dJ/dŶ = {res.formula.split('dJ/dŶ = ')[-1]}"
    ch.terms.append(_term("dJ/dY_hat", 0, grad_text, res.latex, res.grad, run.dj_dyhat, tail_note))
    return res.grad


def _autodiff_only_back(ch: _Chain, ls: LayerSpec, reason: str) -> np.ndarray | None:
    """Backward terms of a layer without a rule (framework values only); returns the framework's dJ/dA_{l-1}."""
    l = ls.index
    note = f"autodiff only: {reason}"
    ch.terms.append(_term(f"dJ/dA{l}", l, f"dJ/dA{l} — autodiff only", r"\partial J/\partial A_l", None, ls.da, note))
    if ls.weight is not None:
        ch.terms.append(
            _term(
                f"dJ/dW{l}",
                l,
                f"dJ/dW{l} — autodiff only",
                r"\partial J/\partial W_l",
                None,
                ls.dw,
                note,
                ls.weight_layout,
            )
        )
        if ls.bias is not None:
            ch.terms.append(
                _term(f"dJ/db{l}", l, f"dJ/db{l} — autodiff only", r"\partial J/\partial b_l", None, ls.db, note)
            )
    ch.used_fw_back.append(l)
    return ch.run.layers[l - 2].da if l >= 2 else None


def _backward_step(ch: _Chain, ls: LayerSpec, dA: np.ndarray | None) -> np.ndarray | None:
    """Terms dJ/dA_l, dJ/dZ_l, dJ/dW_l, dJ/db_l of one layer; returns dJ/dA_{l-1}."""
    run, l, L = ch.run, ls.index, len(ch.run.layers)
    rule, act, reason = ch.resolved[l - 1]
    if rule is None:
        return _autodiff_only_back(ch, ls, reason)
    bits = [ch.chain_note] if ch.chain_note else []
    if ch.borrowed:
        bits.append(f"forward uses the framework's A of layer(s) {ch.borrowed}")
    if ch.used_fw_back:
        bits.append(f"backward uses the framework's dJ/dA through layer(s) {ch.used_fw_back}")
    note = "; ".join(bits)
    layout, a_in, conv = _act_layout(rule, ls), ch.acts[l - 1], run.conventions
    logits = l == L and ch.dj_dz_last is not None
    if logits:
        display = run.conventions.display
        ch.terms.append(
            _term(
                f"dJ/dA{l}",
                l,
                f"not defined: {display} computes J from Z_L",
                "—",
                None,
                None,
                f"{display} logits shortcut: J does not depend on A_L",
            )
        )
    else:
        text = f"dJ/dA{l} = dJ/dŶ" if l == L else f"dJ/dA{l} = dJ/d(input of layer {l + 1})"
        ch.terms.append(_term(f"dJ/dA{l}", l, text, rf"\partial J/\partial A_{{{l}}}", dA, ls.da, note, layout))
    if act is None:  # no pre-activation: dJ/dA passes straight through the rule's backward
        return None if dA is None else rule.backward(ls, dA, a_in, None, conv)[2]
    if logits:
        dZ = ch.dj_dz_last
        dz_text = f"dJ/dZ{l} = {ch.loss_formula.split('dJ/dŶ = ')[-1]} (logits form, at Z{l})"
    elif dA is None:
        dZ, dz_text = None, f"dJ/dZ{l}"
    else:
        dZ, dz_text = act.backward(ch.zs[l], dA), act.rule.dz_text(l)
    dz_latex = rf"\frac{{\partial J}}{{\partial Z_{{{l}}}}} = \frac{{\partial J}}{{\partial A_{{{l}}}}} \odot S_{{{l}}}"
    ch.terms.append(_term(f"dJ/dZ{l}", l, dz_text, dz_latex, dZ, ls.dz, note, layout))
    if dZ is None:
        return (run.layers[l - 2].da if l >= 2 else None) if rule.weighted else None
    dw, db, dA_prev = rule.backward(ls, dZ, a_in, ls.weight, conv)
    if rule.weighted:
        wf, wl = rule.grad_text(ls, l, conv)
        ch.terms.append(
            _term(f"dJ/dW{l}", l, wf, wl, dw, ls.dw, _join(note, _param_note(run, ls, "W")), ls.weight_layout)
        )
        ch.params_grad[l] = (dw, db)
        if ls.bias is not None:
            ch.terms.append(
                _term(
                    f"dJ/db{l}",
                    l,
                    f"dJ/db{l} = Σ dJ/dZ{l} over every axis but the channel/feature",
                    rf"\frac{{\partial J}}{{\partial b_{{{l}}}}} = \sum_n \frac{{\partial J}}{{\partial Z_{{{l}}}}}",
                    db,
                    ls.db,
                    _join(note, _param_note(run, ls, "b")),
                )
            )
    return dA_prev


def _shared_terms(ch: _Chain) -> list[Term]:
    """One term per parameter used by several layers: the sum of its per-use terms, checked against the
    framework's gradient of the parameter itself (the ``.grad`` a ``backward()`` would leave).
    """  # noqa: D205
    out = []
    for sp in ch.run.shared:
        parts = [ch.params_grad.get(l, (None, None))[0 if sp.which == "W" else 1] for l in sp.layers]
        value = None if any(p is None for p in parts) else np.sum(parts, axis=0)
        uses = " + ".join(f"dJ/d{sp.which}{l}" for l in sp.layers)
        name = f"dJ/d{sp.which}[{sp.module}]"
        formula = (
            f"{name} = {uses}  (shared module {sp.module!r} used at layers "
            f"{', '.join(map(str, sp.layers[:-1]))} and {sp.layers[-1]}: its parameter's gradient is the sum of "
            "the per-use terms)"
        )
        note = (
            "autodiff value: the framework's gradient of the parameter itself (what backward() accumulates in "
            f"{ch.run.conventions.grad_words})"
        )
        if value is None:
            note += "; no closed form: a use has no rule"
        ls0 = ch.run.layers[sp.layers[0] - 1]
        layout = ls0.weight_layout if sp.which == "W" else ""
        latex = rf"\frac{{\partial J}}{{\partial {sp.which}}} = \sum_{{l \in \{{{','.join(map(str, sp.layers))}\}}}}"
        latex += rf" \frac{{\partial J}}{{\partial {sp.which}_l}}"
        out.append(_term(name, sp.layers[0], formula, latex, value, sp.autodiff, note, layout))
    return out


# --------------------------------------------------------------------------------------------------- derive
def derive(run: FrameworkRun, *, finite_differences: bool = False, fd_samples: int = 32, fd_seed: int = 0) -> Trace:
    """Build the :class:`Trace` from an adapter's :class:`FrameworkRun` (the framework-free half of explain)."""
    tol = tolerance_for(run.dtype)
    if run.rtol_floor > tol.rtol:
        tol = Tolerance(rtol=run.rtol_floor, atol=tol.atol)
    ch = _Chain(run, [resolve(ls) for ls in run.layers], notes=list(run.notes), acts=[run.x])
    for ls in run.layers:
        _forward_step(ch, ls)
    dA = _loss_step(ch)
    for ls in reversed(run.layers):
        dA = _backward_step(ch, ls, dA)
    ch.terms += _shared_terms(ch)
    for t in ch.terms:
        _compare(t, tol)
    trace = Trace(
        framework=run.framework,
        model_name=run.model_name,
        loss=run.loss_display,
        loss_formula=ch.loss_formula,
        dtype=run.dtype,
        n=int(run.x.shape[0]),
        layers=[_layer_info(run, ls, r, reason) for ls, (r, _, reason) in zip(run.layers, ch.resolved, strict=True)],
        terms=ch.terms,
        notes=ch.notes,
        model_dtype=run.model_dtype,
    )
    if finite_differences:
        _finite_differences(run, trace, ch.acts, fd_samples, fd_seed)
    return trace
