"""GradsightTrainerCallback on a tiny transformers model built from a config (nothing is downloaded)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import gradsight  # noqa: E402
from gradsight.integrations import GradsightTrainerCallback, hf_callback  # noqa: E402


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


def test_data_parallel_is_refused_until_summaries_are_aggregated(tmp_path):
    class Args:
        world_size = 2

    with pytest.raises(gradsight.UnsupportedError, match=r"does not support data-parallel training yet.*world_size=2"):
        GradsightTrainerCallback(on_finding=None).on_train_begin(Args(), None, None, model=_model())


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
