"""Built-in examples, one per classic backprop surprise (``gradsight explain --example NAME``).

Each example builds its model through the framework adapter (``build_dense_model`` takes kernels in the
``(in, out)`` layout; ``build_graph_example`` builds the graph examples: a transformer block, a ResNet block,
an embedding classifier), runs the explainer, and returns the text to print, a JSON-ready dict and whether
every verification passed. The graph examples always check finite differences too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ._check_loss import check_loss
from ._depth import depth_sweep
from ._explain import adapter, explain
from ._jvg import jacobian_vs_gradient

__all__ = ["EXAMPLES", "EXAMPLE_W", "Example", "ExampleResult"]

#: the examples' non-trivial weight matrix (W1 = W2 = W3 in the 3-layer examples), kernel layout (in, out).
EXAMPLE_W = np.array([[1.0, 0.5, 0.25], [0.75, 0.5, 0.3], [0.9, 0.3, 0.1]])
SEED_W = EXAMPLE_W  # former name, kept for code that imported it


@dataclass
class ExampleResult:
    """What an example produced."""

    text: str
    data: dict
    ok: bool


@dataclass(frozen=True)
class Example:
    """A named example."""

    name: str
    summary: str
    run: Callable[[str, bool], ExampleResult]


def _fw_name(framework: str) -> str:
    return "torch" if framework == "torch" else "tensorflow"


def _default(framework: str, fd: bool) -> ExampleResult:
    ad = adapter(framework)
    model = ad.build_dense_model([EXAMPLE_W] * 3, None, [None, None, "relu"], "float64")
    x, y = np.ones((7, 3)), np.ones((7, 3))
    tr = explain(model, x, y, "mse", finite_differences=fd)
    head = (
        "A 3-layer network (W1 = W2 = W3 = [[1, .5, .25], [.75, .5, .3], [.9, .3, .1]], ReLU on the "
        "last layer), X = ones(7, 3), Y = ones(7, 3), mean-squared error.\n"
    )
    return ExampleResult(head + str(tr), {"trace": tr.to_dict()}, tr.ok)


def _single_layer(framework: str, fd: bool) -> ExampleResult:
    ad = adapter(framework)
    model = ad.build_dense_model([np.ones((3, 3))], None, None, "float64")
    x = np.ones((15, 3))
    y = np.zeros((15, 3))
    t_sum = explain(model, x, y, "output_sum", finite_differences=fd)
    t_mean = explain(model, x, y, "output_mean", finite_differences=fd)
    g_sum = t_sum["dJ/dW1"].autodiff
    g_mean = t_mean["dJ/dW1"].autodiff
    lines = [
        "Single layer Ŷ = X·W, W = ones(3, 3), X = ones(15, 3): the loss-scaling example.",
        f"  dŶ/dW (autodiff's gradient of Ŷ = of ΣŶ): every entry {g_sum.ravel()[0]:g}  (= n = 15: summed over n)",
        f"  dJ/dW for J = mean(Ŷ):                    every entry {g_mean.ravel()[0]:.6g} (= n·1/(n·f) = 1/3)",
        f"  dJ/dW for J = sum(Ŷ):                     every entry {g_sum.ravel()[0]:g}",
        "",
        str(t_mean),
    ]
    return ExampleResult(
        "\n".join(lines),
        {"mean": t_mean.to_dict(), "sum": t_sum.to_dict(), "dY_dW": g_sum.ravel()[0], "dJmean_dW": g_mean.ravel()[0]},
        t_sum.ok and t_mean.ok,
    )


def _three_layer(framework: str, fd: bool) -> ExampleResult:
    ad = adapter(framework)
    ones = np.ones((3, 3))
    x = np.ones((5, 3))
    model = ad.build_dense_model([ones] * 3, None, None, "float64")
    tr = explain(model, x, np.zeros((5, 3)), "output_mean", finite_differences=fd)
    sums = []
    traces = [tr]
    for depth in (1, 2, 3):
        sub = ad.build_dense_model([ones] * depth, None, None, "float64")
        t = explain(sub, x, np.zeros((5, 3)), "output_sum")
        traces.append(t)
        sums.append(float(t[f"dJ/dW{depth}"].autodiff.ravel()[0]))
    lines = [
        "Three layers of ones, no bias or activation, X = ones(5, 3), J = mean(Ŷ): how the gradient scale moves "
        "through depth.",
        "  dJ/dW_l = " + ", ".join(f"{tr[f'dJ/dW{l}'].autodiff.ravel()[0]:.6g}" for l in (1, 2, 3)) + "  (all 3)",
        "  per-layer sum-gradients dZ_l/dW_l = A_{l-1}ᵀ·1 (column sums of A_{l-1}): "
        + ", ".join(f"{s:g}" for s in sums)
        + "  (5, 15, 45)",
        "",
        str(tr),
    ]
    return ExampleResult("\n".join(lines), {"trace": tr.to_dict(), "sum_gradients": sums}, all(t.ok for t in traces))


def _activation_matrix(framework: str, fd: bool) -> ExampleResult:
    r1 = jacobian_vs_gradient(framework=framework)
    r2 = jacobian_vs_gradient(matrix=np.eye(3), framework=framework)
    text = f"Activation written as a matrix, A = Z·S: why tape.gradient(A, Z) is ones, not S.\n\n{r1}\n\n{r2}"
    return ExampleResult(text, {"diag_2_0_1": r1.to_dict(), "identity": r2.to_dict()}, r1.ok and r2.ok)


def _training_loop(framework: str, fd: bool) -> ExampleResult:
    ad = adapter(framework)
    n = 7
    model = ad.build_dense_model([EXAMPLE_W] * 3, None, [None, None, "relu"], "float32")
    x, y = np.ones((n, 3), dtype=np.float32), np.ones((n, 1), dtype=np.float32)
    # ŷ through the framework (float32, as in training): explain with J = mean(Ŷ) just to run the forward pass
    y_hat = explain(model, x, np.zeros((n, 3), np.float32), "output_mean")["A3"].autodiff
    handwritten = float(1 / (2 * n) * np.sum((y - y_hat) ** 2))
    fw_loss, fw_text = ad.example_loss()
    report = check_loss(fw_loss, y, y_hat)
    value = np.asarray(report.value)
    lines = [
        "The broadcasting trap in a training loop: 3 layers of the example weights, ReLU on the last, X = ones(7, 3), "
        "Y = ones(7, 1), n = 7.",
        f"  hand-written 1/(2n)·Σ(Y − Ŷ)² = {handwritten:.6g}   (the intended loss: 20.592548)",
        f"  {fw_text} → {np.array2string(value, precision=6)}   (one broadcast value per sample: 13.728364 ×7)",
        "",
        str(report),
    ]
    return ExampleResult(
        "\n".join(lines),
        {"handwritten": handwritten, "framework_loss": value, "check_loss": report.to_dict()},
        "broadcast" in report.codes,
    )


def _depth(framework: str, fd: bool) -> ExampleResult:
    a = depth_sweep(3, 5, init="ones", framework=framework)
    b = depth_sweep(3, 5, init="scaled", framework=framework)
    text = (
        "Depth sweep (X = ones(n, 3), Y = Ŷ − 1, mean MSE): gradients grow ×f per layer with all-ones "
        f"weights and stay flat when scaled by 1/f.\n\n{a}\n\n{b}"
    )
    return ExampleResult(text, {"ones": a.to_dict(), "scaled": b.to_dict()}, a.ok and b.ok)


def _graph_example(name: str) -> Callable[[str, bool], ExampleResult]:
    """A built-in graph example: built by the framework's adapter, explained with finite differences (float64)."""

    def run(framework: str, fd: bool) -> ExampleResult:
        model, x, y, loss, intro, options = adapter(framework).build_graph_example(name)
        tr = explain(model, x, y, loss, finite_differences=True, **options)
        fd_terms = [t for t in tr.terms if t.fd is not None]
        summary = f"\n{len(fd_terms)} parameter gradients also checked against float64 central differences: " + (
            "all agree ✓" if all(t.fd.ok for t in fd_terms) else "some disagree ✗"
        )
        return ExampleResult(f"{intro}\n\n{tr}{summary}", {"trace": tr.to_dict()}, tr.ok)

    return run


EXAMPLES: dict[str, Example] = {
    e.name: e
    for e in (
        Example("default", "a 3-layer network with ReLU and MSE, full trace", _default),
        Example("single-layer", "W = ones(3,3), X = ones(15,3): dŶ/dW = 15, mean → 1/3, sum → 15", _single_layer),
        Example(
            "three-layer", "three layers of ones, X = ones(5,3): dJ/dW_l = 3; sum-gradients 5, 15, 45", _three_layer
        ),
        Example(
            "activation-matrix",
            "A = Z·S: the Jacobian holds Sᵀ blocks, the gradient is S's row sums",
            _activation_matrix,
        ),
        Example(
            "training-loop",
            "n = 7, ReLU, Y (7,1) vs Ŷ (7,3): 20.5925 vs 13.728364 ×7, check_loss flags it",
            _training_loop,
        ),
        Example(
            "depth-sweep", "per-layer gradient RMS for depths 1..5: 0.667, 2, 6, 18, 54; flat 0.667 scaled", _depth
        ),
        Example(
            "transformer-block",
            "pre-norm block: LayerNorm → multi-head self-attention → + x → LayerNorm → GELU MLP → + residual",
            _graph_example("transformer-block"),
        ),
        Example(
            "resnet-block",
            "conv → BatchNorm (training) → ReLU → conv → BatchNorm → + skip → ReLU",
            _graph_example("resnet-block"),
        ),
        Example(
            "embedding-classifier",
            "ids → embedding (sparse gradient rows) → mean → LayerNorm → logits, weighted label-smoothed CE",
            _graph_example("embedding-classifier"),
        ),
    )
}
