"""The seed notebook's figures, reproduced in both frameworks.

Expected numbers are derived from the closed form in each test, or quoted from the seed's printed output
(seed: /work/shared/seed/000_37d1a034184fda8c.txt), as stated next to each.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradsight import InputError
from gradsight.explain import check_loss, depth_sweep, explain, jacobian_vs_gradient
from gradsight.explain._examples import EXAMPLE_W as SEED_W
from gradsight.explain._explain import adapter


def test_single_layer_ones(framework):
    ad = adapter(framework)
    model = ad.build_dense_model([np.ones((3, 3))], None, None, "float64")
    x = np.ones((15, 3))
    t_sum = explain(model, x, np.zeros((15, 3)), "output_sum")
    t_mean = explain(model, x, np.zeros((15, 3)), "output_mean")
    # closed form: dΣŶ/dW = Xᵀ·1 = n = 15; d mean(Ŷ)/dW = n/(n·f) = 1/3 (seed printed 15 and 0.33333334)
    np.testing.assert_allclose(t_sum["dJ/dW1"].autodiff, np.full((3, 3), 15.0))
    np.testing.assert_allclose(t_sum["dJ/dW1"].value, np.full((3, 3), 15.0))
    np.testing.assert_allclose(t_mean["dJ/dW1"].autodiff, np.full((3, 3), 1 / 3))
    np.testing.assert_allclose(t_mean["dJ/dW1"].value, np.full((3, 3), 1 / 3))
    assert t_sum.ok and t_mean.ok


def test_three_layers_of_ones(framework):
    ad = adapter(framework)
    ones = np.ones((3, 3))
    x = np.ones((5, 3))
    tr = explain(ad.build_dense_model([ones] * 3, None, None, "float64"), x, np.zeros((5, 3)), "output_mean")
    # closed form: dJ/dŶ = 1/(n·f) = 1/15; each Wᵀ multiplies by f = 3 going back; A_{l-1} = 3^{l-1}, so
    # dJ/dW_l = n · 3^{l-1} · 3^{3-l}/15 = 3 (seed printed 3, 3.0000002, 3.0000002)
    for l in (1, 2, 3):
        np.testing.assert_allclose(tr[f"dJ/dW{l}"].autodiff, np.full((3, 3), 3.0))
        np.testing.assert_allclose(tr[f"dJ/dW{l}"].value, np.full((3, 3), 3.0))
    assert tr.ok
    # per-layer sum-gradients dZ_l/dW_l = A_{l-1}ᵀ·1 = n·3^{l-1}: 5, 15, 45 (seed printed these)
    for depth, expected in zip((1, 2, 3), (5.0, 15.0, 45.0), strict=False):
        t = explain(ad.build_dense_model([ones] * depth, None, None, "float64"), x, np.zeros((5, 3)), "output_sum")
        np.testing.assert_allclose(t[f"dJ/dW{depth}"].autodiff, np.full((3, 3), expected))
        np.testing.assert_allclose(t[f"dJ/dW{depth}"].value, np.full((3, 3), expected))


def test_depth_sweep_closed_form_and_autodiff(framework):
    ones = depth_sweep(3, 5, init="ones", framework=framework)
    # (2/f)·f^{L-1} for f = 3: 0.667, 2, 6, 18, 54 — every layer of a depth-L stack has the same value
    for d, vals in ones.by_depth().items():
        np.testing.assert_allclose(vals, [2 / 3 * 3 ** (d - 1)] * d)
    assert [round(ones.by_depth()[d][0], 3) for d in range(1, 6)] == [0.667, 2, 6, 18, 54]
    assert all(r["autodiff_rms"] is not None for r in ones.rows) and ones.ok
    scaled = depth_sweep(3, 5, init="scaled", framework=framework)
    for r in scaled.rows:
        assert r["grad_rms"] == pytest.approx(2 / 3) and r["autodiff_rms"] == pytest.approx(2 / 3)
    assert scaled.ok


def test_depth_sweep_uneven_widths_and_relu():
    sweep = depth_sweep([2, 4, 3, 5], 3, init="ones", activation="relu")
    # naive recomputation: forward/backward with ones written out by hand for depth 3
    x = np.ones((4, 2))
    w = [np.ones((2, 4)), np.ones((4, 3)), np.ones((3, 5))]
    a = [x]
    for wi in w:
        a.append(a[-1] @ wi)
    d = 2 / (4 * 5) * np.ones_like(a[-1])
    grads = []
    for l in (2, 1, 0):
        grads.insert(0, a[l].T @ d)
        d = d @ w[l].T
    rows = [r for r in sweep.rows if r["depth"] == 3]
    for r, g in zip(rows, grads, strict=False):
        assert r["grad_rms"] == pytest.approx(np.sqrt(np.mean(g**2)))
        assert r["predicted"] == pytest.approx(np.sqrt(np.mean(g**2)))


def test_training_loop_cell_keras(keras):
    import tensorflow as tf

    ad = adapter("tensorflow")
    n = 7
    model = ad.build_dense_model([SEED_W] * 3, None, [None, None, "relu"], "float32")
    x, y = np.ones((n, 3), np.float32), np.ones((n, 1), np.float32)
    y_hat = model(x).numpy()
    # seed printed: loss: 20.592548370361328, [13.728364 ×7]
    assert float(1 / (2 * n) * np.sum((y - y_hat) ** 2)) == pytest.approx(20.592548, rel=1e-6)
    per_sample = tf.keras.losses.MSE(y, y_hat).numpy()
    np.testing.assert_allclose(per_sample, np.full(7, 13.728364), rtol=1e-6)
    assert keras.losses.mean_squared_error is tf.keras.losses.MSE
    report = check_loss(tf.keras.losses.MSE, y, y_hat)
    assert "broadcast" in report.codes and "non_scalar" in report.codes
    assert not report.ok
    assert "(7, 1)" in report["broadcast"].message and "(7, 3)" in report["broadcast"].message
    # Keras averages the last axis: the measured gradient of the per-sample vector's sum is 2/f·(Ŷ − Y)
    assert report.gradient_formula.startswith("dJ/dŶ = 2/f·(Ŷ − Y)")
    # and explain refuses the broadcast, pointing to check_loss
    with pytest.raises(InputError, match=r"check_loss"):
        explain(model, x, y, keras.losses.MeanSquaredError())


def test_training_loop_cell_torch(torch):
    ad = adapter("torch")
    n = 7
    model = ad.build_dense_model([SEED_W] * 3, None, [None, None, "relu"], "float32")
    x, y = torch.ones(n, 3), torch.ones(n, 1)
    with torch.no_grad():
        y_hat = model(x)
    assert float(1 / (2 * n) * ((y - y_hat) ** 2).sum()) == pytest.approx(20.592548, rel=1e-6)
    report = check_loss(torch.nn.MSELoss(), y, y_hat)
    assert {"broadcast", "framework_warning"} <= set(report.codes)
    assert float(report.value) == pytest.approx(13.728364, rel=1e-6)
    hand = check_loss(lambda p, t: ((t - p) ** 2).sum() / (2 * n), y, y_hat, framework="torch")
    assert float(hand.value) == pytest.approx(20.592548, rel=1e-6)
    assert hand.gradient_formula.startswith("dJ/dŶ = 1/n·(Ŷ − Y)")


@pytest.mark.parametrize("s", [np.eye(3), np.diag([2.0, 0.0, 1.0]), np.arange(9.0).reshape(3, 3)])
def test_jacobian_vs_gradient_matrix_activation(framework, s):
    r = jacobian_vs_gradient(matrix=s, framework=framework)
    # naive: J[i, j, p, q] = δ_ip S_qj; the gradient is the Jacobian summed over the target's axes
    z = r.source
    naive = np.zeros(z.shape + z.shape)
    for i in range(z.shape[0]):
        for j in range(3):
            for q in range(3):
                naive[i, j, i, q] = s[q, j]
    np.testing.assert_allclose(r.jacobian, naive)
    np.testing.assert_allclose(r.gradient, np.tile(s.sum(axis=1), (z.shape[0], 1)))
    assert r.ok
    if np.array_equal(s, np.eye(3)):
        np.testing.assert_array_equal(r.gradient, np.ones_like(z))  # the seed's "ones instead of diag()"


def test_jacobian_vs_gradient_default_and_custom(framework):
    r = jacobian_vs_gradient(framework=framework)
    np.testing.assert_allclose(r.gradient, [[2, 0, 1], [2, 0, 1]])
    assert "Sᵀ" in str(r) and r.to_dict()["ok"]
    if framework == "torch":
        import torch

        fn = torch.sin
    else:
        import tensorflow as tf

        fn = tf.sin
    src = np.array([[0.1, 0.2], [0.3, 0.4]])
    r2 = jacobian_vs_gradient(fn, src, framework=framework)
    np.testing.assert_allclose(r2.gradient, np.cos(src), rtol=1e-12)
    assert r2.ok and r2.closed_form is None
