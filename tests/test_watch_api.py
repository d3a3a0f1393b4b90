"""One public API for every watch: the same test, run on each adapter (torch, Keras).

Each adapter gives two watches: an *automatic* one, whose steps close by themselves (torch with an optimizer,
Keras with ``fit``), and a *manual* one, whose steps close with ``watch.step()`` (torch without an optimizer, a
Keras ``GradientTape`` loop).
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import pytest

import gradsight
from gradsight import InputError, WatchError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: The public API every watch has, with the same kind of member (property or method) on every adapter.
PUBLIC = {
    "current_step": "property",
    "closed": "property",
    "steps": "property",
    "layers": "property",
    "scalars": "property",
    "meta": "property",
    "tensors": "property",
    "last_step": "property",
    "step": "method",
    "log": "method",
    "log_event": "method",
    "flush": "method",
    "close": "method",
    "events": "method",
    "to_pandas": "method",
    "summaries": "method",
    "summary": "method",
    "scalar_rows": "method",
    "snapshot": "method",
}


class TorchAdapter:
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        self.x = torch.randn(8, 6)

    def auto(self, path):
        self.opt = self.torch.optim.SGD(self.model.parameters(), lr=0.1)
        return gradsight.watch(self.model, path=path, optimizer=self.opt, every=1)

    def train_step(self, w) -> None:
        self.opt.zero_grad()
        self.model(self.x).square().mean().backward()
        self.opt.step()

    def manual(self, path):
        return gradsight.watch(self.model, path=path, every=1)

    def manual_step(self, w) -> None:
        self.model.zero_grad()
        self.model(self.x).square().mean().backward()
        with self.torch.no_grad():
            for p in self.model.parameters():
                p -= 0.1 * p.grad
        w.step()


class KerasAdapter:
    name = "keras"

    def __init__(self) -> None:
        keras = pytest.importorskip("keras")
        self.tf = pytest.importorskip("tensorflow")
        self.keras = keras
        keras.utils.set_random_seed(0)
        inp = keras.Input((6,))
        h = keras.layers.Dense(5, activation="relu", name="d1")(inp)
        self.model = keras.Model(inp, keras.layers.Dense(3, name="head")(h))
        self.model.compile(keras.optimizers.SGD(0.1), "mse")
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(8, 6)).astype("float32")
        self.y = rng.normal(size=(8, 3)).astype("float32")

    def auto(self, path):
        return gradsight.watch(self.model, path=path, every=1)

    def train_step(self, w) -> None:
        self.model.fit(self.x, self.y, batch_size=8, epochs=1, verbose=0)

    def manual(self, path):
        from gradsight.frameworks.keras._watch import watch_tape

        self.v = self.tf.Variable(np.ones((3, 2), "float32"), name="v")
        return watch_tape(path, every=1)

    def manual_step(self, w) -> None:
        with self.tf.GradientTape() as tape:
            loss = self.tf.reduce_sum(self.tf.square(self.v))
        (g,) = tape.gradient(loss, [self.v])
        with w.record_step([g], {"v": self.v}, loss=loss):
            self.v.assign_sub(0.1 * g)

    def close(self) -> None:
        self.keras.backend.clear_session()


@pytest.fixture(params=["torch", pytest.param("keras", marks=pytest.mark.keras)])
def adapter(request):
    if request.param == "torch":
        pytest.importorskip("torch")
        a = TorchAdapter()
    else:
        a = KerasAdapter()
    yield a
    if hasattr(a, "close"):
        a.close()


def test_the_same_public_members(adapter, tmp_path):
    w = adapter.auto(tmp_path / "a.db")
    try:
        for name, kind in PUBLIC.items():
            member = inspect.getattr_static(type(w), name)
            assert (kind == "property") == isinstance(member, property), (adapter.name, name)
            if kind == "method":
                assert callable(getattr(w, name)), name
        assert list(inspect.signature(w.log).parameters) == ["loss", "step", "scalars"]
        assert w.framework == adapter.name
    finally:
        w.close()


def test_current_step_log_flush_events_and_reads(adapter, tmp_path):
    w = adapter.auto(tmp_path / "a.db")
    assert w.current_step == 0 and not w.closed
    adapter.train_step(w)
    assert w.current_step == 1
    adapter.train_step(w)
    assert w.current_step == 2
    w.log(loss=0.5, step=0)
    w.log(0.25, step=1, extra=3.0)
    with pytest.raises(InputError, match=r"non-negative step number"):
        w.log(loss=1.0, step=-1)
    with pytest.raises(InputError, match=r"expects a number or a one-element tensor"):
        w.log(loss="low")
    w.log_event(1, "note", {"what": "api"})
    w.flush()
    with gradsight.load(w.path) as run:  # a second reader sees everything flushed
        assert run.scalars.loc[0, "loss"] == 0.5 and run.scalars.loc[1, "extra"] == 3.0
    assert w.steps == [0, 1]
    assert w.scalars.loc[1, "loss"] == 0.25
    assert {"grad_norm", "grad_nonfinite"} <= set(w.scalars.columns)
    assert any(c.startswith("grad_norm/") for c in w.scalars.columns)
    assert w.events("note") == [{"step": 1, "kind": "note", "what": "api"}]
    assert w.meta["framework"] == adapter.name and w.last_step == 1
    assert w.layers and w.tensors
    df = w.to_pandas()
    assert set(df["kind"]) == {"weight", "grad", "update", "output", "output_grad"}
    t = next(info for info in w.tensors if info.kind == "grad")
    assert w.summary(t.name, "grad", 1).count > 0
    assert sum(1 for _ in w.summaries(kind="grad")) == 2 * sum(info.kind == "grad" for info in w.tensors)
    snap = w.snapshot(tmp_path / "snap.db")
    w.close()
    w.close()  # idempotent
    assert w.closed
    with pytest.raises(WatchError, match=r"cannot log: the watch recording to .* is closed"):
        w.log(loss=1.0)
    with gradsight.load(snap) as run:
        assert run.steps == [0, 1]


def test_step_closes_a_manual_step_and_refuses_where_steps_close_themselves(adapter, tmp_path):
    w = adapter.auto(tmp_path / "a.db")
    with pytest.raises(WatchError, match=r"watch\.step\(\)"):
        w.step()
    w.close()
    with pytest.raises(WatchError, match=r"closed"):
        w.step()
    if adapter.name == "torch":  # one watch per model at a time: the model is free again
        adapter.model = type(adapter.model)(*adapter.model)
    m = adapter.manual(tmp_path / "m.db")
    with m:
        adapter.manual_step(m)
        assert m.current_step == 1
        adapter.manual_step(m)
        assert m.current_step == 2
        assert m.steps == [0, 1]
        if adapter.name == "torch":
            adapter.model.zero_grad(set_to_none=True)
        m.step()  # a step that records nothing keeps the numbering going
        assert m.current_step == 3


def test_exception_leaving_the_block_is_recorded(adapter, tmp_path):
    with pytest.raises(ValueError, match="boom"), adapter.auto(tmp_path / "a.db") as w:
        adapter.train_step(w)
        raise ValueError("boom")
    assert w.closed
    with gradsight.load(tmp_path / "a.db") as run:
        (event,) = run.events("exception")
        assert event == {"step": 1, "kind": "exception", "type": "ValueError", "message": "boom"}


def test_one_open_watch_per_model(adapter, tmp_path):
    with adapter.auto(tmp_path / "a.db"), pytest.raises(WatchError, match=r"already watched"):
        gradsight.watch(adapter.model, path=tmp_path / "b.db")
