"""One statistics contract for every adapter: recorded summaries equal the numpy reference of the same tensors.

Each adapter trains a small model for one logged step while the test captures, by its own means, the tensors the
watch summarises (weights before the step, the gradients the optimizer applies, updates, layer outputs and their
gradients). Then, for each of them, the recorded summary must equal :func:`gradsight.summarize` of the captured
tensor: every count, histogram bin, min, max and per-unit count exactly, ``sum``/``sum_sq`` within the dtype's
tolerance (:mod:`gradsight._tolerance`, normwise: ``|error| <= atol + rtol * (count * max|x|)`` and
``(count * max|x|**2)``). Layer outputs and output gradients carry per-unit counts along the shared unit axis
(:func:`gradsight._watch_core.unit_axis`: the last dim of these dense outputs) in every adapter.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import gradsight
from gradsight._tolerance import tolerance_for
from gradsight.summary import TensorSummary, summarize

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXACT = ("count", "zeros", "nan", "posinf", "neginf", "positive", "units_total", "min", "max")


def assert_contract(got: TensorSummary, ref: TensorSummary, dtype: str, where: str) -> None:
    for k in EXACT:
        assert getattr(got, k) == getattr(ref, k), (where, k, getattr(got, k), getattr(ref, k))
    np.testing.assert_array_equal(got.hist, ref.hist, err_msg=f"{where}: histogram")
    if ref.units_active is None:
        assert got.units_active is None, where
    else:
        np.testing.assert_array_equal(got.units_active, ref.units_active, err_msg=f"{where}: units")
    tol = tolerance_for(dtype)
    big = max(abs(ref.min), abs(ref.max), 0.0) if ref.finite else 0.0
    assert tol.allows(abs(got.sum - ref.sum), ref.count * big), (where, "sum", got.sum, ref.sum)
    assert tol.allows(abs(got.sum_sq - ref.sum_sq), ref.count * big * big), (where, "sum_sq", got.sum_sq, ref.sum_sq)


def check_run(path, refs: dict[tuple[str, str], tuple[np.ndarray, int | None]], dtype: str) -> None:
    with gradsight.load(path) as run:
        recorded = {(info.name, info.kind) for info in run.tensors}
        assert recorded == set(refs), sorted(recorded ^ set(refs))
        for (name, kind), (arr, axis) in refs.items():
            assert_contract(run.summary(name, kind, 0), summarize(arr, unit_axis=axis), dtype, f"{name} {kind}")


# ---- torch ----------------------------------------------------------------------------------------------------
def _to_numpy(t):
    import torch

    t = t.detach().cpu().clone()  # a copy: the optimizer changes parameters in place
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_contract(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).to(dt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 6, dtype=dt)
    refs: dict[tuple[str, str], tuple[np.ndarray, int | None]] = {}
    handles = []

    def capture(name):
        def hook(module, args, out):
            refs[(name, "output")] = (_to_numpy(out.clone()), 1)
            out.register_hook(lambda g: refs.__setitem__((name, "output_grad"), (_to_numpy(g.clone()), 1)))

        return hook

    for name, mod in model.named_children():
        handles.append(mod.register_forward_hook(capture(name)))
    with gradsight.watch(model, path=tmp_path / "t.db", optimizer=opt, preset="full"):
        opt.zero_grad()
        model(x).float().square().mean().backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            refs[(n, "weight")] = (_to_numpy(p), None)
            refs[(n, "grad")] = (_to_numpy(p.grad), None)
        opt.step()
        for n, p in model.named_parameters():
            refs[(n, "update")] = (_to_numpy(p.detach() - before[n]), None)
    for h in handles:
        h.remove()
    check_run(tmp_path / "t.db", refs, dtype)


# ---- Keras ----------------------------------------------------------------------------------------------------
@pytest.mark.keras
@pytest.mark.parametrize(
    ("policy", "dtype"),
    [("float32", "float32"), ("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")],
)
def test_keras_contract(tmp_path, policy, dtype):
    """Keras' mixed-precision policies: float32 weights, gradients and updates; layer outputs and their gradients
    in the compute dtype. Under ``mixed_float16`` Keras wraps the optimizer in a ``LossScaleOptimizer``: the watch
    records the gradients unscaled (``/ loss_scale``, a power of two: exact), so the reference is the scaled
    loss's gradients divided by the same scale, widened to float32 first (float16 outputs' gradients, unscaled,
    may leave float16's range; the kernels widen float16/bfloat16 to float32 exactly before anything is read)."""
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(policy)
    try:
        inp = keras.Input((6,), name="x")
        h = keras.layers.Dense(5, activation="relu", name="d1")(inp)
        model = keras.Model(inp, keras.layers.Dense(3, name="head")(h))
        loss_fn = keras.losses.MeanSquaredError()
        # run_eagerly: the test's own tape and the watch's train step run the same eager kernels, so the captured
        # tensors are bit for bit the ones the watch summarises (a compiled step may round the last bit otherwise)
        model.compile(keras.optimizers.SGD(0.1), loss_fn, run_eagerly=True)
        opt = model.optimizer
        scale = float(opt.initial_scale) if hasattr(opt, "inner_optimizer") else 1.0  # a LossScaleOptimizer's
        assert (scale != 1.0) == (policy == "mixed_float16"), (policy, type(opt).__name__)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8, 6)).astype("float32")
        y = rng.normal(size=(8, 3)).astype("float32")
        with tf.GradientTape() as tape:
            h1 = model.get_layer("d1")(x)
            out = model.get_layer("head")(h1)
            loss = loss_fn(y, out)
            scaled = loss * tf.cast(scale, loss.dtype)  # LossScaleOptimizer.scale_loss before it is built
        assert h1.dtype.name == out.dtype.name == dtype, (h1.dtype, out.dtype)
        variables = list(model.trainable_variables)
        grads = tape.gradient(scaled, [*variables, h1, out])

        def unscaled(g):
            return np.asarray(g.numpy(), dtype=np.float32) * np.float32(1.0 / scale)

        refs: dict[tuple[str, str], tuple[np.ndarray, int | None]] = {}
        before = [v.numpy().copy() for v in variables]
        with gradsight.watch(model, path=tmp_path / "k.db", preset="full"):
            model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        for v, b, g in zip(variables, before, grads, strict=False):
            assert v.dtype == "float32", v.dtype
            refs[(v.path, "weight")] = (b, None)
            refs[(v.path, "grad")] = (unscaled(g), None)
            refs[(v.path, "update")] = (v.numpy() - b, None)
        for name, t, g in (("d1", h1, grads[-2]), ("head", out, grads[-1])):
            refs[(name, "output")] = (np.asarray(t.numpy(), dtype=np.float32), -1)  # exact widening
            refs[(name, "output_grad")] = (unscaled(g), -1)
        with gradsight.load(tmp_path / "k.db") as run:  # check_run, with each tensor's own dtype's tolerance
            stored = {(info.name, info.kind): info.dtype for info in run.tensors}
            assert set(stored) == set(refs), sorted(set(stored) ^ set(refs))
            for (name, kind), (arr, axis) in refs.items():
                want = dtype if kind in ("output", "output_grad") else "float32"
                assert stored[(name, kind)] == want, (name, kind, stored[(name, kind)])
                ref = summarize(arr, unit_axis=axis)
                assert_contract(run.summary(name, kind, 0), ref, want, f"{policy}: {name} {kind}")
    finally:
        keras.mixed_precision.set_global_policy("float32")
        keras.backend.clear_session()
