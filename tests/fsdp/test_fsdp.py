"""FSDP2 (fully_shard): 2 CPU ranks (gloo, 127.0.0.1), spawned with torch.multiprocessing; one spawn for all scenarios.

Every recorded field of the sharded run is compared against a single process on the concatenated 2b batch: the
merged shard summaries of weights, gradients and updates and the merged rank-local outputs (counts and histograms
exactly, sums to float64 rounding), and the per-step signals (sums of squared shard norms over ranks, then sqrt).
"""

import fsdp_workers as W
import numpy as np
import pytest
import torch
from torch import nn

import gradsight
from _ranks import assert_open_failed_on_every_rank, assert_same, result, spawn_ranks
from gradsight import UnsupportedError
from gradsight.store import load

# One worker runs this module: its tests share one module fixture (pytest-xdist).
pytestmark = pytest.mark.xdist_group("fsdp")

TIMEOUT_S = 120  # the whole spawn (all scenarios); a hang fails the test instead of blocking CI
PARAM_KINDS = ("weight", "grad", "update")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return spawn_ranks(W.run_rank, out, list(W.SCENARIOS), "FSDP", TIMEOUT_S)


def single_process_run(path, micro=1):
    """The reference: one process, the concatenated 2b batches, loss = sum, lr / 2 (FSDP averages 2 rank sums)."""
    model = W.make_net()
    opt = torch.optim.SGD(W._params(model), lr=W.LR / 2)
    x, y = W.data(2, micro=micro)
    with gradsight.watch(model, optimizer=opt, path=path, preset="full"):
        for s in range(W.STEPS):
            opt.zero_grad()
            for k in range(micro):
                nn.functional.cross_entropy(model(x[s, k]), y[s, k], reduction="sum").backward()
            opt.step()
    return load(path)


def assert_runs_equal(ref, run):
    ref_rows = {(s, t.name, t.kind): x for s, t, x in ref.summaries()}
    rows = {(s, t.name, t.kind): x for s, t, x in run.summaries()}
    assert rows.keys() == ref_rows.keys()
    assert {k[2] for k in rows} == {"weight", "grad", "update", "output", "output_grad"}
    for key, r in ref_rows.items():
        # FSDP differentiates the mean of the two ranks' sum-losses: its gradients (and dJ/dA) are half the single
        # process's sum-loss gradients.
        assert_same(r, rows[key], scale=0.5 if key[2] in ("grad", "output_grad") else 1.0, what=key)
    shapes = {(t.name, t.kind): tuple(t.shape) for t in run.tensors if t.kind in PARAM_KINDS}
    assert shapes == {(t.name, t.kind): tuple(t.shape) for t in ref.tensors if t.kind in PARAM_KINDS}
    # the per-step signals: gradient norms half the reference's, weight and update norms equal
    want, got = ref.scalars, run.scalars
    signals = [c for c in want.columns if c.startswith(("grad_norm", "weight_norm/", "update_norm/"))]
    assert signals and set(signals) <= set(got.columns)
    for c in signals:
        scale = 0.5 if c.startswith("grad_norm") else 1.0
        np.testing.assert_allclose(got[c].to_numpy(), scale * want[c].to_numpy(), rtol=1e-9, err_msg=c)
    assert (got["grad_nonfinite"] == 0).all()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return single_process_run(tmp_path_factory.mktemp("single") / "single.db")


def test_every_recorded_field_equals_one_process_on_the_concatenated_batch(ranks, reference):
    run, ref = load(ranks / "merge.db"), reference
    assert sorted(run.steps) == [0, 1, 2]
    assert_runs_equal(ref, run)
    # uneven shards (7 rows on 2 ranks: 4 + 3), an empty shard on rank 1 (temp, 1 element), a frozen parameter
    assert run.summary("body.0.weight", "weight", 0).count == 7 * 12
    assert run.summary("temp", "grad", 1).count == 1
    frozen = {t.kind for t in run.tensors if t.name == "body.0.bias"}
    assert frozen == {"weight"}  # no gradient, and the optimizer does not hold it: no update
    assert run.meta["frozen"] == ref.meta["frozen"] == ["body.0.bias"]
    assert run.meta["optimizer_params"]["not_held"] == ["body.0.bias"]
    out = run.summary("body.0", "output", 0)
    assert out.count == 2 * W.B * 7 and out.units_total == 2 * W.B  # 2 ranks x b samples x 7 units


def test_fsdp1_with_use_orig_params_equals_one_process_too(ranks, reference):
    run = load(ranks / "fsdp1.db")
    assert run.meta["distributed"]["wrapper"] == "FullyShardedDataParallel (use_orig_params=True)"
    # the model's own names: FSDP1's _fsdp_wrapped_module components are removed, shapes are the global ones
    assert run.layers == ["model", "body.0", "body.1", "body.2", "body.3", "body.4"]
    assert_runs_equal(reference, run)
    assert run.meta["frozen"] == ["body.0.bias"]


def test_gradient_accumulation_without_gradient_sync_equals_one_process(ranks, tmp_path):
    run = load(ranks / "accum.db")
    ref = single_process_run(tmp_path / "single.db", micro=2)
    assert_runs_equal(ref, run)
    assert run.summary("body.0", "output", 0).count == 2 * 2 * W.B * 7  # 2 micro-batches x 2 ranks x b x 7


def test_only_rank_0_writes_and_meta_says_what_is_recorded(ranks):
    assert result(ranks, "merge", 0)["writes"] and result(ranks, "merge", 0)["read"] == "ok"
    r1 = result(ranks, "merge", 1)
    assert r1["path"] is None and not r1["writes"] and "rank 1 writes no run file" in r1["read"]
    assert {p.name for p in ranks.glob("*rank1.db")} == {"signals.rank1.db"}  # rank_paths=True only
    meta = load(ranks / "merge.db").meta["distributed"]
    assert meta["wrapper"] == "fully_shard (FSDP2)" and meta["world_size"] == 2 and meta["writing_ranks"] == [0]
    assert meta["merged_kinds"] == ["weight", "grad", "update", "output", "output_grad"]
    assert meta["mixed_precision"] is None and meta["cpu_offload"] is None
    # 7 parameters (6 held by the optimizer): 4 x 7 + 2 x 6 + 3 float64 words per step
    assert meta["per_step_bytes"] == 8 * (4 * 7 + 2 * 6 + 3)
    sent = meta["bytes_per_logged_step"]["sent_per_rank"]
    assert meta["bytes_per_logged_step"]["received_per_rank"] == 2 * sent
    # 1 + 3 x 6 parameter rows + 2 x 5 layer rows (output, output_grad), 2,128 bytes each, plus units and header
    assert 29 * 2128 + 96 <= sent <= 29 * 2128 + 96 + 8 * 2 * 2 * (7 + 7 + 5 + 5 + 3)


def test_per_step_signals_are_global_norms_and_anomaly_captures_agree_on_every_rank(ranks):
    runs = [load(result(ranks, "signals", r)["path"]) for r in range(2)]
    want = result(ranks, "signals", 0)["preclip"]  # the norm of the whole gradient, before clip_grad_norm_
    per_tensor = result(ranks, "signals", 0)["per_tensor"]
    assert want == result(ranks, "signals", 1)["preclip"]
    a, b = (run.scalars for run in runs)
    assert a.columns.tolist() == b.columns.tolist()
    signal_cols = [c for c in a.columns if c != "loss"]
    # bit-identical on both ranks: what the anomaly judge sees is the same everywhere
    assert a[signal_cols].equals(b[signal_cols])
    np.testing.assert_allclose(a["grad_norm_preclip"].to_numpy(), want, rtol=1e-9)
    np.testing.assert_allclose(a["grad_norm"].to_numpy(), np.minimum(want, 0.5), rtol=1e-6)
    for name in per_tensor[0]:
        got = a[f"grad_norm_preclip/{name}"].to_numpy()
        np.testing.assert_allclose(got, [p[name] for p in per_tensor], rtol=1e-9, err_msg=name)
    np.testing.assert_allclose(a["clip_ratio"].to_numpy(), 0.5 / np.asarray(want), rtol=1e-6)
    events = [[(e["step"], e["signal"], e["captured"]) for e in run.events("anomaly")] for run in runs]
    assert events[0] == events[1] and [e[0] for e in events[0]] == [20]  # rank 1's loss spike is not judged
    assert runs[0].steps == runs[1].steps == [0, *range(20, 26)]


def test_mixed_precision_records_the_float32_master_shards(ranks):
    run = load(ranks / "mixed.db")
    dtypes = {(t.name, t.kind): t.dtype for t in run.tensors}
    assert dtypes[("body.0.weight", "weight")] == dtypes[("body.0.weight", "grad")] == "torch.float32"
    assert dtypes[("body.0", "output")] == "torch.bfloat16"  # the forward ran in the policy's param_dtype
    assert "bfloat16" in run.meta["distributed"]["mixed_precision"]
    assert run.summary("body.0.weight", "weight", 1).count == 7 * 12


def test_rank_dependent_layers_raise_on_both_ranks_instead_of_hanging(ranks):
    for r in (0, 1):
        res = result(ranks, "layout_mismatch", r)
        assert res["step"] == 1 and "the ranks disagree at a logged step" in res["error"]


def test_a_rank_that_cannot_open_its_run_file_makes_every_rank_raise_at_once(ranks):
    assert_open_failed_on_every_rank(ranks)


def test_a_rank_that_raises_leaves_at_once_and_the_other_fails_instead_of_hanging(ranks):
    r0, r1 = result(ranks, "rank_raises", 0), result(ranks, "rank_raises", 1)
    assert r1["error"] == "ValueError: a bad batch on rank 1" and r1["seconds"] < 10
    assert r0["error"].startswith("RuntimeError") and r0["seconds"] < 15  # well before the 20 s pg timeout
    run = load(ranks / "raises.db")
    assert run.steps == [0, 2]
    assert [e["type"] for e in run.events("exception")] == ["RuntimeError"]


def test_shardings_that_cannot_be_merged_exactly_are_refused_on_every_rank(ranks):
    for r in (0, 1):
        res = result(ranks, "refusals", r)
        assert res["fsdp1_flat"].startswith("refused: gradsight.watch does not support FullyShardedDataParallel wi")
        assert "on a 2-D device mesh: hybrid sharding (HSDP)" in res["hsdp"]
        assert "DTensor parameters without FSDP" in res["tensor_parallel"]
    assert not list(ranks.glob("refused_*"))


# ---- refusals and arguments, in one process ----------------------------------------------------------------------
def test_fsdp1_without_use_orig_params_is_refused_naming_what_is_missing(tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(fsdp)  # a bare instance: a real one needs a process group
    fsdp._modules["_fsdp_wrapped_module"] = nn.Linear(3, 2)
    with pytest.raises(UnsupportedError, match=r"FullyShardedDataParallel without use_orig_params=True: its param"):
        gradsight.watch(fsdp, path=tmp_path / "r.db")
    assert not (tmp_path / "r.db").exists()


def test_deepspeed_is_refused(tmp_path):
    model = nn.Linear(3, 2)
    model.weight.ds_id = 0  # what DeepSpeed ZeRO-3 puts on every partitioned parameter
    with pytest.raises(UnsupportedError, match=r"does not support DeepSpeed \(ZeRO\): ZeRO partitions"):
        gradsight.watch(model, path=tmp_path / "r.db")
    assert not (tmp_path / "r.db").exists()
