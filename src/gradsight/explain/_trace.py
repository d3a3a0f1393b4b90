"""Term and Trace: the result of :func:`gradsight.explain`, and how it describes itself (text, Markdown, dict).

Verdicts. A term is ``ok`` when its closed-form value agrees with the framework's autodiff value normwise:
``max|value − autodiff| <= atol + rtol·max|value|`` with ``(rtol, atol) = gradsight._tolerance.tolerance_for(
<autodiff dtype>)`` (float64: 1e-9 / 1e-12; float32: 1e-4 / 1e-6). A term without a closed form (a layer
without a rule, or a loss given as an arbitrary callable) has ``value=None``; it is *not applicable* and counts
as ``ok=True``, with a ``note`` saying so, so ``trace.ok`` answers "did every derivation that was made agree?".
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FiniteDifference", "GraphNodeInfo", "LayerInfo", "Term", "Trace", "clean_json"]


def clean_json(obj: Any) -> Any:
    """Make ``obj`` JSON-serialisable: numpy → lists/floats, NaN/inf → None, tuples → lists."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean_json(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def preview(a: np.ndarray | None, rows: int = 3, cols: int = 6) -> str:
    """A short text preview: the first ``rows`` rows and ``cols`` columns, numpy precision 4."""
    if a is None:
        return "—"
    arr = np.asarray(a)
    if arr.ndim == 0:
        return np.array2string(arr, precision=4)
    if arr.ndim == 1:
        idx: tuple[slice, ...] = (slice(0, cols),)
    else:
        idx = tuple(slice(0, rows) if i == 0 else slice(0, cols) for i in range(2))
    part = arr[idx]
    while part.ndim > 2:
        part = part[..., 0]
    with np.printoptions(precision=4, suppress=True, linewidth=100, threshold=60):
        text = np.array2string(part, precision=4)
    more = arr.shape[0] > (cols if arr.ndim == 1 else rows) or (arr.ndim > 1 and arr.shape[1] > cols) or arr.ndim > 2
    return text + (f"  … of shape {tuple(arr.shape)}" if more else "")


@dataclass
class FiniteDifference:
    """A float64 central-difference check of a parameter gradient on sampled entries.

    Attributes:
        entries: the checked flat indices (in the framework layout).
        values: the central differences ``(J(w+h) − J(w−h)) / 2h`` at those entries, h = 1e-6·max(1, |w|).
        reference: the autodiff gradient at those entries.
        max_abs_err: ``max|values − reference|``.
        ok: normwise check with rtol 1e-5, atol 1e-7 (truncation error O(h²) and rounding O(ε/h)).
        note: caveats (e.g. ReLU kinks within h of an entry make FD unreliable).
    """

    entries: list[int]
    values: np.ndarray
    reference: np.ndarray
    max_abs_err: float
    ok: bool
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return clean_json(
            {
                "entries": self.entries,
                "values": self.values,
                "reference": self.reference,
                "max_abs_err": self.max_abs_err,
                "ok": self.ok,
                "note": self.note,
            }
        )


@dataclass
class Term:
    """One derived quantity, its closed form next to the framework's autodiff value.

    Attributes:
        name: ``Z{l}``, ``S{l}``, ``A{l}``, ``dJ/dA{l}``, ``dJ/dZ{l}``, ``dJ/dW{l}``, ``dJ/db{l}``, ``J`` or
            ``dJ/dY_hat`` (a chain); ``A[node]``, ``dJ/dA[node]``, ``dJ/dW[owner]``, ``dJ/db[owner]`` (a graph).
        layer: l (a chain) or the node's position in the topological order (a graph); 0 for J and dJ/dY_hat.
        formula: plain-text formula.
        latex: LaTeX formula.
        shape: the value's shape.
        value: closed form (float64, framework layout), None when not applicable.
        autodiff: the framework's value (float64 copy), None when the framework has none.
        max_abs_err: ``max|value − autodiff|`` (NaN when not applicable).
        max_rel_err: ``max_abs_err / max|autodiff|`` (normwise; 0 when both are 0, inf when only autodiff is 0).
        ok: the verdict (see the module docstring).
        fd: the finite-difference result (parameter terms, when asked for).
        note: why a term is not applicable, which upstream values came from the framework, caveats.
        layout: the array layout in words.
        node: for a graph trace, the node (or parameter owner) the term belongs to, e.g. ``"blocks.0.ln1"``.
        local: for a graph trace, the node's local derivative in its compact form and how backward applies it.
    """

    name: str
    layer: int
    formula: str
    latex: str
    shape: tuple[int, ...]
    value: np.ndarray | None
    autodiff: np.ndarray | None
    max_abs_err: float = float("nan")
    max_rel_err: float = float("nan")
    ok: bool = True
    fd: FiniteDifference | None = None
    note: str = ""
    layout: str = ""
    node: str = ""
    local: str = ""

    @property
    def mark(self) -> str:
        """✓, ✗, or · (not applicable)."""
        if self.value is None or self.autodiff is None:
            return "·"
        return "✓" if self.ok else "✗"

    def _err_text(self) -> str:
        if self.value is None or self.autodiff is None:
            return "n/a"
        return f"max|err| {self.max_abs_err:.2e} (rel {self.max_rel_err:.2e})"

    def __repr__(self) -> str:
        return (
            f"Term({self.name!r}, layer={self.layer}, shape={self.shape}, ok={self.ok}, "
            f"max_abs_err={self.max_abs_err:.3g})"
        )

    def __str__(self) -> str:
        lines = [f"{self.mark} {self.name:<10} {self.formula}", f"    shape {self.shape}   {self._err_text()}"]
        shown = self.value if self.value is not None else self.autodiff
        lines += ["    " + ln for ln in preview(shown).splitlines()]
        if self.fd is not None:
            lines.append(
                f"    finite differences on {len(self.fd.entries)} entries: max|err| {self.fd.max_abs_err:.2e} "
                f"{'✓' if self.fd.ok else '✗'}" + (f" ({self.fd.note})" if self.fd.note else "")
            )
        if self.local:
            lines.append(f"    local: {self.local}")
        if self.note:
            lines.append(f"    note: {self.note}")
        return "\n".join(lines)

    def to_dict(self, values: bool = False) -> dict:
        """JSON-ready form; ``values=True`` adds ``value`` and ``autodiff`` as nested lists."""
        d: dict[str, Any] = {
            "name": self.name,
            "layer": self.layer,
            "formula": self.formula,
            "latex": self.latex,
            "shape": list(self.shape),
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "ok": self.ok,
            "applicable": self.value is not None and self.autodiff is not None,
            "note": self.note,
            "layout": self.layout,
            "fd": None if self.fd is None else self.fd.to_dict(),
        }
        if self.node:
            d["node"] = self.node
            d["local"] = self.local
        if values:
            d["value"] = self.value
            d["autodiff"] = self.autodiff
        return clean_json(d)


@dataclass
class LayerInfo:
    """Per-layer facts: index, kind, names, activation, whether a rule exists, and remarks.

    ``remarks`` says e.g. that the layer is frozen or that its module is also used at other layers.
    """

    index: int
    kind: str
    name: str
    type_name: str
    activation: str
    has_rule: bool
    reason: str = ""
    weight_layout: str = ""
    remarks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return clean_json(dict(self.__dict__))


@dataclass
class GraphNodeInfo:
    """One node of an explained graph: its name, op, inputs and whether a rule derived it.

    Attributes:
        index: its position in the topological order (1-based).
        name: the node's name (module path, parameter name or op name).
        op: the rule kind, ``"input"``, ``"param"`` or ``"opaque"``.
        inputs: the names of the nodes it reads (constants shown by value).
        type_name: what the framework calls it, e.g. ``"nn.LayerNorm"``.
        has_rule: a closed-form rule derived it (False: autodiff only).
        reason: why it has no rule.
        shape: its output's shape.
        consumers: the nodes reading its output (two or more: its gradient is a sum).
        term: the name of its gradient term (``dJ/dW[fc]`` for a parameter, ``dJ/dA[name]`` otherwise).
    """

    index: int
    name: str
    op: str
    inputs: list[str]
    type_name: str
    has_rule: bool
    reason: str = ""
    shape: tuple[int, ...] = ()
    consumers: list[str] = field(default_factory=list)
    term: str = ""

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return clean_json(dict(self.__dict__))


@dataclass
class Trace:
    """The layer-by-layer derivation of backprop for one batch, each term checked against autodiff.

    Look terms up by name: ``trace["dJ/dW2"]`` (a chain) or ``trace["dJ/dW[blocks.0.attn.q_proj]"]`` (a graph).
    ``trace.ok`` is True when every term agreed. A graph trace also has ``graph`` (its nodes with their
    inputs) and ``layer(name)`` (one node's terms).
    """

    framework: str
    model_name: str
    loss: str
    loss_formula: str
    dtype: str
    n: int
    layers: list[LayerInfo]
    terms: list[Term] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model_dtype: str = ""
    graph: list[GraphNodeInfo] = field(default_factory=list)
    tracer: str = ""

    @property
    def ok(self) -> bool:
        """All terms ok (and finite-difference checks, where run)."""
        return all(t.ok and (t.fd is None or t.fd.ok) for t in self.terms)

    @property
    def failures(self) -> list[Term]:
        """The terms that failed verification."""
        return [t for t in self.terms if not (t.ok and (t.fd is None or t.fd.ok))]

    @property
    def names(self) -> list[str]:
        """All term names, in order."""
        return [t.name for t in self.terms]

    def __getitem__(self, name: str) -> Term:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(f"no term named {name!r} in this trace; available: {', '.join(self.names)}")

    def layer(self, name: str) -> list[Term]:
        """The terms of one node (graph) or layer (chain): ``trace.layer("blocks.0.ln1")``, ``trace.layer("2")``.

        For a graph, a module path also selects what lies under it: ``trace.layer("blocks.0.attn")`` gives the
        attention node's terms and those of its projections' parameters.

        Raises:
            KeyError: no node or layer of that name.
        """
        if self.graph:
            out = [t for t in self.terms if t.node == name or t.node.startswith(name + ".")]
            if not out:
                names = ", ".join(n.name for n in self.graph)
                raise KeyError(f"no node named {name!r} in this graph; nodes: {names}")
            return out
        try:
            index = int(name)
        except ValueError:
            index = next((li.index for li in self.layers if li.name == name), -1)
        out = [t for t in self.terms if t.layer == index and index > 0]
        if not out:
            raise KeyError(f"no layer {name!r} in this trace; layers are 1..{len(self.layers)}")
        return out

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self):
        return iter(self.terms)

    def __len__(self) -> int:
        return len(self.terms)

    def __repr__(self) -> str:
        return (
            f"Trace(framework={self.framework!r}, model={self.model_name!r}, L={len(self.layers)}, "
            f"terms={len(self.terms)}, ok={self.ok})"
        )

    # ------------------------------------------------------------------------------------------ rendering
    def _sections(self) -> list[tuple[str, list[Term]]]:
        fwd = [t for t in self.terms if t.name[0] in "ZSA"]
        loss = [t for t in self.terms if t.layer == 0]
        bwd = [t for t in self.terms if t.name.startswith("dJ/d") and t.layer > 0]
        return [("Forward pass", fwd), ("Loss", loss), ("Backward pass", bwd)]

    def __str__(self) -> str:
        if self.graph:
            from ._render_graph import graph_text

            return graph_text(self)
        n_ok = sum(1 for t in self.terms if t.mark == "✓")
        n_bad = len(self.failures)
        n_na = sum(1 for t in self.terms if t.mark == "·")
        dt = self.dtype + (f", model in {self.model_dtype}" if self.model_dtype else "")
        head = [
            f"gradsight explain — {self.model_name} ({self.framework}, {dt}), batch n = {self.n}",
            f"loss: {self.loss}",
            "layers (l = 1..L, A_0 = X, Ŷ = A_L):",
        ]
        for li in self.layers:
            rule = "" if li.has_rule else f"   [autodiff only: {li.reason}]"
            rem = "".join(f"   [{r}]" for r in li.remarks)
            head.append(f"  {li.index}. {li.name}  [{li.kind}, activation {li.activation}]{rule}{rem}")
        out = head
        for title, terms in self._sections():
            out += ["", f"── {title} " + "─" * (60 - len(title))]
            for t in terms:
                out.append(str(t))
        out += ["", f"{'✓' if self.ok else '✗'} {n_ok} terms verified, {n_bad} failed, {n_na} not applicable"]
        out += [f"note: {x}" for x in self.notes]
        return "\n".join(out)

    def to_markdown(self) -> str:
        """Markdown: a header, the layer list (or the graph), one table per section."""
        if self.graph:
            from ._render_graph import graph_markdown

            return graph_markdown(self)
        out = [
            f"### gradsight explain — `{self.model_name}` ({self.framework}, {self.dtype}), n = {self.n}",
            "",
            f"**Loss:** {self.loss} — {self.loss_formula}",
            "",
        ]
        for li in self.layers:
            extra = "" if li.has_rule else f" — *autodiff only: {li.reason}*"
            extra += "".join(f" — *{r}*" for r in li.remarks)
            out.append(f"{li.index}. `{li.name}` ({li.kind}, activation {li.activation}){extra}")
        for title, terms in self._sections():
            out += [
                "",
                f"#### {title}",
                "",
                "| | term | formula | shape | max abs err | note |",
                "|---|---|---|---|---|---|",
            ]
            for t in terms:
                err = "n/a" if t.mark == "·" else f"{t.max_abs_err:.2e}"
                note = t.note.replace("|", "\\|")
                latex = t.latex.replace("|", r"\vert ")
                out.append(f"| {t.mark} | `{t.name}` | ${latex}$ | {t.shape} | {err} | {note} |")
        out += ["", f"**{'✓ all terms agree with autodiff' if self.ok else '✗ some terms disagree'}**"]
        return "\n".join(out)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def _repr_html_(self) -> str:
        if self.graph:
            from ._render_graph import graph_html

            return graph_html(self)
        return f"<pre>{html.escape(str(self))}</pre>"

    def to_html(self) -> str:
        """A self-contained HTML fragment (a graph trace: headed sections and tables; a chain: preformatted)."""
        return self._repr_html_()

    def to_dict(self, values: bool = False) -> dict:
        """JSON-ready form (``json.dumps`` works); ``values=True`` includes every array."""
        return clean_json(
            {
                "framework": self.framework,
                "model": self.model_name,
                "loss": self.loss,
                "loss_formula": self.loss_formula,
                "dtype": self.dtype,
                "n": self.n,
                "ok": self.ok,
                "layers": [li.to_dict() for li in self.layers],
                "terms": [t.to_dict(values=values) for t in self.terms],
                "notes": self.notes,
                "model_dtype": self.model_dtype,
                **({"graph": [g.to_dict() for g in self.graph], "tracer": self.tracer} if self.graph else {}),
            }
        )
