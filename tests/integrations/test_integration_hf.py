"""GradsightTrainerCallback on a tiny transformers model built from a config (nothing is downloaded)."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import gradsight  # noqa: E402
from gradsight.integrations import GradsightTrainerCallback, hf_callback  # noqa: E402

# The 2-process tests share one module fixture: keep them on one worker (pytest-xdist).
pytestmark = pytest.mark.xdist_group("hf")


def _model():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=16, length=6):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 32, (n, length), generator=g)
        self.labels = (self.ids[:, 0] > 16).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _args(tmp_path, **kw):
    kw.setdefault("max_steps", 4)
    return transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **kw,
    )


def test_watches_the_trainer_model_and_logs_headline_scalars(tmp_path):
    cb = GradsightTrainerCallback(preset="full", on_finding=None)
    trainer = transformers.Trainer(model=_model(), args=_args(tmp_path), train_dataset=_Data(), callbacks=[cb])
    trainer.train()
    assert cb.watch is None
    history = [h for h in trainer.state.log_history if "loss" in h]
    with gradsight.load(cb.path) as run:
        assert run.steps == [0, 1, 2, 3]
        assert run.meta["user_config"]["integration"] == "transformers"
        kinds = {t.kind for t in run.tensors}
        assert kinds == {"weight", "grad", "update", "output", "output_grad"}
        np.testing.assert_allclose(run.scalars["loss"].to_numpy(), [h["loss"] for h in history], rtol=1e-6)
        norms = [
            float(np.sqrt(sum(s.sum_sq for _, _, s in run.summaries(kind="grad", steps=(k, k))))) for k in run.steps
        ]
    np.testing.assert_allclose([h["gradsight/grad_norm"] for h in history], norms, rtol=1e-6)
    # Our gradient norm is the one the Trainer clipped against (its grad_norm, before clipping).
    np.testing.assert_allclose([h["grad_norm"] for h in history], norms, rtol=1e-4)


def test_gradient_accumulation_is_one_step_per_optimizer_step(tmp_path):
    cb = hf_callback(preset="full", on_finding=None, kinds=("grad", "update"))
    args = _args(tmp_path, max_steps=2, gradient_accumulation_steps=2)
    transformers.Trainer(model=_model(), args=args, train_dataset=_Data(), callbacks=[cb]).train()
    with gradsight.load(cb.path) as run:
        assert run.steps == [0, 1]
        assert run.meta["user_config"]["gradient_accumulation_steps"] == 2


def test_online_diagnosis_stops_training_on_non_finite_gradients(tmp_path):
    found = []
    cb = GradsightTrainerCallback(preset="full", on_finding=found.append, stop_on=("non-finite",))
    model = _model()
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, max_steps=20), train_dataset=_Data(64), callbacks=[cb]
    )
    trainer.train()
    assert [f.code for f in found][:1] == ["non-finite"]
    assert trainer.state.global_step < 20
    with gradsight.load(cb.path) as run:
        assert any(e["code"] == "non-finite" for e in run.events("finding"))


def test_multi_process_without_a_process_group_is_refused(tmp_path):
    class Args:
        world_size = 2

    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(gradsight.UnsupportedError, match=r"runs 2 processes .* no initialised process group"):
        GradsightTrainerCallback(on_finding=None).on_train_begin(Args(), None, None, model=_model(), optimizer=opt)


def test_deepspeed_is_refused_with_the_reason(tmp_path):
    class Args:
        world_size = 1
        deepspeed = "ds_config.json"

    with pytest.raises(gradsight.UnsupportedError, match=r"does not support DeepSpeed: ZeRO partitions"):
        GradsightTrainerCallback(on_finding=None).on_train_begin(Args(), None, None, model=_model())
    assert list(tmp_path.iterdir()) == []


DDP_SCRIPT = r"""
import json, os, sys, warnings
warnings.simplefilter("ignore")
import torch, transformers
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from test_integration_hf import _Data, _model
from gradsight.integrations import GradsightTrainerCallback

out, rank = sys.argv[1], int(os.environ["RANK"])


def train(name, model, max_steps, **cb_kwargs):
    cb = GradsightTrainerCallback(path=f"{out}/{name}.db", on_finding=None, **cb_kwargs)
    args = transformers.TrainingArguments(
        output_dir=f"{out}/{name}", per_device_train_batch_size=4, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, max_steps=max_steps, ddp_backend="gloo",
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(64), callbacks=[cb])
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    info = {"path": None if cb.path is None else str(cb.path), "global_step": trainer.state.global_step,
            "findings": [f.code for f in cb.findings], "closed": cb.watch is None, "history": history}
    with open(f"{out}/{name}.rank{rank}.json", "w") as f:
        json.dump(info, f)


train("ddp", _model(), 4, preset="full")
nan = _model()
with torch.no_grad():
    nan.classifier.weight.fill_(float("nan"))
train("stop", nan, 20, every=1, stop_on=("non-finite",))

# FSDP2: Accelerate shards only on accelerators, so the Trainer's events are played by hand around a sharded model
from types import SimpleNamespace
from torch.distributed.fsdp import fully_shard

model = _model()
for layer in model.bert.encoder.layer:
    fully_shard(layer)
fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
args = SimpleNamespace(world_size=2, output_dir=f"{out}/fsdp", gradient_accumulation_steps=1)
state, control = transformers.TrainerState(), transformers.TrainerControl()
cb = GradsightTrainerCallback(path=f"{out}/fsdp.db", on_finding=None, preset="full", stop_on=("non-finite",))
cb.on_train_begin(args, state, control, model=model, optimizer=opt)
data = _Data(64)
for step in range(3):
    batch = {k: v[8 * step + 4 * rank : 8 * step + 4 * rank + 4] for k, v in data[:].items()}
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    state.global_step += 1
    cb.on_step_end(args, state, control)
    cb.on_log(args, state, control, logs={"loss": float(loss)})
cb.on_train_end(args, state, control)
with open(f"{out}/fsdp.rank{rank}.json", "w") as f:
    json.dump({"path": None if cb.path is None else str(cb.path), "stop": control.should_training_stop,
               "log": control.should_log}, f)
# leave the process group before exit: otherwise gloo's worker threads can abort the interpreter's teardown
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def _run_two_ranks(tmp_path, script, timeout=55):
    """Run ``script`` as 2 CPU ranks (torchrun's environment, gloo on loopback) with a hard timeout."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    (tmp_path / "train.py").write_text(script)
    with socket.socket() as s:  # a free loopback port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = str(Path(__file__).parent)
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore"}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(tmp_path / "train.py"), str(tmp_path), here],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: a timeout kills it and anything it started
            )
        )
    logs = []
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=timeout)[0].decode())
            except subprocess.TimeoutExpired:
                pytest.fail(f"the 2-rank Trainer run did not finish within {timeout} s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_ddp")
    _run_two_ranks(out, DDP_SCRIPT)
    return out


def _rank(out, name, rank):
    import json

    return json.loads((out / f"{name}.rank{rank}.json").read_text())


def test_ddp_two_processes_write_one_run_file_with_merged_outputs(two_ranks):
    r0, r1 = _rank(two_ranks, "ddp", 0), _rank(two_ranks, "ddp", 1)
    assert r0["path"] == str(two_ranks / "ddp.db") and r1["path"] is None  # rank 1 writes nothing
    assert r0["global_step"] == r1["global_step"] == 4 and r0["closed"] and r1["closed"]
    assert sorted(p.name for p in two_ranks.glob("ddp*.db")) == ["ddp.db"]
    with gradsight.load(two_ranks / "ddp.db") as run:
        meta = run.meta["distributed"]
        assert meta["wrapper"] == "DistributedDataParallel" and meta["world_size"] == 2
        assert meta["replicas_identical"]["verified"] is True
        assert run.steps == [0, 1, 2, 3]
        assert "bert.embeddings.word_embeddings.weight" in {t.name for t in run.tensors}  # no "module." prefix
        # 2 ranks x 4 samples x 2 logits: the classifier's output merged over the global batch
        assert run.summary("classifier", "output", 0).count == 2 * 4 * 2
        np.testing.assert_allclose(run.scalars["loss"].to_numpy(), [h["loss"] for h in r0["history"]], rtol=1e-6)
    # the headline scalars reach rank 0's logs; the Trainer logged at the same steps on both ranks
    assert all("gradsight/grad_norm" in h for h in r0["history"])
    assert [h["step"] for h in r0["history"]] == [h["step"] for h in r1["history"]]


def test_fsdp2_model_gets_the_fsdp_aggregation_through_the_callback(two_ranks):
    r0, r1 = _rank(two_ranks, "fsdp", 0), _rank(two_ranks, "fsdp", 1)
    assert r0["path"] == str(two_ranks / "fsdp.db") and r1["path"] is None
    assert r0["stop"] is r1["stop"] is False and r0["log"] is r1["log"] is True
    with gradsight.load(two_ranks / "fsdp.db") as run:
        assert run.meta["distributed"]["wrapper"] == "fully_shard (FSDP2)"
        assert run.steps == [0, 1, 2]
        info = next(t for t in run.tensors if t.name == "bert.embeddings.word_embeddings.weight" and t.kind == "grad")
        assert tuple(info.shape) == (32, 8)  # the global shape; each rank holds 16 rows
        assert run.summary("bert.embeddings.word_embeddings.weight", "weight", 0).count == 32 * 8
        assert run.summary("classifier", "output", 0).count == 2 * 4 * 2
        assert len(run.scalars["loss"].dropna()) == 3


def test_ddp_stop_decision_on_rank_0_stops_every_rank_at_the_same_step(two_ranks):
    r0, r1 = _rank(two_ranks, "stop", 0), _rank(two_ranks, "stop", 1)
    assert r0["findings"][:1] == ["non-finite"] and r1["findings"] == []  # reads on rank 0 only
    assert r0["global_step"] == r1["global_step"] < 20
    with gradsight.load(two_ranks / "stop.db") as run:
        assert any(e["code"] == "non-finite" for e in run.events("finding"))


def test_diagnosis_arguments_are_checked_when_the_callback_is_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(gradsight.InputError, match=r"stop_on names unknown finding code\(s\) \['nan'\]"):
        GradsightTrainerCallback(stop_on=("nan",))
    with pytest.raises(gradsight.InputError, match="on_finding must be 'warn', a callable or None, got 'print'"):
        GradsightTrainerCallback(on_finding="print")
    with pytest.raises(gradsight.InputError, match="full_every must be a positive integer, got 0"):
        GradsightTrainerCallback(diagnose_every=0)
    assert list(tmp_path.iterdir()) == []  # checking writes nothing


def test_clipping_trainer_records_the_norm_before_and_after_max_grad_norm(tmp_path):
    # The Trainer clips at max_grad_norm and logs the norm it clipped (before clipping) as grad_norm.
    cb = GradsightTrainerCallback(on_finding=None)
    args = _args(tmp_path, max_grad_norm=0.001)
    trainer = transformers.Trainer(model=_model(), args=args, train_dataset=_Data(), callbacks=[cb])
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    with gradsight.load(cb.path) as run:
        sc = run.scalars
        assert list(sc.index) == [0, 1, 2, 3]
        np.testing.assert_allclose(sc["grad_norm_preclip"].to_numpy(), logged, rtol=1e-5)
        assert (sc["grad_norm_preclip"] > 10 * 0.001).all()  # the clip bites
        np.testing.assert_allclose(sc["grad_norm"].to_numpy(), 0.001, rtol=1e-4)
        np.testing.assert_allclose(sc["clip_ratio"].to_numpy(), 0.001 / sc["grad_norm_preclip"].to_numpy(), rtol=1e-4)
        assert run.meta["clipping"] == {"first_step": 0}


def test_the_lightning_callback_in_a_hugging_face_trainer_is_refused_clearly(tmp_path):
    """Regression: the HF Trainer failed with its own AttributeError ('... has no attribute on_init_end')."""
    pytest.importorskip("lightning")
    from gradsight import UnsupportedError
    from gradsight.integrations import GradsightLightningCallback

    callback = GradsightLightningCallback(path=tmp_path / "r.db", on_finding=None)
    with pytest.raises(UnsupportedError, match=r"Lightning's callback.*use .*GradsightTrainerCallback"):
        transformers.Trainer(model=_model(), args=_args(tmp_path), train_dataset=_Data(), callbacks=[callback])
    assert not (tmp_path / "r.db").exists()
