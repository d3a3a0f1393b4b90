"""``derive_graph``: the framework-free half of explain for a graph — walk the op rules over an adapter's nodes.

Forward, in topological order: each op node's output from its inputs' closed-form values (term ``A[name]``).
Loss: J and dJ/dŶ from the loss rule at the output node. Backward, in reverse topological order: a node's
gradient is the **sum** of what each of its consumers sends back (plus dJ/dŶ at the output); the term
``dJ/dA[name]`` (``dJ/dW[owner]``/``dJ/db[owner]`` for a parameter, ``dJ/dA[x]`` for the input) writes that sum
out, each part labelled with the consumer it comes from, e.g.
``dJ/dA[x] = dJ/dA[block.add] (skip) + (1/σ)(γ⊙dJ/dA[block.ln1] − …) (branch)``. Then the node's rule turns
its gradient into one vector-Jacobian product per input. Everything is float64 numpy, compared term by term
with the framework's autodiff values.

A node without a rule (``"opaque"``, or a kind or activation missing from the table) is traced with its
autodiff values only: its ``A`` is the framework's, and what it sends back to its inputs is the framework's
vector-Jacobian product; every term computed from those borrowed values says so in its ``note``. A rule that
fails on a node (an input it does not support) turns that node into an autodiff-only one, with the error as
its reason: a graph that can be traced is never refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._tolerance import Tolerance, tolerance_for
from ._derive import _compare, _term
from ._fd import graph_finite_differences
from ._graph import GraphNode, GraphRun, consumers, node_inputs
from ._trace import GraphNodeInfo, Term, Trace
from .rules import OP_RULES, OpNames, evaluate_loss

__all__ = ["derive_graph"]

#: ops whose edge into them is a skip connection when the tensor also feeds another op.
_RESIDUAL_OPS = frozenset({"add", "sub"})


@dataclass
class _Part:
    """One consumer's contribution to a node's gradient."""

    consumer: str
    op: str
    value: np.ndarray
    text: str


@dataclass
class _State:
    run: GraphRun
    values: dict[str, np.ndarray] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # node → why autodiff only ("" when derived)
    fwd_borrow: dict[str, set[str]] = field(default_factory=dict)  # node → opaque nodes its value depends on
    bwd_borrow: dict[str, set[str]] = field(default_factory=dict)  # node → opaque nodes its gradient went through
    parts: dict[str, list[_Part]] = field(default_factory=dict)
    terms: list[Term] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    loss_formula: str = "autodiff only (arbitrary callable)"
    loss_borrowed: bool = False


def _display(run: GraphRun) -> dict[str, str]:
    """The name each node's value is written with in formulas: ``A[n]``, ``W[owner]``, ``b[owner]``."""
    out = {}
    for nd in run.nodes:
        if nd.op == "param":
            out[nd.name] = nd.grad_term[4:]  # "dJ/dW[fc]" -> "W[fc]"
        else:
            out[nd.name] = f"A[{nd.name}]"
    return out


def _const_text(v) -> str:
    a = np.asarray(v) if v is not None else None
    if a is None:
        return "—"
    if a.ndim == 0:
        return f"{float(a):g}" if a.dtype.kind in "fc" else str(a.item())
    return f"const{tuple(a.shape)}"


def _names(nd: GraphNode, disp: dict[str, str]) -> OpNames:
    names = nd.attrs.get("const_names", {})
    ins = tuple(disp[src] if src else names.get(k, _const_text(nd.consts.get(k))) for k, src in enumerate(nd.inputs))
    return OpNames(f"A[{nd.name}]", f"dJ/dA[{nd.name}]", ins, nd.attrs)


def _borrow_note(prefix: str, names: set[str]) -> str:
    return f"{prefix} {sorted(names)} (no rule there)" if names else ""


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


# ------------------------------------------------------------------------------------------------- forward
def _forward(st: _State, disp: dict[str, str]) -> None:
    run = st.run
    for i, nd in enumerate(run.nodes, start=1):
        ups = set().union(*(st.fwd_borrow.get(s, set()) for s in nd.inputs if s)) if nd.inputs else set()
        if nd.op == "input":
            st.values[nd.name] = run.x
            st.fwd_borrow[nd.name] = set()
            continue
        if nd.op == "param":
            st.values[nd.name] = np.asarray(nd.out, dtype=np.float64)
            st.fwd_borrow[nd.name] = set()
            continue
        rule = OP_RULES.get(nd.op) if nd.op != "opaque" else None
        reason = nd.reason or ("" if rule is not None else f"no rule registered for op {nd.op!r}")
        value = None
        nm = _names(nd, disp)
        if rule is not None:
            try:
                value = np.asarray(rule.forward(node_inputs(nd, st.values), nd.attrs), dtype=np.float64)
                if nd.out is not None and value.shape != np.shape(nd.out):
                    raise ValueError(f"output shape {value.shape} but the framework's is {np.shape(nd.out)}")
            except Exception as exc:  # a rule that does not fit this node: autodiff only, never a refusal
                reason = f"the {nd.op} rule does not apply here ({type(exc).__name__}: {exc})"
                value, rule = None, None
        st.reasons[nd.name] = "" if rule is not None else reason
        if rule is None:
            st.values[nd.name] = np.asarray(nd.out, dtype=np.float64)
            st.fwd_borrow[nd.name] = ups | {nd.name}
            st.terms.append(
                _term(
                    f"A[{nd.name}]",
                    i,
                    f"A[{nd.name}] = {nd.type_name}({', '.join(nm.ins)}) — autodiff only",
                    "",
                    None,
                    nd.out,
                    f"autodiff only: {reason}; the graph continues with the framework's value",
                    nd.layout,
                )
            )
            st.terms[-1].node = nd.name
            continue
        st.values[nd.name] = value
        st.fwd_borrow[nd.name] = ups
        t = _term(
            f"A[{nd.name}]",
            i,
            rule.text(nm),
            rule.latex(nm) if rule.latex else "",
            value,
            nd.out,
            _borrow_note("uses the framework's value of node(s)", ups),
            nd.layout,
        )
        t.node, t.local = nd.name, rule.local(nm)
        st.terms.append(t)


# ---------------------------------------------------------------------------------------------------- loss
def _loss(st: _State) -> np.ndarray | None:
    run = st.run
    spec = run.loss
    out_borrow = st.fwd_borrow.get(run.output, set())
    note = _borrow_note("uses the framework's value of node(s)", out_borrow)
    if spec is None or spec.reduction == "none":
        st.terms.append(
            _term(
                "J",
                0,
                f"J = {run.loss_display}(…) — autodiff only",
                "J",
                None,
                np.float64(run.j),
                "arbitrary callable: no closed form",
            )
        )
        st.terms.append(
            _term(
                "dJ/dY_hat",
                0,
                "dJ/dŶ from autodiff (arbitrary callable)",
                r"\partial J/\partial\hat Y",
                None,
                run.dj_dyhat,
                "arbitrary callable: dJ/dŶ comes from autodiff; the backward pass starts from it",
            )
        )
        st.loss_borrowed = True
        return None if run.dj_dyhat is None else np.asarray(run.dj_dyhat, dtype=np.float64)
    res = evaluate_loss(spec, st.values[run.output], run.y)
    st.loss_formula = res.formula
    st.terms.append(_term("J", 0, res.formula, res.latex, np.float64(res.value), np.float64(run.j), note))
    grad_text = f"dJ/dŶ = {res.formula.split('dJ/dŶ = ')[-1]}  (Ŷ = A[{run.output}])"
    st.terms.append(_term("dJ/dY_hat", 0, grad_text, res.latex, res.grad, run.dj_dyhat, note))
    return res.grad


# ------------------------------------------------------------------------------------------------ backward
def _sum_text(nd: GraphNode, parts: list[_Part]) -> str:
    labelled = len(parts) > 1 and any(p.op in _RESIDUAL_OPS for p in parts)
    bits = []
    for p in parts:
        label = ""
        if labelled and p.consumer != "loss":
            label = " (skip)" if p.op in _RESIDUAL_OPS else " (branch)"
        elif len(parts) > 1 and p.consumer != "loss":
            label = f" (via {p.consumer})"
        bits.append(p.text + label)
    rhs = " + ".join(bits) if bits else "0 (no path to J)"
    return f"{nd.grad_term} = {rhs}"


def _grad_value(nd: GraphNode, parts: list[_Part], shape: tuple[int, ...]) -> np.ndarray:
    total = np.zeros(shape)
    for p in parts:
        total = total + p.value
    return total


def _send(st: _State, nd: GraphNode, g: np.ndarray, disp: dict[str, str]) -> None:
    """Turn ``nd``'s gradient into one part per producer (positions read from the same producer summed)."""
    rule = OP_RULES.get(nd.op) if not st.reasons.get(nd.name) else None
    nm = _names(nd, disp)
    if rule is None:
        grads = nd.input_grads or [None] * len(nd.inputs)
        texts = [f"(∂A[{nd.name}]/∂{nm.i(k)})ᵀ·dJ/dA[{nd.name}] [autodiff]" for k in range(len(nd.inputs))]
    else:
        try:
            grads = rule.backward(g, node_inputs(nd, st.values), nd.attrs, st.values[nd.name])
        except Exception as exc:  # pragma: no cover - a rule's forward ran, its backward should too
            st.reasons[nd.name] = f"the {nd.op} rule's backward failed ({type(exc).__name__}: {exc})"
            return _send(st, nd, g, disp)
        texts = [nm.g if k in rule.identity else rule.contrib(nm, k) for k in range(len(nd.inputs))]
    grouped: dict[str, tuple[np.ndarray, list[str]]] = {}
    for k, src in enumerate(nd.inputs):
        if not src or k >= len(grads) or grads[k] is None:
            continue
        val = np.asarray(grads[k], dtype=np.float64)
        if src in grouped:
            prev, txt = grouped[src]
            grouped[src] = (prev + val, [*txt, texts[k]])
        else:
            grouped[src] = (val, [texts[k]])
    roles = rule.roles if rule is not None else ()
    for src, (val, txt) in grouped.items():
        if len(txt) == 1:
            text = txt[0]
        else:
            ks = [k for k, s in enumerate(nd.inputs) if s == src]
            read = ", ".join(roles[k] if k < len(roles) else f"input {k}" for k in ks)
            text = f"(∂A[{nd.name}]/∂{disp[src]})ᵀ·dJ/dA[{nd.name}] (read as {read}: the parts summed)"
        st.parts.setdefault(src, []).append(_Part(nd.name, nd.op, val, text))
        borrowed = set(st.bwd_borrow.get(nd.name, set())) | ({nd.name} if rule is None else set())
        st.bwd_borrow[src] = st.bwd_borrow.get(src, set()) | borrowed


def _backward(st: _State, g_loss: np.ndarray | None, disp: dict[str, str]) -> None:
    run = st.run
    index = {nd.name: i for i, nd in enumerate(run.nodes, start=1)}
    for nd in reversed(run.nodes):
        parts = list(st.parts.get(nd.name, []))
        if nd.name == run.output and g_loss is not None:
            parts.insert(0, _Part("loss", "loss", g_loss, "dJ/dŶ"))
        shape = tuple(np.shape(st.values[nd.name]))
        if nd.op == "input" and nd.grad is None:
            continue  # integer ids: no gradient
        g = _grad_value(nd, parts, shape)
        borrowed = st.bwd_borrow.get(nd.name, set())
        note = _join(
            "starts from the autodiff dJ/dŶ (arbitrary loss)" if st.loss_borrowed else "",
            _borrow_note("uses the framework's vector-Jacobian product through node(s)", borrowed),
            _borrow_note("uses the framework's forward value of node(s)", st.fwd_borrow.get(nd.name, set())),
        )
        if len(parts) > 1:
            note = _join(f"fan-out: used by {len(parts)} consumers, so its gradient is their sum", note)
        if nd.op == "param":
            autodiff = run.param_grads.get(nd.key)
            if parts and all(p.op == "embedding" for p in parts) and g.ndim == 2:
                rows = int(np.count_nonzero(np.any(g != 0, axis=1)))
                note = _join(note, f"sparse: {rows} of {g.shape[0]} rows are non-zero (the looked-up ids)")
            if nd.frozen:
                note = _join(note, f"frozen ({run.conventions.frozen_words}): derived and checked, not updated")
            t = _term(nd.grad_term, index[nd.name], _sum_text(nd, parts), "", g, autodiff, note, nd.layout)
            t.node = nd.grad_term[nd.grad_term.index("[") + 1 : -1]
            st.terms.append(t)
            continue
        t = _term(nd.grad_term, index[nd.name], _sum_text(nd, parts), "", g, nd.grad, note, nd.layout)
        t.node = nd.name
        st.terms.append(t)
        if nd.op != "input":
            _send(st, nd, g, disp)


# -------------------------------------------------------------------------------------------------- derive
def _graph_info(st: _State) -> list[GraphNodeInfo]:
    run = st.run
    users = consumers(run.nodes)
    disp = {nd.name: nd.name for nd in run.nodes}
    out = []
    for i, nd in enumerate(run.nodes, start=1):
        nm = _names(nd, disp)
        reason = st.reasons.get(nd.name, "")
        out.append(
            GraphNodeInfo(
                i,
                nd.name,
                nd.op,
                [s[2:-1] if s.startswith("A[") else s for s in nm.ins],
                nd.type_name,
                nd.op in ("input", "param") or not reason,
                reason,
                tuple(np.shape(st.values.get(nd.name))),
                users.get(nd.name, []),
                nd.grad_term,
            )
        )
    return out


def derive_graph(run: GraphRun, *, finite_differences: bool = False, fd_samples: int = 32, fd_seed: int = 0) -> Trace:
    """Build the :class:`Trace` of a graph from an adapter's :class:`GraphRun` (the framework-free half)."""
    tol = tolerance_for(run.dtype)
    if run.rtol_floor > tol.rtol or run.atol_floor > tol.atol:
        tol = Tolerance(rtol=max(run.rtol_floor, tol.rtol), atol=max(run.atol_floor, tol.atol))
    st = _State(run, notes=list(run.notes))
    disp = _display(run)
    _forward(st, disp)
    g_loss = _loss(st)
    _backward(st, g_loss, disp)
    for t in st.terms:
        _compare(t, tol)
    opaque = [n for n, r in st.reasons.items() if r]
    if opaque:
        st.notes.append(
            f"{len(opaque)} node(s) have no rule and are traced with autodiff values only: {opaque}; terms that "
            "depend on them say so"
        )
    trace = Trace(
        framework=run.framework,
        model_name=run.model_name,
        loss=run.loss_display,
        loss_formula=st.loss_formula,
        dtype=run.dtype,
        n=int(np.shape(run.x)[0]),
        layers=[],
        terms=st.terms,
        notes=st.notes,
        model_dtype=run.model_dtype,
        graph=_graph_info(st),
        tracer=run.tracer,
    )
    if finite_differences:
        graph_finite_differences(run, trace, st.values, st.reasons, fd_samples, fd_seed)
    return trace
