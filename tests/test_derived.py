"""Derived quantities (gradsight._derived) against naive recomputations from the raw tensors, and agreement of
the one definition across diagnose, show and export on one run."""

import math

import numpy as np
import pandas as pd
import pytest

from gradsight import _derived as derived
from gradsight.diagnose import Thresholds, UpdateRatioRule, diagnose
from gradsight.export import layer_scalars
from gradsight.show._data import activity, layer_rms, layer_table, update_ratio
from gradsight.store import Run, RunWriter
from gradsight.summary import summarize

STEPS = (0, 1, 2, 3, 4, 5)
# tensor -> (layer, shape, has an update); "b.bias" is a tensor whose update is never recorded
TENSORS = {
    "a.weight": ("a", (4, 3), True),
    "a.bias": ("a", (4,), True),
    "b.weight": ("b", (2, 4), True),
    "b.bias": ("b", (2,), False),
    "z.weight": ("z", (3,), True),  # all-zero weights at step 0: ratio undefined there
}
NAN_UPDATE = (3, "a.weight")  # a NaN in an update: the ratio of layer a is undefined at step 3
NAN_GRAD = (2, "b.weight")  # NaN and Inf in a gradient


@pytest.fixture
def raw(tmp_path):
    """A run file written from known arrays; returns (path, arrays) with arrays[(step, tensor, kind)]."""
    rng = np.random.default_rng(7)
    arrays = {}
    path = tmp_path / "derived.db"
    with RunWriter(path, meta={"framework": "numpy-test", "model": {"layers": [{"name": n} for n in "abz"]}}) as w:
        for step in STEPS:
            items = []
            for name, (layer, shape, has_update) in TENSORS.items():
                weight = rng.normal(0, 0.5, shape).astype(np.float32)
                if name == "z.weight" and step == 0:
                    weight[:] = 0
                grad = rng.normal(0, 10.0 ** -rng.integers(0, 4), shape).astype(np.float32)
                if (step, name) == NAN_GRAD:
                    grad.flat[:2] = [np.nan, np.inf]
                kinds = {"weight": weight, "grad": grad}
                if has_update:
                    update = (-0.1 * np.nan_to_num(grad, posinf=0)).astype(np.float32)
                    if (step, name) == NAN_UPDATE:
                        update.flat[0] = np.nan
                    kinds["update"] = update
                for kind, a in kinds.items():
                    arrays[(step, name, kind)] = a
                    items.append((w.tensor_id(name, layer, kind, a.shape, "float32"), summarize(a)))
            for layer, width in (("a", 4), ("b", 2)):
                out = np.maximum(rng.normal(size=(8, width)), 0).astype(np.float32)
                out[:, 0] = 0  # one dead unit
                arrays[(step, layer, "output")] = out
                items.append((w.tensor_id(layer, layer, "output", out.shape, "float32"), summarize(out, unit_axis=-1)))
            w.log_summaries(step, items)
    return path, arrays


def _tensors(arrays, step, layer, kind):
    return {n: a for (s, n, k), a in arrays.items() if s == step and k == kind and TENSORS.get(n, (n,))[0] == layer}


def naive_rms(arrays, step, layer, kind):
    x = np.concatenate([a.astype(np.float64).ravel() for a in _tensors(arrays, step, layer, kind).values()])
    x = x[np.isfinite(x)]
    return math.sqrt(np.mean(x**2)) if x.size else math.nan


def naive_ratio(arrays, step, layer):
    """||update|| / ||weight|| over the layer's tensors with both; NaN if any element is NaN/Inf or ||W|| = 0."""
    upd = _tensors(arrays, step, layer, "update")
    wts = _tensors(arrays, step, layer, "weight")
    both = [n for n in upd if n in wts]
    u = np.concatenate([upd[n].astype(np.float64).ravel() for n in both])
    w = np.concatenate([wts[n].astype(np.float64).ravel() for n in both])
    if not (np.isfinite(u).all() and np.isfinite(w).all()) or not np.any(w):
        return math.nan
    return float(np.linalg.norm(u) / np.linalg.norm(w))


def same(got, want, rtol=1e-6):
    if math.isnan(want):
        return math.isnan(got)
    return math.isclose(got, want, rel_tol=rtol, abs_tol=1e-30)


def test_layer_rms_matches_a_naive_recomputation(raw):
    path, arrays = raw
    with Run(path) as r:
        for kind in ("weight", "grad", "update"):
            long = derived.layer_rms(r.to_pandas(kind=kind))
            wide = layer_rms(r, kind)  # what the figures draw
            for step in STEPS:
                for layer in ("a", "b"):
                    want = naive_rms(arrays, step, layer, kind)
                    got = long[(long.step == step) & (long.layer == layer)]["rms"].item()
                    assert same(got, want), (kind, step, layer)
                    assert same(wide.loc[step, layer], want)
    assert math.isnan(derived.rms(0.0, 0)) and derived.rms(8.0, 2) == 2.0


def test_update_ratio_matches_a_naive_recomputation(raw):
    path, arrays = raw
    with Run(path) as r:
        table = derived.update_ratio_table(r.to_pandas(kind=["weight", "update"]))
        wide = update_ratio(r)
        rows = list(r.summaries())
    for step in STEPS:
        step_items = [(info, s) for st, info, s in rows if st == step]
        scalars = layer_scalars(step_items)  # what the TensorBoard export and the logger callbacks publish
        per_step = derived.step_update_ratios((i.layer, i.name, i.kind, s.sum_sq, s.nonfinite) for i, s in step_items)
        for layer in ("a", "b", "z"):
            want = naive_ratio(arrays, step, layer)
            row = table[(table.step == step) & (table.layer == layer)]
            assert same(row["ratio"].item(), want), (step, layer, row)
            assert same(wide.loc[step, layer], want)
            assert same(per_step[layer], want)
            assert same(scalars[f"{layer}/update_ratio"], want)
    # layer b pairs only its weight (its bias has no update): one tensor, not two
    assert set(table[table.layer == "b"]["tensors"]) == {1}
    # undefined ratios are reported, never dropped: the NaN update and the zero weights
    assert math.isnan(wide.loc[3, "a"]) and table[(table.step == 3) & (table.layer == "a")]["nonfinite"].item() == 1
    assert math.isnan(wide.loc[0, "z"]) and not math.isnan(wide.loc[1, "z"])
    assert len(table) == len(STEPS) * 3


def test_update_ratio_kernel_edge_cases():
    assert derived.update_ratio(4.0, 16.0) == 0.5
    assert math.isnan(derived.update_ratio(4.0, 0.0))
    assert math.isnan(derived.update_ratio(4.0, 16.0, nonfinite=1))
    assert math.isnan(derived.update_ratio(math.inf, 16.0))
    got = derived.update_ratio(np.array([1.0, 1.0]), np.array([4.0, math.inf]), np.array([0, 0]))
    assert got[0] == 0.5 and math.isnan(got[1])
    assert derived.step_update_ratios([("l", "t", "update", 1.0, 0)]) == {}  # no weight for it: no ratio


def test_unit_activity_matches_a_naive_recomputation(raw):
    path, arrays = raw
    with Run(path) as r:
        active, dead = activity(r)
    for step in STEPS:
        for layer in ("a", "b"):
            out = arrays[(step, layer, "output")]
            assert same(active.loc[step, layer], np.count_nonzero(out) / out.size)
            assert same(dead.loc[step, layer], np.mean((out != 0).sum(axis=0) == 0))


def test_global_norm_matches_a_naive_recomputation(raw):
    path, arrays = raw
    with Run(path) as r:
        grads = r.to_pandas(kind="grad").groupby("step")[["sum_sq", "nonfinite"]].sum()
    for step in STEPS:
        x = np.concatenate(
            [a.astype(np.float64).ravel() for (s, _, k), a in arrays.items() if s == step and k == "grad"]
        )
        want = float(np.linalg.norm(x)) if np.isfinite(x).all() else math.nan
        assert same(derived.global_norm(grads.loc[step, "sum_sq"], grads.loc[step, "nonfinite"]), want), step


def test_figure_data_and_finding_evidence_agree(raw):
    """The update ratio the overview figure draws and the one the update-ratio finding quotes are the same."""
    path, _ = raw
    th = Thresholds(update_ratio_high=1e-9, update_ratio_low=1e-12)  # every layer is "too high": all get evidence
    with Run(path) as r:
        figure = update_ratio(r)
        table = layer_table(r)
        (finding,) = diagnose(r, rules=[UpdateRatioRule()], thresholds=th)
    assert finding.code == "update-ratio-high" and set(finding.layers) == {"a", "b", "z"}
    for layer, ev in finding.evidence["layers"].items():
        col = figure[layer]
        assert ev["median_ratio"] == pytest.approx(float(col.median()), rel=1e-12)
        assert ev["min_ratio"] == pytest.approx(float(col.min()), rel=1e-12)
        assert ev["max_ratio"] == pytest.approx(float(col.max()), rel=1e-12)
        assert ev["steps"] == int(col.notna().sum())
        assert ev["undefined_steps"] == int(col.isna().sum())
        last = table.set_index("layer").loc[layer, "update_ratio"]
        assert last == pytest.approx(float(col.dropna().iloc[-1]), rel=1e-12)
    assert finding.evidence["layers"]["a"]["undefined_steps"] == 1
    assert finding.evidence["layers"]["z"]["undefined_steps"] == 1


def test_wide_orders_layers_and_keeps_gaps():
    long = pd.DataFrame({"step": [0, 0, 1], "layer": ["y", "x", "x"], "v": [1.0, 2.0, 3.0]})
    w = derived.wide(long, "v", ["x"])
    assert list(w.columns) == ["x", "y"] and list(w.index) == [0, 1] and math.isnan(w.loc[1, "y"])
    assert derived.wide(derived.update_ratio_table(long.iloc[:0]), "ratio").empty
