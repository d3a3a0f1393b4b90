"""The runs of issue #14, built small in PyTorch, diagnosed end to end: the root cause first, the fix named.

Each trains in about a second on one CPU thread (digits from scikit-learn where a real data set is needed).
"""

import math

import numpy as np
import pytest

import gradsight
from gradsight.diagnose import RunData, Thresholds
from gradsight.diagnose._advice import lr_direction
from gradsight.diagnose._base import fmt
from gradsight.diagnose._why import why_small

pytestmark = pytest.mark.torch


def _roots(found):
    return [f for f in found if f.is_root and f.severity in ("warning", "error")]


def _by_code(found, code):
    hits = [f for f in found if f.code == code]
    assert hits, f"no {code} among {[(f.code, f.severity) for f in found]}"
    return hits[0]


def _no_contradiction(found):
    directions = {lr_direction(a) for f in found for a in f.advice}
    assert not {-1, 1} <= directions, [f.advice for f in found]


def _digits(torch, images=True):
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)
    return (x.unsqueeze(1) if images else x.reshape(len(x), -1)), torch.tensor(d.target)


def _train(torch, model, opt, path, x, y, *, steps, every=10, loss=None, zero_grad=True, batch=64, seed=0):
    loss = loss or torch.nn.functional.cross_entropy
    g = torch.Generator().manual_seed(seed)
    with gradsight.watch(model, path=path, optimizer=opt, every=every) as w:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            if zero_grad:
                opt.zero_grad()
            value = loss(model(x[idx]), y[idx])
            value.backward()
            opt.step()
            w.log(loss=value)
    return gradsight.diagnose(path)


def test_digits_cnn_sgd_lr10_the_step_is_the_root(torch, torch_seeded_one_thread, tmp_path):
    nn = torch.nn
    x, y = _digits(torch)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10),
    )  # fmt: skip
    found = _train(torch, model, torch.optim.SGD(model.parameters(), lr=10.0), tmp_path / "r.db", x, y, steps=60)
    root = found[0]
    assert root.code == "learning-rate-too-high" and root.is_root and root.first_step == 0
    assert root.evidence["update_ratio"] > 0.5 and root.evidence["lr"] == 10.0
    assert isinstance(root.evidence["anomaly_events"], list)  # the watch's captures around the step, when any
    assert root.advice[0].startswith("Lower the learning rate by about") and "from 10 to" in root.advice[0]
    dead = _by_code(found, "dead-units")
    assert not dead.is_root and "learning-rate-too-high" in dead.evidence["root_causes"]
    assert "2" not in dead.layers and "5" not in dead.layers  # the pooling and the flatten are echoes, folded in
    for f in found[1:]:
        assert not f.is_root or f.severity == "info", f.code
    _no_contradiction(found)


def test_conv_bias_minus_6_names_the_parameter(torch, torch_seeded_one_thread, tmp_path):
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 4),
    )  # fmt: skip
    with torch.no_grad():
        model[2].bias.fill_(-6.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean((1, 2)) > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    found = _train(torch, model, opt, tmp_path / "r.db", x, y, steps=30, every=5, batch=32)
    root = found[0]
    assert root.code == "bad-initialisation" and root.layers[:2] == ("2", "3")
    assert "the bias of '2' has mean -6 (std 0)" in root.message
    assert "100% of the units of '3' are ≤ 0 (dead) from step 0" in root.message
    assert root.evidence["layers"]["3"]["tensor"] == "2.bias"
    assert any("bias of '2' at 0" in a for a in root.advice)
    dead = _by_code(found, "dead-units")
    assert dead.layers == ("3",) and dead.caused_by == ("bad-initialisation",)
    assert dead.evidence["echoes"] == {"4": "3", "5": "3"}
    # the zero gradients upstream are explained factor by factor
    nog = _by_code(found, "no-gradient")
    assert {k: v["verdict"] for k, v in nog.evidence["why"].items()} == {
        "0": "incoming",  # dJ/dA at the first ReLU is exactly 0: the gradient stops at '3'
        "2": "local_derivative",  # S of its ReLU '3' is 0 everywhere
        "6": "input",  # its input, the flattened dead units, is all zeros
    }
    assert nog.evidence["why"]["0"]["incoming"]["stops_at"] == "3"


@pytest.mark.parametrize("seed", range(4))
def test_an_lstm_that_learns_has_no_warning(torch, torch_seeded_one_thread, tmp_path, seed):
    nn = torch.nn
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(1, 16, batch_first=True)
            self.head = nn.Linear(16, 1)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1]).squeeze(-1)

    model = Net()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 10, 1, generator=g)
    y = (x[:, 0, 0] > 0).float()
    found = _train(
        torch, model, torch.optim.Adam(model.parameters(), lr=1e-2), tmp_path / "r.db", x, y, steps=200,
        batch=32, loss=nn.functional.binary_cross_entropy_with_logits, seed=seed,
    )  # fmt: skip
    assert not [f for f in found if f.severity != "info"], [f.message for f in found]


def _mlp(torch):
    nn = torch.nn
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_missing_zero_grad(torch, torch_seeded_one_thread, tmp_path, optimizer):
    x, y = _digits(torch, images=False)
    model = _mlp(torch)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    found = _train(torch, model, opt, tmp_path / "r.db", x, y, steps=80, zero_grad=False)
    assert found[0].code == "gradients-accumulating" and found[0].is_root
    assert any("zero_grad()" in a for a in found[0].advice)
    _no_contradiction(found)


def test_frozen_by_mistake_and_detached(torch, torch_seeded_one_thread, tmp_path):
    x, y = _digits(torch, images=False)
    model = _mlp(torch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model[0].requires_grad_(False)
    root = _train(torch, model, opt, tmp_path / "a.db", x, y, steps=40)[0]
    assert root.code == "no-gradient" and root.layers == ("0",)
    assert root.evidence["absent"] == ["0.weight", "0.bias"]

    nn = torch.nn

    class TwoBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Linear(64, 32)
            self.aux_fc = nn.Linear(64, 32)
            self.out = nn.Linear(64, 10)

        def forward(self, x):
            return self.out(torch.cat([torch.relu(self.main(x)), torch.relu(self.aux_fc(x)).detach()], 1))

    model = TwoBranch()
    root = _train(torch, model, torch.optim.Adam(model.parameters(), lr=1e-3), tmp_path / "b.db", x, y, steps=40)[0]
    assert root.code == "no-gradient" and root.layers == ("aux_fc",)


def test_a_layer_missing_from_the_optimizer(torch, torch_seeded_one_thread, tmp_path):
    x, y = _digits(torch, images=False)
    model = _mlp(torch)
    opt = torch.optim.SGD([*model[2].parameters(), *model[4].parameters()], lr=0.05, momentum=0.9)
    found = _train(torch, model, opt, tmp_path / "r.db", x, y, steps=60)
    root = found[0]
    assert root.code == "not-optimized" and root.layers == ("0",)
    assert set(root.evidence["not_held"]) == {"0.weight", "0.bias"}
    assert "gradients-accumulating" not in [f.code for f in found]  # its never-zeroed .grad is not the loop's fault


def test_a_nan_at_the_end_of_a_divergence_is_not_blamed_on_the_loss(torch, torch_seeded_one_thread, tmp_path):
    nn = torch.nn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g) * 3
    y = x @ torch.randn(16, 1, generator=g)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 1))
    found = _train(
        torch, model, torch.optim.SGD(model.parameters(), lr=0.05), tmp_path / "r.db", x, y, steps=40,
        loss=nn.functional.mse_loss,
    )  # fmt: skip
    assert found[0].code == "learning-rate-too-high", [(f.code, f.caused_by) for f in found]
    nan = _by_code(found, "non-finite")
    assert not nan.is_root and "log(0)" not in nan.explanation
    _no_contradiction(found)


def test_a_transformer_on_random_tokens_sits_at_log_v_without_a_warning(torch, torch_seeded_one_thread, tmp_path):
    nn = torch.nn
    vocab, length = 64, 16

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, 32)
            self.enc = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False
            )
            self.head = nn.Linear(32, vocab)
            nn.init.zeros_(self.head.weight)  # uniform predictions from step 0: the loss starts at ln V
            nn.init.zeros_(self.head.bias)

        def forward(self, x):
            return self.head(self.enc(self.emb(x)))

    model = Tiny()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (4096, length), generator=g)
    y = torch.randint(0, vocab, (4096, length), generator=g)

    def loss(out, target):
        return nn.functional.cross_entropy(out.reshape(-1, vocab), target.reshape(-1))

    found = _train(
        torch, model, torch.optim.Adam(model.parameters(), lr=1e-3), tmp_path / "r.db", x, y, steps=60, every=5,
        batch=16, loss=loss,
    )  # fmt: skip
    assert not [f for f in found if f.severity != "info"], [(f.code, f.message) for f in found]
    flat = [f for f in found if f.code == "loss-not-decreasing"]
    if flat:  # info at most, naming chance level
        assert flat[0].evidence.get("chance_classes") == vocab
    assert gradsight.load(tmp_path / "r.db").scalars["loss"].iloc[0] == pytest.approx(math.log(vocab), rel=1e-3)


def _softmax_mlp(torch, end):
    nn = torch.nn
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), *end)


@pytest.mark.parametrize("lr", [1e-3, 1e-4], ids=["learning", "crawling"])
def test_a_softmax_fed_to_cross_entropy_is_named_with_the_floor_it_cannot_pass(
    torch, torch_seeded_one_thread, tmp_path, lr
):
    x, y = _digits(torch, images=False)
    model = _softmax_mlp(torch, [torch.nn.Softmax(dim=-1)])
    found = _train(torch, model, torch.optim.Adam(model.parameters(), lr=lr), tmp_path / "r.db", x, y, steps=150)
    root = found[0]
    assert root.code == "double-softmax" and root.is_root and root.severity == "warning", [f.code for f in found]
    assert root.layers == ("3",) and root.evidence["classes"] == 10
    floor = math.log(1 + 9 / math.e)  # the cross-entropy of softmax(p) for p a one-hot probability vector
    assert root.evidence["loss_floor"] == pytest.approx(floor) and root.evidence["loss_min"] >= floor
    assert root.evidence["output_grad_sums_to_zero"] is True
    assert "Remove the final softmax '3'" in root.advice[0]
    assert all(not f.is_root or f.severity == "info" for f in found[1:]), [(f.code, f.is_root) for f in found]


def test_without_output_gradients_a_probability_loss_in_the_band_is_not_called_double_softmax(
    torch, torch_seeded_one_thread, tmp_path
):
    """Regression: with no output gradient recorded (Keras' cross-entropy on a softmax output never has one, or
    kinds= without output_grad), a healthy NLL of log p that had covered half its way to 1.46 was called it."""
    f = torch.nn.functional
    x, y = _digits(torch, images=False)
    model = _softmax_mlp(torch, [torch.nn.Softmax(dim=-1)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with gradsight.watch(
        model, path=tmp_path / "r.db", optimizer=opt, every=10, kinds=("weight", "grad", "output")
    ) as w:
        for _ in range(60):
            idx = torch.randint(0, len(x), (64,), generator=g)
            opt.zero_grad()
            value = f.nll_loss(torch.log(model(x[idx])), y[idx])
            value.backward()
            opt.step()
            w.log(loss=value)
    values = gradsight.load(tmp_path / "r.db").scalars["loss"].to_numpy()
    assert values.min() > math.log(1 + 9 / math.e)  # every value in the band: the case in question
    assert "double-softmax" not in [g.code for g in gradsight.diagnose(tmp_path / "r.db")]


@pytest.mark.parametrize("variant", ["nll-of-log", "log-softmax-nll", "mse", "nll-of-log-short"])
def test_a_softmax_output_trained_with_a_loss_made_for_probabilities_is_not_double_softmax(
    torch, torch_seeded_one_thread, tmp_path, variant
):
    """Only a loss that applies softmax again is named, even while a right loss still lies in the band (short run).

    The short run's loss has covered most of its way down to the band's floor without crossing it: only its output
    gradient, with every entry <= 0 instead of summing to zero, tells it from a second softmax.
    """
    f = torch.nn.functional
    x, y = _digits(torch, images=False)
    end = [torch.nn.LogSoftmax(dim=-1)] if variant == "log-softmax-nll" else [torch.nn.Softmax(dim=-1)]
    losses = {
        "nll-of-log": lambda p, t: f.nll_loss(torch.log(p), t),
        "log-softmax-nll": f.nll_loss,
        "mse": lambda p, t: f.mse_loss(p, f.one_hot(t, 10).float()),
        "nll-of-log-short": lambda p, t: f.nll_loss(torch.log(p), t),
    }
    steps = 60 if variant.endswith("short") else 150
    model = _softmax_mlp(torch, end)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    found = _train(torch, model, opt, tmp_path / "r.db", x, y, steps=steps, loss=losses[variant])
    assert "double-softmax" not in [g.code for g in found]
    if variant.endswith("short"):  # the case the output-gradient test is for: every loss value inside the band
        values = gradsight.load(tmp_path / "r.db").scalars["loss"].to_numpy()
        floor = math.log(1 + 9 / math.e)
        assert values.min() > floor and values.max() < math.log(math.e + 9)
        assert np.median(values[-16:]) - floor < 0.5 * (np.median(values[:16]) - floor)


class _SoftmaxInForward:
    """A digits MLP whose forward() returns F.softmax of its last layer's scores (no Softmax module)."""

    def __new__(cls, torch):
        nn = torch.nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.hidden, self.scores = nn.Linear(64, 64), nn.Linear(64, 10)

            def forward(self, x):
                return nn.functional.softmax(self.scores(torch.relu(self.hidden(x))), dim=1)

        return Net()


@pytest.mark.parametrize("lr", [1e-2, 3e-3])
def test_a_softmax_applied_in_forward_before_cross_entropy_is_named_from_its_weak_gradient(
    torch, torch_seeded_one_thread, tmp_path, lr
):
    """No layer says "softmax": the last layer gives scores, and F.softmax in forward() turns them into
    probabilities that F.cross_entropy softmaxes again. Its loss lies in the band, and the gradient reaching the
    scores is about 10x weaker than a cross-entropy on them gives at the same loss."""
    x, y = _digits(torch, images=False)
    model = _SoftmaxInForward(torch)
    found = _train(torch, model, torch.optim.Adam(model.parameters(), lr=lr), tmp_path / "r.db", x, y, steps=300)
    root = found[0]
    assert root.code == "double-softmax" and root.is_root and root.severity == "warning", [f.code for f in found]
    assert root.layers == ("scores",) and root.evidence["classes"] == 10
    assert root.evidence["softmax_applied_in_code"] is True
    # a cross-entropy on the scores starts at q = sqrt(C / (C - 1)) = 1.054; through a second softmax at
    # 1 / sqrt(C (C - 1)) = 0.105 (both at a uniform prediction)
    assert root.evidence["gradient_ratio_first"] == pytest.approx(1 / math.sqrt(90), rel=0.1)
    assert root.evidence["gradient_ratio_max"] <= 0.35
    assert root.evidence["loss_min"] >= math.log(1 + 9 / math.e)
    assert "Remove the softmax applied to 'scores'" in root.advice[0] and "forward()" in root.advice[0]
    q0 = root.evidence["gradient_ratio_first"]
    assert f"here q was {fmt(q0)} at the first logged step" in root.explanation and "{" not in root.explanation
    assert all(not f.is_root or f.severity == "info" for f in found[1:]), [(f.code, f.is_root) for f in found]


@pytest.mark.parametrize("boost", [0.3, 1.5, 2.2], ids=["near-uniform", "spread", "peaked"])
def test_cross_entropy_on_soft_targets_is_not_double_softmax(torch, torch_seeded_one_thread, tmp_path, boost):
    """Soft targets (probabilities as labels) also give a weak gradient once the model matches them, and their
    loss sits at the targets' entropy, inside the band: a near-uniform target starts weak but stays in the band's
    upper half; a peaked one starts at a full-strength gradient."""
    f = torch.nn.functional
    x, y = _digits(torch, images=False)
    g = torch.Generator().manual_seed(1)
    soft = torch.softmax(0.5 * torch.randn(len(y), 10, generator=g) + boost * f.one_hot(y, 10), dim=1)
    index = torch.arange(len(y))
    model = _softmax_mlp(torch, [])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss(out, i):
        return f.cross_entropy(out, soft[i])

    found = _train(torch, model, opt, tmp_path / "r.db", x, index, steps=300, loss=loss)
    values = gradsight.load(tmp_path / "r.db").scalars["loss"].to_numpy()
    floor, ceiling = math.log(1 + 9 / math.e), math.log(math.e + 9)
    assert np.mean((values > floor) & (values < ceiling)) > 0.9  # (mostly) the band: the case in question
    assert "double-softmax" not in [h.code for h in found], [(h.code, h.message) for h in found]


def test_nll_loss_fed_raw_scores_is_an_unbounded_loss(torch, torch_seeded_one_thread, tmp_path):
    x, y = _digits(torch, images=False)
    model = _softmax_mlp(torch, [])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    found = _train(torch, model, opt, tmp_path / "r.db", x, y, steps=200, loss=torch.nn.functional.nll_loss)
    root = found[0]
    assert root.code == "loss-unbounded" and root.is_root and root.severity in ("warning", "error"), [
        f.code for f in found
    ]
    medians = root.evidence["window_medians"]
    assert medians[0] > medians[1] > medians[2] and root.evidence["loss_end"] < -10
    assert "log_softmax" in root.advice[0]
    assert all(f.is_root is False or f is root or f.severity == "info" for f in found)


def test_a_loss_with_a_floor_below_zero_is_not_unbounded(torch, torch_seeded_one_thread, tmp_path):
    """A Gaussian negative log-likelihood with a learned variance settles a few units below zero."""
    nn = torch.nn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.01 * torch.randn(2048, 1, generator=g)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))

    def gaussian_nll(out, target):
        return nn.functional.gaussian_nll_loss(out[:, :1], target, out[:, 1:].exp(), eps=1e-4)

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    found = _train(torch, model, opt, tmp_path / "r.db", x, y, steps=300, loss=gaussian_nll)
    values = gradsight.load(tmp_path / "r.db").scalars["loss"].to_numpy()
    assert values[-30:].mean() < -1  # the case in question: a loss that settled below zero
    assert "loss-unbounded" not in [f.code for f in found], [(f.code, f.message) for f in found]


# ---- why is this gradient near zero: constructed cases ------------------------------------------------------------
def _mse_run(torch, model, path, steps=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = torch.randn(64, 2, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradsight.watch(model, path=path, optimizer=opt, every=1) as w:
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            w.log(loss=loss)
    return RunData(path)


def test_why_near_zero_names_the_dead_input_and_the_dead_relu(torch, torch_seeded_one_thread, tmp_path):
    nn = torch.nn
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].bias.fill_(-10.0)  # '1' is dead: '2' gets a zero input, '0' a zero local derivative
    data = _mse_run(torch, model, tmp_path / "r.db")
    th = Thresholds()
    upstream = why_small(data, "2", th)
    assert upstream["verdict"] == "input" and upstream["input"]["layer"] == "1"
    assert upstream["input"]["zero_fraction"] == 1.0
    assert "its input A (the output of '1') is exactly 0 in 100% of its entries" in upstream["sentence"]
    relu = why_small(data, "0", th)
    assert relu["verdict"] == "local_derivative" and relu["local_derivative"]["zero_fraction"] == 1.0
    assert "the local derivative S of its ReLU '1' is 0 for 100%" in relu["sentence"]
    assert "explain's layer 1" in relu["exact"] and "trace['S1']" in relu["exact"]


def test_why_near_zero_names_a_saturated_sigmoid(torch, torch_seeded_one_thread, tmp_path):
    nn = torch.nn
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].weight.mul_(40.0)
    data = _mse_run(torch, model, tmp_path / "r.db")
    why = why_small(data, "0", Thresholds())
    assert why["verdict"] == "local_derivative" and why["local_derivative"]["activation"] == "sigmoid"
    assert why["local_derivative"]["gain"] < 0.25
    assert "the local derivative S of its sigmoid '1' is on average" in why["sentence"]


def test_why_near_zero_names_a_gradient_vanishing_from_above(torch, torch_seeded_one_thread, tmp_path):
    nn = torch.nn
    layers = [nn.Linear(8, 16), nn.Sigmoid()]
    for _ in range(9):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(16, 2))
    data = _mse_run(torch, model, tmp_path / "r.db")
    why = why_small(data, "0", Thresholds())
    assert why["verdict"] == "incoming", why["sentence"]
    assert why["local_derivative"]["gain"] > 0.25  # the sigmoid itself is not saturated
    assert why["incoming"]["downstream"]["ratio"] < 1e-3
    found = gradsight.diagnose(data)
    vanish = _by_code(found, "vanishing-gradients")
    assert vanish.layers[0] == "0" and vanish.evidence["why"]["0"]["verdict"] == "incoming"
    assert "gradsight.explain(model, x, y, loss)" in vanish.explanation


@pytest.mark.parametrize("steps", [60, 300], ids=["early", "long"])
def test_nll_loss_fed_probabilities_is_named(torch, torch_seeded_one_thread, tmp_path, steps):
    """nn.Softmax then F.nll_loss: the loss is -mean(p_y), in [-1, 0]; the output gradient is -1/N at each label."""
    x, y = _digits(torch, images=False)
    model = _softmax_mlp(torch, [torch.nn.Softmax(dim=-1)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    found = _train(torch, model, opt, tmp_path / "r.db", x, y, steps=steps, loss=torch.nn.functional.nll_loss)
    root = found[0]
    assert root.code == "nll-on-probabilities" and root.is_root and root.severity == "warning", [
        (f.code, f.message) for f in found
    ]
    assert root.layers == ("3",) and root.evidence["classes"] == 10
    values = gradsight.load(tmp_path / "r.db").scalars["loss"].to_numpy()
    assert root.evidence["loss_min"] == pytest.approx(values.min()) and -1 <= values.min() < values.max() <= 0
    assert root.evidence["output_grad_sum"] == pytest.approx(-1.0, abs=1e-5)  # 64 labels, each -1/64
    assert "nn.LogSoftmax" in root.advice[0] and "{" not in root.message + root.explanation


@pytest.mark.parametrize("variant", ["log-softmax-nll", "nll-of-log", "mse-on-probabilities"])
def test_a_softmax_output_with_a_right_loss_is_not_nll_on_probabilities(
    torch, torch_seeded_one_thread, tmp_path, variant
):
    f = torch.nn.functional
    end = [torch.nn.LogSoftmax(dim=-1)] if variant == "log-softmax-nll" else [torch.nn.Softmax(dim=-1)]
    loss = {
        "log-softmax-nll": f.nll_loss,
        "nll-of-log": lambda p, t: f.nll_loss(torch.log(p), t),
        "mse-on-probabilities": lambda p, t: f.mse_loss(p, f.one_hot(t, 10).float()),
    }[variant]
    x, y = _digits(torch, images=False)
    model = _softmax_mlp(torch, end)
    found = _train(
        torch, model, torch.optim.Adam(model.parameters(), lr=1e-3), tmp_path / "r.db", x, y, steps=60, loss=loss
    )
    assert "nll-on-probabilities" not in [g.code for g in found]
