"""Layers in the order the forward pass calls them, and a shared module recorded once per output width.

The references are the models' own forward code (the call order) and numpy on the tensors the forward produced.
"""

import numpy as np
import pytest

import gradsight

torch = pytest.importorskip("torch")
nn = torch.nn


class DeclaredOutOfOrder(nn.Module):
    """Activations declared after the layers they follow, one ReLU shared between two widths, one unused module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 8)
        self.out = nn.Linear(8, 3)
        self.unused = nn.Linear(3, 3)  # declared, never called
        self.act = nn.ReLU()  # shared: after fc1 (16 units) and after fc2 (8 units)
        self.tanh = nn.Tanh()

    def forward(self, x):
        return self.out(self.tanh(self.act(self.fc2(self.act(self.fc1(x))))))


def _train(tmp_path, steps=3, **kwargs):
    torch.manual_seed(0)
    model = DeclaredOutOfOrder()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    seen = {}
    model.fc1.register_forward_hook(lambda m, a, o: seen.setdefault("relu1", torch.relu(o).detach().clone()))
    model.fc2.register_forward_hook(lambda m, a, o: seen.setdefault("relu2", torch.relu(o).detach().clone()))
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db", every=1, **kwargs) as w:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            seen.clear() if w.current_step < steps else None
    return gradsight.load(tmp_path / "r.db"), seen


def test_layers_follow_the_forward_pass_not_the_declaration(tmp_path):
    run, _ = _train(tmp_path)
    # the forward's call order; the unused module follows the layer it was declared after
    assert run.layers == ["fc1", "act", "fc2", "act#2", "tanh", "out", "unused"]
    model = run.meta["model"]
    assert [e["name"] for e in model["layers"]][:6] == ["fc1", "fc2", "out", "unused", "act", "tanh"]  # declared
    assert model["call_order"] == ["fc1", "act", "fc2", "act#2", "tanh", "out"]
    assert {"name": "act#2", "type": "ReLU", "params": {}, "shares": "act"} in model["layers"]


def test_a_shared_module_is_recorded_once_per_output_width_with_its_unit_counts(tmp_path):
    run, seen = _train(tmp_path, steps=1)
    df = run.to_pandas(kind="output")
    first, second = (df[df.tensor == name].iloc[0] for name in ("act", "act#2"))
    for row, ref in ((first, seen["relu1"]), (second, seen["relu2"])):
        a = ref.double().numpy()
        assert row["count"] == a.size
        assert row["zeros"] == int((a == 0).sum())
        assert row["sum"] == pytest.approx(a.sum(), rel=1e-6, abs=1e-6)
    for name, ref in (("act", seen["relu1"]), ("act#2", seen["relu2"])):  # per-unit activity of each width
        summary = run.summary(name, "output", 0)
        assert summary.units_total == ref.shape[0]
        np.testing.assert_array_equal(summary.units_active, (ref != 0).sum(dim=0).numpy())


def test_a_shared_module_with_one_width_stays_one_record(tmp_path):
    class Same(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(6, 6), nn.Linear(6, 6), nn.ReLU()

        def forward(self, x):
            return self.b(self.act(self.a(self.act(x))))

    model = Same()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "s.db", every=1):
        opt.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
    run = gradsight.load(tmp_path / "s.db")
    assert sorted(run.to_pandas(kind="output").tensor.unique()) == ["a", "act", "b"]
    assert run.layers == ["act", "a", "b"]  # first called before a; one record for both calls
    assert np.isfinite(run.to_pandas(kind="output").l2).all()


def test_appending_to_a_run_with_a_call_order_is_the_same_model(tmp_path):
    _train(tmp_path)
    run, _ = _train(tmp_path, if_exists="append")
    assert run.layers == ["fc1", "act", "fc2", "act#2", "tanh", "out", "unused"]
    assert run.steps == list(range(6))


def test_diagnosis_reads_the_call_order_a_dead_relu_declared_last_is_blamed_on_its_bias(tmp_path):
    """Declared in registration order, 'act' seemed to follow 'out': the diagnosis blamed 'out' (a fault it has not)."""
    torch.manual_seed(0)
    model = DeclaredOutOfOrder()
    with torch.no_grad():
        model.fc1.bias.fill_(-8.0)  # every unit of the first ReLU dead from the start
    opt = torch.optim.SGD(model.parameters(), 0.01)
    x, y = torch.randn(256, 10), torch.randint(0, 3, (256,))
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "d.db", every=10):
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    roots = [f for f in gradsight.diagnose(tmp_path / "d.db") if f.is_root and f.severity != "info"]
    assert roots[0].code == "bad-initialisation"
    assert roots[0].layers[0] == "fc1" and "bias of 'fc1'" in roots[0].message
    assert "out" not in roots[0].layers


def test_a_width_that_changes_from_batch_to_batch_stays_one_record(tmp_path):
    """A dropout over attention probabilities (batch, T, T) has a different width at every sequence length: it is
    one call site, recorded as one tensor whatever T each batch has."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.drop, self.out = nn.Linear(4, 4), nn.Dropout(0.0), nn.Linear(4, 2)

        def forward(self, x):
            q = self.q(x)
            p = self.drop(torch.softmax(q @ q.transpose(1, 2), -1))
            return self.out((p @ q).mean(1))

    model = Attn()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "v.db", every=1):
        for t in (3, 5, 4, 5):
            opt.zero_grad()
            model(torch.randn(2, t, 4)).sum().backward()
            opt.step()
    run = gradsight.load(tmp_path / "v.db")
    out = run.to_pandas(kind="output")
    assert sorted(out.tensor.unique()) == ["drop", "out", "q"]
    assert out[out.tensor == "drop"].step.tolist() == [0, 1, 2, 3]
    assert [run.summary("drop", "output", s).units for s in range(4)] == [3, 5, 4, 5]


class _Segments(nn.Module):
    """One ReLU shared by the stem (32 wide) and two checkpointed segments (16 and 8 wide)."""

    def __init__(self):
        super().__init__()
        self.stem, self.act, self.head = nn.Linear(4, 32), nn.ReLU(), nn.Linear(8, 1)
        self.seg1, self.seg2 = nn.Linear(32, 16), nn.Linear(16, 8)

    def forward(self, x, reentrant=None):
        from torch.utils.checkpoint import checkpoint

        h = self.act(self.stem(x))
        for seg in (self.seg1, self.seg2):
            if reentrant is None:
                h = self.act(seg(h))
            else:
                h = checkpoint(lambda t, seg=seg: self.act(seg(t)), h, use_reentrant=reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [None, False, True])
def test_checkpointed_segments_keep_the_forward_order_and_every_record(tmp_path, reentrant):
    """use_reentrant=True runs the segments without gradients, then again during backward (in reverse): the order
    was the recomputation's, and the segment sharing a width-keyed count with the stem's call lost its record."""
    torch.manual_seed(0)
    model = _Segments()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    x = torch.randn(4, 4, requires_grad=True)
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "c.db", every=1):
        for _ in range(2):
            opt.zero_grad()
            model(x, reentrant).sum().backward()
            opt.step()
    run = gradsight.load(tmp_path / "c.db")
    assert run.layers == ["stem", "act", "seg1", "act#2", "seg2", "act#3", "head"]
    out = run.to_pandas(kind="output")
    for step in (0, 1):
        at = out[out.step == step].set_index("tensor")
        assert {t: int(at.loc[t, "count"]) for t in ("act", "act#2", "act#3")} == {"act": 128, "act#2": 64, "act#3": 32}


def test_the_call_order_comes_from_a_forward_that_counts(tmp_path):
    """An evaluation pass with gradients on but no backward, on another path, ran first: its order was written."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.act = nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(4, 4), nn.ReLU()

        def forward(self, x, evaluate=False):
            if evaluate:
                return self.c(self.act(x))
            return self.b(self.act(self.a(x)))

    model = Two()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "o.db", every=1):
        model(torch.randn(2, 4), evaluate=True)  # never backpropagated
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    run = gradsight.load(tmp_path / "o.db")
    assert run.meta["model"]["call_order"] == ["a", "act", "b"]
    assert run.layers == ["a", "act", "b", "c"]  # a module the training forward never called goes last


def test_a_relu_after_an_out_of_place_residual_add_counts_channels(tmp_path):
    """`out = out + identity; out = self.relu(out)`: the add's result is no recorded output, so the ReLU's unit
    axis fell back to the last dim, and image columns were counted as units."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.relu = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 3, 3, padding=1), nn.ReLU()

        def forward(self, x):
            out = self.relu(self.conv1(x))
            out = self.conv2(out) + x
            return self.relu(out).mean((2, 3))

    model = Block()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    x = torch.randn(2, 3, 5, 7)
    seen = []
    model.relu.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db", every=1):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    run = gradsight.load(tmp_path / "r.db")
    for name, ref in (("relu", seen[0]), ("relu#2", seen[1])):
        s = run.summary(name, "output", 0)
        np.testing.assert_array_equal(s.units_active, (ref != 0).sum(dim=(0, 2, 3)).numpy())  # per channel


def test_a_no_grad_pass_between_backward_and_step_adds_no_record(tmp_path):
    """A validation batch of another sequence length under no_grad, after backward: its softmax width was taken
    for the training forward's, and an empty layer 'sm#2' appeared in the run's layers."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.sm, self.out = nn.Linear(4, 4), nn.Softmax(-1), nn.Linear(4, 2)

        def forward(self, x):
            q = self.q(x)
            return self.out((self.sm(q @ q.transpose(1, 2)) @ q).mean(1))

    model = Attn()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "n.db", every=1):
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(2, 6, 4)).sum().backward()
            with torch.no_grad():
                model(torch.randn(2, 3, 4))  # validation, another length
            opt.step()
    run = gradsight.load(tmp_path / "n.db")
    assert run.layers == ["q", "sm", "out"]
    assert not any(e.get("shares") for e in run.meta["model"]["layers"])


def test_appending_without_a_logged_forward_keeps_the_stored_order(tmp_path):
    """The appending watch wrote the model's description again without its call order: a session that logged
    no forward left the run in declaration order ('act' after 'out' again)."""
    _train(tmp_path)  # steps 0-2, every one logged
    torch.manual_seed(0)
    model = DeclaredOutOfOrder()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db", every=100, if_exists="append"):
        for _ in range(2):  # steps 3 and 4: not logged
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.randn(8, 10)), torch.randint(0, 3, (8,))).backward()
            opt.step()
    run = gradsight.load(tmp_path / "r.db")
    assert run.steps == [0, 1, 2] and run.last_step == 4
    assert run.layers == ["fc1", "act", "fc2", "act#2", "tanh", "out", "unused"]
