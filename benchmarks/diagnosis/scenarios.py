"""Labelled training scenarios for the diagnosis benchmark: each one healthy or broken in one known way.

Every scenario trains a small model (PyTorch or Keras 3 on TensorFlow) under :func:`gradsight.watch` with a watch
configuration chosen by the caller, and returns the run file. Its labels say what a perfect diagnosis would name
as the root cause:

``expected_root``
    the finding code that names the root cause (``None`` for a healthy run: no warning or error is expected).
``acceptable_roots``
    alternates that name the same cause in other words (each justified in a comment where it is declared).
``expected_names``
    layer or parameter names that the root finding should name in its ``layers`` or its evidence.
``exhibit``
    a cheap check, on the recorded run, that the scenario still shows its fault (or, for a healthy run, that it
    learns): a scenario that silently stopped being broken would make the benchmark meaningless.

Only the public API is used (``gradsight.watch``, ``gradsight.load``, the run's scalars and summaries). Data: the
digits set bundled with scikit-learn (8x8 grey images, 10 classes, no network), or, when scikit-learn is missing,
a synthetic stand-in of the same shape (``DATASET`` says which); everything else is synthetic. Each run is a few
hundred steps of a small model on one CPU thread, about a second (PyTorch) or a few seconds (Keras, mostly graph
tracing).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gradsight

Exhibit = Callable[[gradsight.Run], "str | None"]
Trainer = Callable[[int, Path, Mapping[str, Any]], Path]


@dataclass(frozen=True)
class Scenario:
    """One labelled scenario.

    Attributes:
        name: its identifier (``<framework>-<what>``).
        framework: ``"torch"`` or ``"keras"``.
        description: what the run does and what is wrong with it (or that nothing is).
        train: ``train(seed, path, watch_kwargs)`` trains under ``gradsight.watch(..., path=path,
            **watch_kwargs)`` and returns the run file.
        expected_root: the code naming the root cause; ``None`` for a healthy run.
        acceptable_roots: alternates that name the same cause (justified where declared).
        expected_names: names (layers or parameters) the root finding should mention.
        why: the reasoning behind the label.
        exhibit: ``exhibit(run)`` is ``None`` when the run shows the scenario's fault (or, healthy, learns), else
            what is missing.
    """

    name: str
    framework: str
    description: str
    train: Trainer
    expected_root: str | None
    acceptable_roots: tuple[str, ...]
    expected_names: tuple[str, ...]
    why: str
    exhibit: Exhibit

    @property
    def healthy(self) -> bool:
        """Whether the run is labelled healthy (no warning or error expected)."""
        return self.expected_root is None

    @property
    def accepted(self) -> tuple[str, ...]:
        """The expected root and its acceptable alternates."""
        return (self.expected_root, *self.acceptable_roots) if self.expected_root else ()

    def run(self, seed: int, path: str | os.PathLike[str], watch: Mapping[str, Any] | None = None) -> Path:
        """Train the scenario with ``seed`` into the run file ``path`` (must not exist) and return it.

        ``watch`` holds the keyword arguments of :func:`gradsight.watch` besides the model, the path and the
        optimizer, e.g. ``{"preset": "default"}`` or ``{"preset": "default", "every": 10}``. Warnings raised while
        training (the watch's, the frameworks') are silenced: a broken run is expected to raise some.
        """
        watch = dict(watch or {"preset": "default"})
        with _quiet():
            return Path(self.train(seed, Path(path), watch))


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    framework: str,
    *,
    root: str | None,
    why: str,
    exhibit: Exhibit,
    acceptable: tuple[str, ...] = (),
    names: tuple[str, ...] = (),
) -> Callable[[Trainer], Trainer]:
    """Register the decorated ``train(seed, path, watch)`` function as a scenario named after it."""

    def register(fn: Trainer) -> Trainer:
        name = f"{framework}-" + fn.__name__.removeprefix(f"{framework}_").replace("_", "-")
        doc = " ".join((fn.__doc__ or "").split())
        SCENARIOS[name] = Scenario(name, framework, doc, fn, root, acceptable, names, " ".join(why.split()), exhibit)
        return fn

    return register


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers: quiet training, data, loss series, cheap exhibit checks.


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            yield


#: Where the image data comes from: ``"sklearn digits"`` or a note that a synthetic stand-in is used.
DATASET = "sklearn digits (load_digits, bundled with scikit-learn)"


@lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits images as float32 ``(n, 8, 8)`` in [0, 1] and int64 labels; synthetic if sklearn is missing."""
    global DATASET
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - sklearn is a dev dependency here
        DATASET = "synthetic digits stand-in (scikit-learn is not installed)"
        rng = np.random.default_rng(1234)
        protos = (rng.random((10, 8, 8)) > 0.6).astype(np.float32)
        y = rng.integers(0, 10, size=1797)
        x = np.clip(protos[y] + rng.normal(0, 0.25, size=(1797, 8, 8)), 0, 1)
        return x.astype(np.float32), y.astype(np.int64)
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _indices(seed: int, steps: int, batch: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed + 10_000).integers(0, n, size=(steps, batch))


def loss_series(run: gradsight.Run, name: str = "loss") -> np.ndarray:
    """The logged loss per step (NaN where it was logged as NaN or not logged), from step 0."""
    rows = run.scalar_rows(name=name)
    if not rows:
        return np.zeros(0)
    out = np.full(max(s for s, _, _ in rows) + 1, np.nan)
    for step, _, value in rows:
        out[step] = value
    return out


def _scalar(run: gradsight.Run, name: str) -> np.ndarray:
    rows = run.scalar_rows(name=name)
    return np.array([v for _, _, v in rows], dtype=float)


def learns(factor: float = 0.5, *, below: float | None = None) -> Exhibit:
    """Healthy exhibit: a finite loss whose last-tenth median is below ``factor`` x its first-tenth median."""

    def check(run: gradsight.Run) -> str | None:
        loss = loss_series(run)
        if len(loss) < 10 or not np.isfinite(loss).all():
            return f"expected a finite loss at every step, got {len(loss)} values, {np.isnan(loss).sum()} NaN"
        k = max(len(loss) // 10, 1)
        start, end = float(np.median(loss[:k])), float(np.median(loss[-k:]))
        if end > factor * start:
            return f"loss should fall below {factor} x its start: {start:.3g} -> {end:.3g}"
        if below is not None and end > below:
            return f"loss should end below {below}: ends at {end:.3g}"
        return None

    return check


def loss_jumps(factor: float = 3.0, within: int = 20) -> Exhibit:
    """Exhibit: within the first ``within`` steps the loss jumps above ``factor`` x its first value, or is NaN/Inf."""

    def check(run: gradsight.Run) -> str | None:
        loss = loss_series(run)
        early = loss[1 : within + 1]
        if len(loss) and (not np.isfinite(early).all() or np.nanmax(early) > factor * loss[0]):
            return None
        peak = np.nanmax(early) if len(early) else None
        return f"expected the loss to jump above {factor} x {loss[:1]} within {within} steps; max {peak}"

    return check


def nonfinite_loss(*, after: int = -1) -> Exhibit:
    """Exhibit: the loss is NaN or Inf at some step later than ``after``."""

    def check(run: gradsight.Run) -> str | None:
        loss = loss_series(run)
        bad = np.flatnonzero(~np.isfinite(loss))
        if len(bad) and bad[0] > after:
            return None
        first = int(bad[0]) if len(bad) else None
        return f"expected a non-finite loss after step {after}; first non-finite step: {first}"

    return check


def grad_norm_grows(factor: float = 5.0) -> Exhibit:
    """Exhibit: the gradient norm of the last tenth of the run exceeds ``factor`` x that of the first 5 steps."""

    def check(run: gradsight.Run) -> str | None:
        g = _scalar(run, "grad_norm")
        if len(g) < 20:
            return f"expected a grad_norm scalar at every step, got {len(g)}"
        start, end = float(np.nanmedian(g[:5])), float(np.nanmedian(g[-max(len(g) // 10, 1) :]))
        return None if end > factor * start else f"grad norm should grow {factor}x: {start:.3g} -> {end:.3g}"

    return check


def no_grad_for(tensor: str, *, other: str) -> Exhibit:
    """Exhibit: parameter ``tensor`` never has a non-zero gradient norm while ``other`` has one."""

    def check(run: gradsight.Run) -> str | None:
        mine, theirs = _scalar(run, f"grad_norm/{tensor}"), _scalar(run, f"grad_norm/{other}")
        if not len(theirs) or not np.nanmax(theirs) > 0:
            return f"expected {other} to get gradient"
        if len(mine) and np.nanmax(np.abs(mine)) > 0:
            return f"expected {tensor} to get no gradient, its norm reaches {np.nanmax(mine):.3g}"
        return None

    return check


def weight_unchanged(layer: str, *, but_has_grad: str) -> Exhibit:
    """Exhibit: ``layer``'s weights are the same at the first and last logged step while it has gradients."""

    def check(run: gradsight.Run) -> str | None:
        w = run.to_pandas(kind="weight", layer=layer)
        if w.empty:
            return f"no weight summaries of {layer!r}"
        first, last = w[w.step == w.step.min()], w[w.step == w.step.max()]
        if w.step.nunique() < 2:
            return f"expected {layer!r} weights at two logged steps, got {sorted(w.step.unique())}"
        if not np.allclose(first.l2.to_numpy(), last.l2.to_numpy(), rtol=0, atol=0):
            return f"{layer!r} weights changed: {first.l2.tolist()} -> {last.l2.tolist()}"
        g = _scalar(run, f"grad_norm/{but_has_grad}")
        if not len(g) or not np.nanmax(g) > 0:
            return f"expected {but_has_grad} to have a gradient"
        return None

    return check


def output_dead(layer: str) -> Exhibit:
    """Exhibit: every element of ``layer``'s output is zero at step 0 (all ReLUs dead from the start)."""

    def check(run: gradsight.Run) -> str | None:
        o = run.to_pandas(kind="output", layer=layer, steps=(0, 0))
        if o.empty:
            return f"no output summary of {layer!r} at step 0"
        zeros, count = int(o.zeros.sum()), int(o["count"].sum())
        return None if zeros == count else f"{layer!r}: {zeros} of {count} outputs are zero at step 0, not all"

    return check


def output_saturated(layer: str, rms: float = 0.9) -> Exhibit:
    """Exhibit: a tanh ``layer``'s output RMS at step 0 exceeds ``rms`` (units pinned near +-1)."""

    def check(run: gradsight.Run) -> str | None:
        o = run.to_pandas(kind="output", layer=layer, steps=(0, 0))
        if o.empty:
            return f"no output summary of {layer!r} at step 0"
        value = float(o.rms.iloc[0])
        return None if value > rms else f"{layer!r} output RMS {value:.3g} at step 0, expected > {rms}"

    return check


def grad_ratio_below(early: str, late: str, ratio: float) -> Exhibit:
    """Exhibit: median gradient norm of ``early`` is below ``ratio`` x that of ``late`` (vanishing gradients)."""

    def check(run: gradsight.Run) -> str | None:
        a, b = _scalar(run, f"grad_norm/{early}"), _scalar(run, f"grad_norm/{late}")
        if not len(a) or not len(b):
            return f"no grad_norm/{early} or grad_norm/{late} scalars"
        r = float(np.nanmedian(a) / np.nanmedian(b))
        return None if r < ratio else f"grad norm {early}/{late} = {r:.3g}, expected below {ratio}"

    return check


def all_of(*checks: Exhibit) -> Exhibit:
    """Exhibit: every check passes (the first failure is reported)."""

    def check(run: gradsight.Run) -> str | None:
        for c in checks:
            problem = c(run)
            if problem:
                return problem
        return None

    return check


# ---------------------------------------------------------------------------------------------------------------
# PyTorch building blocks.


def _torch() -> Any:
    import torch

    return torch


def _seed_torch(seed: int) -> Any:
    torch = _torch()
    torch.manual_seed(seed)
    return torch


def _digits_torch(images: bool = True, channels: int = 1) -> tuple[Any, Any]:
    torch = _torch()
    x, y = digits()
    xt = torch.tensor(x)
    xt = xt[:, None].repeat(1, channels, 1, 1) if images else xt.reshape(len(x), 64)
    return xt, torch.tensor(y)


def _mlp(act: str = "relu", widths: tuple[int, ...] = (64, 64), n_in: int = 64, n_out: int = 10) -> Any:
    nn = _torch().nn
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    layers: list[tuple[str, Any]] = []
    prev = n_in
    for i, w in enumerate(widths, start=1):
        layers += [(f"fc{i}", nn.Linear(prev, w)), (f"act{i}", acts[act]())]
        prev = w
    layers.append(("out", nn.Linear(prev, n_out)))
    return nn.Sequential(OrderedDict(layers))


def _cnn(c_in: int = 1, c1: int = 8, c2: int = 16, pool: bool = True) -> Any:
    nn = _torch().nn
    layers = [
        ("conv1", nn.Conv2d(c_in, c1, 3, padding=1)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(c1, c2, 3, padding=1)),
        ("relu2", nn.ReLU()),
    ]
    if pool:
        layers.append(("pool", nn.MaxPool2d(2)))
    layers += [("flatten", nn.Flatten()), ("fc", nn.Linear(c2 * (16 if pool else 64), 10))]
    return nn.Sequential(OrderedDict(layers))


def _ce(out: Any, y: Any) -> Any:
    return _torch().nn.functional.cross_entropy(out.float(), y)


def _train_torch(
    model: Any,
    opt: Any,
    path: Path,
    watch: Mapping[str, Any],
    data: tuple[Any, Any],
    *,
    seed: int,
    steps: int = 300,
    batch: int = 32,
    loss_fn: Callable[[Any, Any], Any] = _ce,
    zero_grad: bool = True,
    clip: float | None = None,
    autocast: Any = None,
    scheduler: Any = None,
    step: Callable[[], None] | None = None,
) -> Path:
    """The plain PyTorch loop every scenario shares; the knobs are the faults."""
    torch = _torch()
    x, y = data
    idx = torch.from_numpy(_indices(seed, steps, batch, len(x)))
    kwargs = {"optimizer": opt} if opt is not None else {}
    with gradsight.watch(model, path=path, **kwargs, **watch) as run:
        for s in range(steps):
            xb, yb = x[idx[s]], y[idx[s]]
            if zero_grad and opt is not None:
                opt.zero_grad(set_to_none=True)
            ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
            with ctx:
                loss = loss_fn(model(xb), yb)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if step is not None:
                step()
            else:
                opt.step()
            if scheduler is not None:
                scheduler.step()
            run.log(loss=loss.detach().float())
    return path


# ---------------------------------------------------------------------------------------------------------------
# PyTorch: healthy runs.


@scenario("torch", root=None, why="Standard CNN, SGD with momentum at a textbook learning rate.", exhibit=learns(0.3))
def torch_cnn_digits(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A two-convolution ReLU CNN with max pooling on digits, SGD lr=0.05 momentum 0.9; learns to ~0.1 loss."""
    torch = _seed_torch(seed)
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return _train_torch(model, opt, path, watch, _digits_torch(), seed=seed)


class _ResMLP:
    """A pre-norm residual MLP (built lazily so that importing this module does not import torch)."""

    @staticmethod
    def build(width: int = 64, blocks: int = 3) -> Any:
        torch = _torch()
        nn = torch.nn

        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.norm = nn.LayerNorm(width)
                self.fc_a = nn.Linear(width, 2 * width)
                self.act = nn.GELU()
                self.fc_b = nn.Linear(2 * width, width)

            def forward(self, x: Any) -> Any:
                return x + self.fc_b(self.act(self.fc_a(self.norm(x))))

        class ResMLP(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inp = nn.Linear(64, width)
                self.blocks = nn.Sequential(*[Block() for _ in range(blocks)])
                self.norm = nn.LayerNorm(width)
                self.head = nn.Linear(width, 10)

            def forward(self, x: Any) -> Any:
                return self.head(self.norm(self.blocks(self.inp(x))))

        return ResMLP()


@scenario("torch", root=None, why="Pre-norm residual blocks, AdamW at 1e-3: the modern default.", exhibit=learns(0.3))
def torch_residual_mlp(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A pre-norm residual MLP (3 blocks, LayerNorm, GELU) on flattened digits, AdamW lr=1e-3."""
    torch = _seed_torch(seed)
    model = _ResMLP.build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed)


def _lstm_model(vocab: int = 8, hidden: int = 32) -> Any:
    nn = _torch().nn

    class FirstToken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(vocab, hidden, batch_first=True)
            self.head = nn.Linear(hidden, vocab)

        def forward(self, x: Any) -> Any:
            out, _ = self.lstm(x)
            return self.head(out[:, -1])

    return FirstToken()


def _first_token_data(seed: int, n: int = 2048, length: int = 6, vocab: int = 8) -> tuple[Any, Any]:
    torch = _torch()
    tokens = np.random.default_rng(seed + 20_000).integers(0, vocab, size=(n, length))
    x = np.eye(vocab, dtype=np.float32)[tokens]
    return torch.from_numpy(x), torch.from_numpy(tokens[:, 0])


@scenario(
    "torch",
    root=None,
    why="An LSTM that learns a memory task (recall the first of 6 tokens) with Adam at 1e-2.",
    exhibit=learns(0.5),
)
def torch_lstm(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """An LSTM (32 units) reads 6 one-hot tokens and recalls the first one; Adam lr=1e-2, learns from log 8 to ~0."""
    torch = _seed_torch(seed)
    model = _lstm_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return _train_torch(model, opt, path, watch, _first_token_data(seed), seed=seed)


def _gpt(vocab: int, seed: int) -> Any:
    _seed_torch(seed)
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def _train_gpt(
    model: Any, opt: Any, path: Path, watch: Mapping[str, Any], *, seed: int, vocab: int, random: bool, warmup: int
) -> Path:
    torch = _torch()
    steps, batch, length = 200, 16, 32
    rng = np.random.default_rng(seed + 30_000)
    if random:  # uniform random tokens: nothing to learn, the loss stays at log(vocab)
        ids = rng.integers(0, vocab, size=(steps, batch, length))
    else:  # counting sequences (x, x+1, x+2, ... mod vocab): trivially learnable
        ids = (rng.integers(0, vocab, size=(steps, batch, 1)) + np.arange(length)) % vocab
    ids = torch.from_numpy(ids)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    with gradsight.watch(model, path=path, optimizer=opt, **watch) as run:
        for s in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids[s], labels=ids[s]).loss
            loss.backward()
            opt.step()
            sched.step()
            run.log(loss=loss.detach())
    return path


@scenario(
    "torch",
    root=None,
    why="A GPT-style transformer at a standard AdamW learning rate with warm-up, on a learnable sequence task.",
    exhibit=learns(0.3),
)
def torch_gpt_counting(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """GPT-2 (transformers GPT2Config: 2 layers, 32 dims, 16 tokens) learns counting sequences; AdamW 1e-3, warm-up."""
    torch = _torch()
    model = _gpt(16, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return _train_gpt(model, opt, path, watch, seed=seed, vocab=16, random=False, warmup=20)


def _at_chance(vocab: int) -> Exhibit:
    def check(run: gradsight.Run) -> str | None:
        loss = loss_series(run)
        med = float(np.median(loss)) if len(loss) else math.nan
        return None if abs(med - math.log(vocab)) < 0.1 else f"loss median {med:.3g}, expected ~log({vocab})"

    return check


@scenario(
    "torch",
    root=None,
    why="Nothing can be learned from uniform random tokens: a loss at log(V) from start to end is the correct "
    "outcome, not a fault (at most an info that the loss does not decrease).",
    exhibit=_at_chance(64),
)
def torch_gpt_random_tokens(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """The same GPT-2 on uniformly random tokens (64-token vocabulary): the loss sits at log 64 = 4.16 throughout."""
    torch = _torch()
    model = _gpt(64, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return _train_gpt(model, opt, path, watch, seed=seed, vocab=64, random=True, warmup=20)


def _regression_data(seed: int, noise: float, n: int = 4096, d: int = 16) -> tuple[Any, Any]:
    torch = _torch()
    rng = np.random.default_rng(seed + 40_000)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, 1)) / math.sqrt(d)
    y = (x @ w + noise * rng.normal(size=(n, 1))).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def _mse(out: Any, y: Any) -> Any:
    return _torch().nn.functional.mse_loss(out, y)


def _at_floor(noise: float) -> Exhibit:
    def check(run: gradsight.Run) -> str | None:
        loss = loss_series(run)
        end = float(np.median(loss[-50:]))
        if not noise**2 * 0.7 < end < noise**2 * 1.5:
            return f"loss should end at the noise floor {noise**2:.3g}, ends at {end:.3g}"
        return None if loss[0] > 2 * end else f"loss should start well above its floor: {loss[0]:.3g}"

    return check


@scenario(
    "torch",
    root=None,
    why="Converging to the noise floor and then staying flat is success: the loss can not fall further, gradients "
    "are pure noise, and updates are small. None of that is a fault.",
    exhibit=_at_floor(0.5),
)
def torch_converged_floor(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A small MLP regresses a noisy linear target (noise std 0.5): at its floor (MSE 0.25) after ~60 of 300 steps."""
    torch = _seed_torch(seed)
    model = _mlp("relu", (32,), n_in=16, n_out=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return _train_torch(model, opt, path, watch, _regression_data(seed, 0.5), seed=seed, loss_fn=_mse)


def _clip_bites(max_norm: float, fraction: float = 0.05) -> Exhibit:
    def check(run: gradsight.Run) -> str | None:
        pre = _scalar(run, "grad_norm_preclip")
        g = pre if len(pre) else _scalar(run, "grad_norm")
        bit = float(np.mean(g >= 0.999 * max_norm)) if len(g) else 0.0
        if bit >= fraction:
            return None
        return f"clipping at {max_norm} bit on {bit:.0%} of steps, expected at least {fraction:.0%}"

    return check


@scenario(
    "torch",
    root=None,
    why="Gradient clipping that bites now and then (mostly early) is the intended use of clipping: at most an "
    "info gradients-clipped, never a warning.",
    exhibit=all_of(learns(0.3), _clip_bites(1.0)),
)
def torch_clipped_ok(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits MLP, SGD lr=0.1 momentum 0.9, clip_grad_norm_(max_norm=1.0), which bites on some early steps."""
    torch = _seed_torch(seed)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed, clip=1.0)


@scenario(
    "torch",
    root=None,
    why="bfloat16 autocast has float32's exponent range: no overflow, and the run learns like float32.",
    exhibit=learns(0.3),
)
def torch_bf16_autocast(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """The digits CNN under torch.autocast("cpu", dtype=bfloat16) (mixed precision), Adam lr=2e-3."""
    torch = _seed_torch(seed)
    model = _cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    data = _digits_torch()
    return _train_torch(model, opt, path, watch, data, seed=seed, autocast=torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch: learning rate too high.

# update-ratio-high measures the learning rate's effect directly (||dW|| / ||W|| far above ~1e-3 per step) and its
# advice is to lower the learning rate: it names the same root cause in the diagnosis' older vocabulary, so it is
# an acceptable root for every learning-rate scenario. Symptoms such as exploding-gradients, dead-units or
# non-finite are not: their advice points elsewhere (clipping, initialisation, the loss formula) as often as at the
# learning rate.
_LR_ALT = ("update-ratio-high",)


@scenario(
    "torch",
    root="learning-rate-too-high",
    acceptable=_LR_ALT,
    why="lr=10 on plain SGD: the first update is larger than the weights themselves, the loss jumps at step 1 and "
    "the ReLUs die. Dead units and the loss plateau follow from the step size.",
    exhibit=loss_jumps(3.0, within=5),
)
def torch_cnn_sgd_lr10(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits CNN (no pooling) with SGD at lr=10: the weights blow up within steps, ReLUs die, no recovery."""
    torch = _seed_torch(seed)
    model = _cnn(pool=False)
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    return _train_torch(model, opt, path, watch, _digits_torch(), seed=seed)


@scenario(
    "torch",
    root="learning-rate-too-high",
    acceptable=_LR_ALT,
    why="SGD with momentum at lr=1.5: each step overshoots; the loss jumps and stays far above what lr=0.05 reaches.",
    exhibit=loss_jumps(1.5, within=30),
)
def torch_mlp_sgd_high_lr(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits ReLU MLP, SGD lr=1.5 momentum 0.9 (30x the working rate)."""
    torch = _seed_torch(seed)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.5, momentum=0.9)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed)


@scenario(
    "torch",
    root="learning-rate-too-high",
    acceptable=_LR_ALT,
    why="Adam's step is ~lr per weight whatever the gradient: lr=0.3 moves each weight by far more than its size.",
    exhibit=loss_jumps(3.0, within=20),
)
def torch_mlp_adam_high_lr(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits ReLU MLP with Adam at lr=0.3 (300x the usual 1e-3)."""
    torch = _seed_torch(seed)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.3)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed)


def _gpt_spikes(run: gradsight.Run) -> str | None:
    loss = loss_series(run)
    end = float(np.median(loss[-20:]))
    if not np.nanmax(loss[:30]) > 1.2 * loss[0]:
        return f"the loss should spike above 1.2 x its start within 30 steps, max {np.nanmax(loss[:30]):.3g}"
    return None if end > 0.4 else f"the no-warm-up transformer should fail to learn counting; ends at {end:.3g}"


@scenario(
    "torch",
    root="learning-rate-too-high",
    acceptable=_LR_ALT,
    why="The warm-up was forgotten and the peak rate is far too high for a transformer: AdamW at 0.15 from step 0, "
    "the loss spikes above its start within steps and the model ends far worse than the same model at 1e-3.",
    exhibit=_gpt_spikes,
)
def torch_gpt_no_warmup(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """The counting GPT-2 with AdamW at lr=0.15 from step 0: no warm-up, and a peak rate ~100x too high."""
    torch = _torch()
    model = _gpt(16, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=0.15)
    return _train_gpt(model, opt, path, watch, seed=seed, vocab=16, random=False, warmup=0)


def _diverges_then_nan(run: gradsight.Run) -> str | None:
    loss = loss_series(run)
    bad = np.flatnonzero(~np.isfinite(loss))
    if not len(bad) or bad[0] < 10:
        return f"expected the loss to go non-finite after step 10, first non-finite at {bad[:1]}"
    grew = float(np.nanmax(loss[: bad[0]]) / loss[0])
    return None if grew > 100 else f"expected the loss to grow >100x before the NaN, grew {grew:.3g}x"


@scenario(
    "torch",
    root="learning-rate-too-high",
    acceptable=_LR_ALT,
    why="The NaN is the end of a divergence driven by the learning rate (loss and gradients grow geometrically for "
    "tens of steps first), not a bad loss formula: non-finite is a symptom here, and the NaN step itself is "
    "usually not a logged one.",
    exhibit=_diverges_then_nan,
)
def torch_nan_unlogged(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """Linear regression with SGD at lr=1.0, above the stability limit 2/lambda_max (~0.8 here): weights and loss grow
    geometrically (~2x per step) and overflow to Inf/NaN around step 75, between logged steps."""
    torch = _seed_torch(seed)
    nn = torch.nn
    model = nn.Sequential(OrderedDict(fc=nn.Linear(16, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = _regression_data(seed, 0.1)
    return _train_torch(model, opt, path, watch, (x, 3 * y), seed=seed, loss_fn=_mse, steps=200)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch: bad initialisation.


@scenario(
    "torch",
    root="bad-initialisation",
    names=("conv2.bias",),
    why="conv2's bias at -6 puts every pre-activation of relu2 below zero from step 0: all units dead by "
    "construction, before any update. The cause is the bias value, not the learning rate.",
    exhibit=output_dead("relu2"),
)
def torch_conv_bias_neg6(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """Conv(3->8)-ReLU-Conv(8->8)-ReLU-Flatten-Linear on 3-channel digits, the second conv's bias set to -6."""
    torch = _seed_torch(seed)
    model = _cnn(c_in=3, c1=8, c2=8, pool=False)
    with torch.no_grad():
        model.conv2.bias.fill_(-6.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return _train_torch(model, opt, path, watch, _digits_torch(channels=3), seed=seed)


def _init_normal(model: Any, std: float, layers: tuple[str, ...]) -> None:
    torch = _torch()
    with torch.no_grad():
        for name in layers:
            getattr(model, name).weight.normal_(0.0, std)


def _first_loss_above(value: float) -> Exhibit:
    def check(run: gradsight.Run) -> str | None:
        loss = loss_series(run)
        return None if len(loss) and loss[0] > value else f"first loss {loss[:1]} should exceed {value}"

    return check


@scenario(
    "torch",
    root="bad-initialisation",
    names=("fc2",),
    why="Weights with std 1.0 in 256-wide ReLU layers (He init: 0.09) multiply the activations ~11x per layer: "
    "logits in the thousands and a loss of hundreds at step 0, before any update.",
    exhibit=_first_loss_above(50.0),
)
def torch_init_too_large(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A 4-layer ReLU MLP (256 wide) with every weight drawn from N(0, 1): activations grow ~11x per layer."""
    torch = _seed_torch(seed)
    model = _mlp("relu", (256, 256, 256))
    _init_normal(model, 1.0, ("fc1", "fc2", "fc3", "out"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed)


@scenario(
    "torch",
    root="bad-initialisation",
    names=("fc1",),
    why="tanh layers with weights of std 3 start with pre-activations of size ~10: the units are pinned to +-1 by "
    "the initial weight scale, so the root is the initialisation; saturation is its symptom.",
    exhibit=output_saturated("act1"),
)
def torch_init_too_large_tanh(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A tanh MLP whose two hidden layers are initialised with std 3 (Xavier would be ~0.15)."""
    torch = _seed_torch(seed)
    model = _mlp("tanh")
    _init_normal(model, 3.0, ("fc1", "fc2"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed)


def _stuck(fraction: float = 0.1) -> Exhibit:
    def check(run: gradsight.Run) -> str | None:
        loss = loss_series(run)
        start, end = float(np.median(loss[:20])), float(np.median(loss[-20:]))
        return None if end > (1 - fraction) * start else f"loss should stay near its start: {start:.3g} -> {end:.3g}"

    return check


@scenario(
    "torch",
    root="bad-initialisation",
    names=("fc1",),
    why="Weights of std 1e-3 shrink the signal ~100x per layer on the way forward and the gradient ~100x per layer "
    "on the way back: the first layers get essentially nothing, by construction of the initial weights.",
    exhibit=_stuck(0.1),
)
def torch_init_too_small(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A 6-layer ReLU MLP (64 wide) with every weight drawn from N(0, 1e-3): signal and gradients vanish."""
    torch = _seed_torch(seed)
    model = _mlp("relu", (64,) * 5)
    _init_normal(model, 1e-3, ("fc1", "fc2", "fc3", "fc4", "fc5", "out"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed)


@scenario(
    "torch",
    root="bad-initialisation",
    names=("fc1.bias",),
    why="fc1's bias at -3 is ~10 standard deviations below its pre-activations: every unit of act1 is dead from "
    "step 0 by construction, and the net can only learn the output bias.",
    exhibit=all_of(output_dead("act1"), _stuck(0.2)),
)
def torch_negative_bias(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits ReLU MLP whose first layer's bias is initialised at -3."""
    torch = _seed_torch(seed)
    model = _mlp()
    with torch.no_grad():
        model.fc1.bias.fill_(-3.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch: vanishing gradients in saturating stacks.

# saturated-units is an acceptable root for deep sigmoid/tanh stacks: both name the activation as the cause, and
# both advise ReLU-family activations, normalisation or residual connections.
_VANISH_ALT = ("saturated-units",)


@scenario(
    "torch",
    root="vanishing-gradients",
    acceptable=_VANISH_ALT,
    names=("fc1",),
    why="Ten sigmoid layers at default init: each passes at most 1/4 of the gradient back, so fc1 gets ~1e-6 of "
    "what the output layer gets. The architecture is the cause, not a single weight or the step size.",
    exhibit=grad_ratio_below("fc1.weight", "out.weight", 1e-3),
)
def torch_deep_sigmoid(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """Ten sigmoid layers (32 wide) on digits, default init, SGD lr=0.1 momentum 0.9."""
    torch = _seed_torch(seed)
    model = _mlp("sigmoid", (32,) * 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed)


@scenario(
    "torch",
    root="vanishing-gradients",
    acceptable=_VANISH_ALT,
    names=("fc1",),
    why="Sixteen tanh layers at PyTorch's default init (gain 1/sqrt(3) per layer): the signal and the gradient "
    "shrink layer by layer, the first layers barely move.",
    exhibit=grad_ratio_below("fc1.weight", "out.weight", 1e-2),
)
def torch_deep_tanh(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """Sixteen tanh layers (32 wide) on digits, default init, SGD lr=0.05 momentum 0.9."""
    torch = _seed_torch(seed)
    model = _mlp("tanh", (32,) * 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch: non-finite values from the loss formula or the number format.


def _naive_bce(out: Any, y: Any) -> Any:
    torch = _torch()
    p = torch.sigmoid(out)
    t = torch.nn.functional.one_hot(y, out.shape[-1]).float()
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


@scenario(
    "torch",
    root="non-finite",
    names=("out",),
    why="A hand-written binary cross-entropy: once a logit passes ~17, sigmoid rounds to exactly 1.0 in float32, "
    "log(1 - p) = log(0) = -Inf and 0 * -Inf = NaN. The formula is the cause (a confident model is not a fault); "
    "the fix is binary_cross_entropy_with_logits. The same run with binary_cross_entropy_with_logits (same Adam "
    "lr=5e-2) trains to a loss of ~0.03: the learning rate is not the cause.",
    exhibit=nonfinite_loss(after=5),
)
def torch_log_zero(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits MLP trained one-vs-rest with a hand-written -(t log p + (1-t) log(1-p)), Adam lr=5e-2."""
    torch = _seed_torch(seed)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed, loss_fn=_naive_bce)


def _masked_ce(out: Any, y: Any) -> Any:
    torch = _torch()
    labelled = (y < 2).float()  # only digits 0 and 1 carry labels in this "semi-supervised" set-up
    ce = torch.nn.functional.cross_entropy(out, y, reduction="none")
    return (labelled * ce).sum() / labelled.sum()


@scenario(
    "torch",
    root="non-finite",
    why="The loss divides by the number of labelled samples in the batch; a batch without one gives 0/0 = NaN in "
    "the loss and its gradient, and from then on NaN weights. The formula is the cause.",
    exhibit=nonfinite_loss(),
)
def torch_div_zero(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits MLP with a masked mean loss sum(mask * ce) / sum(mask), only 2 of 10 classes labelled, batch 8."""
    torch = _seed_torch(seed)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = _digits_torch(images=False)
    return _train_torch(model, opt, path, watch, data, seed=seed, batch=8, loss_fn=_masked_ce)


def _naive_softmax_ce(out: Any, y: Any) -> Any:
    e = out.exp()  # in float16, exp overflows to Inf for any logit above 11.09
    p = e / e.sum(-1, keepdim=True)
    return -p.gather(1, y[:, None]).log().mean()


@scenario(
    "torch",
    root="non-finite",
    names=("out",),
    why="The model runs in float16 and the loss is a hand-written softmax exp(z) / sum(exp(z)): once a logit passes "
    "11.09 (around step 35), exp overflows float16's 65504 to Inf and Inf/Inf = NaN. The same code in float32 "
    "trains to a low loss: the number format is the cause, not the learning rate.",
    exhibit=nonfinite_loss(after=5),
)
def torch_fp16_overflow(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits MLP cast to float16 (model.half()), a hand-written softmax cross-entropy, SGD lr=0.1 momentum 0.9."""
    torch = _seed_torch(seed)
    model = _mlp("relu", (128, 128)).half()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _digits_torch(images=False)
    return _train_torch(model, opt, path, watch, (x.half(), y), seed=seed, loss_fn=_naive_softmax_ce)


def _floor_never_passed(classes: int = 10) -> Exhibit:
    """Fault exhibit: every loss lies in the band of a cross-entropy of softmax(p), and the run learned towards it."""
    floor, ceiling = math.log1p((classes - 1) / math.e), math.log(math.e + classes - 1)

    def check(run: gradsight.Run) -> str | None:
        loss = loss_series(run)
        if len(loss) < 10 or not np.isfinite(loss).all():
            return f"expected a finite loss at every step, got {len(loss)} values"
        if loss.min() < floor or loss.max() > ceiling:
            return f"loss should stay in [{floor:.3f}, {ceiling:.3f}], got [{loss.min():.3f}, {loss.max():.3f}]"
        return None if np.median(loss[-30:]) < floor + 0.5 else f"loss should approach {floor:.3f}"

    return check


def _softmax_mlp() -> Any:
    nn = _torch().nn
    model = _mlp()
    model.add_module("softmax", nn.Softmax(dim=-1))
    return model


@scenario(
    "torch",
    root="double-softmax",
    names=("softmax",),
    why="The model ends in nn.Softmax and is trained with F.cross_entropy, which applies log-softmax again: the "
    "cross-entropy of softmax(p) for probabilities p cannot fall below log(1 + 9/e) = 1.46 for 10 classes, so the "
    "loss crawls towards 1.46 and stops there, where the same model without the Softmax reaches ~0.1.",
    exhibit=_floor_never_passed(10),
)
def torch_double_softmax(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits ReLU MLP ending in nn.Softmax, trained with F.cross_entropy; Adam lr=1e-3."""
    torch = _seed_torch(seed)
    model = _softmax_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed)


def _nll_of_log(out: Any, y: Any) -> Any:
    torch = _torch()
    return torch.nn.functional.nll_loss(torch.log(out), y)


@scenario(
    "torch",
    root=None,
    why="A model that ends in nn.Softmax, trained with the negative log-likelihood of its probabilities: the right "
    "loss for a probability output (numerically less robust than log-softmax, but correct here).",
    exhibit=learns(0.3),
)
def torch_softmax_nll(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits ReLU MLP ending in nn.Softmax, trained with nll_loss(log(p)); Adam lr=1e-3."""
    torch = _seed_torch(seed)
    model = _softmax_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed, loss_fn=_nll_of_log)


def _in_minus_one_to_zero() -> Exhibit:
    """Fault exhibit: every loss value lies in [-1, 0] (the negative mean probability of the right class)."""

    def check(run: gradsight.Run) -> str | None:
        loss = loss_series(run)
        if len(loss) < 10 or not np.isfinite(loss).all():
            return f"expected a finite loss at every step, got {len(loss)} values"
        lo, hi = float(loss.min()), float(loss.max())
        return None if lo >= -1 and hi <= 0 else f"loss should stay in [-1, 0], got [{lo:.3g}, {hi:.3g}]"

    return check


@scenario(
    "torch",
    root="nll-on-probabilities",
    names=("softmax",),
    why="The model ends in nn.Softmax and is trained with F.nll_loss on its probabilities, not their log: the loss "
    "is -mean(p_y), in [-1, 0], whose gradient 1/N at each label does not grow with the error as a cross-entropy's "
    "1/(N p_y) does, so the model learns slowly.",
    exhibit=_in_minus_one_to_zero(),
)
def torch_nll_on_probabilities(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits ReLU MLP ending in nn.Softmax, trained with F.nll_loss on the probabilities; Adam lr=1e-3."""
    torch = _seed_torch(seed)
    model = _softmax_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    nll = torch.nn.functional.nll_loss
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed, loss_fn=nll)


def _ce_of_softmax(out: Any, y: Any) -> Any:
    f = _torch().nn.functional
    return f.cross_entropy(f.softmax(out, dim=1), y)  # the mistake: probabilities where scores belong


@scenario(
    "torch",
    root="double-softmax",
    names=("out",),
    why="The loop applies F.softmax to the model's scores and passes the probabilities to F.cross_entropy, which "
    "applies log-softmax again. No layer says softmax: the loss stays in [1.46, 2.46] for 10 classes, and the "
    "gradient reaching the scores passes through the first softmax's Jacobian, about 10x weaker than a "
    "cross-entropy on the scores gives.",
    exhibit=_floor_never_passed(10),
)
def torch_softmax_in_code(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits ReLU MLP whose scores go through F.softmax before F.cross_entropy; Adam lr=3e-3."""
    torch = _seed_torch(seed)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed, loss_fn=_ce_of_softmax)


def _soft_targets(seed: int) -> tuple[Any, Any]:
    """Digits with soft labels: a fixed "teacher" distribution per image, spread over the classes (entropy ~2)."""
    torch = _torch()
    x, y = _digits_torch(images=False)
    g = torch.Generator().manual_seed(1000 + seed)
    logits = 0.5 * torch.randn(len(y), 10, generator=g) + 1.5 * torch.nn.functional.one_hot(y, 10)
    return x, torch.softmax(logits, dim=1)


def _ce_soft(out: Any, target: Any) -> Any:
    return _torch().nn.functional.cross_entropy(out, target)


def _learns_in_band(classes: int = 10) -> Exhibit:
    """Healthy exhibit: the loss falls, and stays inside the band a double softmax would give."""
    floor, ceiling = math.log1p((classes - 1) / math.e), math.log(math.e + classes - 1)

    def check(run: gradsight.Run) -> str | None:
        loss = loss_series(run)
        if len(loss) < 10 or not np.isfinite(loss).all():
            return f"expected a finite loss at every step, got {len(loss)} values"
        start, end = float(np.median(loss[:30])), float(np.median(loss[-30:]))
        if not floor < end < start - 0.05:
            return f"loss should fall and end above {floor:.3f}: {start:.3f} -> {end:.3f}"
        inside = float(np.mean((loss > floor) & (loss < ceiling)))
        return None if inside > 0.9 else f"loss should stay in [{floor:.3f}, {ceiling:.3f}]: {inside:.0%} inside"

    return check


@scenario(
    "torch",
    root=None,
    why="A cross-entropy on soft targets (probabilities as labels, as in distillation): the loss cannot fall below "
    "the targets' entropy (~2 nats here), so it stays in the range a double softmax gives, and the gradient "
    "weakens as the model matches the targets. Healthy.",
    exhibit=_learns_in_band(10),
)
def torch_soft_targets(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits ReLU MLP trained with F.cross_entropy on fixed soft targets (entropy ~2 nats); Adam lr=1e-2."""
    torch = _seed_torch(seed)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return _train_torch(model, opt, path, watch, _soft_targets(seed), seed=seed, loss_fn=_ce_soft)


def _falls_below(value: float) -> Exhibit:
    def check(run: gradsight.Run) -> str | None:
        loss = loss_series(run)
        if len(loss) < 10 or not np.isfinite(loss).all():
            return f"expected a finite loss at every step, got {len(loss)} values"
        return None if np.median(loss[-30:]) < value else f"loss should end below {value}"

    return check


def _nll_of_scores(out: Any, y: Any) -> Any:
    return _torch().nn.functional.nll_loss(out, y)  # the mistake: raw scores where log-probabilities belong


@scenario(
    "torch",
    root="loss-unbounded",
    why="F.nll_loss expects log-probabilities; fed raw scores it returns -z_y, which falls for ever as the right "
    "class's score grows: the loss goes far below zero and keeps falling while the weights grow.",
    exhibit=_falls_below(-10.0),
)
def torch_nll_on_scores(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits ReLU MLP trained with F.nll_loss on its raw scores (no log_softmax); Adam lr=1e-3."""
    torch = _seed_torch(seed)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed, loss_fn=_nll_of_scores)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch: the training loop's plumbing.


@scenario(
    "torch",
    root="gradients-accumulating",
    why="optimizer.zero_grad() is never called: each .grad is the sum of every gradient so far, its norm grows "
    "with the step count and SGD effectively runs with ever-growing momentum.",
    exhibit=grad_norm_grows(5.0),
)
def torch_missing_zero_grad_sgd(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits MLP with SGD lr=0.01 and no zero_grad() in the loop."""
    torch = _seed_torch(seed)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed, zero_grad=False)


@scenario(
    "torch",
    root="gradients-accumulating",
    why="The same missing zero_grad() under Adam: Adam normalises the step, so the loss does not blow up, but the "
    "gradient it sees is the running sum and its norm grows with the step count.",
    exhibit=grad_norm_grows(5.0),
)
def torch_missing_zero_grad_adam(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """The digits CNN with Adam lr=1e-3 and no zero_grad() in the loop."""
    torch = _seed_torch(seed)
    model = _cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return _train_torch(model, opt, path, watch, _digits_torch(), seed=seed, zero_grad=False)


@scenario(
    "torch",
    root="no-gradient",
    names=("fc1",),
    why="fc1 was frozen by mistake (requires_grad=False, meant for another layer) after the optimizer was built "
    "over all parameters: the optimizer holds fc1, fc1 never gets a gradient, the others do.",
    exhibit=no_grad_for("fc1.weight", other="out.weight"),
)
def torch_frozen_by_mistake(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits MLP: Adam over all parameters, then fc1.requires_grad_(False) by mistake."""
    torch = _seed_torch(seed)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.fc1.requires_grad_(False)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed)


@scenario(
    "torch",
    root="not-optimized",
    names=("fc1",),
    why="The optimizer was built from fc2's and out's parameters only: fc1 gets gradients every step but is never "
    "updated. (Its .grad also accumulates, since optimizer.zero_grad() clears only the optimizer's parameters: a "
    "consequence of the same cause, not a missing zero_grad.)",
    exhibit=weight_unchanged("fc1", but_has_grad="fc1.weight"),
)
def torch_missing_from_optimizer(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits MLP whose SGD optimizer lists fc2 and out but forgets fc1."""
    torch = _seed_torch(seed)
    model = _mlp()
    params = [*model.fc2.parameters(), *model.out.parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed)


@scenario(
    "torch",
    root="not-optimized",
    names=("fc",),
    why="The classifier head was replaced after the optimizer was created: the new head gets gradients but is not "
    "in the optimizer (which still holds the old, detached head); its .grad accumulates because zero_grad() "
    "never reaches it, a consequence of the same cause.",
    exhibit=weight_unchanged("fc", but_has_grad="fc.weight"),
)
def torch_head_replaced_after_optimizer(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """The digits CNN: Adam is built, then model.fc is replaced by a fresh Linear (a new head for 10 classes)."""
    torch = _seed_torch(seed)
    model = _cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.fc = torch.nn.Linear(256, 10)
    return _train_torch(model, opt, path, watch, _digits_torch(), seed=seed)


def _two_branch(detach: bool = False, zero_scale: bool = False) -> Any:
    nn = _torch().nn
    torch = _torch()

    class TwoBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(64, 64)
            self.act1 = nn.ReLU()
            self.aux_fc = nn.Linear(64, 32)
            self.aux_act = nn.ReLU()
            self.out = nn.Linear(96, 10)
            # A LayerScale-like gain registered as a buffer (not a parameter) and initialised at 0.
            self.register_buffer("aux_scale", torch.zeros(1) if zero_scale else torch.ones(1))

        def forward(self, x: Any) -> Any:
            aux = self.aux_act(self.aux_fc(x)) * self.aux_scale
            if detach:
                aux = aux.detach()
            return self.out(torch.cat([self.act1(self.fc1(x)), aux], dim=1))

    return TwoBranch()


@scenario(
    "torch",
    root="no-gradient",
    names=("aux_fc",),
    why="The auxiliary branch's output is .detach()ed before the merge: aux_fc is in the optimizer and in the "
    "forward pass but no gradient ever reaches it.",
    exhibit=no_grad_for("aux_fc.weight", other="fc1.weight"),
)
def torch_detached_branch(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A two-branch digits MLP whose auxiliary branch is detached (aux.detach()) before the concatenation."""
    torch = _seed_torch(seed)
    model = _two_branch(detach=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed)


@scenario(
    "torch",
    root="no-gradient",
    names=("aux_fc",),
    why="The branch is scaled by a gain registered as a buffer initialised at 0 (meant to be a learnable "
    "LayerScale): aux_fc's gradient is exactly zero at every step, so it never trains.",
    exhibit=no_grad_for("aux_fc.weight", other="fc1.weight"),
)
def torch_zero_scaled_branch(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """The two-branch MLP whose auxiliary branch is multiplied by a zero buffer: exactly-zero gradients."""
    torch = _seed_torch(seed)
    model = _two_branch(zero_scale=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return _train_torch(model, opt, path, watch, _digits_torch(images=False), seed=seed)


def _no_steps(run: gradsight.Run) -> str | None:
    if run.meta.get("optimizer"):
        return f"expected a watch without optimizer, got {run.meta.get('optimizer')!r}"
    return None if len(run.steps) <= 1 else f"expected at most one summarised step, got {len(run.steps)}"


@scenario(
    "torch",
    root="no-steps-recorded",
    why="The loop updates the weights by hand and the watch was given no optimizer, and watch.step() is never "
    "called: nothing is recorded, and only no-steps-recorded can say so.",
    exhibit=_no_steps,
)
def torch_no_steps(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A digits MLP updated by a hand-written SGD step (p -= lr * p.grad), watched without optimizer=."""
    torch = _seed_torch(seed)
    model = _mlp()

    def sgd() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
                p.grad = None

    return _train_torch(model, None, path, watch, _digits_torch(images=False), seed=seed, step=sgd, steps=100)


def _clip_hides(max_norm: float) -> Exhibit:
    def check(run: gradsight.Run) -> str | None:
        pre = _scalar(run, "grad_norm_preclip")
        if len(pre):  # the watch records the pre-clip norm: check that it explodes behind the clipping
            grew = float(np.nanmax(pre) / np.nanmedian(pre[:5]))
            return None if grew > 100 else f"pre-clip gradient norm should grow >100x, grew {grew:.3g}x"
        return _clip_bites(max_norm, 0.5)(run)

    return check


@scenario(
    "torch",
    root="gradients-clipped",
    acceptable=("learning-rate-too-high", "exploding-gradients"),
    why="Clipping at 1.0 bites at almost every step while the gradient behind it grows by orders of magnitude: the "
    "clipping hides a divergence (warning). learning-rate-too-high (its cause here) and exploding-gradients (what "
    "is hidden) name the same problem.",
    exhibit=_clip_hides(1.0),
)
def torch_clipping_hides_explosion(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A deep linear regression net, SGD lr=0.1 momentum 0.99, clip_grad_norm_(1.0): it diverges behind the clipping."""
    torch = _seed_torch(seed)
    nn = torch.nn
    model = nn.Sequential(
        OrderedDict(fc1=nn.Linear(16, 32), fc2=nn.Linear(32, 32), fc3=nn.Linear(32, 32), out=nn.Linear(32, 1))
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.99)
    x, y = _regression_data(seed, 0.1)
    return _train_torch(model, opt, path, watch, (x, 3 * y), seed=seed, loss_fn=_mse, clip=1.0, steps=200)


# ---------------------------------------------------------------------------------------------------------------
# Keras 3 (TensorFlow backend).

_KERAS_READY = False


def _keras() -> Any:
    global _KERAS_READY
    import keras

    if not _KERAS_READY:
        import tensorflow as tf

        with contextlib.suppress(RuntimeError):  # already initialised by someone else: keep their setting
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.get_logger().setLevel("ERROR")
        _KERAS_READY = True
    return keras


def _train_keras(
    model: Any,
    optimizer: Any,
    path: Path,
    watch: Mapping[str, Any],
    *,
    seed: int,
    images: bool = False,
    loss: Any = None,
    steps: int = 200,
    batch: int = 32,
) -> Path:
    keras = _keras()
    x, y = digits()
    x = x[..., None] if images else x.reshape(len(x), 64)
    idx = _indices(seed, steps, batch, len(x)).reshape(-1)
    loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss)
    with gradsight.watch(model, path=path, **watch):
        model.fit(x[idx], y[idx], batch_size=batch, epochs=1, shuffle=False, verbose=0)
    return path


def _keras_mlp(act: str = "relu", widths: tuple[int, ...] = (64, 64), out_act: str | None = None, **dense: Any) -> Any:
    keras = _keras()
    layers = [keras.Input((64,))]
    for i, w in enumerate(widths, start=1):
        layers.append(keras.layers.Dense(w, activation=act, name=f"fc{i}", **dense.get(f"fc{i}", {})))
    layers.append(keras.layers.Dense(10, activation=out_act, name="out"))
    return keras.Sequential(layers, name="mlp")


@scenario("keras", root=None, why="A standard Keras CNN with Adam at 2e-3.", exhibit=learns(0.3))
def keras_cnn_digits(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A Keras CNN (two 3x3 ReLU convolutions, max pooling, a dense head) on digits, Adam lr=2e-3."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(10, name="out"),
        ],
        name="cnn",
    )
    return _train_keras(model, keras.optimizers.Adam(2e-3), path, watch, seed=seed, images=True)


@scenario("keras", root=None, why="A standard Keras MLP with Adam at 2e-3.", exhibit=learns(0.3))
def keras_mlp_digits(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A Keras ReLU MLP (64-64) on digits, Adam lr=2e-3."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    return _train_keras(_keras_mlp(), keras.optimizers.Adam(2e-3), path, watch, seed=seed)


@scenario(
    "keras",
    root="learning-rate-too-high",
    acceptable=_LR_ALT,
    why="Adam at lr=50 moves every weight by ~50 per step, hundreds of times its size: the loss jumps to ~1e7 at once.",
    exhibit=loss_jumps(3.0, within=20),
)
def keras_adam_lr50(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A Keras ReLU MLP (64-64) on digits with Adam at lr=50."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    return _train_keras(_keras_mlp(), keras.optimizers.Adam(50.0), path, watch, seed=seed)


@scenario(
    "keras",
    root="learning-rate-too-high",
    acceptable=_LR_ALT,
    why="SGD with momentum at lr=1.5 (30x a working rate): every step overshoots.",
    exhibit=loss_jumps(2.0, within=30),
)
def keras_sgd_high_lr(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A Keras ReLU MLP (64-64) on digits with SGD lr=1.5 momentum 0.9."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    return _train_keras(_keras_mlp(), keras.optimizers.SGD(1.5, momentum=0.9), path, watch, seed=seed)


@scenario(
    "keras",
    root="bad-initialisation",
    names=("fc1/bias",),
    why="fc1's bias initialised at -3 kills every unit of the layer from step 0 (Keras' Dense applies its ReLU "
    "inside the layer).",
    exhibit=all_of(output_dead("fc1"), _stuck(0.2)),
)
def keras_negative_bias(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A Keras ReLU MLP whose first Dense layer has bias_initializer=Constant(-3), SGD lr=0.05 momentum 0.9."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    model = _keras_mlp(fc1={"bias_initializer": keras.initializers.Constant(-3.0)})
    return _train_keras(model, keras.optimizers.SGD(0.05, momentum=0.9), path, watch, seed=seed)


@scenario(
    "keras",
    root="bad-initialisation",
    names=("fc1",),
    why="tanh layers initialised with std 3 start saturated: the weight scale is the cause.",
    exhibit=output_saturated("fc1"),
)
def keras_init_too_large_tanh(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A Keras tanh MLP whose two hidden layers use RandomNormal(stddev=3), SGD lr=0.01 momentum 0.9."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    init = {"kernel_initializer": keras.initializers.RandomNormal(stddev=3.0, seed=seed)}
    model = _keras_mlp("tanh", fc1=init, fc2=init)
    return _train_keras(model, keras.optimizers.SGD(0.01, momentum=0.9), path, watch, seed=seed)


@scenario(
    "keras",
    root="vanishing-gradients",
    acceptable=_VANISH_ALT,
    names=("fc1",),
    why="Eight sigmoid layers: the gradient shrinks by at least 4x per layer on its way back to fc1 (~1e-5 of the "
    "output layer's).",
    exhibit=grad_ratio_below("mlp/fc1/kernel", "mlp/out/kernel", 1e-3),
)
def keras_deep_sigmoid(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """Eight Keras sigmoid Dense layers (32 wide) on digits, SGD lr=0.1 momentum 0.9."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    model = _keras_mlp("sigmoid", (32,) * 8)
    return _train_keras(model, keras.optimizers.SGD(0.1, momentum=0.9), path, watch, seed=seed)


def _keras_naive_bce(y_true: Any, p: Any) -> Any:
    keras = _keras()
    ops = keras.ops
    t = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), 10)
    return -ops.mean(t * ops.log(p) + (1 - t) * ops.log(1 - p))


@scenario(
    "keras",
    root="non-finite",
    names=("out",),
    why="A hand-written binary cross-entropy on sigmoid outputs: log(1 - p) = log(0) once p rounds to 1.0.",
    exhibit=nonfinite_loss(after=5),
)
def keras_log_zero(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A Keras MLP with sigmoid outputs and a hand-written -(t log p + (1-t) log(1-p)), Adam lr=5e-2."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    model = _keras_mlp(out_act="sigmoid")
    return _train_keras(model, keras.optimizers.Adam(5e-2), path, watch, seed=seed, loss=_keras_naive_bce)


def _outside_unit_interval(layer: str) -> Exhibit:
    """Exhibit: ``layer``'s output (what the loss reads as probabilities) leaves [0, 1] at step 0."""

    def check(run: gradsight.Run) -> str | None:
        o = run.to_pandas(kind="output", layer=layer, steps=(0, 0))
        if o.empty:
            return f"no output summary of {layer!r} at step 0"
        lo, hi = float(o["min"].min()), float(o["max"].max())
        return None if lo < 0 or hi > 1 else f"{layer!r} output lies in [{lo:.3g}, {hi:.3g}] at step 0, inside [0, 1]"

    return check


@scenario(
    "keras",
    root="logits-as-probabilities",
    names=("out",),
    why="The last Dense layer has no activation (raw scores) but the loss is SparseCategoricalCrossentropy() with "
    "its default from_logits=False: Keras clips the scores to [1e-7, 1 - 1e-7] and takes their log, so every "
    "score outside that range gets no gradient and the model learns far less than with from_logits=True.",
    exhibit=_outside_unit_interval("out"),
)
def keras_logits_as_probabilities(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A Keras ReLU MLP (64-64) with a linear output, SparseCategoricalCrossentropy() (from_logits=False), Adam."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    loss = keras.losses.SparseCategoricalCrossentropy()  # the mistake: from_logits=True belongs here
    return _train_keras(_keras_mlp(), keras.optimizers.Adam(2e-3), path, watch, seed=seed, loss=loss)


@scenario(
    "keras",
    root=None,
    why="A Keras MLP ending in softmax, trained with SparseCategoricalCrossentropy() (from_logits=False): the right "
    "pairing for a probability output.",
    exhibit=learns(0.3),
)
def keras_softmax_probabilities(seed: int, path: Path, watch: Mapping[str, Any]) -> Path:
    """A Keras ReLU MLP (64-64) ending in softmax, SparseCategoricalCrossentropy() (from_logits=False), Adam."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    loss = keras.losses.SparseCategoricalCrossentropy()
    return _train_keras(_keras_mlp(out_act="softmax"), keras.optimizers.Adam(2e-3), path, watch, seed=seed, loss=loss)
