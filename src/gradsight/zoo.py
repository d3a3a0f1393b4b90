"""The fault zoo: small, fast, seeded training scenarios, each with the finding it must produce.

Every scenario is plain data (:class:`Scenario`): an architecture written as a list of layer specs, the
initialisation, the data, the loss, the optimizer and the expected findings. The framework modules
(``gradsight.frameworks.torch._zoo`` / ``_keras_zoo``, imported lazily) build the same network in PyTorch or
Keras with the *same layer names*, train it under :func:`gradsight.watch` (full summaries at every step) on tiny
synthetic data generated here with numpy, and return the run. Each scenario runs in about a second (PyTorch) or
a few seconds (Keras, mostly graph tracing) on a CPU.

>>> from gradsight import zoo
>>> zoo.list_scenarios()  # doctest: +SKIP
['healthy-mlp', 'healthy-cnn', 'deep-sigmoid', 'dead-relu', 'high-lr', 'saturated-tanh', 'log-zero']
>>> result = zoo.run_scenario("dead-relu", framework="torch", seed=0)  # doctest: +SKIP
>>> result.problems()  # [] when the expected findings were produced  # doctest: +SKIP

A NaN can also be injected into a chosen layer's forward pass or its backward pass at a chosen step
(:class:`NaNInjection`), to check that :func:`gradsight.diagnose.diagnose` locates it there.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._errors import InputError
from ._frameworks import framework_info
from ._scenario import Expectation, NaNInjection, Scenario
from .store import Run, load

if TYPE_CHECKING:  # pragma: no cover
    from .diagnose import Finding

__all__ = [
    "SCENARIOS",
    "Expectation",
    "NaNInjection",
    "Scenario",
    "ScenarioResult",
    "get_scenario",
    "list_scenarios",
    "make_data",
    "run_scenario",
]

Framework = Literal["torch", "keras"]
FRAMEWORKS: tuple[str, ...] = ("torch", "keras")


def _mlp(act: str, widths: tuple[int, ...], n_out: int, **extra: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    layers: list[dict[str, Any]] = []
    for i, w in enumerate(widths, start=1):
        act_name = f"{act}{i}" if act in ("tanh", "sigmoid") else f"act{i}"
        layers.append({"kind": "dense", "name": f"fc{i}", "units": w, **extra.get(f"fc{i}", {})})
        layers.append({"kind": "act", "name": act_name, "fn": act})
    layers.append({"kind": "dense", "name": "out", "units": n_out, **extra.get("out", {})})
    return tuple(layers)


#: Every scenario of the zoo by name, healthy ones first: what :func:`list_scenarios` lists and
#: :func:`run_scenario` runs.
SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "healthy-mlp",
            "A ReLU MLP with default initialisation, cross-entropy from logits and a moderate learning rate.",
            _mlp("relu", (32, 32), 3),
        ),
        Scenario(
            "healthy-cnn",
            "A small ReLU CNN (two 3x3 convolutions, pooling, a dense head) on 8x8 images.",
            (
                {"kind": "conv", "name": "conv1", "filters": 8},
                {"kind": "act", "name": "act1", "fn": "relu"},
                {"kind": "conv", "name": "conv2", "filters": 8},
                {"kind": "act", "name": "act2", "fn": "relu"},
                {"kind": "pool", "name": "pool"},
                {"kind": "flatten", "name": "flatten"},
                {"kind": "dense", "name": "out", "units": 4},
            ),
            data="images",
            lr=0.05,
        ),
        Scenario(
            "deep-sigmoid",
            "Eight sigmoid layers: each passes at most 1/4 of the gradient back, so the first layers get almost none.",
            _mlp("sigmoid", (32,) * 8, 3),
            lr=0.1,
            expect=(Expectation("vanishing-gradients", layers=("fc1", "fc2"), first_layer="fc1"),),
        ),
        Scenario(
            "dead-relu",
            "A ReLU MLP whose hidden biases start at -10: every pre-activation is negative, every unit dead.",
            _mlp("relu", (32, 32), 3, fc1={"bias": -10.0}, fc2={"bias": -10.0}),
            expect=(Expectation("dead-units", layers=("act1", "act2"), first_layer="act1"),),
        ),
        Scenario(
            "high-lr",
            "A deep linear regression network trained with a learning rate far too high: each step overshoots "
            "further, gradients grow by orders of magnitude within a few steps, then overflow to Inf/NaN.",
            (
                {"kind": "dense", "name": "fc1", "units": 32},
                {"kind": "dense", "name": "fc2", "units": 32},
                {"kind": "dense", "name": "out", "units": 1},
            ),
            data="regress",
            loss="mse",
            lr=0.05,
            steps=20,
            expect=(
                Expectation("exploding-gradients", layers=("fc1", "fc2", "out")),
                Expectation("non-finite"),
            ),
        ),
        Scenario(
            "saturated-tanh",
            "A tanh MLP with weights initialised at standard deviation 3: pre-activations of size ~10 pin the "
            "units to +-1.",
            _mlp("tanh", (32, 32), 3, fc1={"weight_std": 3.0}, fc2={"weight_std": 3.0}),
            lr=0.01,
            expect=(Expectation("saturated-units", layers=("tanh1", "tanh2"), first_layer="tanh1"),),
        ),
        Scenario(
            "log-zero",
            "A hand-written cross-entropy -sum(onehot * log(softmax(logits))) with large logits: probabilities "
            "underflow to 0, 0 * log(0) is NaN in the loss, and the backward pass spreads it from the last layer.",
            _mlp("relu", (32,), 3, out={"weight_std": 30.0}),
            loss="ce-naive",
            steps=10,
            expect=(Expectation("non-finite", first_layer="out", origin_kind="loss"),),
        ),
    )
}


@dataclass
class ScenarioResult:
    """What :func:`run_scenario` returns.

    Attributes:
        scenario: the scenario that ran.
        framework: ``"torch"`` or ``"keras"``.
        seed: the seed.
        path: the run file.
        findings: ``diagnose(path)``.
        expect: the findings it had to produce (the scenario's, or the injection's).
        injection: the NaN injection, if any.
    """

    scenario: Scenario
    framework: str
    seed: int
    path: Path
    findings: list[Finding]
    expect: tuple[Expectation, ...]
    injection: NaNInjection | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def run(self) -> Run:
        """Open the run file."""
        return load(self.path)

    def problems(self) -> list[str]:
        """Differences between the findings and the expectations; empty when the scenario behaved.

        A healthy scenario (no expectations) must have no warning or error finding; a faulty one must have each
        expected finding with the expected layers (and origin).
        """
        out: list[str] = []
        tag = f"{self.scenario.name} [{self.framework}, seed {self.seed}]"
        if not self.expect:
            bad = [f for f in self.findings if f.severity in ("warning", "error")]
            out += [f"{tag}: healthy scenario produced {f.severity} {f.code}: {f.message}" for f in bad]
            return out
        for e in self.expect:
            cands = [f for f in self.findings if f.code == e.code]
            if not cands:
                got = [f.code for f in self.findings]
                out.append(f"{tag}: expected a {e.code!r} finding, got {got!r}")
                continue
            f = cands[0]
            missing = [name for name in e.layers if name not in f.layers]
            if missing:
                out.append(f"{tag}: {e.code} finding lacks layers {missing!r}; it names {list(f.layers)!r}")
            if e.first_layer is not None and (not f.layers or f.layers[0] != e.first_layer):
                out.append(f"{tag}: {e.code} finding should start at {e.first_layer!r}, names {list(f.layers)!r}")
            if e.origin_kind is not None:
                kind = (f.evidence.get("origin") or {}).get("kind")
                if kind != e.origin_kind:
                    out.append(f"{tag}: {e.code} origin kind is {kind!r}, expected {e.origin_kind!r}")
        if self.injection is not None:
            f = next((f for f in self.findings if f.code == "non-finite"), None)
            if f is not None and f.first_step != self.injection.step:
                out.append(f"{tag}: NaN injected at step {self.injection.step}, first found at step {f.first_step}")
            if f is not None and self.injection.phase == "backward":
                phase = (f.evidence.get("origin") or {}).get("phase")
                if phase != "backward":
                    out.append(f"{tag}: NaN injected in the backward pass, origin phase is {phase!r}")
        return out

    @property
    def ok(self) -> bool:
        """Whether :meth:`problems` is empty."""
        return not self.problems()


def list_scenarios() -> list[str]:
    """The names of the zoo's scenarios, healthy ones first."""
    return list(SCENARIOS)


def get_scenario(name: str) -> Scenario:
    """The :class:`Scenario` called ``name``.

    Raises:
        InputError: no such scenario.
    """
    try:
        return SCENARIOS[name]
    except KeyError:
        raise InputError(f"unknown zoo scenario {name!r}; expected one of {list_scenarios()!r}.") from None


def make_data(scenario: Scenario, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The scenario's training data, ``steps * batch`` samples, generated with numpy from ``seed``.

    Returns:
        ``(x, y)``: float32 inputs (``(n, 10)``, or ``(n, 8, 8, 1)`` channels-last images) and targets (int64
        class indices, or float32 ``(n, 1)`` for regression).
    """
    rng = np.random.default_rng(seed)
    n = scenario.steps * scenario.batch
    if scenario.data == "images":
        y = rng.integers(0, 4, size=n)
        x = rng.normal(0, 0.3, size=(n, 8, 8, 1))
        for i, c in enumerate(y):  # a bright 4x4 quadrant tells the class
            r, q = divmod(int(c), 2)
            x[i, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4, 0] += 1.0
        return x.astype(np.float32), y.astype(np.int64)
    x = rng.normal(size=(n, 10)).astype(np.float32)
    if scenario.data == "regress":
        w = rng.normal(size=(10, 1))
        return x, (3.0 * x @ w).astype(np.float32)
    if scenario.data == "classify":
        w = rng.normal(size=(10, 3))
        return x, np.argmax(x @ w, axis=1).astype(np.int64)
    raise InputError(f"scenario {scenario.name!r} has unknown data {scenario.data!r}.")  # pragma: no cover


#: The largest seed: numpy's legacy seeding, Keras' ``set_random_seed`` and most tools take 32-bit seeds.
MAX_SEED = 2**32 - 1


def check_seed(seed: Any, what: str = "seed") -> int:
    """Check a random seed: an int in ``[0, 2**32 − 1]`` (numpy ints accepted; bool refused).

    Args:
        seed: the value given.
        what: how the caller names it in the message (``"seed"``, ``"--seed"``).

    Returns:
        The seed as a Python int.

    Raises:
        InputError: not an int, or outside ``[0, 2**32 − 1]``.
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise InputError(
            f"{what} must be an int from 0 to {MAX_SEED} (2**32 − 1), got {type(seed).__name__} {seed!r:.40}; "
            "e.g. seed=0."
        )
    if not 0 <= seed <= MAX_SEED:
        raise InputError(
            f"{what} must be an int from 0 to {MAX_SEED} (2**32 − 1, the range numpy and the frameworks seed "
            f"with), got {seed!r:.40}; e.g. seed=0, or seed % 2**32 to fold a larger number into range."
        )
    return int(seed)


def run_scenario(
    name: str,
    *,
    framework: Framework = "torch",
    seed: int = 0,
    steps: int | None = None,
    path: str | os.PathLike[str] | None = None,
    inject: NaNInjection | None = None,
) -> ScenarioResult:
    """Train a zoo scenario under :func:`gradsight.watch` and diagnose the run.

    Args:
        name: a scenario from :func:`list_scenarios`.
        framework: ``"torch"`` (alias ``"pytorch"``) or ``"keras"`` (aliases ``"tensorflow"``, ``"tf"``).
        seed: seeds the data, the initialisation and the framework's random generators.
        steps: override the scenario's number of training steps.
        path: the run file to write (must not exist); default a new file in a fresh temporary directory.
        inject: put a NaN into one layer's forward or backward pass (see :class:`NaNInjection`).

    Returns:
        The :class:`ScenarioResult` with the run file, the findings and the expectations.

    Raises:
        InputError: unknown scenario or framework, a seed outside ``[0, 2**32 − 1]``, or an injection into a layer
            that is not a dense layer.
    """
    scenario = get_scenario(name)
    seed = check_seed(seed)
    info = framework_info(framework) if isinstance(framework, str) else None  # aliases: as --framework takes them
    framework = info.name if info is not None else framework  # type: ignore[assignment]
    if framework not in FRAMEWORKS:
        raise InputError(
            f"framework must be 'torch' or 'keras', got {framework!r} (aliases: 'pytorch' for 'torch'; "
            "'tensorflow' and 'tf' for 'keras')."
        )
    if steps is not None:
        if not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be a positive int, got {steps!r}.")
        scenario = dataclasses.replace(scenario, steps=steps)
    if inject is not None:
        dense = [spec["name"] for spec in scenario.layers if spec["kind"] == "dense"]
        if inject.layer not in dense:
            raise InputError(
                f"NaNInjection layer {inject.layer!r} is not a dense layer of scenario {name!r}; choose one of "
                f"{dense!r}."
            )
        if inject.phase not in ("forward", "backward"):
            raise InputError(f"NaNInjection phase must be 'forward' or 'backward', got {inject.phase!r}.")
        if not 0 <= inject.step < scenario.steps:
            raise InputError(f"NaNInjection step {inject.step!r} is outside the run's steps 0..{scenario.steps - 1}.")
    if path is None:
        path = Path(tempfile.mkdtemp(prefix=f"gradsight-zoo-{name}-")) / f"{framework}-seed{seed}.db"
    x, y = make_data(scenario, seed)
    if framework == "torch":
        from .frameworks.torch._zoo import train
    else:
        from .frameworks.keras._zoo import train
    run_path = train(scenario, x, y, seed=seed, path=Path(path), inject=inject)
    from .diagnose import diagnose

    with load(run_path) as run:
        findings = diagnose(run)
    expect = (inject.expectation,) if inject is not None else scenario.expect
    return ScenarioResult(scenario, framework, seed, Path(run_path), findings, expect, inject)
