"""The HTML report: self-contained, escaped, and checked in a real headless Chromium."""

import re

import pytest
from _browser import find_chromium, load_page
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


def test_report_runs_the_diagnosis_when_no_findings_are_given(make_run):
    pytest.importorskip("gradsight.diagnose._diagnose", reason="gradsight.diagnose.diagnose has not landed")
    text = render_html(make_run(steps=12, dead_layer=1), findings=None)
    assert "dead-units" in text


CHROMIUM = find_chromium()


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary on PATH (apt-get install -y chromium; .ci/run installs it)",
)
def test_report_in_headless_chromium(make_run, tmp_path):
    run_path = make_run(layers=["dense", XSS, "out"], steps=8, nonfinite_at=(3, 1))
    page = report(run_path, tmp_path / "report.html", findings=[_xss_finding()])
    res = load_page(
        CHROMIUM,
        page,
        {
            "text": "document.body.innerText",
            "injected": "document.querySelectorAll('img[src=\"x\"], img[onerror]').length",
            "images": "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length",
            "title": "document.title",
        },
    )
    assert res.console == [], f"console messages: {res.console}"
    assert res.dialogs == [], f"the page opened dialogs: {res.dialogs}"
    external = [u[:80] for u in res.requests if u != page.as_uri() and not u.startswith("data:")]
    assert external == [], f"the page made network requests: {external}"
    assert res.screenshot.startswith(b"\x89PNG\r\n\x1a\n") and len(res.screenshot) > 20_000
    (tmp_path / "screenshot.png").write_bytes(res.screenshot)
    assert XSS in res.values["text"], "the hostile layer name must be shown as text"
    assert res.values["injected"] == 0
    assert res.values["images"] == 3, "all three figures must decode"
    assert res.values["title"].startswith("gradsight report")
