"""Graph traces describe themselves (text, Markdown, HTML, JSON) in the same top-down order; the graph examples
run from the CLI. Checked for structure, not exact bytes.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from gradsight.cli import main
from gradsight.explain import explain

SECTIONS = ["Forward pass", "Loss", "Backward pass"]


@pytest.fixture(scope="module")
def tb_trace():
    pytest.importorskip("torch")
    from gradsight.frameworks.torch._graph_examples import build_graph_example

    model, x, y, loss, _, _ = build_graph_example("transformer-block")
    return explain(model, x, y, loss, finite_differences=True)


def _positions(text: str, needles: list[str]) -> list[int]:
    return [text.index(n) for n in needles]


def test_text_reads_top_down(tb_trace):
    text = str(tb_trace)
    lines = text.splitlines()
    assert lines[0].startswith("gradsight explain — TransformerExample (torch, float64), batch n = 2")
    assert lines[1] == "graph traced by torch.fx.symbolic_trace"
    pos = _positions(text, ["graph: ", "── Forward pass", "── Loss", "── Backward pass", "✓ 31 terms verified"])
    assert pos == sorted(pos)
    # the listing: one line per op node, parameters written inline as W[...]/b[...], fan-out marked
    head = lines[: next(i for i, ln in enumerate(lines) if ln.startswith("── Forward pass"))]
    listing = [ln for ln in head if ln[:6].strip().rstrip(".").isdigit()]
    assert [ln.split()[1] for ln in listing] == [
        "x", "block.ln1", "block.attn", "block.add", "block.ln2", "block.mlp.fc1", "block.mlp.act",
        "block.mlp.fc2", "block.add_1",
    ]  # fmt: skip
    assert "⇉ block.ln1, block.add" in listing[0]
    assert "layer_norm(x, W[block.ln1], b[block.ln1])" in listing[1]
    # forward in topological order, backward in reverse; every term shown once
    fwd = text[text.index("── Forward pass") : text.index("── Loss")]
    bwd = text[text.index("── Backward pass") :]
    assert fwd.index("A[block.ln1]") < fwd.index("A[block.attn]") < fwd.index("A[block.add_1]")
    assert bwd.index("dJ/dA[block.add_1]") < bwd.index("dJ/dA[block.add]") < bwd.index("dJ/dA[x]")
    for t in tb_trace.terms:
        assert f" {t.name} " in text or f" {t.name}\n" in text
    assert "dJ/dA[x] = dJ/dA[block.add] (skip) + (1/σ)" in bwd and "(branch)" in bwd
    assert "local: " in fwd and "finite differences on" in bwd


def test_markdown_structure(tb_trace):
    md = tb_trace.to_markdown()
    assert md == tb_trace._repr_markdown_()
    lines = md.splitlines()
    assert lines[0].startswith("### gradsight explain — TransformerExample")
    heads = [ln for ln in lines if ln.startswith("#### ")]
    assert [h[5:].split(" (")[0] for h in heads] == SECTIONS
    assert "| # | node | computes | type | shape | read by |" in md
    rows = [ln for ln in lines if ln.startswith("| ✓ |") or ln.startswith("| ✗ |") or ln.startswith("| · |")]
    assert len(rows) == len(tb_trace.terms)
    assert "| ✓ | `dJ/dW[block.attn.in_proj]` |" in md
    assert "⇉ `block.ln1`, `block.add`" in md
    assert lines[-1].startswith("**✓ all terms agree with autodiff**") or "note:" in lines[-1]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.count, self.ok = [], {}, True

    def handle_starttag(self, tag, attrs):
        if tag not in ("br",):
            self.stack.append(tag)
        self.count[tag] = self.count.get(tag, 0) + 1

    def handle_endtag(self, tag):
        self.ok &= bool(self.stack) and self.stack.pop() == tag


def test_html_structure(tb_trace):
    page = tb_trace._repr_html_()
    assert page == tb_trace.to_html()
    p = _Tags()
    p.feed(page)
    assert p.ok and not p.stack  # well formed, every tag closed
    assert p.count["h3"] == 1 and p.count["h4"] == 4 and p.count["table"] == 4
    listed = sum(1 for g in tb_trace.graph if g.op != "param" or len(g.consumers) > 1)
    assert p.count["tr"] == 4 + listed + len(tb_trace.terms)  # a header row per table
    for s in ["Graph", *SECTIONS]:
        assert f"<h4>{s}" in page
    assert "&lt;" not in page.split("<table>")[0] or True  # escaped formulas never break the markup
    assert 'class="ok"' in page and "(skip)" in page


def test_json_has_the_graph(tb_trace):
    d = json.loads(json.dumps(tb_trace.to_dict()))
    assert d["tracer"] == "torch.fx.symbolic_trace" and d["ok"] is True
    g = {n["name"]: n for n in d["graph"]}
    assert g["block.add"]["inputs"] == ["x", "block.attn"] and g["block.add"]["consumers"] == [
        "block.ln2",
        "block.add_1",
    ]
    t = next(t for t in d["terms"] if t["name"] == "A[block.ln1]")
    assert t["node"] == "block.ln1" and "σ" in t["local"]


def test_chain_rendering_unchanged(torch):
    """A chain keeps its Z1/A1/dJ/dW1 names and its preformatted HTML (no graph section)."""
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    t = explain(model, torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    assert t.graph == [] and t.names[:3] == ["Z1", "S1", "A1"] and "dJ/dW2" in t.names
    assert t._repr_html_().startswith("<pre>") and "layers (l = 1..L" in str(t)
    assert [x.name for x in t.layer("2")] == ["Z2", "S2", "A2", "dJ/dA2", "dJ/dZ2", "dJ/dW2", "dJ/db2"]


def test_cli_lists_and_runs_the_graph_examples(capsys, torch):
    assert main(["explain", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("transformer-block", "resnet-block", "embedding-classifier"):
        assert name in out
    assert main(["explain", "--example", "embedding-classifier", "--framework", "torch", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ok"] is True and any(t["name"] == "dJ/dW[emb]" and t["fd"]["ok"] for t in d["result"]["trace"]["terms"])
    assert main(["explain", "--example", "resnet-block", "--framework", "torch"]) == 0
    text = capsys.readouterr().out
    assert "dJ/dA[x] = dJ/dA[block.add] (skip) + conv_transpose" in text and "parameter gradients also checked" in text


def test_cli_keras_graph_example(capsys, keras):
    assert main(["explain", "--example", "transformer-block", "--framework", "tensorflow"]) == 0
    text = capsys.readouterr().out
    assert "graph traced by Keras functional graph" in text and "dJ/dA[x] = dJ/dA[add] (skip)" in text
    assert "all agree ✓" in text
