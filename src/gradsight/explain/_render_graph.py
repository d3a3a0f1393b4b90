"""How a graph trace describes itself: text, Markdown and HTML, read top-down like a textbook section.

The same order in every medium: the graph (nodes in topological order, with their inputs and the tensors read
by several nodes marked ⇉), the forward pass (``A[node]`` per op), the loss, and the backward pass in reverse
topological order, where each gradient is written as the sum of what its consumers send back (the fan-in sums),
followed by the verdict and the notes. Works on any object with a trace's attributes (no import of the Trace
class, so no import cycle).
"""

from __future__ import annotations

import html
from typing import Any

__all__ = ["graph_html", "graph_markdown", "graph_text"]

_FORWARD_TITLE = "Forward pass (topological order)"
_LOSS_TITLE = "Loss"
_BACKWARD_TITLE = (
    "Backward pass (reverse topological order; a tensor read by several nodes receives the sum of their gradients)"
)


def _sections(trace: Any) -> list[tuple[str, list[Any]]]:
    fwd = [t for t in trace.terms if t.name.startswith("A[")]
    loss = [t for t in trace.terms if t.layer == 0]
    bwd = [t for t in trace.terms if t.name.startswith("dJ/d") and t.layer > 0]
    return [(_FORWARD_TITLE, fwd), (_LOSS_TITLE, loss), (_BACKWARD_TITLE, bwd)]


def _counts(trace: Any) -> tuple[int, int, int]:
    n_ok = sum(1 for t in trace.terms if t.mark == "✓")
    return n_ok, len(trace.failures), sum(1 for t in trace.terms if t.mark == "·")


def _head(trace: Any) -> str:
    dt = trace.dtype + (f", model in {trace.model_dtype}" if trace.model_dtype else "")
    return f"gradsight explain — {trace.model_name} ({trace.framework}, {dt}), batch n = {trace.n}"


def _output(trace: Any) -> str:
    ops = [g for g in trace.graph if g.op not in ("input", "param")]
    return ops[-1].name if ops else "?"


def _shown(trace: Any) -> dict[str, str]:
    """How each node is written in the listing: a parameter as ``W[owner]``/``b[owner]``, others by name."""
    return {g.name: (g.term[4:] if g.op == "param" and g.term.startswith("dJ/d") else g.name) for g in trace.graph}


def _listed(trace: Any) -> list[Any]:
    """The nodes the listing shows: every op and the input; a parameter only when several nodes read it."""
    return [g for g in trace.graph if g.op != "param" or len(g.consumers) > 1]


def _node_line(g: Any, shown: dict[str, str] | None = None) -> tuple[str, str, str]:
    """(what it computes, type, remark) of a node for the graph listing."""
    shown = shown or {}
    if g.op == "input":
        what = "input X"
    elif g.op == "param":
        what = f"parameter {shown.get(g.name, g.name)}, shared"
    else:
        what = f"{g.op}({', '.join(shown.get(i, i) for i in g.inputs)})"
    remark = "" if g.has_rule else f"[autodiff only: {g.reason}]"
    return what, g.type_name, remark


def graph_text(trace: Any) -> str:
    """Plain-text rendering of a graph trace."""
    n_ok, n_bad, n_na = _counts(trace)
    shown = _shown(trace)
    listed = _listed(trace)
    n_params = sum(1 for g in trace.graph if g.op == "param")
    out = [
        _head(trace),
        f"graph traced by {trace.tracer}" if trace.tracer else "graph",
        f"loss: {trace.loss}",
        f"graph: {len(trace.graph) - n_params} nodes and {n_params} parameters (W[owner], b[owner]) in topological "
        f"order, A[x] = X, Ŷ = A[{_output(trace)}]; ⇉ marks a tensor read by several nodes (its gradient is a sum):",
    ]
    width = max((len(g.name) for g in listed), default=4)
    for g in listed:
        what, type_name, remark = _node_line(g, shown)
        fan = f"  ⇉ {', '.join(g.consumers)}" if len(g.consumers) > 1 else ""
        out.append(f"  {g.index:>3}. {g.name:<{width}}  {what}  [{type_name}] {tuple(g.shape)}{fan} {remark}".rstrip())
    for title, terms in _sections(trace):
        out += ["", f"── {title} " + "─" * max(4, 60 - len(title))]
        out += [str(t) for t in terms]
    out += ["", f"{'✓' if trace.ok else '✗'} {n_ok} terms verified, {n_bad} failed, {n_na} not applicable"]
    out += [f"note: {x}" for x in trace.notes]
    return "\n".join(out)


def _md(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def graph_markdown(trace: Any) -> str:
    """Markdown rendering of a graph trace: the graph as a table, one table per section."""
    out = [
        f"### {_head(trace)}",
        "",
        f"**Graph** traced by {trace.tracer}; **loss:** {_md(trace.loss)} — {_md(trace.loss_formula)}",
        "",
        "| # | node | computes | type | shape | read by |",
        "|---|---|---|---|---|---|",
    ]
    shown = _shown(trace)
    for g in _listed(trace):
        what, type_name, remark = _node_line(g, shown)
        fan = ("⇉ " if len(g.consumers) > 1 else "") + ", ".join(f"`{c}`" for c in g.consumers)
        out.append(
            f"| {g.index} | `{g.name}` | {_md(what)}{(' — *' + _md(remark) + '*') if remark else ''} | "
            f"{_md(type_name)} | {tuple(g.shape)} | {fan} |"
        )
    for title, terms in _sections(trace):
        out += [
            "",
            f"#### {title}",
            "",
            "| | term | formula | shape | max abs err | note |",
            "|---|---|---|---|---|---|",
        ]
        for t in terms:
            err = "n/a" if t.mark == "·" else f"{t.max_abs_err:.2e}"
            note = _md(t.note + (f" local: {t.local}" if t.local else ""))
            out.append(f"| {t.mark} | `{_md(t.name)}` | `{_md(t.formula)}` | {t.shape} | {err} | {note} |")
    n_ok, n_bad, n_na = _counts(trace)
    verdict = "✓ all terms agree with autodiff" if trace.ok else "✗ some terms disagree"
    out += ["", f"**{verdict}** ({n_ok} verified, {n_bad} failed, {n_na} not applicable)"]
    out += [f"- note: {_md(x)}" for x in trace.notes]
    return "\n".join(out)


def graph_html(trace: Any) -> str:
    """A self-contained HTML fragment of a graph trace: headed sections, the graph and the terms as tables."""
    e = html.escape
    out = [
        '<div class="gradsight-explain">',
        f"<h3>{e(_head(trace))}</h3>",
        f"<p>Graph traced by {e(trace.tracer)}; loss: {e(trace.loss)} — <code>{e(trace.loss_formula)}</code></p>",
        "<h4>Graph</h4>",
        "<table><thead><tr><th>#</th><th>node</th><th>computes</th><th>type</th><th>shape</th><th>read by</th>"
        "</tr></thead><tbody>",
    ]
    shown = _shown(trace)
    for g in _listed(trace):
        what, type_name, remark = _node_line(g, shown)
        fan = ("⇉ " if len(g.consumers) > 1 else "") + ", ".join(g.consumers)
        out.append(
            f"<tr><td>{g.index}</td><td><code>{e(g.name)}</code></td><td>{e(what)} <em>{e(remark)}</em></td>"
            f"<td>{e(type_name)}</td><td>{e(str(tuple(g.shape)))}</td><td>{e(fan)}</td></tr>"
        )
    out.append("</tbody></table>")
    for title, terms in _sections(trace):
        out += [
            f"<h4>{e(title)}</h4>",
            "<table><thead><tr><th></th><th>term</th><th>formula</th><th>shape</th><th>max abs err</th>"
            "<th>note</th></tr></thead><tbody>",
        ]
        for t in terms:
            err = "n/a" if t.mark == "·" else f"{t.max_abs_err:.2e}"
            local = f"<br><small>local: {e(t.local)}</small>" if t.local else ""
            out.append(
                f'<tr class="{"ok" if t.ok else "bad"}"><td>{e(t.mark)}</td><td><code>{e(t.name)}</code></td>'
                f"<td><code>{e(t.formula)}</code>{local}</td><td>{e(str(t.shape))}</td><td>{e(err)}</td>"
                f"<td>{e(t.note)}</td></tr>"
            )
        out.append("</tbody></table>")
    n_ok, n_bad, n_na = _counts(trace)
    verdict = "✓ all terms agree with autodiff" if trace.ok else "✗ some terms disagree"
    out.append(f"<p><strong>{e(verdict)}</strong> ({n_ok} verified, {n_bad} failed, {n_na} not applicable)</p>")
    if trace.notes:
        out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in trace.notes) + "</ul>")
    out.append("</div>")
    return "\n".join(out)
