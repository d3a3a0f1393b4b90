"""The figures: render for torch and Keras runs, non-empty, no warnings, readable labels, right numbers."""

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pytest
from _synthetic import XSS, write_synthetic_run
from matplotlib.collections import QuadMesh

from gradsight import InputError
from gradsight.diagnose._finding import Finding
from gradsight.show import plot_depth_profile, plot_histograms, plot_overview
from gradsight.store import RunWriter, load
from gradsight.summary import summarize


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _pixels(fig):
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3]


def _assert_drawn(fig):
    img = _pixels(fig)
    assert img.size > 0
    non_white = (img < 250).any(axis=-1).mean()
    assert non_white > 0.05, f"only {non_white:.1%} of the pixels are not white"
    assert sum(len(ax.lines) + len(ax.collections) for ax in fig.axes) > 0


FIGURES = {
    "overview": lambda p: plot_overview(p, findings=[Finding("vanishing-gradients", "warning", ("0",), 2, 8)]),
    "depth": lambda p: plot_depth_profile(p),
    "histograms": lambda p: plot_histograms(p, load(p).tensors[1].name),
}


@pytest.mark.parametrize("framework", ["torch", "keras"])
@pytest.mark.parametrize("figure", sorted(FIGURES))
def test_every_figure_renders_for_a_torch_and_a_keras_run(make_run, framework, figure):
    path = make_run(framework=framework, n_layers=4, nonfinite_at=(5, 1), dead_layer=2)
    fig = FIGURES[figure](path)
    _assert_drawn(fig)


def test_figures_accept_a_run_object_and_leave_it_open(make_run):
    run = load(make_run())
    plot_overview(run, findings=[])
    assert run.steps  # still usable


def _overlaps(texts, renderer):
    boxes = [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]
    return [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]


def test_ten_layer_labels_do_not_overlap(make_run):
    names = [f"encoder.block{i}.very_long_sublayer_name.linear" for i in range(9)] + [XSS]
    path = make_run(layers=names, steps=10)
    fig = plot_overview(path, findings=[])
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    heat = fig.axes[1]
    labels = heat.get_yticklabels()
    assert len([t for t in labels if t.get_text()]) == 10
    assert len({t.get_text() for t in labels}) == 10, "shortened names must stay distinct"
    assert not _overlaps(labels, r)
    legend = fig.legends[0]
    assert not _overlaps(legend.get_texts(), r)
    leg_box = legend.get_window_extent(r)
    for ax in fig.axes[:6]:
        assert not leg_box.overlaps(ax.get_window_extent(r)), "the layer legend covers a panel"
    # panel titles do not run into the panel above
    titles = [ax.title if ax.title.get_text() else ax._left_title for ax in fig.axes[:6]]
    assert not _overlaps(titles, r)

    fig = plot_depth_profile(path)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    assert not _overlaps(fig.axes[0].get_xticklabels(), r)


def test_many_layers_are_thinned_not_overlapping(make_run):
    path = make_run(n_layers=80, steps=3, width=4)
    fig = plot_overview(path, findings=[])
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    shown = [t for t in fig.axes[1].get_yticklabels() if t.get_text()]
    assert 5 < len(shown) < 80
    assert not _overlaps(shown, r)


def test_user_strings_are_not_parsed_as_mathtext(make_run):
    names = ["a$b$c_{x}", "_hidden", "$\\frac{1}{0"]
    fig = plot_overview(make_run(layers=names, steps=4), findings=[])
    fig.canvas.draw()  # a mathtext parse error would raise here
    assert [t.get_text() for t in fig.legends[0].get_texts()] == names


def test_heatmap_values_match_a_naive_recomputation(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        (s, layer, t): rng.normal(0, 10.0**-layer, size)
        for s in range(3)
        for layer in range(3)
        for t, size in (("w", 6), ("b", 2))
    }
    path = tmp_path / "known.db"
    with RunWriter(path, meta={"framework": "torch"}) as w:
        ids = {
            (layer, t): w.tensor_id(f"{layer}.{t}", str(layer), "grad", (size,), "float32")
            for layer in range(3)
            for t, size in (("w", 6), ("b", 2))
        }
        for s in range(3):
            w.log_summaries(s, [(ids[(layer, t)], summarize(arrays[(s, layer, t)])) for layer, t in ids])
    fig = plot_overview(path, findings=[])
    mesh = next(c for c in fig.axes[1].collections if isinstance(c, QuadMesh))
    got = np.asarray(mesh.get_array()).reshape(3, 3)  # layers × steps
    want = np.array(
        [
            [
                np.sqrt(np.mean(np.concatenate([arrays[(s, layer, "w")], arrays[(s, layer, "b")]]) ** 2))
                for s in range(3)
            ]
            for layer in range(3)
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # the panels with nothing recorded say so instead of staying blank
    notes = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "no weight summaries recorded" in notes
    assert "no 'loss' scalar recorded" in notes


def test_histogram_fractions_match_numpy(tmp_path):
    x = np.array([0.0, 0.3, 0.3, 1.5, 3.0, -5.0, 1e-3, np.nan])
    path = tmp_path / "h.db"
    with RunWriter(path, meta={"framework": "keras"}) as w:
        tid = w.tensor_id("dense/kernel", "dense", "weight", (8,), "float32")
        w.log_summaries(0, [(tid, summarize(x))])
        w.log_summaries(1, [(tid, summarize(2 * x))])
    fig = plot_histograms(path, "dense", kind="weight")  # a layer name works too
    mesh = next(c for c in fig.axes[0].collections if isinstance(c, QuadMesh))
    coords = mesh.get_coordinates()  # (bins + 1) × (steps + 1) × (x, y)
    bins = np.log2(coords[:-1, 0, 1]).astype(int) + 127
    got = np.ma.filled(mesh.get_array(), 0.0).reshape(len(bins), 2)
    for step, v in enumerate((x, 2 * x)):
        nz = np.abs(v[np.isfinite(v) & (v != 0)])
        want = np.zeros(len(bins))
        for f in np.floor(np.log2(nz)).astype(int) + 127:
            want[list(bins).index(f)] += 1 / v.size
        np.testing.assert_allclose(got[:, step], want, rtol=1e-12)
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert any("zeros 12.5%" in t and "NaN/Inf 12.5%" in t for t in labels), labels


def test_empty_run_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.db"
    RunWriter(path, meta={"framework": "torch"}).close()
    with pytest.raises(InputError, match="no tensor summaries and no scalars"):
        plot_overview(path, findings=[])
    with pytest.raises(InputError, match="has no 'grad' summaries"):
        plot_depth_profile(path)
    with pytest.raises(InputError, match="no 'grad' tensor or layer named 'nope'"):
        plot_histograms(path, "nope")


def test_bad_arguments_are_explained(make_run):
    path = make_run(steps=3)
    with pytest.raises(InputError, match=r"steps \[99\] were not recorded.*from 0 to 2"):
        plot_depth_profile(path, steps=[99])
    with pytest.raises(InputError, match="unknown kind 'gradient'"):
        plot_depth_profile(path, kind="gradient")
    with pytest.raises(InputError, match="expected a gradsight Run or the path"):
        plot_overview(42)


def test_missing_activity_and_updates_are_annotated(make_run):
    fig = plot_overview(make_run(units=False, updates=False), findings=[])
    notes = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "no update summaries recorded" in notes
    assert "no layer-output unit counts recorded" in notes
    _assert_drawn(fig)


def test_findings_are_marked_on_the_time_axis(make_run):
    f = Finding("exploding-gradients", "error", ("1",), 3, 7)
    fig = plot_overview(make_run(steps=10), findings=[f])
    leg = fig.axes[0].get_legend()
    assert "error: exploding-gradients (steps 3–7)" in [t.get_text() for t in leg.get_texts()]
    vlines = [ln for ln in fig.axes[3].lines if list(ln.get_xdata()) == [3, 3]]
    assert vlines


def test_real_write_synthetic_run_helper_has_keras_names(tmp_path):
    run = load(write_synthetic_run(tmp_path / "k.db", framework="keras", n_layers=2))
    assert run.framework == "keras" and run.layers == ["dense_0", "dense_1"]


def test_overview_draws_per_step_signals_and_anomaly_captures(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn

    import gradsight
    from gradsight.show._data import step_update_ratio, update_ratio

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 4)
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db") as w:
        for s in range(40):
            if s == 30:
                opt.param_groups[0]["lr"] = 10.0
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            w.log(loss)
    run = gradsight.load(tmp_path / "r.db")
    ratio = update_ratio(run)
    assert list(ratio.index) == list(range(40))  # every step, not only the logged step 0
    sc = run.scalars
    want = np.sqrt(sc["update_norm/0.weight"] ** 2 + sc["update_norm/0.bias"] ** 2) / np.sqrt(
        sc["weight_norm/0.weight"] ** 2 + sc["weight_norm/0.bias"] ** 2
    )
    np.testing.assert_allclose(ratio["0"].to_numpy(), want.to_numpy(), rtol=1e-12)
    assert step_update_ratio(run) is not None
    fig = plot_overview(run, findings=[])
    labels = [ln.get_label() for ax in fig.axes for ln in ax.lines]  # the loss panel's right axis
    assert "gradient norm" in labels and "before clipping" in labels
    assert any("anomaly capture" in t.get_text() for t in fig.axes[0].texts)


@pytest.mark.parametrize("steps", [100, "100", [True], [1.5]], ids=["int", "str", "bool", "float"])
def test_depth_profile_steps_must_be_a_list_of_step_numbers(make_run, steps):
    """Regression: an int raised Python's own TypeError, and a string was read digit by digit ('100' drew steps
    1, 0, 0)."""
    with pytest.raises(InputError, match=r"expects a list of step numbers, got"):
        plot_depth_profile(make_run(steps=3), steps=steps)
