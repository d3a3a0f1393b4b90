"""PyTorch side of :mod:`gradsight.zoo`: build a scenario's network, train it under the watch, return the run."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..._scenario import NaNInjection, Scenario

__all__ = ["build", "train"]


class _NaNGrad(torch.autograd.Function):
    """Identity forward; backward puts a NaN into the first unit of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[..., 0] = float("nan")
        return g


class InjectLinear(nn.Linear):
    """A ``Linear`` that injects a NaN into its forward output or its backward pass at one training step."""

    def __init__(self, *args: Any, phase: str, at_step: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase = phase
        self.at_step = at_step
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if torch.is_grad_enabled():
            hit = self.calls == self.at_step
            self.calls += 1
            if hit and self.phase == "forward":
                out = out.clone()
                out[..., 0] = float("nan")
            elif hit:
                out = _NaNGrad.apply(out)
        return out


def _in_features(data: str) -> tuple[int, ...]:
    return (1, 8, 8) if data == "images" else (10,)


def build(scenario: Scenario, inject: NaNInjection | None = None) -> nn.Sequential:
    """The scenario's network as an ``nn.Sequential`` whose module names are the scenario's layer names."""
    mods: collections.OrderedDict[str, nn.Module] = collections.OrderedDict()
    shape = _in_features(scenario.data)
    for spec in scenario.layers:
        kind, name = spec["kind"], spec["name"]
        mod: nn.Module
        if kind == "dense":
            if inject is not None and inject.layer == name:
                mod = InjectLinear(shape[-1], spec["units"], phase=inject.phase, at_step=inject.step)
            else:
                mod = nn.Linear(shape[-1], spec["units"])
            shape = (spec["units"],)
        elif kind == "conv":
            mod = nn.Conv2d(shape[0], spec["filters"], 3, padding=1)
            shape = (spec["filters"], *shape[1:])
        elif kind == "act":
            mod = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[spec["fn"]]()
        elif kind == "pool":
            mod = nn.MaxPool2d(2)
            shape = (shape[0], shape[1] // 2, shape[2] // 2)
        elif kind == "flatten":
            mod = nn.Flatten()
            shape = (int(np.prod(shape)),)
        else:  # pragma: no cover - scenarios are data we write
            raise ValueError(f"unknown layer kind {kind!r}")
        if "weight_std" in spec:
            nn.init.normal_(mod.weight, 0.0, spec["weight_std"])
        if "bias" in spec:
            nn.init.constant_(mod.bias, spec["bias"])
        mods[name] = mod
    return nn.Sequential(mods)


def _loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "ce":
        return nn.functional.cross_entropy(out, y)
    if kind == "mse":
        return nn.functional.mse_loss(out, y)
    if kind == "ce-naive":  # the classic bug: 0 * log(0) = NaN for every class whose probability underflowed
        onehot = nn.functional.one_hot(y, out.shape[-1]).to(out.dtype)
        return -(onehot * torch.log(torch.softmax(out, dim=-1))).sum(-1).mean()
    raise ValueError(f"unknown loss {kind!r}")  # pragma: no cover


def train(
    scenario: Scenario, x: np.ndarray, y: np.ndarray, *, seed: int, path: Path, inject: NaNInjection | None = None
) -> Path:
    """Train the scenario under ``gradsight.watch`` (full summaries every step); return the run file."""
    threads = torch.get_num_threads()
    # Tiny models run fastest on one thread: with several, OpenMP workers spin and fight over shared cores
    # (measured here: a 40-step CNN scenario takes 0.4 s on one thread, up to 9 s on two busy cores).
    torch.set_num_threads(1)
    try:
        return _train(scenario, x, y, seed=seed, path=path, inject=inject)
    finally:
        torch.set_num_threads(threads)


def _train(scenario: Scenario, x: np.ndarray, y: np.ndarray, *, seed: int, path: Path, inject: Any) -> Path:
    from ..._watch import watch

    torch.manual_seed(seed)
    model = build(scenario, inject)
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1) if x.ndim == 4 else x))
    yt = torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=scenario.lr, momentum=scenario.momentum)
    b = scenario.batch
    with watch(model, path=path, optimizer=opt, every=1, config={"zoo": scenario.name, "seed": seed}) as w:
        for step in range(scenario.steps):
            xb, yb = xt[step * b : (step + 1) * b], yt[step * b : (step + 1) * b]
            loss = _loss(scenario.loss, model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    return Path(w.path)
