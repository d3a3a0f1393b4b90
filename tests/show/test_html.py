"""The HTML report: self-contained, escaped, and checked in a real headless Chromium."""

import re

import pytest
from _browser import open_page, skip_reason
from _synthetic import XSS

from gradsight import InputError, StoreError
from gradsight.diagnose._finding import Finding
from gradsight.show import render_html, report
from gradsight.show._html import CSP

ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"


def _xss_finding():
    return Finding(
        "dead-units",
        "warning",
        (XSS,),
        1,
        4,
        evidence={"layer": XSS, "ratio": float("nan")},
        message=f"Dead units in {XSS}",
        explanation=f"Because {XSS}.",
        advice=(f"Try {XSS}",),
    )


def test_every_user_string_is_escaped(make_run):
    path = make_run(layers=["dense", XSS], steps=4)
    text = render_html(path, findings=[_xss_finding()])
    assert "<img src=x" not in text
    assert "onerror=alert(1)>" not in text
    # layer table, finding (layers, message, explanation, advice, evidence) and the config value in the metadata
    assert text.count(ESCAPED) >= 7
    assert "<script" not in text.lower()


def test_the_report_is_self_contained(make_run):
    text = render_html(make_run(steps=4), findings=[])
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in text
    assert "default-src 'none'" in CSP
    srcs = re.findall(r'\bsrc="([^"]*)"', text)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"\b(href|action)=", text)
    assert "http://" not in text and "https://" not in text
    assert "No findings" in text


def test_findings_come_before_the_figures_and_tables(make_run):
    text = render_html(make_run(steps=4), findings=[_xss_finding()])
    assert text.index('id="findings"') < text.index('id="figures"') < text.index('id="layers"')
    assert 'class="finding warning"' in text and "<details><summary>evidence</summary>" in text


def test_report_path_defaults_next_to_the_run(make_run):
    run_path = make_run(steps=3)
    out = report(run_path, findings=[])
    assert out == run_path.with_suffix(".html").resolve() and out.stat().st_size > 10_000


def test_report_refuses_to_overwrite_the_run_file_and_a_missing_folder(make_run, tmp_path):
    run_path = make_run(steps=3)
    with pytest.raises(InputError, match="is the run file itself"):
        report(run_path, run_path, findings=[])
    with pytest.raises(StoreError, match="does not exist"):
        report(run_path, tmp_path / "nope" / "r.html", findings=[])


def test_report_replaces_only_an_earlier_report_and_checks_its_path_argument(make_run, tmp_path):
    """Regression: report(path=...) replaced any existing file silently (notes, a foreign database), and a path
    of the wrong type raised Python's own TypeError."""
    run_path = make_run(steps=3)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(InputError, match=r"already exists and is not a gradsight report.*never overwrites"):
        report(run_path, notes, findings=[])
    assert notes.read_text() == "my notes"
    out = report(run_path, tmp_path / "r.html", findings=[])
    first = out.read_bytes()
    assert b'<meta name="generator" content="gradsight' in first
    assert report(run_path, out, findings=[]) == out  # an earlier report is replaced
    with pytest.raises(InputError, match=r"expects a file path \(str or os.PathLike\) or None, got int 5"):
        report(run_path, 5, findings=[])


def test_report_never_replaces_a_pipe_or_a_folder_and_checks_the_findings(make_run, tmp_path):
    """Regression: a FIFO (or a device node) at the report path was replaced by the report's regular file, a
    folder gave IsADirectoryError, and findings="abc" an AttributeError from deep inside."""
    import os

    run_path = make_run(steps=3)
    fifo = tmp_path / "pipe.html"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        report(run_path, fifo, findings=[])
    assert fifo.is_fifo()
    with pytest.raises(InputError, match="is a folder"):
        report(run_path, tmp_path, findings=[])
    with pytest.raises(InputError, match=r"findings must be a list of gradsight\.Finding"):
        report(run_path, tmp_path / "r.html", findings="abc")
    with pytest.raises(InputError, match=r"findings must be gradsight\.Finding objects"):
        report(run_path, tmp_path / "r.html", findings=[1])


def test_report_of_a_run_whose_outputs_are_nan_from_the_second_step(tmp_path):
    """Regression: the histogram and depth-profile figures failed in matplotlib ("Data cannot be log-scaled")."""
    import numpy as np

    from gradsight.store import RunWriter
    from gradsight.summary import summarize

    with RunWriter(tmp_path / "nan.db", meta={"framework": "torch"}) as w:
        tid = w.tensor_id("l", "l", "output", (4, 2), "float32")
        gid = w.tensor_id("l.weight", "l", "grad", (2, 2), "float32")
        for step in range(10):
            x = np.full((4, 2), np.nan if step else 0.5, dtype=np.float32)
            w.log_summaries(step, [(tid, summarize(x)), (gid, summarize(np.full((2, 2), np.nan, np.float32)))])
            w.log_scalars(step, {"loss": float("nan") if step else 1.0})
    out = report(tmp_path / "nan.db", tmp_path / "nan.html", findings=[])
    assert out.stat().st_size > 10_000


def test_report_shows_control_characters_in_names_as_escapes(make_run, tmp_path):
    run_path = make_run(steps=2)
    from gradsight.store import RunWriter

    with RunWriter(tmp_path / "odd.db", meta={"framework": "torch", "model": {"name": "x\ny\x1b[31mred"}}) as w:
        w.log_scalars(0, {"loss": 1.0})
    text = report(tmp_path / "odd.db", tmp_path / "odd.html", findings=[]).read_text()
    assert "\x1b" not in text and "x\\x0ay\\x1b[31mred" in text  # as the terminal summary shows it
    assert run_path.exists()


def test_report_runs_the_diagnosis_when_no_findings_are_given(make_run):
    pytest.importorskip("gradsight.diagnose._diagnose", reason="gradsight.diagnose.diagnose has not landed")
    text = render_html(make_run(steps=12, dead_layer=1), findings=None)
    assert "dead-units" in text


BROWSER_SKIP = skip_reason()


@pytest.mark.skipif(BROWSER_SKIP is not None, reason=BROWSER_SKIP or "")
def test_report_in_headless_chromium(make_run, tmp_path):
    run_path = make_run(layers=["dense", XSS, "out"], steps=8, nonfinite_at=(3, 1))
    page_path = report(run_path, tmp_path / "report.html", findings=[_xss_finding()])
    with open_page(page_path) as (page, log):
        assert page.title().startswith("gradsight report")
        # the sections, in reading order
        ids = page.locator("body > section").evaluate_all("els => els.map(e => e.id)")
        assert ids == ["findings", "figures", "layers", "metadata"]
        assert page.locator("#findings h2").inner_text() == "Findings (1)"
        # the finding: severity class, code, the hostile layer name shown as text, evidence folded away
        finding = page.locator("#findings div.finding.warning")
        assert finding.count() == 1
        assert finding.locator("code").first.inner_text() == "dead-units"
        assert XSS in finding.inner_text()
        assert finding.locator("details summary").inner_text() == "evidence"
        assert not finding.locator("details").evaluate("d => d.open")
        # three figures, each decoded, with a caption
        figures = page.locator("#figures figure")
        assert figures.count() == 3
        decoded = page.locator("#figures img").evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
        assert decoded == [True, True, True], "all three figures must decode"
        assert page.locator("#figures figcaption").count() == 3
        # the layer table: one row per layer, the hostile name as text in its first cell
        cells = page.locator("#layers tr td:first-child").all_inner_texts()
        assert [c.strip() for c in cells] == ["dense", XSS, "out"]
        # nothing injected, nothing run, nothing fetched
        assert page.locator('img[src="x"], img[onerror], script').count() == 0
        screenshot = page.screenshot(full_page=True)
    assert log.console == [], f"console messages: {log.console}"
    assert log.errors == [], f"page errors: {log.errors}"
    assert log.dialogs == [], f"the page opened dialogs: {log.dialogs}"
    external = [u[:80] for u in log.requests if u != page_path.as_uri() and not u.startswith("data:")]
    assert external == [], f"the page made network requests: {external}"
    assert screenshot.startswith(b"\x89PNG\r\n\x1a\n") and len(screenshot) > 20_000
    (tmp_path / "screenshot.png").write_bytes(screenshot)
