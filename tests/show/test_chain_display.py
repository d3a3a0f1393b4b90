"""The chain of a diagnosis on display: the report lists root causes first, symptoms say what they are because of,
and the overview marks each root's first step."""

import matplotlib.pyplot as plt
import pytest

from gradsight.diagnose._chain import link
from gradsight.diagnose._finding import Finding
from gradsight.show import plot_overview, render_html, render_show


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _chain():
    return link(
        [
            Finding("dead-units", "error", ("1",), 4, 10, message="Dead units in '1'.", advice=("Lower the lr.",)),
            Finding(
                "learning-rate-too-high", "warning", ("0",), 2, 3, message="The step of 2 was too large.",
                advice=("Lower the learning rate by about 100x.",),
            ),
        ]
    )  # fmt: skip


def test_the_report_shows_roots_first_then_symptoms_because_of_them(make_run):
    text = render_html(make_run(steps=12), findings=_chain())
    roots, symptoms = text.index('id="roots"'), text.index('id="symptoms"')
    root = text.index("The step of 2 was too large.")
    symptom = text.index("Dead units in &#x27;1&#x27;.")
    assert roots < root < symptoms < symptom
    assert 'data-role="root"' in text and 'data-role="symptom"' in text
    assert '<p class="because">Because of <code>learning-rate-too-high</code>.</p>' in text
    assert "Because of learning-rate-too-high (the root cause): see its advice" in text
    assert "Lower the learning rate by about 100x." in text


def test_the_report_without_symptoms_has_no_chain_headings(make_run):
    plain = [Finding("vanishing-gradients", "warning", ("0",), 2, 8, message="Vanishing.")]
    text = render_html(make_run(steps=4), findings=plain)
    assert 'id="roots"' not in text and "Vanishing." in text


def test_the_overview_marks_the_roots_first_step(make_run):
    fig = plot_overview(make_run(steps=12), findings=_chain())
    loss_ax = fig.axes[0]
    markers = [ln for ln in loss_ax.lines if ln.get_marker() == "v"]
    assert len(markers) == 1 and list(markers[0].get_xdata()) == [2]
    labels = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert labels[0].startswith("error: learning-rate-too-high (steps 2–3; root)")
    assert labels[1] == "error: dead-units (steps 4–10; because of learning-rate-too-high)"


def test_show_prints_what_a_symptom_is_because_of(make_run):
    text = render_show(make_run(steps=4), findings=_chain())
    assert text.index("learning-rate-too-high") < text.index("dead-units")
    assert "    because of: learning-rate-too-high" in text
