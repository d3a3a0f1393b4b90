"""explain on models and losses that were explained wrong or refused wrongly; references are torch's autograd."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import gradsight  # noqa: E402


def _value(term) -> np.ndarray:
    """A term's closed form, or where it has none (autodiff only) the framework's value."""
    return np.asarray(term.value if term.value is not None else term.autodiff, dtype=np.float64)


def _grads(model: nn.Module, loss_fn, x, y) -> tuple[float, dict[str, np.ndarray]]:
    model.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().double().numpy().copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("training", [None, True])
def test_a_batchnorm_in_training_mode_inside_a_sequential_is_explained_with_batch_statistics(training):
    """Regression: the chain explainer ran such a model in eval mode (running statistics) and marked every term
    verified, while the model as given (and training=True) uses batch statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    kw = {} if training is None else {"training": training}
    trace = gradsight.explain(model, x, y, nn.MSELoss(), **kw)
    running = model[1].running_mean.clone()
    loss, grads = _grads(model, nn.MSELoss(), x, y)
    assert trace.ok and float(_value(trace["J"])) == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(_value(trace["dJ/dW[0]"]), grads["0.weight"], rtol=1e-9, atol=1e-12)
    assert any("BatchNorm in training mode" in n for n in trace.notes)
    assert not torch.equal(running, model[1].running_mean)  # (our own forward above moved them; explain did not)


def test_an_embedding_that_scales_gradients_by_frequency_has_no_closed_form():
    """Regression: scale_grad_by_freq was given the plain embedding rule, and the closed form failed (✗)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(12, 2)).double()
    ids, y = torch.tensor([[1, 1, 2], [3, 1, 4]]), torch.randn(2, 2, dtype=torch.float64)
    trace = gradsight.explain(model, ids, y, nn.MSELoss())
    _, grads = _grads(model, nn.MSELoss(), ids, y)
    assert trace.ok
    np.testing.assert_allclose(_value(trace["dJ/dW[0]"]), grads["0.weight"], rtol=1e-9, atol=1e-12)


def test_the_padding_row_of_an_embedding_is_left_out_of_the_finite_differences():
    """Regression: the finite-difference check perturbed the padding_idx row, whose gradient torch sets to zero
    by convention, and failed a correct derivation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.Flatten(), nn.Linear(12, 2)).double()
    ids, y = torch.tensor([[0, 1, 2], [3, 0, 4]]), torch.randn(2, 2, dtype=torch.float64)
    trace = gradsight.explain(model, ids, y, nn.MSELoss(), finite_differences=True)
    term = trace["dJ/dW[0]"]
    assert trace.ok and term.fd is not None and term.fd.ok
    assert all(e // 4 != 0 for e in term.fd.entries) and "padding_idx" in term.note


def test_a_bfloat16_model_takes_a_bfloat16_batch():
    """Regression: bfloat16 x and y raised numpy's TypeError (no bfloat16 in numpy)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).bfloat16()
    x, y = torch.randn(6, 4).bfloat16(), torch.randn(6, 3).bfloat16()
    from_bf16 = gradsight.explain(model, x, y, nn.MSELoss())
    from_f32 = gradsight.explain(model, x.float(), y.float(), nn.MSELoss())
    assert from_bf16.ok and float(_value(from_bf16["J"])) == float(_value(from_f32["J"]))


def test_k_dimensional_cross_entropy_and_batchmean_kl_divergence_are_explained_by_autodiff():
    """Regression: (N, C, L) logits with (N, L) targets were refused as a wrong y, and KLDivLoss(reduction=
    'batchmean') as a reduction torch does not accept; both are valid torch and now run without a closed form."""
    torch.manual_seed(0)
    model = nn.Conv1d(2, 3, 1).double()  # (N, 2, L) -> (N, 3, L) logits
    x, y = torch.randn(2, 2, 5, dtype=torch.float64), torch.randint(0, 3, (2, 5))
    trace = gradsight.explain(model, x, y, nn.CrossEntropyLoss())
    loss, grads = _grads(model, nn.CrossEntropyLoss(), x, y)
    assert trace.ok and float(_value(trace["J"])) == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(_value(trace["dJ/dW1"]), grads["weight"], rtol=1e-9, atol=1e-12)
    kl = nn.KLDivLoss(reduction="batchmean")
    model = nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.softmax(torch.randn(6, 3, dtype=torch.float64), 1)
    trace = gradsight.explain(model, x, y, kl)
    loss, grads = _grads(model, kl, x, y)
    assert trace.ok and float(_value(trace["J"])) == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(_value(trace["dJ/dW1"]), grads["0.weight"], rtol=1e-9, atol=1e-12)


def test_bce_on_a_saturated_output_matches_torchs_clamp():
    """Regression: the closed form divided by max(Ŷ(1−Ŷ), 1e-12) in float64; torch's constant is a C++ float
    (9.99999996e-13), so at an output that rounds to 1 the two differed by 4e-9 and the term failed (✗)."""
    model = nn.Sequential(nn.Linear(2, 1), nn.Sigmoid()).double()
    with torch.no_grad():
        model[0].weight.fill_(40.0)
        model[0].bias.zero_()
    x = torch.tensor([[1.0, 1.0], [-0.1, 0.2], [0.3, -0.2]], dtype=torch.float64)
    y = torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64)
    assert float(model(x)[0].detach()) == 1.0  # saturated
    trace = gradsight.explain(model, x, y, nn.BCELoss())
    _, grads = _grads(model, nn.BCELoss(), x, y)
    assert trace.ok and trace["dJ/dY_hat"].ok
    np.testing.assert_allclose(_value(trace["dJ/dW1"]), grads["0.weight"], rtol=1e-9)


def test_a_hugging_face_gpt2_fed_token_ids_is_explained_and_its_cache_setting_restored():
    """Regression: torch.export's input guard was taken for the first op reading the ids (refused as a wrong
    dtype); then the key/value cache's concatenations, exported as constants, cut the keys' and values'
    gradients (every term upstream of the attention failed)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, n_positions=8)
    gpt = transformers.GPT2LMHeadModel(cfg).double().eval()

    class LastToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = gpt

        def forward(self, ids):
            return self.m(input_ids=ids).logits[:, -1]

    model = LastToken()
    ids, y = torch.randint(0, 20, (2, 6)), torch.tensor([3, 5])
    trace = gradsight.explain(model, ids, y, nn.CrossEntropyLoss())
    loss, grads = _grads(model, nn.CrossEntropyLoss(), ids, y)
    assert trace.ok and float(_value(trace["J"])) == pytest.approx(loss, rel=1e-12)
    assert any("key/value cache" in n for n in trace.notes) and gpt.config.use_cache is True
    np.testing.assert_allclose(
        _value(trace["dJ/dW[m.transformer.h.0.attn.c_attn]"]), grads["m.transformer.h.0.attn.c_attn.weight"], atol=1e-12
    )
