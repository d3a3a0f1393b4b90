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
    # The 2-process tests share one module fixture: keep them on one worker (pytest-xdist).
    pytest.mark.xdist_group("lightning"),
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


def test_multi_process_strategies_other_than_ddp_and_fsdp_are_refused(tmp_path):
    class FakeTrainer:
        world_size = 2
        strategy = object()  # e.g. DeepSpeed: neither DDP nor FSDP

    cb = GradsightLightningCallback(on_finding=None)
    with pytest.raises(gradsight.UnsupportedError, match=r"through Lightning's DDPStrategy .*world_size=2"):
        cb.setup(FakeTrainer(), TinyModule(), "fit")


DDP_SCRIPT = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import torch
import lightning.pytorch as L
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightning.pytorch.strategies import ModelParallelStrategy
from gradsight.integrations import GradsightLightningCallback


class TinyModule(L.LightningModule):
    def __init__(self, lr):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.lr = lr

    def configure_model(self):
        if isinstance(self.trainer.strategy, ModelParallelStrategy):  # the module shards itself (FSDP2)
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(out, name, strategy, lr, max_steps, every, clip=None):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)
    cb = GradsightLightningCallback(
        path=f"{out}/{name}.db", every=every, preset="full", on_finding=None, stop_on=("non-finite",)
    )
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=2, max_steps=max_steps, callbacks=[cb], default_root_dir=out,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, gradient_clip_val=clip,
    )
    trainer.fit(TinyModule(lr), data)
    rank = trainer.global_rank
    info = {"rank": rank, "path": None if cb.path is None else str(cb.path), "global_step": trainer.global_step,
            "watch": cb.watch is None, "findings": [f.code for f in cb.findings]}
    with open(f"{out}/{name}.rank{rank}.json", "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    for run in json.loads(sys.argv[2]):  # every fit in the same 2 processes (one launch: CI's 2 cores are slow)
        fit(sys.argv[1], **run)
    # leave the process group before exit: otherwise gloo's worker threads can abort the interpreter's teardown
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
"""


#: The 2-process fits, run one after the other in the same 2 processes: name -> settings.
FITS = {
    "merge": {"strategy": "ddp", "lr": 0.05, "max_steps": 6, "every": 2},
    "stop": {"strategy": "ddp", "lr": 1e6, "max_steps": 40, "every": 1},
    "fsdp2": {"strategy": "fsdp2", "lr": 0.05, "max_steps": 4, "every": 2, "clip": 0.01},
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run DDP_SCRIPT (Lightning's "ddp" launcher, 2 CPU ranks, gloo on loopback) with a hard timeout."""
    import contextlib
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("lightning_2p")
    script = out / "train_ddp.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:  # a free loopback port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore"}
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    runs = json.dumps([{"name": k, **v} for k, v in FITS.items()])
    # Lightning's "ddp" launcher re-runs the script for rank 1; its own session lets a timeout kill both ranks.
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), runs],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the 2-process fits did not finish within 90 s:\n{log.decode()[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # rank 1 is in the same session: never leave it behind
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log.decode()[-4000:]
    missing = [(n, r) for n in FITS for r in (0, 1) if not (out / f"{n}.rank{r}.json").exists()]
    assert not missing, f"(fit, rank) {missing} did not finish:\n{log.decode()[-4000:]}"
    return out


def _ranks(out, name):
    import json

    return out / f"{name}.db", {r: json.loads((out / f"{name}.rank{r}.json").read_text()) for r in (0, 1)}


def test_ddp_two_cpu_processes_merge_outputs_into_one_run_file(two_ranks):
    run_path, ranks = _ranks(two_ranks, "merge")
    assert ranks[0]["path"] == str(run_path)
    assert ranks[1]["path"] is None  # rank 1 writes nothing
    assert all(info["global_step"] == 6 and info["watch"] for info in ranks.values())
    assert sorted(p.name for p in two_ranks.glob("*.db*") if not p.name.endswith(("-wal", "-shm"))) == [
        f"{name}.db" for name in sorted(FITS)
    ]
    with gradsight.load(run_path) as run:
        assert run.meta["distributed"]["world_size"] == 2
        assert run.steps == [0, 2, 4]
        assert {"net.0", "net.2"} <= set(run.layers)  # the module's own names, no wrapper prefix
        for step in run.steps:
            # 2 ranks x 4 samples per rank x 8 features: merged over the global batch
            assert run.summary("net.0", "output", step).count == 2 * 4 * 8
            assert run.summary("net.0.weight", "grad", step).count == 8 * 4  # replicated: recorded once
        assert run.meta["distributed"]["replicas_identical"]["verified"] is True
        assert len(run.scalars["loss"]) == 6


def test_fsdp2_model_parallel_strategy_two_cpu_processes_merge_shards_into_one_run_file(two_ranks):
    run_path, ranks = _ranks(two_ranks, "fsdp2")
    assert ranks[0]["path"] == str(run_path) and ranks[1]["path"] is None
    assert all(info["global_step"] == 4 and info["watch"] for info in ranks.values())
    with gradsight.load(run_path) as run:
        meta = run.meta["distributed"]
        assert meta["wrapper"] == "fully_shard (FSDP2)" and meta["world_size"] == 2
        assert run.steps == [0, 2]
        for step in run.steps:
            assert run.summary("net.0", "output", step).count == 2 * 4 * 8  # merged over the global batch
            assert run.summary("net.0.weight", "grad", step).count == 8 * 4  # 2 shards of 4 x 4, merged
            assert run.summary("net.2.bias", "weight", step).count == 1  # 1 element: rank 1's shard is empty
        info = next(t for t in run.tensors if t.name == "net.0.weight" and t.kind == "weight")
        assert tuple(info.shape) == (8, 4)
        sc = run.scalars
        assert len(sc["loss"].dropna()) == 4 and len(sc) == 4
        # Lightning calls training_step directly, not through the module's __call__: the end of backward is
        # still seen (hooks on the FSDP modules' outputs), so the norm before gradient_clip_val is recorded
        np.testing.assert_allclose(sc["grad_norm"].to_numpy(), 0.01, rtol=1e-4)
        assert (sc["grad_norm_preclip"] > 0.1).all()
        np.testing.assert_allclose(sc["clip_ratio"].to_numpy(), 0.01 / sc["grad_norm_preclip"].to_numpy(), rtol=1e-4)


def test_refuses_an_explicit_optimizer():
    with pytest.raises(gradsight.InputError, match="takes the model and optimizer from the Trainer"):
        GradsightLightningCallback(optimizer=object())


def test_diagnosis_arguments_are_checked_when_the_callback_is_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(gradsight.InputError, match=r"stop_on names unknown finding code\(s\) \['nan'\]"):
        GradsightLightningCallback(stop_on=("nan",))
    with pytest.raises(gradsight.InputError, match="on_finding must be 'warn', a callable or None, got 'print'"):
        GradsightLightningCallback(on_finding="print")
    with pytest.raises(gradsight.InputError, match="full_every must be a positive integer, got 0"):
        GradsightLightningCallback(diagnose_every=0)
    GradsightLightningCallback(diagnose=False, stop_on=("nan",))  # not checked when there is no diagnosis
    assert list(tmp_path.iterdir()) == []  # checking writes nothing


def test_ddp_stop_decision_on_rank_0_stops_every_rank(two_ranks):
    # Only rank 0 runs the diagnosis; if rank 1 did not stop too it would hang in DDP's all-reduce (timeout).
    run_path, ranks = _ranks(two_ranks, "stop")
    assert "non-finite" in ranks[0]["findings"]
    assert ranks[1]["findings"] == []  # reads happen on rank 0 only
    assert ranks[0]["global_step"] == ranks[1]["global_step"] < 40
    with gradsight.load(run_path) as run:
        assert any(e["code"] == "non-finite" for e in run.events("finding"))


class _PreClipNorms(L.Callback):
    """The gradient norm Lightning has before it clips (on_before_optimizer_step runs before clipping)."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in pl_module.parameters())))


def test_gradient_clip_val_records_the_norm_before_and_after_clipping(tmp_path):
    torch.manual_seed(0)
    cb = GradsightLightningCallback(on_finding=None)
    ref = _PreClipNorms()
    _trainer(tmp_path, [cb, ref], gradient_clip_val=0.01).fit(TinyModule(), _data())
    with gradsight.load(cb.path) as run:
        sc = run.scalars
        assert list(sc.index) == list(range(8))
        np.testing.assert_allclose(sc["grad_norm_preclip"].to_numpy(), ref.norms, rtol=1e-5)
        assert (sc["grad_norm_preclip"] > 10 * 0.01).all()
        np.testing.assert_allclose(sc["grad_norm"].to_numpy(), 0.01, rtol=1e-4)
        assert run.meta["clipping"] == {"first_step": 0}


def test_the_hugging_face_callback_in_a_lightning_trainer_is_refused_clearly(tmp_path):
    """Regression: Lightning failed with its own AttributeError ('... has no attribute on_exception')."""
    pytest.importorskip("transformers")
    from gradsight import UnsupportedError
    from gradsight.integrations import GradsightTrainerCallback

    trainer = _trainer(tmp_path, [GradsightTrainerCallback(path=tmp_path / "r.db", on_finding=None)], max_steps=1)
    with pytest.raises(UnsupportedError, match=r"Hugging Face Trainer's callback.*use .*GradsightLightningCallback"):
        trainer.fit(TinyModule(), _data())
    assert not (tmp_path / "r.db").exists()
