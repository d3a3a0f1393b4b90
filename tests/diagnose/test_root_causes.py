"""The root-cause rules on synthetic runs whose every number the test sets: per-step signals and summaries."""

import math
import re

import numpy as np
import pytest

from gradsight.diagnose import CODE_DESCRIPTIONS, CODES, Thresholds, diagnose
from gradsight.diagnose._advice import lr_direction


def codes(findings):
    return [f.code for f in findings]


def by_code(findings, code):
    found = [f for f in findings if f.code == code]
    assert found, f"no {code} finding among {codes(findings)}"
    return found[0]


def per_step(s, step, **values):
    """Per-step signals; names with a slash (``weight_norm/fc1.weight``) are passed as a dict."""
    s.scalars(step, **values)


def signals(s, step, *, w, u, g, loss, lr=None, tensors=("fc1.weight", "fc2.weight")):
    """One step of per-step signals for every tensor: weight norm w, update norm u, gradient norm g."""
    values = {"loss": loss, "grad_norm": g * math.sqrt(len(tensors))}
    for t in tensors:
        values[f"weight_norm/{t}"] = w
        values[f"update_norm/{t}"] = u
        values[f"grad_norm/{t}"] = g
    if lr is not None:
        values["lr"] = lr
    s.writer.log_scalars(step, values)


def test_new_codes_are_public_and_described():
    for code in (
        "learning-rate-too-high",
        "bad-initialisation",
        "gradients-accumulating",
        "no-gradient",
        "not-optimized",
        "gradients-clipped",
        "no-steps-recorded",
    ):
        assert code in CODES and CODE_DESCRIPTIONS[code]


# ---- learning-rate-too-high ---------------------------------------------------------------------------------
def test_lr_too_high_names_the_first_step_that_did_damage(synth):
    s = synth()
    for step in range(30):
        u = {0: 0.6, 5: 0.9}.get(step, 1e-3)  # step 0: a large step that does no harm; step 5: one that does
        w = 1.0 if step <= 5 else 4.0
        signals(s, step, w=w, u=u, g=1.0, loss=2.0 if step <= 5 else 6.0, lr=0.5)
    (f,) = [f for f in diagnose(s.run()) if f.code == "learning-rate-too-high"]
    assert f.is_root and f.first_step == 5 and f.severity == "warning"
    assert f.evidence["update_ratio"] == pytest.approx(0.9)
    assert f.evidence["source"] == "per-step update_norm/<tensor>"
    assert set(f.evidence["damage"]) >= {"weights", "loss"}
    assert "the update of step 5 moved the weights by 0.9 of their norm" in f.message
    assert "the norm of all weights grew 4x" in f.message and "The learning rate at step 5 was 0.5." in f.message
    assert f.advice[0].startswith("Lower the learning rate by about 100x (from 0.5 to 0.005 or less)")
    assert all(lr_direction(a) <= 0 for a in f.advice)


def test_a_large_step_without_damage_is_not_a_finding(synth):
    s = synth()
    for step in range(30):
        signals(s, step, w=1.0, u=0.9 if step == 3 else 1e-3, g=1.0, loss=2.0 - 0.01 * step)
    assert "learning-rate-too-high" not in codes(diagnose(s.run()))


def test_lr_too_high_when_most_layers_move_by_their_norm_though_the_pooled_ratio_is_small(synth):
    """A transformer at a far too high learning rate: most layers move by 1.5x their own norm at step 0, but the
    embeddings (norm 100) hold the pooled ratio at 0.03 and the global weight norm hardly grows."""
    s = synth()
    small = ("fc1.weight", "fc2.weight", "fc3.weight")
    for step in range(20):
        grown = 1.0 if step == 0 else 3.0  # each small layer's norm triples after the update of step 0
        values = {"loss": 2.0, "grad_norm": 1.0, "lr": 0.03, "weight_norm/emb.weight": 100.0}
        values["update_norm/emb.weight"] = 1.0 if step == 0 else 1e-3
        for t in small:
            values[f"weight_norm/{t}"] = grown
            values[f"update_norm/{t}"] = 1.5 if step == 0 else 1e-3 * grown
            values[f"grad_norm/{t}"] = 1.0
        s.writer.log_scalars(step, values)
    f = by_code(diagnose(s.run()), "learning-rate-too-high")
    pooled = math.sqrt(1.0 + 3 * 1.5**2) / math.sqrt(100.0**2 + 3)
    assert f.first_step == 0 and f.evidence["update_ratio"] == pytest.approx(pooled)
    assert f.evidence["median_layer_ratio"] == pytest.approx(1.5)  # layers emb 0.01, fc1-3 1.5
    assert f.evidence["damage"]["weights"]["typical_tensor"] and f.evidence["damage"]["weights"]["growth"] == 3.0
    assert "moved 3 of 4 layers by at least 0.5 of their own norm (median over layers 1.5" in f.message
    assert "the typical parameter tensor's norm grew 3x (median over 4 tensors; 3 of them 2x or more, by step 1)" in (
        f.message
    )
    assert f.advice[0].startswith("Lower the learning rate by about 100x (from 0.03 to 0.0003 or less)")  # 1.5/1e-2


def test_zero_initialised_biases_growing_from_zero_are_no_weight_damage():
    """Biases start at 0 and grow linearly: their norm 'grows' 3x between steps 1 and 4 while no weight moves.
    They counted in the typical tensor's growth, so any large early step was confirmed as damaging."""
    import tempfile
    from pathlib import Path

    from gradsight.diagnose._base import RunData
    from gradsight.diagnose._series import damage
    from gradsight.store import RunWriter

    path = Path(tempfile.mkdtemp()) / "b.db"
    with RunWriter(path, meta={"framework": "synthetic", "model": {"layers": []}}) as w:
        for step in range(10):
            values = {"loss": 1.0 / (step + 1)}
            for t in ("fc1", "fc2", "fc3"):
                values[f"weight_norm/{t}.weight"] = 1.0 + 1e-4 * step
                values[f"weight_norm/{t}.bias"] = 0.01 * step  # zero at initialisation
            w.log_scalars(step, values)
    th = Thresholds()
    data = RunData(path)
    for step in (1, 2):
        assert "weights" not in damage(data, step, **th.damage_args())


def test_lr_too_high_from_summaries_when_no_per_step_norms(synth, rng):
    s = synth()
    for step in range(12):
        scale = 0.1 if step <= 3 else 2.0  # the weights blow up after the update of step 3
        s.log(step, "weight", "fc1", np.full((4, 3), scale))
        s.log(step, "update", "fc1", np.full((4, 3), 0.08 if step == 3 else 1e-4))
        s.log(step, "grad", "fc1", rng.normal(0, 0.1, (4, 3)))
        s.scalars(step, loss=1.0 if step <= 3 else 5.0)
    f = by_code(diagnose(s.run()), "learning-rate-too-high")
    assert f.first_step == 3 and f.evidence["source"] == "update summaries"
    assert f.evidence["update_ratio"] == pytest.approx(0.8, rel=1e-6)


# ---- bad-initialisation -------------------------------------------------------------------------------------------
def test_bad_init_names_a_bias_inside_a_fused_keras_layer(synth, rng):
    layers = [{"name": "fc1", "type": "Dense", "activation": "relu"}, {"name": "out", "type": "Dense"}]
    s = synth(layers=layers, framework="keras")
    for step in range(6):
        s.log(step, "weight", "fc1", rng.normal(0, 0.3, (3, 8)), tensor="fc1/kernel")
        s.log(step, "weight", "fc1", np.full(8, -10.0), tensor="fc1/bias")
        s.log(step, "output", "fc1", np.zeros((16, 8)), unit_axis=-1)
        s.log(step, "weight", "out", rng.normal(0, 0.3, (8, 2)), tensor="out/kernel")
        s.log(step, "output", "out", rng.normal(size=(16, 2)), unit_axis=-1)
    found = diagnose(s.run())
    f = found[0]
    assert f.code == "bad-initialisation" and f.is_root and f.layers == ("fc1",)
    h = f.evidence["layers"]["fc1"]
    assert h["parameter"] == "bias" and h["tensor"] == "fc1/bias" and h["bias"]["mean"] == -10.0
    assert "unit-scale inputs" in h["weight_term_source"]
    assert "the bias of 'fc1' has mean -10 (std 0)" in f.message
    assert "100% of the units of 'fc1' are ≤ 0 (dead) from step 0" in f.message
    dead = by_code(found, "dead-units")
    assert dead.caused_by == ("bad-initialisation",) and not dead.is_root


def test_dead_units_behind_weights_at_he_scale_get_no_he_advice(synth, rng):
    """Weights at He's scale did not kill the units: advising He's scheme would change nothing."""
    layers = [{"name": "fc1", "type": "Linear", "activation": "relu"}, {"name": "out", "type": "Linear"}]
    s = synth(layers=layers)
    for step in range(6):
        s.log(step, "weight", "fc1", rng.normal(0, math.sqrt(2 / 8), (16, 8)), tensor="fc1.weight")  # He: fan-in 8
        s.log(step, "output", "fc1", np.zeros((16, 16)), unit_axis=-1)  # dead anyway: the inputs are the cause
        s.log(step, "weight", "out", rng.normal(0, 0.3, (2, 16)), tensor="out.weight")
        s.log(step, "output", "out", rng.normal(size=(16, 2)), unit_axis=-1)
    f = by_code(diagnose(s.run()), "bad-initialisation")
    h = f.evidence["layers"]["fc1"]
    assert h["parameter"] == "weight" and h["standard_scale"]
    assert "the inputs it receives, not its weights, are off" in f.message
    assert not any("He's scheme" in a for a in f.advice) and any("normalisation" in a for a in f.advice)


def _chain_run(s, rng, std, layers, width=64, steps=3):
    for step in range(steps):
        x = rng.normal(size=(16, width))
        for spec in layers:
            name = spec["name"]
            if spec["type"] == "Linear":
                w = rng.normal(0, std, (width, width))
                s.log(step, "weight", name, w)
                x = x @ w.T
            elif spec["type"] == "ReLU":
                x = np.maximum(x, 0)
            else:  # a normalisation layer: back to unit scale
                x = (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-6)
            s.log(step, "output", name, x, unit_axis=-1)


def test_bad_init_weight_scale_along_a_chain(synth, rng):
    layers = []
    for i in range(4):
        layers += [{"name": f"fc{i}", "type": "Linear"}, {"name": f"act{i}", "type": "ReLU"}]
    s = synth(layers=layers)
    _chain_run(s, rng, 1.0, layers)  # std 1 for fan-in 64: 5.7x He's sqrt(2/64)
    f = by_code(diagnose(s.run()), "bad-initialisation")
    (chain,) = f.evidence["scale_chains"]
    assert chain["direction"] == "large" and [e["layer"] for e in chain["layers"]] == ["fc0", "fc1", "fc2", "fc3"]
    assert all(
        e["reference"] == "He" and e["scale"] == pytest.approx(1 / math.sqrt(2 / 64), rel=0.05) for e in chain["layers"]
    )
    assert f.layers[:4] == ("fc0", "fc1", "fc2", "fc3")
    assert re.search(r"start 5\.\d+x–5\.\d+x larger than the standard scale \(e\.g\. 'fc\d': std ", f.message)


def test_normalisation_breaks_a_scale_chain(synth, rng):
    # two small projections, a LayerNorm, two more: chains of two, as in a transformer block (small by design)
    layers = [
        {"name": "q", "type": "Linear"},
        {"name": "o", "type": "Linear"},
        {"name": "ln", "type": "LayerNorm"},
        {"name": "fc", "type": "Linear"},
        {"name": "proj", "type": "Linear"},
    ]
    s = synth(layers=layers)
    _chain_run(s, rng, 0.02, layers)
    assert "bad-initialisation" not in codes(diagnose(s.run()))


def test_parallel_projections_reading_one_input_are_not_a_chain(synth, rng):
    """An attention block's query, key and value read the same input: small by design (std 0.02), their outputs
    have the same RMS, and only value -> output compounds (two layers). It was reported as a chain of four."""
    layers = [{"name": n, "type": "Linear"} for n in ("q", "k", "v", "o")] + [{"name": "ln", "type": "LayerNorm"}]
    s = synth(layers=layers)
    for step in range(3):
        x = rng.normal(size=(16, 64))
        outs = {}
        for name in ("q", "k", "v"):
            w = rng.normal(0, 0.02, (64, 64))
            s.log(step, "weight", name, w)
            outs[name] = x @ w.T
        w = rng.normal(0, 0.02, (64, 64))
        s.log(step, "weight", "o", w)
        outs["o"] = outs["v"] @ w.T
        for name in ("q", "k", "v", "o"):
            s.log(step, "output", name, outs[name], unit_axis=-1)
        s.log(step, "output", "ln", rng.normal(size=(16, 64)), unit_axis=-1)
    assert "bad-initialisation" not in codes(diagnose(s.run()))


# ---- gradients-accumulating -----------------------------------------------------------------------------------
def test_gradients_accumulating(synth, rng):
    s = synth()
    for step in range(40):
        s.scalars(step, grad_norm=0.3 * (step + 1) * (1 + 0.03 * rng.normal()), loss=1.0 + 0.05 * rng.normal())
    f = by_code(diagnose(s.run()), "gradients-accumulating")
    assert f.is_root and f.first_step == 0 and f.evidence["slope"] == pytest.approx(1.0, abs=0.1)
    assert f.evidence["rising_fraction"] >= 0.8 and f.evidence["growth"] > 20
    assert "optimizer.zero_grad()" in f.message and any("zero_grad()" in a for a in f.advice)


def test_a_keras_run_is_never_called_accumulating(synth, rng):
    """fit and apply take a fresh gradient each step: a Keras regression whose gradient grew like a running sum
    while its output layer reached large targets was told to call optimizer.zero_grad()."""
    s = synth(framework="keras")
    for step in range(40):
        s.scalars(step, grad_norm=0.3 * (step + 1) * (1 + 0.03 * rng.normal()), loss=1.0 + 0.05 * rng.normal())
    assert "gradients-accumulating" not in codes(diagnose(s.run()))


def test_a_loss_cut_off_from_every_parameter_is_no_gradient(synth):
    """Regression: the loss computed from detached outputs: optimizer steps, not one gradient. update-ratio-low
    was the root; the per-step weight norms without any gradient norm are the evidence."""
    s = synth()
    for step in range(10):
        s.scalars(
            step,
            loss=1.0,
            lr=0.1,
            **{"weight_norm/fc1.weight": 1.0, "update_norm/fc1.weight": 0.0, "weight_norm/fc2.weight": 2.0},
        )
    found = diagnose(s.run())
    f = found[0]
    assert f.code == "no-gradient" and f.is_root and f.evidence["absent"] == ["fc1.weight", "fc2.weight"]
    assert "detach()" in f.advice[0]


def test_a_fine_tune_at_its_noise_floor_is_not_a_loss_that_rose(synth, rng):
    """Regression: the lowest of the first three losses was a lucky batch; half the start window's ordinary batches
    lay above twice it and were left out as spikes, which biased the start low and made a flat loss 'rise'."""
    s = synth()
    for step in range(300):
        s.scalars(step, loss=float(0.03 * rng.lognormal(0.0, 0.6)) if step else 0.008)
    found = [f for f in diagnose(s.run()) if f.code == "loss-not-decreasing"]
    assert all(f.severity == "info" for f in found), [(f.severity, f.message) for f in found]


@pytest.mark.parametrize("kind", ["noisy", "exponential"])
def test_not_accumulating(synth, rng, kind):
    s = synth()
    for step in range(40):
        if kind == "noisy":  # a fresh minibatch gradient: up and down around a level
            s.scalars(step, grad_norm=abs(1 + 0.4 * rng.normal()), loss=1.0 - 0.01 * step)
        else:  # divergence: gradient and loss grow exponentially together
            s.scalars(step, grad_norm=1.3**step, loss=1.6**step)
    assert "gradients-accumulating" not in codes(diagnose(s.run()))


# ---- no-gradient / not-optimized --------------------------------------------------------------------------------
def _params_run(s, grads, held, updates=None, lr=0.1, steps=6):
    for step in range(steps):
        values = {"loss": 1.0 - 0.01 * step, "lr": lr}
        for t in held:
            values[f"weight_norm/{t}"] = 1.0
            values[f"update_norm/{t}"] = (updates or {}).get(t, 0.01)
        for t, g in grads.items():
            values[f"grad_norm/{t}"] = g
        s.writer.log_scalars(step, values)


@pytest.mark.parametrize(("grad_c", "key"), [(None, "absent"), (0.0, "zero")])
def test_no_gradient(synth, grad_c, key):
    s = synth()
    grads = {"fc1.weight": 0.5, "fc2.weight": 0.3}
    if grad_c is not None:
        grads["fc3.weight"] = grad_c
    _params_run(s, grads, held=["fc1.weight", "fc2.weight", "fc3.weight"])
    f = by_code(diagnose(s.run()), "no-gradient")
    assert f.severity == "warning" and f.layers == ("fc3",) and f.evidence[key] == ["fc3.weight"]
    assert "1 of the 3 parameter tensors the optimizer holds" in f.message


def test_no_gradient_anywhere_is_the_root_and_never_advises_a_larger_learning_rate(synth):
    """Every gradient exactly zero (float16 underflow, a loss times 0): update-ratio-low used to be the root, advising
    to raise the learning rate, which cannot move a parameter whose gradient is zero."""
    s = synth()
    held = ["fc1.weight", "fc2.weight"]
    _params_run(s, dict.fromkeys(held, 0.0), held=held, updates=dict.fromkeys(held, 0.0))
    found = diagnose(s.run())
    f = by_code(found, "no-gradient")
    assert f.is_root and f.layers == ("fc1", "fc2") and f.evidence["zero"] == held
    assert "none of the 2 parameter tensors the optimizer holds received a non-zero gradient" in f.message
    assert "GradScaler" in f.advice[0] and not any("raise the learning rate" in a.lower() for a in f.advice)
    low = by_code(found, "update-ratio-low")
    assert not low.is_root and low.caused_by == ("no-gradient",)


def test_a_frozen_parameter_is_ranked_before_a_saturated_layer_and_explains_its_frozen_update_alone(synth, rng):
    """A BERT classifier with its word embedding frozen by mistake, whose pooler tanh saturates as it fits: the
    frozen embedding (a fact of the set-up) comes first, and its zero update ratio is not put on the saturation."""
    layers = [{"name": "emb", "type": "Embedding"}, {"name": "fc", "type": "Linear"}, {"name": "pool", "type": "Tanh"}]
    s = synth(layers=[*layers, {"name": "head", "type": "Linear"}])
    for step in range(12):
        values = {"loss": 1.0 * 0.8**step, "weight_norm/emb.weight": 5.0, "update_norm/emb.weight": 0.0}
        values.update({"weight_norm/fc.weight": 1.0, "update_norm/fc.weight": 1e-3, "grad_norm/fc.weight": 0.1})
        s.writer.log_scalars(step, values)
        s.log(step, "output", "pool", np.tanh(rng.normal(0, 8.0, size=(32, 16))), unit_axis=-1)
        s.log(step, "output", "head", rng.normal(size=(32, 2)), unit_axis=-1)
    found = diagnose(s.run())
    roots = [f for f in found if f.is_root and f.severity == "warning"]
    assert [f.code for f in roots[:2]] == ["no-gradient", "saturated-units"]
    low = by_code(found, "update-ratio-low")
    assert low.caused_by == ("no-gradient",)


@pytest.mark.parametrize("every_layer", [True, False])
def test_update_ratio_low_everywhere_with_gradients_advises_raising_the_learning_rate_first(synth, every_layer):
    """SGD at lr 1e-6: every layer moves, by 1e-8 of its norm. A single slow layer points at its gradient path."""
    s = synth()
    for step in range(30):
        u = {"fc1.weight": 1e-8, "fc2.weight": 1e-8 if every_layer else 1e-3}
        values = {"loss": 2.3}
        for t, v in u.items():
            values.update({f"weight_norm/{t}": 1.0, f"update_norm/{t}": v, f"grad_norm/{t}": 0.1})
        s.writer.log_scalars(step, values)
    f = by_code(diagnose(s.run()), "update-ratio-low")
    first = "Raise the learning rate" if every_layer else "Check that the layer receives gradient"
    assert f.advice[0].startswith(first)


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_no_gradient_advice_speaks_the_runs_framework(synth, framework):
    s = synth(framework=framework)
    _params_run(s, {"fc1.weight": 0.5, "fc2.weight": 0.0}, held=["fc1.weight", "fc2.weight"])
    f = by_code(diagnose(s.run()), "no-gradient")
    text = " ".join(f.advice)
    assert ("tf.stop_gradient" in text) is (framework == "keras")
    assert ("requires_grad" in text) is (framework == "torch")


def test_no_gradient_of_a_frozen_parameter_the_optimizer_holds_is_named_frozen(synth):
    # Frozen on purpose (fine-tuning) or by mistake look the same in a run: the optimizer holds a parameter that can
    # never move. A warning either way, naming it frozen, with the advice to leave it out of the optimizer.
    s = synth(frozen=["fc3.weight"])
    _params_run(s, {"fc1.weight": 0.5}, held=["fc1.weight", "fc3.weight"])
    f = by_code(diagnose(s.run()), "no-gradient")
    assert f.severity == "warning" and f.evidence["frozen"] == ["fc3.weight"]
    assert "requires_grad=False" in f.message and any("leave them out of the optimizer" in a for a in f.advice)


def test_not_optimized_not_held(synth):
    s = synth(optimizer_params={"model_params_held": 2, "model_params": 3})
    _params_run(s, {"fc1.weight": 0.5, "fc2.weight": 0.3, "fc3.weight": 0.2}, held=["fc2.weight", "fc3.weight"])
    f = by_code(diagnose(s.run()), "not-optimized")
    assert f.is_root and f.layers == ("fc1",) and f.evidence["not_held"] == ["fc1.weight"]
    assert "The optimizer holds 2 of the model's 3 parameter tensors." in f.message


def test_not_optimized_advice_speaks_the_runs_framework(synth):
    s = synth(framework="keras", optimizer_params={"model_params_held": 2, "model_params": 3})
    _params_run(s, {"fc1/kernel": 0.5, "fc2/kernel": 0.3, "fc3/kernel": 0.2}, held=["fc2/kernel", "fc3/kernel"])
    f = by_code(diagnose(s.run()), "not-optimized")
    assert "optimizer.apply(grads, model.trainable_variables)" in f.advice[0]
    assert not any("torch" in a for a in f.advice)


def test_not_optimized_learning_rate_zero_but_not_a_float_rounding(synth):
    s = synth()
    _params_run(
        s,
        {"fc1.weight": 0.5, "fc2.weight": 0.3},
        held=["fc1.weight", "fc2.weight"],
        lr=0.0,
        updates={"fc1.weight": 0.0, "fc2.weight": 0.0},
    )
    assert by_code(diagnose(s.run()), "not-optimized").evidence["never_moved"] == ["fc1.weight", "fc2.weight"]
    # an update that rounds away in float32: lr * |g| / |W| = 1e-13 -> no finding
    s2 = synth("b.db")
    _params_run(
        s2, {"fc1.weight": 1e-12, "fc2.weight": 0.3}, held=["fc1.weight", "fc2.weight"], updates={"fc1.weight": 0.0}
    )
    assert "not-optimized" not in codes(diagnose(s2.run()))


def test_a_warm_up_from_a_rate_of_zero_is_not_a_parameter_left_unoptimized(synth):
    """Regression (HF Trainer, linear warm-up): the rate was 0 at step 0 only, the gradient tiny afterwards (its
    update rounds below what the rule can expect), and the zero update of step 0 was read as 'never moved'."""
    s = synth()
    for step in range(6):
        s.writer.log_scalars(
            step,
            {
                "loss": 1.0 - 0.01 * step,
                "lr": 0.01 * step / 5,
                "weight_norm/fc1.weight": 1.0,
                "update_norm/fc1.weight": 0.0 if step == 0 else 1e-9,
                "grad_norm/fc1.weight": 1e-7,
            },
        )
    assert "not-optimized" not in codes(diagnose(s.run()))


def test_a_parameter_another_optimizer_trains_is_not_called_unoptimized(synth, rng):
    """A GAN's discriminator under its own optimizer: the watched one does not hold it, but its weights move."""
    s = synth(optimizer_params={"model_params_held": 1, "model_params": 2})
    _params_run(s, {"gen.weight": 0.5, "disc.weight": 0.3}, held=["gen.weight"])
    for step in (0, 5):
        s.log(step, "weight", "disc", rng.normal(0, 1.0, size=(4, 3)), tensor="disc.weight")
    assert "not-optimized" not in codes(diagnose(s.run()))


# ---- gradients-clipped ----------------------------------------------------------------------------------------------
def test_clipping_is_info_when_it_bites_now_and_then(synth, rng):
    s = synth()
    for step in range(60):
        pre = 3.0 if step % 10 == 0 else 0.5 + 0.1 * rng.random()
        s.scalars(step, grad_norm=min(pre, 1.0), grad_norm_preclip=pre, loss=2.0 - 0.02 * step)
    f = by_code(diagnose(s.run()), "gradients-clipped")
    assert f.severity == "info" and f.evidence["clipped_steps"] == 6 and f.first_step == 0
    assert "pre-clip norm had median 3" in f.message


def test_clipping_at_every_step_while_the_loss_rises_is_the_root_and_lowers_the_learning_rate(synth, rng):
    """The pre-clip norm stays ~4 (nothing explodes behind the clip) while the loss climbs from 2.2 to ~6: each
    clipped step (lr x limit) is too large. Saturation that follows is its symptom."""
    s = synth(layers=[{"name": "h", "type": "Tanh"}, {"name": "out", "type": "Linear"}])
    for step in range(100):
        pre = 4.0 * (1 + 0.1 * rng.random())
        s.scalars(step, grad_norm=1.0, grad_norm_preclip=pre, loss=2.2 + 4.0 * step / 99)
        if step % 20 == 0:
            spread = 1.0 if step == 0 else 8.0
            s.log(step, "output", "h", np.tanh(rng.normal(0, spread, size=(32, 16))))
            s.log(step, "output", "out", rng.normal(size=(32, 2)))
    found = diagnose(s.run())
    root = found[0]
    assert root.code == "gradients-clipped" and root.severity == "warning" and root.is_root
    assert root.evidence["loss_rose"]["loss_end"] > 2 * root.evidence["loss_rose"]["loss_start"]
    assert lr_direction(root.advice[0]) < 0
    sat = by_code(found, "saturated-units")
    assert sat.caused_by == ("gradients-clipped",)


def test_clipping_that_hides_an_explosion_is_a_warning(synth):
    s = synth()
    for step in range(60):
        pre = 1.2**step  # grows 5e4x behind a clip at 1
        s.scalars(step, grad_norm=min(pre, 1.0), grad_norm_preclip=pre, loss=1.0)
    f = by_code(diagnose(s.run()), "gradients-clipped")
    assert f.severity == "warning" and f.evidence["hidden_explosion"]["growth"] >= 100
    assert f.message.startswith("Clipping hides an explosion")


@pytest.mark.parametrize("loss_trend", ["flat", "slow", "falls"])
def test_clipping_far_below_the_gradient_at_every_step_while_the_loss_hardly_falls_is_the_root(synth, rng, loss_trend):
    """clip_grad_norm_(max_norm=1e-3) on gradients of ~0.27: every step cut ~270x. With a flat loss that is the
    root of it (it was info, and the flat loss was called healthy with advice to check the data); with a loss that
    falls 5 % it is still a warning (SGD under clipnorm=1e-4 in Keras, stuck at the majority class); with a loss
    that keeps falling it stays info."""
    s = synth()
    fall = {"flat": 0.0, "slow": 0.05, "falls": 0.9}[loss_trend]
    for step in range(100):
        pre = 0.27 * (1 + 0.1 * rng.random())
        level = 2.3 * (1 - fall * step / 99)
        values = {"grad_norm": 1e-3, "grad_norm_preclip": pre, "loss": level * (1 + 0.002 * rng.normal())}
        values.update({"grad_norm/fc1.weight": 1e-3, "weight_norm/fc1.weight": 1.0, "update_norm/fc1.weight": 1e-4})
        s.writer.log_scalars(step, values)
    found = diagnose(s.run())
    f = by_code(found, "gradients-clipped")
    if loss_trend == "falls":
        assert f.severity == "info" and "too_tight" not in f.evidence
        return
    assert f.severity == "warning" and f.is_root and f.message.startswith("Clipping sets every step")
    tight = f.evidence["too_tight"]
    assert tight["share"] == 1.0 and tight["factor"] == pytest.approx(f.evidence["preclip_median"] / 1e-3)
    assert "Raise the clipping limit" in f.advice[0]
    if loss_trend == "flat":
        flat = by_code(found, "loss-not-decreasing")
        assert flat.severity == "warning" and flat.caused_by == ("gradients-clipped",)
        assert "gradients clipped at 100% of the steps" in flat.evidence["healthy_signals"]["reason"]


# ---- exploding-gradients: judged against the past, and by its damage ------------------------------------------------
def test_small_initial_gradient_growing_to_its_level_is_not_an_explosion(synth, rng):
    s = synth()
    for step in range(60):  # an LSTM's gradient: 1e-4 at init, ~0.1 once it learns; the loss falls throughout
        g = 1e-4 if step < 3 else 0.1 * (1 + 0.2 * rng.normal())
        s.scalars(step, grad_norm=g, loss=0.7 * 0.97**step)
    assert diagnose(s.run()) == []


def test_a_layers_growth_at_its_last_summary_is_judged_by_the_steps_the_run_had_after_it(synth, rng):
    """Regression: growth seen at the last full summary (step 200 of a 300-step run under the default preset)
    was "unfinished" — harmful — because the layer's own series ended there, though 99 healthy steps followed."""
    s = synth()
    for step in range(300):  # a warm-up: the layer's gradient grows 200x by step 200, the loss falls throughout
        if step % 100 == 0:
            scale = 1e-4 if step < 200 else 2e-2
            s.log(step, "grad", "fc1", rng.normal(0, scale, size=(4, 3)))
        s.scalars(step, loss=3.5 * 0.99**step)
    assert [f.code for f in diagnose(s.run())] == []


def test_an_isolated_spike_that_training_recovers_from_is_info(synth, rng):
    s = synth()
    for step in range(60):
        g = 500.0 if step == 30 else 1.0 + 0.1 * rng.normal()
        s.scalars(step, grad_norm=g, loss=0.7 * 0.99**step)
    (f,) = diagnose(s.run())
    assert f.code == "exploding-gradients" and f.severity == "info" and f.evidence["spike_steps"] == [30]


def _spike_run(s, *, lr_at_spike=0.05, loss_after=None):
    """60 steps, one parameter tensor; at step 40 a gradient 1000x its level makes an update of 0.8 of the weights."""
    for step in range(60):
        spike = step == 40
        s.scalars(
            step,
            grad_norm=1000.0 if spike else 1.0,
            lr=lr_at_spike if spike else 0.05,
            loss=(loss_after(step) if loss_after and step > 40 else 1.0 - 0.005 * step),
            **{"weight_norm/fc1.weight": 10.0, "update_norm/fc1.weight": 8.0 if spike else 0.01},
        )
    return diagnose(s.run())


def test_one_batchs_gradient_spike_at_an_unchanged_learning_rate_is_not_the_learning_rate(synth):
    """Regression: SGD fine for 40 steps, then one gradient 1000x its level: the large update was blamed on the
    learning rate, with the advice to lower it 1000-10000x."""
    found = _spike_run(synth(), loss_after=lambda step: 5.0)
    assert "learning-rate-too-high" not in [f.code for f in found]
    root = found[0]
    assert root.code == "exploding-gradients" and root.is_root and root.severity in ("warning", "error")
    assert "began with a single step" in root.message and root.advice[0].startswith("Clip gradients")
    assert "step 40" in root.advice[1]


def test_a_gradient_spike_that_comes_with_a_learning_rate_jump_is_the_learning_rate(synth):
    found = _spike_run(synth(), lr_at_spike=5.0, loss_after=lambda step: 5.0)
    assert found[0].code == "learning-rate-too-high" and found[0].first_step == 40


def test_a_spike_long_after_a_warm_up_is_not_blamed_on_the_schedule(synth, rng):
    """Regression: a warm-up from 1/100 of the rate made every later step count as "raised by the schedule", and a
    spike at step 120, 100 steps into the peak rate, was named learning-rate-too-high."""
    s = synth()
    for step in range(200):
        rate = 0.1 * min(1.0, 0.01 + step / 20)
        spike = step == 120
        s.scalars(
            step,
            lr=rate,
            grad_norm=300.0 if spike else 1.0 + 0.1 * rng.random(),
            loss=(5.0 if step > 120 else 1.0 * 0.99**step),
            **{"weight_norm/fc1.weight": 10.0, "update_norm/fc1.weight": 0.05},
        )
    found = diagnose(s.run())
    assert "learning-rate-too-high" not in [f.code for f in found], [(f.code, f.message) for f in found]
    assert found[0].code == "exploding-gradients" and found[0].advice[0].startswith("Clip gradients")


def test_damage_that_shows_after_the_damage_window_still_counts(synth):
    """Adam's momentum spreads a spike over ~20 steps: the loss rose only 1.5x within 5 steps, 15x within 20."""
    s = synth()
    for step in range(80):
        g = 1000.0 if step == 40 else (1.0 if step < 40 else 5.0)
        lo = 0.2 if step <= 40 else min(0.2 * (1 + 0.1 * (step - 40)) ** 2, 4.0)
        s.scalars(step, grad_norm=g, loss=lo)
    (f,) = [f for f in diagnose(s.run()) if f.code == "exploding-gradients"]
    assert f.severity in ("warning", "error") and "the loss rose" in f.message


def test_a_converged_loss_that_wobbles_is_not_damage(synth, rng):
    """Regression: a GRU at loss ~2e-4 whose loss reached 8e-3 after a gradient jump: 40x, but 1 % of the start."""
    s = synth()
    for step in range(120):
        lo = 0.7 * 0.9**step if step < 80 else 2e-4 * (1 + 40 * (step in range(90, 100)))
        g = 1.0 if step != 90 else 500.0
        s.scalars(step, grad_norm=g * (1 + 0.05 * rng.random()), loss=max(lo, 2e-4))
    assert [f.severity for f in diagnose(s.run()) if f.code == "exploding-gradients"] in ([], ["info"])


@pytest.mark.parametrize("breaks", [True, False])
def test_a_schedule_that_raises_the_learning_rate_into_a_collapse_is_named(synth, rng, breaks):
    """A one-cycle schedule to a peak too high: Adam's steps stay below lr_step_ratio, the loss collapses at ~0.25.
    The same schedule on a run that keeps learning (a warm-up) is no finding."""
    s = synth()
    for step in range(100):
        rate = 0.01 + 0.004 * step  # 0.01 -> 0.4
        lo = 1.0 * 0.98**step
        if breaks and step > 60:
            lo = 3.0 + 0.1 * rng.random()
        s.scalars(
            step,
            lr=rate,
            loss=lo,
            grad_norm=1.0 + 0.1 * rng.random(),
            **{"weight_norm/fc1.weight": 10.0, "update_norm/fc1.weight": 0.05},
        )
    found = [f for f in diagnose(s.run()) if f.code == "learning-rate-too-high"]
    if not breaks:
        assert found == []
        return
    (f,) = found
    assert f.first_step in range(55, 62) and f.evidence["lr_rise"]["to"] >= 10 * f.evidence["lr_rise"]["from"]
    assert "the schedule had raised the learning rate" in f.message
    assert f.advice[0].startswith("Lower the learning rate peak of the schedule")


def test_an_early_spike_cannot_hide_in_the_baseline(synth):
    s = synth()
    for step in range(30):
        s.scalars(step, grad_norm=300.0 if step == 1 else 1.0, loss=2.0 if step <= 1 else 8.0)
    f = by_code(diagnose(s.run()), "exploding-gradients")
    assert f.severity == "warning" and f.first_step == 1
    assert f.evidence["global"]["baseline_norm"] == 1.0 and "the loss rose 4x" in f.message


# ---- loss-not-decreasing ---------------------------------------------------------------------------------------------
def test_an_early_loss_spike_does_not_make_a_flat_run_look_decreasing(synth):
    s = synth()
    for step, v in enumerate([2.3, 9.0, 8.0] + [2.4] * 27):
        s.scalars(step, loss=v)
    f = by_code(diagnose(s.run()), "loss-not-decreasing")
    assert f.severity == "warning" and f.evidence["start_spikes_left_out"] == 2
    assert f.evidence["loss_start"] == 2.4


def test_a_flat_loss_at_chance_with_healthy_signals_is_info(synth, rng):
    s = synth()
    tensors = ("fc1.weight", "fc2.weight")
    for step in range(40):
        signals(
            s,
            step,
            w=1.0,
            u=1e-3 * (1 + 0.1 * rng.random()),
            g=0.1 * (1 + 0.3 * rng.random()),
            loss=math.log(64) * (1 + 0.002 * rng.normal()),
            tensors=tensors,
        )
    (f,) = diagnose(s.run())
    assert f.code == "loss-not-decreasing" and f.severity == "info" and f.evidence["chance_classes"] == 64
    assert "ln 64" in f.message and "healthy" in f.message


def test_a_noisy_loss_at_its_floor_a_little_higher_at_the_end_is_not_a_rise(synth, rng):
    """A fine-tuned model at a loss of ~0.05: minibatch losses spread over tens of percent, and an end median 10 %
    above the start median is noise, not a rise (it was a warning)."""
    s = synth()
    for step in range(200):
        level = 0.05 if step < 100 else 0.055  # a drift well inside the noise
        signals(s, step, w=1.0, u=1e-3 * (1 + 0.1 * rng.random()), g=0.1, loss=level * rng.lognormal(0, 0.5))
    (f,) = diagnose(s.run())
    assert f.code == "loss-not-decreasing" and f.severity == "info"
    assert f.evidence["relative_decrease"] < -0.01  # risen by more than the 1 % band: noise decides, not the band


def test_a_loss_that_rises_out_of_its_noise_is_still_a_warning(synth, rng):
    s = synth()
    for step in range(200):
        level = 0.05 * (1 + step / 50)  # x5 over the run, beyond any noise of the start window
        signals(s, step, w=1.0, u=1e-3 * (1 + 0.1 * rng.random()), g=0.1, loss=level * rng.lognormal(0, 0.2))
    f = by_code(diagnose(s.run()), "loss-not-decreasing")
    assert f.severity == "warning"


def test_a_loss_at_its_floor_after_falling_is_fine(synth, rng):
    s = synth()
    for step in range(60):
        s.scalars(step, loss=max(0.25, 2.0 * 0.8**step) * (1 + 0.02 * rng.normal()))
    assert diagnose(s.run()) == []


# ---- NaN at the end of a divergence ---------------------------------------------------------------------------------
def test_a_nan_after_the_weights_grew_is_not_blamed_on_the_loss_formula(synth):
    s = synth()
    for step in range(12):
        w = 1.0 * 3.0 ** max(0, step - 2)
        signals(s, step, w=w, u=0.8 * w if step >= 2 else 1e-3, g=w, loss=w * w)
    s.scalars(12, loss=float("inf"))
    found = diagnose(s.run())
    nan = by_code(found, "non-finite")
    assert nan.evidence["explained_as"] == "loss-overflow" and "log(0)" not in nan.explanation
    assert not nan.is_root and found[0].code == "learning-rate-too-high"


def test_a_nan_after_slow_ordinary_weight_growth_is_still_the_loss_formula(synth, rng):
    """Weights that grow 4x over 80 healthy steps (learning) are no blow-up: a NaN loss then is the formula's."""
    s = synth()
    for step in range(80):
        w = 1.0 * 4.0 ** (step / 79)  # about 1.8% per step: under 1.1x in any 5 steps
        signals(s, step, w=w, u=2e-3 * w, g=0.1 * (1 + 0.1 * rng.random()), loss=2.0 * 0.99**step)
    s.scalars(80, loss=float("nan"))
    nan = by_code(diagnose(s.run()), "non-finite")
    assert nan.evidence["explained_as"] == "loss-unlocated", nan.explanation  # no outputs recorded at step 80
    assert nan.advice[0].startswith("Compute the loss from logits")  # the formula first, not the learning rate


def test_thresholds_of_the_new_rules_are_validated():
    with pytest.raises(Exception, match="init_chain"):
        Thresholds(init_chain=0)
    assert Thresholds.coerce({"lr_step_ratio": 0.3}).lr_step_ratio == 0.3
