"""Every figure and the report for runs recorded by the real watches (PyTorch loop, Keras fit)."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from gradsight.show import plot_depth_profile, plot_histograms, plot_overview, render_show, report
from gradsight.store import load


def _draw_everything(path, tmp_path):
    run = load(path)
    assert run.steps, "the watch recorded no steps"
    grad = next(t for t in run.tensors if t.kind == "grad")
    figs = [
        plot_overview(run),
        plot_depth_profile(run),
        plot_histograms(run, grad.name),
        plot_histograms(run, grad.layer, kind="weight"),
    ]
    for fig in figs:
        fig.canvas.draw()
        img = np.asarray(fig.canvas.buffer_rgba())[..., :3]
        assert (img < 250).any(axis=-1).mean() > 0.05
    plt.close("all")
    out = report(run, tmp_path / "report.html")
    assert out.stat().st_size > 20_000
    assert run.layers[0] in render_show(run)
    run.close()


@pytest.mark.torch
def test_torch_loop_run(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("gradsight.frameworks.torch._watch", reason="the PyTorch watch has not landed")
    from gradsight._watch import watch

    torch.manual_seed(0)
    layers = []
    for i in range(5):
        layers += [torch.nn.Linear(8, 8), torch.nn.Sigmoid() if i < 4 else torch.nn.Identity()]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 8), torch.randn(64, 8)
    path = tmp_path / "torch.db"
    with watch(model, path=path, optimizer=opt, every=1) as w:
        for _ in range(10):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            w.log(loss)
            opt.step()
    assert load(path).framework == "torch"
    _draw_everything(path, tmp_path)


@pytest.mark.keras
def test_keras_fit_run(tmp_path):
    keras = pytest.importorskip("keras")
    pytest.importorskip("gradsight.frameworks.keras._watch", reason="the Keras watch has not landed")
    from gradsight._watch import watch

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8,))]
        + [keras.layers.Dense(8, activation="relu", name=f"dense_{i}") for i in range(4)]
        + [keras.layers.Dense(1, name="head")]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x = np.random.default_rng(0).normal(size=(80, 8)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    path = tmp_path / "keras.db"
    with watch(model, path=path, every=1):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert load(path).framework == "keras"
    _draw_everything(path, tmp_path)
