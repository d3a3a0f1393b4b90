"""GradsightLightningCallback on a tiny LightningModule on CPU: the user's training code is unchanged."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import gradsight  # noqa: E402
from gradsight.integrations import GradsightLightningCallback, lightning_callback  # noqa: E402

pytestmark = [
    # Lightning 2.6 itself calls torch's deprecated pytree LeafSpec under torch 2.13 (not gradsight's code).
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
    # Lightning's advice to use DataLoader workers, for a 32-sample CPU test.
    pytest.mark.filterwarnings(r"ignore:.*does not have many workers:UserWarning"),
]


class TinyModule(L.LightningModule):
    def __init__(self, lr=0.05):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.lr = lr
        self.batch_losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.batch_losses.append(loss.item() if not loss.requires_grad else loss.detach().item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data(n=32, batch=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(dim=1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _trainer(tmp_path, callbacks, **kw):
    kw.setdefault("max_epochs", 1)
    return L.Trainer(
        default_root_dir=tmp_path,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=L.loggers.CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        **kw,
    )


def test_watches_a_lightning_module_and_writes_the_run_file(tmp_path):
    torch.manual_seed(0)
    cb = GradsightLightningCallback(preset="full", on_finding=None)
    module = TinyModule()
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(module, _data())
    assert cb.watch is None  # closed at the end of fit
    with gradsight.load(cb.path) as run:
        assert run.steps == list(range(8))  # 32 samples / batch 4, one optimizer step each
        assert {"net.0", "net.2"} <= set(run.layers)
        assert {t.kind for t in run.tensors} == {"weight", "grad", "update", "output", "output_grad"}
        loss = run.scalars["loss"]
        np.testing.assert_allclose(loss.to_numpy(), module.batch_losses, rtol=1e-6)
        assert run.meta["user_config"]["integration"] == "lightning"
    # headline scalars went through Lightning's logger (CSVLogger's metrics.csv)
    import pandas as pd

    metrics = pd.read_csv(trainer.logger.experiment.metrics_file_path)
    assert "gradsight/grad_norm" in metrics.columns
    norms = metrics["gradsight/grad_norm"].dropna().to_numpy()
    with gradsight.load(cb.path) as run:
        want = [math.sqrt(sum(s.sum_sq for _, _, s in run.summaries(kind="grad", steps=(k, k)))) for k in run.steps]
    np.testing.assert_allclose(norms, want, rtol=1e-6)


def test_recorded_gradients_are_this_steps_not_the_previous_ones(tmp_path):
    # Lightning runs forward/backward inside optimizer.step(closure); the callback must make the watch see them.
    torch.manual_seed(0)
    module = TinyModule()
    reference = TinyModule()
    reference.load_state_dict(module.state_dict())
    x, y = next(iter(_data()))
    nn.functional.mse_loss(reference.net(x), y).backward()
    cb = GradsightLightningCallback(preset="full", on_finding=None, kinds=("grad", "output"))
    _trainer(tmp_path, [cb], max_steps=1).fit(module, _data())
    with gradsight.load(cb.path) as run:
        for name, p in reference.named_parameters():
            want = gradsight.summarize(p.grad.numpy())
            assert run.summary(name, "grad", 0).approx_equal(want, rtol=1e-5), name
        assert run.summary("net.0", "output", 0).count == 4 * 8


def test_gradient_accumulation_is_one_step_per_optimizer_step(tmp_path):
    torch.manual_seed(0)
    cb = lightning_callback(preset="full", on_finding=None, kinds=("grad", "weight", "update"))
    module = TinyModule()
    _trainer(tmp_path, [cb], accumulate_grad_batches=2).fit(module, _data())
    with gradsight.load(cb.path) as run:
        assert run.steps == list(range(4))  # 8 batches, 4 optimizer steps
        pairs = np.asarray(module.batch_losses).reshape(4, 2).mean(axis=1)
        np.testing.assert_allclose(run.scalars["loss"].to_numpy(), pairs, rtol=1e-6)


def test_online_diagnosis_reports_and_can_stop_training(tmp_path):
    torch.manual_seed(0)
    found = []
    cb = GradsightLightningCallback(preset="full", on_finding=found.append, stop_on=("non-finite",))
    module = TinyModule(lr=1e6)  # diverges to Inf/NaN within a few steps
    trainer = _trainer(tmp_path, [cb], max_epochs=5)
    trainer.fit(module, _data())
    assert "non-finite" in [f.code for f in found]
    assert trainer.global_step < 5 * 8  # stopped early
    with gradsight.load(cb.path) as run:
        assert any(e["code"] == "non-finite" for e in run.events("finding"))


def test_ddp_is_refused_until_summaries_are_aggregated_across_ranks(tmp_path):
    class FakeTrainer:
        world_size = 2
        strategy = object()

    cb = GradsightLightningCallback(on_finding=None)
    with pytest.raises(gradsight.UnsupportedError, match=r"does not support data-parallel training yet.*world_size=2"):
        cb.setup(FakeTrainer(), TinyModule(), "fit")


def test_refuses_an_explicit_optimizer():
    with pytest.raises(gradsight.InputError, match="takes the model and optimizer from the Trainer"):
        GradsightLightningCallback(optimizer=object())
