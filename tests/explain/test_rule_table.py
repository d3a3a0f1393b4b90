"""The rule table, entry by entry: every registered rule's forward and backward against autodiff (float64).

Every activation, layer and loss rule in :mod:`gradsight.explain.rules` is checked on seeded random inputs
against torch autodiff (and the Keras loss conventions against Keras). A rule without a reference here fails
``test_every_rule_has_a_reference``: adding a rule means adding its check. A layer kind or activation without a
rule is traced as autodiff only, and never handled by another rule.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradsight.explain._derive import derive
from gradsight.explain._spec import Conventions, LayerSpec, LossConvention, LossSpec
from gradsight.explain.rules import (
    ACTIVATION_RULES,
    LAYER_RULES,
    LOSS_RULES,
    ActivationRule,
    activation_rule,
    evaluate_loss,
    layer_rule,
    register,
)

SEED = 20240611
PARAMS = {"leaky_relu": {"slope": 0.07}, "elu": {"alpha": 0.8}, "softplus": {"beta": 2.0, "threshold": 3.0}}


def _torch_activations(torch):
    F = torch.nn.functional
    return {
        "identity": lambda z: z,
        "relu": F.relu,
        "leaky_relu": lambda z: F.leaky_relu(z, 0.07),
        "elu": lambda z: F.elu(z, 0.8),
        "gelu": F.gelu,
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "softplus": lambda z: F.softplus(z, beta=2.0, threshold=3.0),
        "silu": F.silu,
        "softmax": lambda z: torch.softmax(z, dim=-1),
    }


def _vjp(torch, fn, x: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fn(x), gᵀ·∂fn/∂x) by torch autodiff, float64."""
    xt = torch.tensor(x, requires_grad=True)
    out = fn(xt)
    (grad,) = torch.autograd.grad(out, xt, torch.tensor(g))
    return out.detach().numpy(), grad.numpy()


def test_every_rule_has_a_reference(torch):
    assert set(ACTIVATION_RULES) == set(_torch_activations(torch))
    assert set(LAYER_RULES) == {"dense", "conv2d", "activation", "flatten", "dropout"}
    assert set(LOSS_RULES) == set(_TORCH_LOSSES)


@pytest.mark.parametrize("name", list(ACTIVATION_RULES))
def test_activation_rule_against_torch(torch, name):
    rng = np.random.default_rng(SEED)
    z = rng.normal(scale=2.0, size=(6, 5))
    g = rng.normal(size=z.shape)
    act = activation_rule(name, **PARAMS.get(name, {}))
    a_ref, dz_ref = _vjp(torch, _torch_activations(torch)[name], z, g)
    np.testing.assert_allclose(act.forward(z), a_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(act.backward(z, g), dz_ref, rtol=1e-10, atol=1e-12)
    s, text, latex, layout = act.local(z)
    assert text and latex and layout
    if act.rule.elementwise:  # S is the diagonal: S = gradient of ΣA
        np.testing.assert_allclose(s, _vjp(torch, _torch_activations(torch)[name], z, np.ones_like(z))[1], atol=1e-12)
    else:  # softmax: the per-sample Jacobians
        fn = _torch_activations(torch)[name]
        ref = torch.func.vmap(torch.func.jacrev(lambda zi: fn(zi[None])[0]))(torch.tensor(z)).numpy()
        np.testing.assert_allclose(s, ref, atol=1e-12)


def _layer_case(torch, kind: str, conv: Conventions):
    """(LayerSpec, a_prev, weight, bias, torch forward of (a_prev, w, b)) in the framework layout of ``conv``."""
    rng = np.random.default_rng(SEED)
    F = torch.nn.functional
    if kind == "dense":
        a, w_io, b = rng.normal(size=(4, 3)), rng.normal(size=(3, 5)), rng.normal(size=5)
        w = w_io.T if conv.dense_weight == "out_in" else w_io

        def fn(a_, w_, b_):
            return a_ @ (w_.T if conv.dense_weight == "out_in" else w_) + b_

        return LayerSpec(1, kind, "dense", "Dense", weight=w, bias=b), a, w, b, fn
    if kind == "conv2d":
        last = conv.conv_weight == "hwio"
        x, k, b = rng.normal(size=(2, 3, 7, 6)), rng.normal(size=(4, 3, 3, 2)), rng.normal(size=4)
        spec = {"stride": (2, 1), "pads": (1, 0, 1, 1), "channels_last": last}
        a = x.transpose(0, 2, 3, 1) if last else x
        w = k.transpose(2, 3, 1, 0) if last else k

        def fn(a_, w_, b_):
            xx = a_.permute(0, 3, 1, 2) if last else a_
            kk = w_.permute(3, 2, 0, 1) if last else w_
            z = F.conv2d(F.pad(xx, (1, 1, 1, 0)), kk, b_, stride=(2, 1))
            return z.permute(0, 2, 3, 1) if last else z

        return LayerSpec(1, kind, "conv", "Conv2D", weight=w, bias=b, conv=spec), a, w, b, fn
    a = rng.normal(size=(3, 2, 4))
    ref = {"activation": lambda a_, w_, b_: a_, "dropout": lambda a_, w_, b_: a_}
    ref["flatten"] = lambda a_, w_, b_: a_.reshape(a_.shape[0], -1)
    return LayerSpec(1, kind, kind, kind), a, None, None, ref[kind]


LAYOUTS = [Conventions(dense_weight="in_out", conv_weight="hwio"), Conventions(dense_weight="out_in")]


@pytest.mark.parametrize("conv", LAYOUTS, ids=["in_out-hwio", "out_in-oihw"])
@pytest.mark.parametrize("kind", list(LAYER_RULES))
def test_layer_rule_against_torch(torch, kind, conv):
    rule = layer_rule(kind)
    ls, a, w, b, fn = _layer_case(torch, kind, conv)
    out = rule.forward(ls, a, w, b, conv)
    g = np.random.default_rng(SEED + 1).normal(size=out.shape)
    ts = [torch.tensor(v, requires_grad=True) if v is not None else None for v in (a, w, b)]
    ref = fn(*ts)
    grads = torch.autograd.grad(ref, [t for t in ts if t is not None], torch.tensor(g))
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-12, atol=1e-12)
    dw, db, da = rule.backward(ls, g, a, w, conv)
    np.testing.assert_allclose(da, grads[0].numpy(), rtol=1e-12, atol=1e-12)
    assert rule.weighted == (w is not None)
    if w is not None:
        np.testing.assert_allclose(dw, grads[1].numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(db, grads[2].numpy(), rtol=1e-12, atol=1e-12)
        assert all(rule.grad_text(ls, 1, conv))
    assert all(rule.text(ls, 1, conv))


# ------------------------------------------------------------------------------------------------------ losses
_TORCH_LOSSES = {
    "mse": lambda F, p, t, i: F.mse_loss(p, t),
    "mae": lambda F, p, t, i: F.l1_loss(p, t),
    "bce": lambda F, p, t, i: F.binary_cross_entropy(p, t),
    "bce_logits": lambda F, p, t, i: F.binary_cross_entropy_with_logits(p, t),
    "cce": lambda F, p, t, i: -(t * p.log()).sum(-1).mean(),
    "cce_logits": lambda F, p, t, i: F.cross_entropy(p, t),
    "sparse_cce": lambda F, p, t, i: F.nll_loss(p.log(), i),
    "sparse_cce_logits": lambda F, p, t, i: F.cross_entropy(p, i),
    "output_mean": lambda F, p, t, i: p.mean(),
    "output_sum": lambda F, p, t, i: p.sum(),
}


def _loss_inputs(kind: str):
    rng = np.random.default_rng(SEED)
    z = rng.normal(size=(6, 4))
    idx = rng.integers(0, 4, size=6)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    y_hat = {"bce": 1 / (1 + np.exp(-z)), "cce": probs, "sparse_cce": probs}.get(kind, z)
    if kind.startswith("sparse"):
        return y_hat, idx, idx
    y = np.eye(4)[idx] if "cce" in kind else rng.uniform(size=z.shape)
    return y_hat, y, idx


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", list(LOSS_RULES))
def test_loss_rule_against_torch(torch, kind, reduction):
    if reduction == "sum" and kind.startswith("output"):
        pytest.skip("output_mean/output_sum have no reduction")
    y_hat, y, idx = _loss_inputs(kind)
    spec = LossSpec(kind, reduction, LossConvention(name="torch"))
    res = evaluate_loss(spec, y_hat, y)
    p = torch.tensor(y_hat, requires_grad=True)
    t = torch.tensor(np.asarray(y, dtype=np.float64))
    j = _TORCH_LOSSES[kind](torch.nn.functional, p, t, torch.tensor(idx))
    if reduction == "sum" and not kind.startswith("output"):
        j = j * (p.numel() if LOSS_RULES[kind].per_element else p.shape[0])
    (g,) = torch.autograd.grad(j, p)
    np.testing.assert_allclose(res.value, float(j.detach()), rtol=1e-12)
    np.testing.assert_allclose(res.grad, g.numpy(), rtol=1e-10, atol=1e-14)
    assert res.formula and res.latex


@pytest.mark.parametrize("kind", ["mse", "mae", "bce", "cce", "cce_logits", "sparse_cce", "sparse_cce_logits"])
def test_keras_loss_convention_against_keras(keras, kind):
    import tensorflow as tf

    from gradsight.frameworks.keras._explain import LOSS_CONVENTION, classify_loss

    y_hat, y, _ = _loss_inputs(kind)
    spec = LossSpec(kind, "sum", LOSS_CONVENTION)
    res = evaluate_loss(spec, y_hat, y)
    _, _, fn, _ = classify_loss(kind, "sum", "float64")
    p = tf.constant(y_hat)
    with tf.GradientTape() as tape:
        tape.watch(p)
        j = fn(tf.constant(y), p)
    np.testing.assert_allclose(res.value, float(j), rtol=1e-6)
    np.testing.assert_allclose(res.grad, tape.gradient(j, p).numpy(), rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------------- unknown kinds are explicit
def _torch_run(torch):
    from torch import nn

    from gradsight.frameworks.torch._explain import run_explain

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    rng = np.random.default_rng(SEED)
    return run_explain(model, rng.normal(size=(5, 3)), rng.normal(size=(5, 2)), "mse")


@pytest.mark.parametrize("what", ["kind", "activation"])
def test_unknown_layer_kind_or_activation_is_autodiff_only(torch, what):
    run = _torch_run(torch)
    if what == "kind":
        run.layers[0].kind = "mystery"  # e.g. an adapter ahead of the rule table
    else:
        run.layers[0].activation = "swishy"
    trace = derive(run)
    assert trace.ok
    info = trace.layers[0]
    assert info.has_rule is False and ("mystery" if what == "kind" else "swishy") in info.reason
    assert trace["A1"].value is None and "autodiff only" in trace["A1"].note
    assert trace["dJ/dW1"].value is None and "Z1" not in trace  # not traced by the dense (or any other) rule
    assert trace["dJ/dW2"].value is not None and trace["dJ/dW2"].ok  # the chain continues around it
    assert "framework's A of layer(s) [1]" in trace["Z2"].note


def test_a_rule_name_registers_once():
    rule = ACTIVATION_RULES["relu"]
    with pytest.raises(ValueError, match="already registered"):
        register(ActivationRule("relu", rule.forward, rule.derivative, rule.text, rule.latex))
