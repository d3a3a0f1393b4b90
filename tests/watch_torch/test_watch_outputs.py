"""Layer outputs and output gradients in unusual training loops: each test replays a case that was recorded wrong.

References are captured by plain forward hooks (the output as the layer left it) and tensor hooks registered in
them (dJ/dA as backward produced it, copied at once), independently of the watch.
"""

import pytest
import torch
import torch.utils.checkpoint as checkpoint
from test_torch_summary import assert_matches
from torch import nn

from gradsight._watch import watch
from gradsight.summary import merge_all, summarize


def capture(module, axis=-1):
    """Record ``module``'s outputs and their gradients (copies) in lists of numpy arrays; returns both lists."""
    outs, grads = [], []

    def hook(_m, _args, out):
        if torch.is_grad_enabled():
            outs.append(out.detach().clone())
            if out.requires_grad:
                out.register_hook(lambda g: grads.append(g.detach().clone()))

    module.register_forward_hook(hook)
    return outs, grads


def reference(tensors, axis=-1):
    return merge_all([summarize(t.numpy(), unit_axis=axis % t.dim()) for t in tensors])


def test_a_module_returning_its_parameter_records_the_gradient_once_per_step_and_keeps_no_hook(tmp_path):
    """Regression: the gradient hook was registered on the parameter itself (a leaf), outlived the step, and
    step k recorded the gradient k + 1 times; close() left the hooks behind."""

    class Queries(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.take = nn.Parameter(torch.randn(4, 8)), nn.Identity()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            q = self.take(self.query)
            return (self.proj(x) @ q.t()).tanh()

    model = Queries()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, path=tmp_path / "r.db", optimizer=opt, preset="full") as run:
        for step in range(3):
            output = summarize(model.query.detach().numpy().copy(), unit_axis=1)
            opt.zero_grad()
            model(torch.randn(3, 8)).square().mean().backward()
            output_grad = summarize(model.query.grad.numpy().copy(), unit_axis=1)  # dJ/dq: q's only use
            opt.step()
            assert not model.query._backward_hooks
            assert_matches(run.summary("take", "output", step), output)
            assert_matches(run.summary("take", "output_grad", step), output_grad)
    assert not model.query._backward_hooks


@pytest.mark.parametrize("change", ["clip_grad_norm_", "divide"])
def test_output_gradients_are_recorded_as_backward_left_them_when_the_parameter_gradient_changes(tmp_path, change):
    """Regression: a small output gradient was kept uncopied until the optimizer step, and where autograd passed
    the same memory on as a parameter's ``.grad`` (an output that is a view of a parameter), clipping changed
    the record."""

    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.pe = nn.Parameter(torch.randn(5, 8))

        def forward(self, x):
            return self.pe.unsqueeze(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos, self.head = nn.Linear(3, 8), Table(), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.emb(x) + self.pos(x)))

    model = Net()
    _, grads = capture(model.pos)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, path=tmp_path / "r.db", optimizer=opt, preset="full") as run:
        opt.zero_grad()
        model(torch.randn(6, 5, 3)).square().mean().backward()
        if change == "clip_grad_norm_":
            nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        else:
            for p in model.parameters():
                p.grad /= 4
        opt.step()
        assert_matches(run.summary("pos", "output_grad", 0), reference(grads))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_records_each_output_once(tmp_path, reentrant):
    """Regression: without reentrance, checkpointing recomputes the block's forward during backward, and the
    watch recorded it as a second forward (every output counted twice)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(12, 16), nn.Linear(16, 3)
            self.block = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))

        def forward(self, x):
            return self.head(checkpoint.checkpoint(self.block, self.a(x), use_reentrant=reentrant))

    model = Net()
    outs = []  # (inside backward, output): every call with gradients, the recomputations in backward included
    model.block[0].register_forward_hook(
        lambda _m, _a, out: (
            outs.append((torch._C._current_graph_task_id() != -1, out.detach().clone()))
            if torch.is_grad_enabled()
            else None
        )
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, path=tmp_path / "r.db", optimizer=opt, preset="full") as run:
        for step in range(2):
            outs.clear()
            opt.zero_grad()
            for _ in range(2):  # two micro-batches
                model(torch.randn(5, 12)).square().mean().backward()
            opt.step()
            # the forward as it ran: with reentrance its first run had no gradients, the recomputation is it
            recorded = [out for in_backward, out in outs if in_backward == reentrant]
            assert len(recorded) == 2 and len(outs) == (2 if reentrant else 4)
            for layer in ("a", "block.0", "block.1", "block.2", "head"):
                got = run.summary(layer, "output", step)
                assert (
                    got.count == run.summary(layer, "output_grad", step).count == 2 * 5 * (3 if layer == "head" else 16)
                )
            assert_matches(run.summary("block.0", "output", step), reference(recorded))


def test_several_eval_mode_forwards_before_one_backward_are_all_recorded(tmp_path):
    """Regression: training in eval mode with three forwards and one backward dropped the first forward's
    outputs (held as a validation forward) but recorded its output gradients."""
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    outs, grads = capture(model[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, path=tmp_path / "r.db", optimizer=opt, preset="full") as run:
        model.eval()
        opt.zero_grad()
        sum(model(torch.randn(5, 12)).square().mean() for _ in range(3)).backward()
        opt.step()
        assert len(outs) == len(grads) == 3
        assert_matches(run.summary("0", "output", 0), reference(outs))
        assert_matches(run.summary("0", "output_grad", 0), reference(grads))
        model.train()
        opt.zero_grad()
        model(torch.randn(5, 12))  # a forward with gradients but no backward: not recorded
        model(torch.randn(5, 12)).square().mean().backward()
        opt.step()
        assert run.summary("0", "output", 1).count == run.summary("0", "output_grad", 1).count == 5 * 16


def test_a_step_the_grad_scaler_skipped_keeps_its_layer_outputs(tmp_path):
    """Regression: at a step whose update the GradScaler skipped, the layer outputs (which show where an Inf came
    from) were dropped while their output gradients were recorded."""
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    outs, _ = capture(model[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    per_step = []
    with watch(model, path=tmp_path / "r.db", optimizer=opt, preset="full", scaler=scaler) as run:
        for step in range(4):
            outs.clear()
            opt.zero_grad()
            x = torch.randn(5, 12)
            if step == 1:
                x[0, 0] = float("inf")  # layer 0's output has Inf; the scaler skips this step's update
            scaler.scale(model(x).square().mean()).backward()
            scaler.step(opt)
            scaler.update()
            per_step.append(reference(outs))
        run.flush()
        assert run.scalars["step_skipped"].get(1) == 1.0
        for step in range(4):
            assert_matches(run.summary("0", "output", step), per_step[step])
            assert run.summary("0", "output_grad", step).count == 5 * 16
        assert run.summary("0", "output", 1).posinf > 0
