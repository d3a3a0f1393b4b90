"""DDP: 2 CPU ranks (gloo, 127.0.0.1), spawned with torch.multiprocessing like users do; one spawn for all scenarios.

The global summaries of 2 ranks x batch b are compared against a single process on the concatenated 2b batch;
the noise scale against a naive recomputation from per-half gradients written here.
"""

import math

import ddp_workers as W
import numpy as np
import pytest
import torch
from torch import nn

import gradsight
from _ranks import assert_open_failed_on_every_rank, assert_same, result, spawn_ranks
from gradsight import InputError
from gradsight.store import load

# One worker runs this module: its tests share one module fixture (pytest-xdist).
pytestmark = pytest.mark.xdist_group("ddp")

TIMEOUT_S = 120  # the whole spawn (all scenarios); a hang fails the test instead of blocking CI


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return spawn_ranks(W.run_rank, out, list(W.SCENARIOS), "DDP", TIMEOUT_S)


def single_process_run(path):
    """The reference: one process, the concatenated 2b batch, loss = sum, lr / 2 (DDP averages 2 rank sums)."""
    model = W.make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = W.data(2)
    with gradsight.watch(model, optimizer=opt, path=path, preset="full"):
        for s in range(W.STEPS):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[s]), y[s], reduction="sum").backward()
            opt.step()
    return load(path)


def test_global_summaries_equal_one_process_on_the_concatenated_batch(ranks, tmp_path):
    ddp = load(ranks / "merge.db")
    ref = single_process_run(tmp_path / "single.db")
    ref_rows = {(s, t.name, t.kind): x for s, t, x in ref.summaries()}
    ddp_rows = {(s, t.name, t.kind): x for s, t, x in ddp.summaries()}
    assert ddp_rows.keys() == ref_rows.keys()
    assert {k[2] for k in ddp_rows} == {"weight", "grad", "update", "output", "output_grad"}
    assert sorted({k[0] for k in ddp_rows}) == [0, 1, 2]
    for key, r in ref_rows.items():
        # DDP differentiates the mean of the two ranks' sum-losses: its gradients (and dJ/dA) are half the single
        # process's sum-loss gradients.
        assert_same(r, ddp_rows[key], scale=0.5 if key[2] in ("grad", "output_grad") else 1.0, what=key)
    out = ddp.summary("1", "output", 0)
    assert out.count == 2 * W.B * 8 and out.units_total == 2 * W.B  # 2 ranks x b samples x 8 units


def test_only_rank_0_writes_and_meta_says_replicas_identical(ranks):
    assert result(ranks, "merge", 0)["writes"] and result(ranks, "merge", 0)["read"] == "ok"
    r1 = result(ranks, "merge", 1)
    assert r1["path"] is None and not r1["writes"] and "rank 1 writes no run file" in r1["read"]
    written = {p.name for p in ranks.iterdir() if ".db" in p.name}
    # rank 1 wrote only the files rank_paths=True asked it for
    assert {n for n in written if "rank1" in n} == {"rp.rank1.db", "signals.rank1.db"}
    meta = load(ranks / "merge.db").meta["distributed"]
    assert meta["world_size"] == 2 and meta["backend"] == "gloo" and meta["writing_ranks"] == [0]
    rep = meta["replicas_identical"]
    assert rep["verified"] is True and rep["steps_checked"] == W.STEPS and rep["max_rel_deviation"] == 0.0
    assert meta["merged_kinds"] == ["output", "output_grad"]


def naive_noise_scale_at_step_0():
    """|g_r|^2 of each half's gradient and |G|^2 of their mean (what DDP averages), then the estimator."""
    model = W.make_mlp()
    x, y = W.data(2)
    gs = []
    for r in range(2):
        model.zero_grad()
        xs, ys = x[0, r * W.B : (r + 1) * W.B], y[0, r * W.B : (r + 1) * W.B]
        nn.functional.cross_entropy(model(xs), ys, reduction="sum").backward()
        gs.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    big = (gs[0] + gs[1]) / 2
    g_small = float(sum(g.square().sum() for g in gs) / 2)
    g_big = float(big.square().sum())
    b_small, b_big = W.B, 2 * W.B
    grad_sq = (b_big * g_big - b_small * g_small) / (b_big - b_small)
    trace = (g_small - g_big) / (1 / b_small - 1 / b_big)
    return {"noise_scale/grad_sq": grad_sq, "noise_scale/trace": trace, "noise_scale": trace / grad_sq}


@pytest.mark.parametrize("run", ["merge", "clip"])
def test_noise_scale_matches_a_naive_recomputation(ranks, run):
    sc = load(ranks / f"{run}.db").scalars
    for name, want in naive_noise_scale_at_step_0().items():
        assert math.isclose(sc.loc[0, name], want, rel_tol=1e-9), (run, name, sc.loc[0, name], want)
    assert sc["noise_scale"].notna().all()  # preset full: every step is logged


def test_per_step_signals_and_anomaly_captures_agree_on_every_rank(ranks):
    runs = [load(result(ranks, "signals", r)["path"]) for r in range(2)]
    want = result(ranks, "signals", 0)["preclip"]  # the all-reduced gradient, before clip_grad_norm_
    assert want == result(ranks, "signals", 1)["preclip"]
    for run in runs:
        sc = run.scalars
        np.testing.assert_allclose(sc["grad_norm_preclip"].to_numpy(), want, rtol=1e-9)
        np.testing.assert_allclose(sc["grad_norm"].to_numpy(), np.minimum(want, 0.5), rtol=1e-6)
    events = [[(e["step"], e["signal"], e["captured"]) for e in run.events("anomaly")] for run in runs]
    assert events[0] == events[1] and [e[0] for e in events[0]] == [20]  # rank 1's loss spike is not judged
    assert runs[0].steps == runs[1].steps == [0, *range(20, 26)]


def test_rank_paths_gives_every_rank_the_same_global_summaries(ranks):
    assert result(ranks, "rank_paths", 1)["path"].endswith("rp.rank1.db")
    a = {(s, t.name, t.kind): x for s, t, x in load(ranks / "rp.db").summaries(kind="output")}
    b = {(s, t.name, t.kind): x for s, t, x in load(ranks / "rp.rank1.db").summaries(kind="output")}
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k] == b[k], k


def test_different_settings_on_two_ranks_raise_on_both(ranks):
    for r in (0, 1):
        assert "different settings or models on different ranks" in result(ranks, "config_mismatch", r)["error"]


def test_a_rank_that_cannot_open_its_run_file_makes_every_rank_raise_at_once(ranks):
    assert_open_failed_on_every_rank(ranks)


def test_rank_dependent_layers_raise_on_both_ranks_instead_of_hanging(ranks):
    for r in (0, 1):
        res = result(ranks, "layout_mismatch", r)
        assert res["step"] == 1 and "the ranks disagree at a logged step" in res["error"]


def test_a_rank_that_finishes_early_does_not_block_the_other(ranks):
    r0, r1 = result(ranks, "early_exit", 0), result(ranks, "early_exit", 1)
    assert (r0["steps_run"], r1["steps_run"]) == (8, 6)
    assert r0["close_s"] < 5 and r1["close_s"] < 5
    run = load(ranks / "early.db")
    assert run.steps == [0, 4]
    sc = run.scalars
    assert sc["loss"].notna().sum() == 8
    assert sc["noise_scale"].dropna().index.tolist() == [0, 4]


# ---- single process: refusals ------------------------------------------------------------------------------------
def test_ddp_only_arguments_are_refused_for_a_plain_model(tmp_path):
    model = nn.Linear(3, 2)
    with pytest.raises(InputError, match="apply to distributed models only"):
        gradsight.watch(model, path=tmp_path / "r.db", batch_size=4)
    with pytest.raises(InputError, match="batch_size must be a positive int"):
        gradsight.watch(model, path=tmp_path / "r.db", batch_size=0)
