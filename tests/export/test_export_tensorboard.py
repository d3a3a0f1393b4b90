"""The TensorBoard export, read back with TensorBoard's own reader and checked against the raw arrays."""

import argparse
import math
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradsight
from gradsight import StoreError, load
from gradsight.export import LiveTensorBoard, TensorBoardSink, to_tensorboard
from gradsight.export import _cli as export_cli

STEPS = (0, 1, 2, 5)  # the steps of the synthetic_run fixture
RTOL = 1e-6  # TensorBoard keeps scalars as float32


def _read(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


def _pool(syn, step, layer, kind):
    arrays = [a for (s, n, k), a in syn.arrays.items() if s == step and k == kind and syn.layers[n] == layer]
    return np.concatenate([a.astype(np.float64).ravel() for a in arrays])


def _close(got, want):
    if math.isnan(want):
        return math.isnan(got)
    return math.isclose(got, want, rel_tol=RTOL, abs_tol=1e-30)


def test_per_layer_scalars_match_a_naive_recomputation(synthetic_run, tmp_path):
    to_tensorboard(synthetic_run.path, tmp_path / "tb")
    acc = _read(tmp_path / "tb")
    for layer, label in (("fc1", "fc1"), ("fc2", "fc2"), ("", "(model)")):
        for kind in ("weight", "grad", "update"):
            rms = _scalars(acc, f"{label}/{kind}_rms")
            nonfinite = _scalars(acc, f"{label}/{kind}_nonfinite")
            zeros = _scalars(acc, f"{label}/{kind}_zero_fraction")
            for step in STEPS:
                x = _pool(synthetic_run, step, layer, kind)
                fin = x[np.isfinite(x)]
                assert _close(rms[step], math.sqrt(np.mean(fin**2))), (layer, kind, step)
                assert nonfinite[step] == np.count_nonzero(~np.isfinite(x))
                assert _close(zeros[step], np.count_nonzero(x == 0) / x.size)
        ratio = _scalars(acc, f"{label}/update_ratio")
        for step in STEPS:
            u, w = _pool(synthetic_run, step, layer, "update"), _pool(synthetic_run, step, layer, "weight")
            ok = np.isfinite(u).all() and np.isfinite(w).all()
            assert _close(ratio[step], np.linalg.norm(u) / np.linalg.norm(w) if ok else math.nan)
    active, dead = _scalars(acc, "fc1/output_active_rate"), _scalars(acc, "fc1/output_dead_fraction")
    for step in STEPS:
        out = synthetic_run.arrays[(step, "fc1", "output")]
        assert _close(active[step], np.count_nonzero(out) / out.size)
        assert _close(dead[step], np.mean((out != 0).sum(axis=0) == 0))


def test_headline_and_run_scalars(synthetic_run, tmp_path):
    to_tensorboard(synthetic_run.path, tmp_path / "tb")
    acc = _read(tmp_path / "tb")
    norm = _scalars(acc, "gradsight/grad_norm")
    nonfinite = _scalars(acc, "gradsight/nonfinite")
    for step in STEPS:
        grads = np.concatenate(
            [a.ravel() for (s, _, k), a in synthetic_run.arrays.items() if s == step and k == "grad"]
        )
        # a step whose gradients hold a NaN/Inf has no global norm (as torch's clip_grad_norm_ says): NaN
        want = float(np.linalg.norm(grads.astype(np.float64))) if np.isfinite(grads).all() else math.nan
        assert _close(norm[step], want), step
        assert nonfinite[step] == (3 if step == 2 else 0)
    loss = _scalars(acc, "loss")
    assert sorted(loss) == [0, 1, 2, 3, 5]  # step 3 has scalars only
    for step, value in loss.items():
        assert _close(value, synthetic_run.scalars[(step, "loss")])  # the NaN loss of step 5 stays NaN


def _naive_bins(a):
    x = np.abs(a[np.isfinite(a) & (a != 0)].astype(np.float64))
    return np.floor(np.log2(x)).astype(int)


@pytest.mark.parametrize("mode", ["log2", "abs"])
def test_histograms_are_the_log2_bins_and_ignore_non_finite_values(synthetic_run, tmp_path, mode):
    to_tensorboard(synthetic_run.path, tmp_path / "tb", histograms=mode)
    acc = _read(tmp_path / "tb")
    tags = acc.Tags()["histograms"]
    suffix = "log2abs" if mode == "log2" else "abs"
    assert f"fc1/grad_{suffix}/fc1.weight" in tags and f"(model)/weight_{suffix}/scale" in tags
    for (step, name, kind), a in synthetic_run.arrays.items():
        layer = synthetic_run.layers[name] or "(model)"
        events = {e.step: e.histogram_value for e in acc.Histograms(f"{layer}/{kind}_{suffix}/{name}")}
        h = events[step]
        e = _naive_bins(a)
        assert h.num == e.size  # finite, non-zero elements only: NaN/Inf/0 never enter a histogram
        if step == 2 and (name, kind) == ("fc1.weight", "grad"):
            assert h.num == a.size - 4
        exps = np.arange(e.min(), e.max() + 1)
        assert list(h.bucket) == [np.count_nonzero(e == k) for k in exps]
        if mode == "log2":
            assert list(h.bucket_limit) == list(exps + 1.0)
            assert (h.min, h.max) == (e.min(), e.max() + 1)
        else:
            assert list(h.bucket_limit) == list(np.ldexp(1.0, exps + 1))
            fin = a[np.isfinite(a)].astype(np.float64)
            assert math.isclose(h.sum_squares, float(np.dot(fin, fin)), rel_tol=1e-9)


def test_scalars_only_and_step_range(synthetic_run, tmp_path):
    to_tensorboard(synthetic_run.path, tmp_path / "tb", histograms=None, steps=(1, 2))
    acc = _read(tmp_path / "tb")
    assert acc.Tags()["histograms"] == []
    assert sorted(_scalars(acc, "fc1/grad_rms")) == [1, 2]


def test_refuses_to_export_twice_into_one_logdir_unless_overwrite(synthetic_run, tmp_path):
    first = to_tensorboard(synthetic_run.path, tmp_path / "tb")
    with pytest.raises(StoreError, match=r"already holds 1 gradsight event file.*overwrite=True"):
        to_tensorboard(synthetic_run.path, tmp_path / "tb")
    second = to_tensorboard(synthetic_run.path, tmp_path / "tb", overwrite=True)
    assert not first.exists() and second.exists()
    assert len(_scalars(_read(tmp_path / "tb"), "fc1/grad_rms")) == len(STEPS)


def test_bad_histogram_mode_is_refused(synthetic_run, tmp_path):
    with pytest.raises(gradsight.InputError, match=r"histograms must be 'log2'.*not 'linear'"):
        to_tensorboard(synthetic_run.path, tmp_path / "tb", histograms="linear")


def test_missing_tensorboard_says_what_to_install(monkeypatch, synthetic_run, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard.compat.proto", None)
    with pytest.raises(ImportError, match=r"pip install 'gradsight\[tensorboard\]'"):
        to_tensorboard(synthetic_run.path, tmp_path / "tb")


def test_writing_events_never_imports_tensorflow_or_torch(tmp_path):
    code = (
        "import sys; from gradsight.export import TensorBoardSink; "
        f"s = TensorBoardSink({str(tmp_path / 'tb')!r}); s.add_scalars(0, {{'a': 1.0}}); s.close(); "
        "print(','.join(m for m in ('tensorflow', 'torch', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_writes_the_same_events(synthetic_run, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    export_cli.add_arguments(parser)
    args = parser.parse_args(
        ["tensorboard", str(synthetic_run.path), "--logdir", str(tmp_path / "tb"), "--steps", "1:"]
    )
    assert export_cli.run(args) == 0
    assert "tensorboard --logdir" in capsys.readouterr().out
    assert sorted(_scalars(_read(tmp_path / "tb"), "fc2/weight_rms")) == [1, 2, 5]


def test_live_export_follows_a_run_being_written(tmp_path):
    path = tmp_path / "live.db"
    rng = np.random.default_rng(0)
    writer = gradsight.RunWriter(path)
    live = LiveTensorBoard(path, tmp_path / "live", interval=3600)  # polled by hand below
    try:
        assert live.poll() == 0  # nothing written yet
        tid = writer.tensor_id("fc.weight", "fc", "grad", (10,), "float32")
        for step in range(3):
            writer.log_summaries(step, [(tid, gradsight.summarize(rng.normal(size=10)))])
            writer.log_scalars(step, {"loss": 1.0 / (step + 1)})
        writer.flush()
        assert live.poll() == 2  # steps 0 and 1; step 2 may still be incomplete
        assert sorted(_scalars(_read(tmp_path / "live"), "fc/grad_rms")) == [0, 1]
        writer.log_summaries(3, [(tid, gradsight.summarize(np.full(10, np.nan)))])
        writer.close()
    finally:
        live.close()
    live.close()  # idempotent
    acc = _read(tmp_path / "live")
    assert sorted(_scalars(acc, "fc/grad_rms")) == [0, 1, 2, 3]
    assert _scalars(acc, "fc/grad_nonfinite")[3] == 10
    with load(path) as run:
        want = {step: s.rms for step, _, s in run.summaries()}
    assert all(_close(v, want[k]) for k, v in _scalars(acc, "fc/grad_rms").items())


def test_sink_reports_what_it_writes(tmp_path):
    with TensorBoardSink(tmp_path / "tb", histograms="abs") as sink:
        assert repr(sink).startswith("TensorBoardSink(") and sink.path.name.endswith(".gradsight")
        assert not sink.add_histogram(0, "x", gradsight.summarize(np.zeros(3)))  # nothing to draw
    with pytest.raises(StoreError, match="is closed"):
        sink.add_scalars(1, {"a": 1.0})
