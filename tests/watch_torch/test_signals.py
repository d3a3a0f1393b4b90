"""Per-step signals and anomaly captures of the torch watch, checked against values computed in the test."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import gradsight  # noqa: E402
from gradsight._anomaly import Anomalies  # noqa: E402
from gradsight._watch_core import anomaly_values  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_seeded_one_thread")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 6)
    return x, x[:, :2].sum(1, keepdim=True)


def _norm(t: torch.Tensor) -> float:
    return float(np.linalg.norm(t.detach().double().numpy()))


def _row(run: gradsight.Run, step: int) -> dict[str, float]:
    return {k: v for k, v in run.scalars.loc[step].items() if not (isinstance(v, float) and math.isnan(v))}


def _train_with_copies(model, opt, path, batches):
    """Train on ``batches`` under a watch; each step's parameters copied before and after the update, in the test.

    ``batches`` may be a generator that changes the model between steps.
    """
    before, after = [], []
    with gradsight.watch(model, optimizer=opt, path=path) as w:
        for x, y in batches:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            before.append({n: p.detach().clone() for n, p in model.named_parameters()})
            opt.step()
            after.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return gradsight.load(w.path), before, after


def _assert_weight_and_update_norms(row, before, after, where):
    for n in before:
        assert row[f"weight_norm/{n}"] == pytest.approx(_norm(before[n]), rel=1e-6), (where, n)
        assert row[f"update_norm/{n}"] == pytest.approx(_norm(after[n] - before[n]), rel=1e-5), (where, n)


def test_weight_and_update_norms_every_step_match_independent_copies(tmp_path):
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    run, before, after = _train_with_copies(model, opt, tmp_path / "r.db", [_data()] * 7)
    assert run.steps == [0]  # one logged step by `every`; the signals are per step all the same
    for s in range(7):
        row = _row(run, s)
        _assert_weight_and_update_norms(row, before[s], after[s], s)
        assert row["lr"] == 0.01
        assert row["grad_norm_preclip"] == row["grad_norm"]  # nothing clipped: one value, no per-tensor copies
        assert not any(k.startswith("grad_norm_preclip/") for k in row) and "clip_ratio" not in row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_step_norms_agree_with_the_summaries_to_float64_rounding(tmp_path, dtype):
    """The per-step norms sum their squares in float64, like the summaries' sum_sq.

    Regression: torch's float32 norm of 1 M weights all equal to 0.05 came out ~5e-4 (relative) off, and a
    bfloat16 weight's norm ~3e-3 off, while the same run's weight summary was exact.
    """
    model = nn.Linear(1024, 1024).to(dtype)
    with torch.no_grad():
        model.weight.fill_(0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 1024).to(dtype)
    grads = []
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db", preset="full") as w:
        for _ in range(2):
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            grads.append(_norm(model.weight.grad))
            opt.step()
    run = gradsight.load(w.path)
    f = run.to_pandas(kind="weight")
    for step in (0, 1):
        row = _row(run, step)
        exact = math.sqrt(f[(f.step == step) & (f.tensor == "weight")]["sum_sq"].iloc[0])
        assert row["weight_norm/weight"] == pytest.approx(exact, rel=1e-9)
        assert row["grad_norm/weight"] == pytest.approx(grads[step], rel=1e-9)


def test_sparse_gradients_are_measured_and_summarised(tmp_path):
    """nn.Embedding(sparse=True) gets a sparse COO gradient; it was left out of every norm and summary."""
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Flatten(), nn.Linear(24, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.tensor([[1, 2, 2], [2, 7, 1]])  # repeated ids: the sparse gradient holds duplicates
    dense = []
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db", preset="full") as w:
        for _ in range(2):
            opt.zero_grad()
            model(ids).pow(2).mean().backward()
            dense.append({n: p.grad.to_dense().double().numpy() for n, p in model.named_parameters()})
            opt.step()
    run = gradsight.load(w.path)
    f = run.to_pandas(kind="grad")
    for step, grads in enumerate(dense):
        row = _row(run, step)
        total = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
        assert row["grad_norm/0.weight"] == pytest.approx(float(np.linalg.norm(grads["0.weight"])), rel=1e-6)
        assert row["grad_norm"] == pytest.approx(total, rel=1e-6)
        emb = f[(f.step == step) & (f.tensor == "0.weight")].iloc[0]
        assert emb["count"] == 50 * 8 and emb["zeros"] == int((grads["0.weight"] == 0).sum())
        assert emb["sum_sq"] == pytest.approx(float((grads["0.weight"] ** 2).sum()), rel=1e-6)


def test_weight_norm_sees_writes_to_the_weights_between_steps(tmp_path):
    """‖W_before‖ is the weights as the step found them, whatever wrote to them since the last step."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _data()
    before = []
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db") as w:
        for step in range(6):
            with torch.no_grad():
                if step == 2:
                    model[0].weight.mul_(3.0)  # in place: a new version of the same tensor
                if step == 3:
                    model[0].bias.data.clamp_(-0.01, 0.01)  # through .data: no version counter sees this write
                if step == 4:
                    model[2].weight.data = torch.full_like(model[2].weight, 0.5)  # a new tensor behind the parameter
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            before.append({n: _norm(p) for n, p in model.named_parameters()})
            opt.step()
    run = gradsight.load(w.path)
    for s, norms in enumerate(before):
        row = _row(run, s)
        for n, v in norms.items():
            assert row[f"weight_norm/{n}"] == pytest.approx(v, rel=1e-6), (s, n)


def test_parameters_converted_after_watch_get_a_w_before_of_their_own_dtype_regression(tmp_path):
    """model.double() after watch(): W_before must be kept in float64 too. Copied into the float32 buffer of the
    first steps, it was rounded to float32, and the update norms ‖W_after - W_before‖ of the float64 weights were
    off by that rounding (the learning rate here makes updates ~1e-7 of the weights, below float32's precision)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-7)

    def batches():
        x, y = _data()
        for step in range(5):
            if step == 2:
                model.double()
                x, y = x.double(), y.double()
            yield x, y

    run, before, after = _train_with_copies(model, opt, tmp_path / "r.db", batches())
    for s in range(5):
        _assert_weight_and_update_norms(_row(run, s), before[s], after[s], s)


class _Flat(nn.Module):
    """A model on one flat parameter, of which the forward uses the first ``x.shape[1]`` entries."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w[: x.shape[1]]).sum(1, keepdim=True)


def test_a_parameter_narrowed_in_place_is_measured_at_its_new_size(tmp_path):
    """``p.data = p.data[:6]`` keeps the memory (the same data pointer) but not the size: the watch's views of the
    parameters, kept from step to step, must follow, or ‖W‖ and ‖ΔW‖ would still cover the 12 old entries."""
    model = _Flat()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def batches():
        x, y = _data()
        for step in range(5):
            if step == 2:
                ptr = model.w.data_ptr()
                model.w.data = model.w.data[:6]
                assert model.w.data_ptr() == ptr
            yield x, y

    run, before, after = _train_with_copies(model, opt, tmp_path / "r.db", batches())
    for s in range(5):
        _assert_weight_and_update_norms(_row(run, s), before[s], after[s], s)


def test_preclip_norm_is_the_gradient_before_clip_grad_norm(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    pre, post = [], []
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db") as w:
        for _ in range(5):
            opt.zero_grad()
            (10 * nn.functional.mse_loss(model(x), y)).backward()
            pre.append({n: _norm(p.grad) for n, p in model.named_parameters()})
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            post.append({n: _norm(p.grad) for n, p in model.named_parameters()})
            opt.step()
    run = gradsight.load(w.path)
    for s in range(5):
        row = _row(run, s)
        total_pre = math.sqrt(sum(v * v for v in pre[s].values()))
        assert row["grad_norm_preclip"] == pytest.approx(total_pre, rel=1e-6)
        assert row["grad_norm"] == pytest.approx(0.1, rel=1e-5)
        assert row["grad_norm_preclip"] > 2 * row["grad_norm"]
        assert row["clip_ratio"] == pytest.approx(0.1 / total_pre, rel=1e-5)
        for n in pre[s]:
            assert row[f"grad_norm_preclip/{n}"] == pytest.approx(pre[s][n], rel=1e-6)
            assert row[f"grad_norm/{n}"] == pytest.approx(post[s][n], rel=1e-6)
    assert run.meta["clipping"] == {"first_step": 0}


def test_gradient_accumulation_signals_are_per_optimizer_step(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    pre = []
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db") as w:
        for _ in range(3):
            opt.zero_grad()
            for k in range(4):  # four micro-batches, one optimizer step
                nn.functional.mse_loss(model(x[16 * k : 16 * (k + 1)]), y[16 * k : 16 * (k + 1)]).backward()
            pre.append(math.sqrt(sum(_norm(p.grad) ** 2 for p in model.parameters())))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
    run = gradsight.load(w.path)
    assert list(run.scalars.index) == [0, 1, 2]
    for s in range(3):
        assert run.scalars.loc[s, "grad_norm_preclip"] == pytest.approx(pre[s], rel=1e-6)


def test_parameters_without_gradients_and_outside_the_optimizer(tmp_path):
    model = _mlp()
    model[2].bias.requires_grad_(False)  # frozen: no gradient
    opt = torch.optim.SGD([model[0].weight, model[2].weight, model[2].bias], lr=0.1)  # 0.bias not held
    x, y = _data()
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db") as w:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    row = _row(gradsight.load(w.path), 2)
    assert "grad_norm/2.bias" not in row and row["grad_norm/0.bias"] > 0
    assert row["update_norm/2.bias"] == 0.0 and row["update_norm/0.weight"] > 0
    assert "update_norm/0.bias" not in row  # not held by the optimizer: no update is measured


def test_loop_without_optimizer_measures_updates_from_the_first_forward(tmp_path):
    model = _mlp()
    x, y = _data()
    with gradsight.watch(model, path=tmp_path / "r.db") as w:
        for _ in range(3):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            model.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            w.step()
    row = _row(gradsight.load(w.path), 2)
    for n, p in model.named_parameters():
        assert row[f"weight_norm/{n}"] == pytest.approx(_norm(before[n]), rel=1e-6)
        assert row[f"update_norm/{n}"] == pytest.approx(_norm(p - before[n]), rel=1e-5)


def _lr_spike_run(path, every=100, steps=70, spike=57):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _data(256)
    with gradsight.watch(model, optimizer=opt, path=path, every=every) as w:
        for s in range(steps):
            if s == spike:
                for g in opt.param_groups:
                    g["lr"] *= 1e3
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[s % 8 * 32 : (s % 8 + 1) * 32]), y[s % 8 * 32 : (s % 8 + 1) * 32])
            loss.backward()
            opt.step()
            w.log(loss)
    return gradsight.load(w.path)


def test_lr_spike_is_captured_at_its_step_and_the_next_ones(tmp_path):
    run = _lr_spike_run(tmp_path / "r.db")
    n = run.meta["config"]["anomaly_steps"]
    assert n == 5
    assert run.steps == [0, *range(57, 57 + n + 1)]  # step 0 by `every`, then the capture
    (event,) = run.events("anomaly")
    assert event["step"] == 57 and event["captured"] == [57, 57 + n]
    assert event["signal"].startswith("update_norm/") and event["value"] > 10 * event["baseline"]
    kinds = {(info.kind, s) for s, info, _ in run.summaries(steps=(57, 63))}
    assert {("weight", 57), ("grad", 57), ("update", 57)} <= kinds  # the triggering step: what is still at hand
    assert {k for k, s in kinds if s == 58} == {"weight", "grad", "update", "output", "output_grad"}
    # the captured update equals the per-step update norm of that step
    upd = run.summary("0.weight", "update", 57)
    assert math.sqrt(upd.sum_sq) == pytest.approx(run.scalars.loc[57, "update_norm/0.weight"], rel=1e-5)


def test_capture_decisions_equal_the_detector_on_the_recorded_scalars(tmp_path):
    run = _lr_spike_run(tmp_path / "r.db")
    det = Anomalies()
    events = []
    for step, row in run.scalars.iterrows():
        values = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
        # the loss is logged after the step, so the watch judges it one step late: as in the recording
        values.pop("loss", None)
        if step > 0:
            prev = run.scalars.loc[step - 1, "loss"]
            values["loss"] = prev
        ev = det.observe(int(step), anomaly_values(values))
        if ev is not None:
            events.append(ev["step"])
    assert events == [e["step"] for e in run.events("anomaly")]


def test_every_one_records_events_but_captures_nothing_twice(tmp_path):
    run = _lr_spike_run(tmp_path / "r.db", every=1, steps=60)
    assert run.steps == list(range(60))
    assert run.meta["config"]["every"] == 1
    assert run.events("anomaly") == []  # every step is logged: anomaly capture is off (nothing to add)


def test_non_finite_every_step_is_rate_limited(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _data()
    steps = 200
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db", every=0) as w:
        for _ in range(steps):
            opt.zero_grad()
            (nn.functional.mse_loss(model(x), y) * torch.tensor(float("nan"))).backward()
            opt.step()
    run = gradsight.load(w.path)
    events = run.events("anomaly")
    bound = 1 + math.log2(1 + steps / run.meta["config"]["anomaly_cooldown"])
    assert 1 <= len(events) <= bound
    assert events[0]["reason"] == "non-finite" and events[0]["step"] == 0
    assert len(run.steps) <= len(events) * (run.meta["config"]["anomaly_steps"] + 1)
    assert sum(e["suppressed"] for e in events) > 0


def test_cheap_preset_has_signals_but_no_captures(tmp_path):
    run = _lr_spike_run(tmp_path / "r.db", every=0)  # default preset, every=0: captures only
    assert run.steps == list(range(57, 63))
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "c.db", preset="cheap") as w:
        for s in range(30):
            opt.zero_grad()
            model(torch.randn(4, 6)).pow(2).mean().mul(1e6 if s == 20 else 1).backward()
            opt.step()
    run = gradsight.load(w.path)
    assert run.steps == [] and run.events("anomaly") == []
    assert "weight_norm/0.weight" in run.scalars.columns


def test_grad_scaler_skipped_step_is_recorded_as_skipped(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _data()
    pre = []
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db", scaler=scaler) as w:
        for s in range(6):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y) * (float("inf") if s == 3 else 1.0)
            scaler.scale(loss).backward()
            pre.append(math.sqrt(sum(_norm(p.grad) ** 2 for p in model.parameters())) / scaler.get_scale())
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            scaler.step(opt)
            scaler.update()
    run = gradsight.load(w.path)
    sc = run.scalars
    assert list(sc.index) == list(range(6))
    assert sc.loc[3, "step_skipped"] == 1.0 and math.isnan(sc.loc[3, "update_norm/0.weight"])
    assert not math.isfinite(sc.loc[3, "grad_norm"]) and sc.loc[3, "grad_nonfinite"] > 0
    for s in (0, 1, 2, 4):
        assert math.isnan(sc.loc[s, "step_skipped"]) and sc.loc[s, "update_norm/0.weight"] > 0
        assert sc.loc[s, "grad_norm_preclip"] == pytest.approx(pre[s], rel=1e-6)  # unscaled
        assert sc.loc[s, "grad_norm"] == pytest.approx(0.01, rel=1e-4)


def test_grad_scaler_without_clipping_records_the_unscaled_gradient_norms(tmp_path):
    """Regression: without clipping, the end-of-backward norms (of the scaled gradients) were taken for the norms
    the optimizer receives, since GradScaler.unscale_ changes the gradients without bumping their version: every
    gradient norm was recorded multiplied by the loss scale."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _data()
    expected = []
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db", scaler=scaler) as w:
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            expected.append({n: _norm(p.grad) / scaler.get_scale() for n, p in model.named_parameters()})
            scaler.step(opt)  # unscales, then steps
            scaler.update()
    sc = gradsight.load(w.path).scalars
    for s, norms in enumerate(expected):
        for n, v in norms.items():
            assert sc.loc[s, f"grad_norm/{n}"] == pytest.approx(v, rel=1e-6), (s, n)
        total = math.sqrt(sum(v * v for v in norms.values()))
        assert sc.loc[s, "grad_norm"] == pytest.approx(total, rel=1e-6)
        assert sc.loc[s, "grad_norm_preclip"] == pytest.approx(total, rel=1e-6)
        assert "clip_ratio" not in sc.columns or math.isnan(sc.loc[s, "clip_ratio"])  # unscaling is no clipping


def test_a_step_the_grad_scaler_skipped_closes_at_its_update_with_its_own_loss_and_outputs(tmp_path):
    """Regression: a skip was seen only at the next iteration's end of backward, so the last iteration's skip was
    never recorded, and (Lightning, where forwards bypass the model's own hooks) the skipped iteration's loss and
    outputs went to the next step. The scaler's update() now closes the skipped step at once."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _data(8)
    losses, firsts = [], []
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db", scaler=scaler, preset="full") as w:
        for s in range(5):
            opt.zero_grad()
            xs = x.clone()
            if s in (2, 4):  # the last iteration too
                xs[0, 0] = float("inf")
            out = model[0](xs)
            firsts.append(out.detach().clone())
            loss = nn.functional.mse_loss(model[2](model[1](out)), y)  # the layers, not the model's own call
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            assert w.current_step == s + 1  # closed by now, skipped or not
            w.log(loss=loss)
            losses.append(loss.item())
    assert "update" not in vars(scaler)  # close() gave the scaler its own update() back
    run = gradsight.load(w.path)
    sc = run.scalars
    assert run.steps == [0, 1, 2, 3, 4]
    assert [s for s in sc.index if sc.loc[s, "step_skipped"] == 1.0] == [2, 4]
    np.testing.assert_array_equal(sc["loss"].to_numpy(), losses)
    for s in range(5):
        got = run.summary("0", "output", s)
        assert got.count == firsts[s].numel() and got.sum == pytest.approx(
            float(torch.nan_to_num(firsts[s], posinf=0.0, neginf=0.0).double().sum()), rel=1e-9
        )
        assert got.posinf + got.neginf == int(torch.isinf(firsts[s]).sum())


def test_grad_scaler_output_grads_are_unscaled_and_stay_with_their_step(tmp_path):
    # dJ/dA from the backward of a GradScaler's scaled loss is recorded divided by the scale (as the parameter
    # gradients the optimizer receives are). Around the skipped step, the output gradients of the backward in
    # progress when the watch notices the skip belong to the next step, not to the skipped one.
    from gradsight.summary import summarize

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _data()
    ref: dict[int, np.ndarray] = {}
    it = [0]

    def keep(module, args, out):
        s = it[0]
        out.register_hook(lambda g: ref.__setitem__(s, (g / scaler.get_scale()).numpy().copy()))

    model[0].register_forward_hook(keep)
    with gradsight.watch(
        model, optimizer=opt, path=tmp_path / "r.db", scaler=scaler, every=1, kinds=("output_grad",)
    ) as w:
        for s in range(6):
            it[0] = s
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y) * (float("inf") if s == 3 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    run = gradsight.load(w.path)
    assert run.scalars.loc[3, "step_skipped"] == 1.0
    df = run.to_pandas(kind="output_grad")
    assert sorted(df[df.tensor == "0"]["step"]) == list(range(6))  # one summary per step, none twice
    for s in range(6):
        got, want = run.summary("0", "output_grad", s), summarize(ref[s])
        assert got.nan + got.posinf + got.neginf == want.nan + want.posinf + want.neginf
        if s != 3:
            assert got.nan + got.posinf + got.neginf == 0
            assert got.sum_sq == pytest.approx(want.sum_sq, rel=1e-6) and got.max == pytest.approx(want.max)


def test_bad_scaler_argument_is_refused(tmp_path):
    model = _mlp()
    with pytest.raises(gradsight.InputError, match=r"scaler must be a torch\.amp\.GradScaler"):
        gradsight.watch(model, path=tmp_path / "r.db", scaler=1024.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"anomaly_factor": 1.0}, "anomaly_factor must be a number > 1"),
        ({"anomaly_window": 2}, "anomaly_window must be an int >= 3"),
        ({"anomaly_steps": -1}, "anomaly_steps must be an int >= 0"),
        ({"anomaly_cooldown": 0}, "anomaly_cooldown must be an int >= 1"),
        ({"anomaly": "yes"}, "anomaly must be True or False"),
    ],
)
def test_anomaly_settings_are_checked(tmp_path, kwargs, match):
    with pytest.raises(gradsight.InputError, match=match):
        gradsight.watch(_mlp(), path=tmp_path / "r.db", **kwargs)


def test_a_learning_rate_that_kills_relus_at_step_1_is_visible_under_the_default_preset(tmp_path):
    # SGD lr=10 on a small ReLU CNN: the weights blow up at step 1 and the ReLUs die. Logged steps alone (0, 100)
    # would show live units at 0; the capture around the jump shows them dead, and the per-step norms the blow-up.
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (512,), generator=g)
    x = (torch.randn(512, 1, 8, 8, generator=g) * 0.3 + y.view(-1, 1, 1, 1) / 10).clamp(0, 1)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=10)
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db") as w:
        for s in range(120):
            i = slice(32 * (s % 16), 32 * (s % 16 + 1))
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            loss.backward()
            opt.step()
            w.log(loss)
    run = gradsight.load(w.path)
    first = run.events("anomaly")[0]
    assert first["step"] <= 2
    sc = run.scalars
    assert sc.loc[first["step"] + 1, "weight_norm/2.weight"] > 3 * sc.loc[0, "weight_norm/2.weight"]
    captured = [s for s in run.steps if first["step"] < s <= first["captured"][1]]
    assert captured
    dead = [run.summary("3", "output", s).units_active for s in captured]
    assert any((d == 0).all() for d in dead)  # every unit of the second ReLU is dead at a captured step
    assert (run.summary("3", "output", 0).units_active > 0).any()  # alive at step 0: the logged step shows nothing


def test_meta_names_frozen_parameters_and_those_the_optimizer_does_not_hold(tmp_path):
    model = _mlp()
    model[0].bias.requires_grad_(False)
    opt = torch.optim.SGD([model[0].weight, model[2].weight], lr=0.1)
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db") as w:
        meta = w.meta
    assert meta["frozen"] == ["0.bias"]
    assert meta["optimizer_params"]["not_held"] == ["0.bias", "2.bias"]


@pytest.mark.parametrize("host", [True, False], ids=["cpu", "accelerator-path"])
def test_finite_gradients_too_large_for_a_float32_square_sum_have_finite_norms(tmp_path, monkeypatch, host):
    """Regression: gradient entries of ~1e21 (a diverging run's last finite steps) are finite in float32, but
    their float32 sum of squares is not; the norms were recorded as Inf, and the diagnosis read Inf norms as a
    NaN/Inf step before any value was non-finite."""
    from gradsight.frameworks.torch import _watch

    if not host:  # the path for tensors on an accelerator, exercised on the CPU
        monkeypatch.setattr(_watch, "_host_cheap", lambda tensors: False)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-30)
    x, y = _data(16)
    with gradsight.watch(model, optimizer=opt, path=tmp_path / "r.db") as w:
        for _ in range(3):
            opt.zero_grad()
            (nn.functional.mse_loss(model(x), y) * 1e21).backward()
            grads = {n: _norm(p.grad) for n, p in model.named_parameters()}
            opt.step()
    row = _row(gradsight.load(w.path), 2)  # (the accelerator path judges a step's signals one step late)
    assert max(grads.values()) > 1.9e19  # its square overflows float32
    for n, g in grads.items():
        assert row[f"grad_norm/{n}"] == pytest.approx(g, rel=1e-5), n
    assert row["grad_norm"] == pytest.approx(math.sqrt(sum(g * g for g in grads.values())), rel=1e-5)
    assert row["grad_nonfinite"] == 0
    assert not [f for f in gradsight.diagnose(w.path) if f.code == "non-finite"]


def test_norms_of_reads_views_at_their_offset_and_takes_any_layout():
    """The host norms read tensors where their data starts (a view's offset), any layout, any float dtype."""
    from gradsight.frameworks.torch._signals import norms_of

    base = torch.randn(40, 30) * 3
    tensors = [
        base[7:19],  # contiguous, at an offset into its storage
        base[:, 5],  # strided
        base.T,  # non-contiguous
        base[3:4, 2:3].reshape(()),  # one element at an offset
        torch.empty(0),
        base.double()[11:],
        base.half()[2:5],
    ]
    for group in (tensors[:1], tensors[:5], tensors):
        got = norms_of(group, host=True)
        assert got == pytest.approx([_norm(t) for t in group], rel=1e-6)
