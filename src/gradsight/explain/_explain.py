"""``explain``: derive backprop layer by layer in closed form (numpy float64) and check every term against autodiff.

Flow: the framework's adapter (found by name through :func:`gradsight.explain._adapter.adapter`, imported
lazily) turns the model into layer specs and computes the framework's own value of every term. The derive loop
(:mod:`gradsight.explain._derive`) then recomputes the forward pass from X and the parameters, the loss and
dJ/dŶ from the closed-form loss rule, and the backward pass from dJ/dŶ, all in float64 numpy, walking the rule
table (:mod:`gradsight.explain.rules`), and compares term by term. This module validates the inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import InputError, UnsupportedError
from .._frameworks import framework_of
from ._adapter import adapter, adapter_info, check_loss_framework
from ._derive import derive
from ._derive_graph import derive_graph
from ._fd import FD_MAX_SAMPLES
from ._graph import GraphRun
from ._trace import Trace

__all__ = ["adapter", "check_loss_arg", "derive", "explain", "to_numpy"]


def to_numpy(obj: Any, what: str) -> np.ndarray:
    """Convert a torch/TF tensor, numpy array or nested list to numpy without importing a framework."""
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):
        obj = obj.detach().cpu()
        if str(getattr(obj, "dtype", "")) == "torch.bfloat16":  # numpy has no bfloat16: float32 holds it exactly
            obj = obj.float()
        obj = obj.numpy()
    elif hasattr(obj, "numpy") and not isinstance(obj, np.ndarray):
        obj = obj.numpy()
    try:
        arr = np.asarray(obj)
    except Exception as exc:
        raise InputError(f"{what} must be an array or tensor, got {type(obj).__name__!r}") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputError(f"{what} must be a numeric array or tensor, got {obj!r:.80} of dtype {arr.dtype}")
    return arr


def _nonfinite(a: np.ndarray) -> tuple[int, list[int]]:
    """How many entries of ``a`` are NaN/inf, and (up to 5 of) the samples holding them."""
    bad = ~np.isfinite(a)
    rows = np.nonzero(bad.reshape(a.shape[0], -1).any(axis=1))[0] if a.ndim else np.array([], int)
    return int(bad.sum()), [int(r) for r in rows[:5]]


def _validate(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check x and y (numeric, a batch axis, floating x, finite, one target per sample) and return numpy."""
    xa = to_numpy(x, "x")
    ya = to_numpy(y, "y")
    if xa.ndim == 0:
        raise InputError(f"x must have a batch axis, e.g. shape (n, features); got a scalar {xa!r}")
    if xa.shape[0] == 0:
        raise InputError(
            f"x is an empty batch (shape {xa.shape!r}); explain needs at least one sample. Fix: pass a batch "
            "with n >= 1 rows, e.g. x[:8]"
        )
    if not (np.issubdtype(xa.dtype, np.floating) or np.issubdtype(xa.dtype, np.integer)):
        raise InputError(
            f"x has dtype {xa.dtype} but the model needs floating-point inputs. Fix: x.float() (torch), "
            "x.astype('float32') (numpy) or tf.cast(x, 'float32')"
        )
    if np.issubdtype(xa.dtype, np.floating) and not np.all(np.isfinite(xa)):
        bad, rows = _nonfinite(xa)
        raise InputError(
            f"x contains {bad} NaN or infinite values (in samples {rows}{' …' if len(rows) == 5 else ''}); every "
            "term would be NaN, so nothing could be checked. explain needs finite inputs. Fix: drop or impute "
            "those samples, e.g. keep = np.isfinite(x).reshape(len(x), -1).all(1); explain(model, x[keep], y[keep])"
        )
    if ya.ndim == 0 or ya.shape[0] != xa.shape[0]:
        n = xa.shape[0]
        hint = f"pass the targets of the same batch (y[:{n}] if y holds more samples)"
        ids = np.issubdtype(xa.dtype, np.integer)
        if ya.ndim >= 1 and (xa.ndim >= 3 or (xa.ndim == 2 and ids)) and ya.shape[0] == n * xa.shape[1]:
            hint = (
                f"y looks flattened over x's first two axes ({n} x {xa.shape[1]} = {ya.shape[0]} targets): pass "
                f"it unflattened, y.reshape({n}, {xa.shape[1]}), with the loss reading (n, T) targets"
            )
        elif ya.ndim >= 1 and xa.ndim >= 3 and ya.shape[0] == xa.shape[1]:
            hint = (
                f"x's second axis has {xa.shape[1]} entries, as many as y's first: if x is sequence-first "
                "(T, n, ...), put the batch first (x.transpose(0, 1) / nn.MultiheadAttention(batch_first=True))"
            )
        raise InputError(
            f"y must have one target per sample, along x's first axis (the batch): x has {n} samples (shape "
            f"{xa.shape!r}) but y has shape {ya.shape!r}. Fix: {hint}."
        )
    if np.issubdtype(ya.dtype, np.floating) and not np.all(np.isfinite(ya)):
        bad, rows = _nonfinite(ya)
        raise InputError(
            f"y contains {bad} NaN or infinite values (in samples {rows}{' …' if len(rows) == 5 else ''}); the loss "
            "and every gradient would be NaN. explain needs finite targets. Fix: drop or impute those samples"
        )
    if ya.dtype == bool:
        ya = ya.astype(np.float64)
    return xa, ya


def _loss_class_error(loss: type) -> InputError:
    fw = framework_of(loss)
    example = (adapter_info(fw).loss_example if fw else "{name}()").format(name=loss.__name__)
    return InputError(
        f"loss is the class {loss.__name__!r}, not a loss object; explain calls the loss on (ŷ, y), which would "
        f"construct a new {loss.__name__} instead. Fix: pass an instance: {example}"
    )


def check_loss_arg(loss: Any, reduction: Any) -> None:
    """Refuse a loss class (instead of an instance), a non-callable loss and an invalid ``reduction``."""
    if isinstance(loss, type):
        raise _loss_class_error(loss)
    if not isinstance(reduction, str) or reduction not in ("mean", "sum"):
        raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    own = getattr(loss, "reduction", None)
    own = {"sum_over_batch_size": "mean", None: None}.get(own, own)
    if not isinstance(loss, str) and reduction != "mean" and own != reduction:
        carries = f"carries its own reduction {getattr(loss, 'reduction', None)!r}" if own else "has no reduction"
        raise InputError(
            f"reduction={reduction!r} applies only to a loss given by name (e.g. explain(..., loss='mse', "
            f"reduction='sum')); the loss {loss!r:.60} {carries}, so it would be silently ignored. Fix: set it on "
            "the object, e.g. nn.MSELoss(reduction='sum') or keras.losses.MeanSquaredError(reduction='sum')"
        )
    if not isinstance(loss, str) and not callable(loss):
        raise InputError(
            f"loss must be a loss object (nn.MSELoss(), keras.losses.MeanSquaredError()), a loss name such as "
            f"'mse', or a callable returning a scalar; got {loss!r:.60} of type {type(loss).__name__!r}"
        )


# long function: the public entry point; most of its length is the docstring, the user's reference for chains,
# graphs, naming and modes; the body only validates and dispatches.
def explain(
    model: Any,
    x: Any,
    y: Any,
    loss: Any = "mse",
    *,
    reduction: str = "mean",
    finite_differences: bool = False,
    fd_samples: int = 32,
    fd_seed: int = 0,
    training: bool | None = None,
) -> Trace:
    """Derive backprop through ``model`` for one batch, term by term, and check every term against autodiff.

    **Chains** (``nn.Sequential``, ``keras.Sequential``, a single-chain functional model) are explained layer by
    layer: l = 1..L, A_0 = X, Ŷ = A_L; a layer is one weighted op (Linear/Dense/Conv) together with the
    activation right after it; nested Sequentials are flattened; parameter-free layers (Flatten, Dropout, a lone
    activation) get their own index. Terms per layer: ``Z{l}``, ``S{l}``, ``A{l}``, ``dJ/dA{l}``, ``dJ/dZ{l}``,
    ``dJ/dW{l}``, ``dJ/db{l}`` (where they exist), plus ``J`` and ``dJ/dY_hat``.

    **Graphs** (any other torch module that ``torch.fx.symbolic_trace`` or ``torch.export`` can trace, any Keras
    functional model; also a chain fed integer ids) are explained node by node in topological order: residual
    adds, normalisation, embeddings, attention. Terms are keyed by quantity and node: ``A[blocks.0.ln1]``,
    ``dJ/dA[blocks.0.ln1]``, ``dJ/dW[blocks.0.attn.q_proj]``, ``dJ/db[...]``, ``dJ/dA[x]``; a node is named by
    its module path where it has one, by its op name otherwise (``A[add_1]``). A tensor read by several nodes
    (a skip connection) receives the sum of their gradients, and its term writes the sum out:
    ``dJ/dA[x] = dJ/dA[add] (skip) + … (branch)``. ``trace.graph`` lists the nodes with their inputs,
    ``trace.layer(name)`` gives one node's terms. A node without a rule is traced with autodiff values and
    marked, never refused; a forward whose control flow depends on tensor values cannot be traced and is
    refused with the module and line where tracing stopped.

    Values are in the framework's own layout (see each term's ``layout``).

    Args:
        model: a torch ``nn.Module`` or a built Keras model. Not modified: weights, ``.grad``, ``training``
            flags and buffers (BatchNorm running statistics) are left as they were.
        x: the input batch (array or tensor; floating point, or integer ids for a model starting with an
            embedding).
        y: the targets (same shape as the output; integer class indices for sparse cross-entropy).
        loss: a framework loss object (``nn.MSELoss()``, ``nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)``,
            ``keras.losses.MeanSquaredError()``, ...), a name (``"mse"``, ``"mae"``, ``"bce"``, ``"bce_logits"``,
            ``"cce"``, ``"cce_logits"``, ``"sparse_cce"``, ``"sparse_cce_logits"``, ``"output_mean"``,
            ``"output_sum"``; computed in the framework's own convention), or any callable returning a scalar
            (torch: ``loss(y_hat, y)``, Keras: ``loss(y_true, y_pred)``; dJ/dŶ then comes from autodiff).
        reduction: ``"mean"`` or ``"sum"``, for a loss given by name.
        finite_differences: also check dJ/dW and dJ/db against float64 central differences of the loss
            (closed-form forward) on sampled entries.
        fd_samples: entries checked per parameter tensor (all entries when the tensor is smaller).
        fd_seed: seed of the entry sampling.
        training: graphs only. None (default): torch modules keep their own mode (a BatchNorm in training mode
            uses batch statistics and its gradient flows through them), Keras layers run in inference mode;
            True: training mode (batch statistics) everywhere; False: inference mode everywhere. Dropout always
            runs at inference (the identity), so the run is deterministic.

    A module used several times in a chain is one layer per use; its per-use dJ/dW terms are checked against
    autodiff through each call alone, and a term ``dJ/dW[<module>]`` states and checks their sum (the
    parameter's ``.grad``); in a graph a parameter is a node, so a shared weight's term is that sum directly.
    Frozen layers are derived and checked too. float16/bfloat16 torch models are explained on a float64 copy;
    Keras float16/bfloat16 models are compared with that dtype's tolerance. NaN/inf in x or y are refused
    (every term would be NaN). Works under ``torch.no_grad()`` and ``torch.inference_mode()``.

    Returns:
        The :class:`Trace`.

    Raises:
        UnsupportedError: not a model, a model that cannot be traced (data-dependent control flow), a model
            taking several inputs, or Keras on a backend other than TensorFlow.
        InputError: bad x/y (shape, dtype, NaN/inf, empty, wrong feature count, integer x feeding anything but
            an embedding), a loss class instead of an instance, an invalid reduction, a loss that fails or does
            not return a scalar.
    """
    fw = framework_of(model)
    if fw is None:
        raise UnsupportedError(
            f"explain needs a torch.nn.Module or a Keras model, got {model!r:.80} of type {type(model).__name__!r}"
        )
    xa, ya = _validate(x, y)
    check_loss_arg(loss, reduction)
    if isinstance(fd_samples, bool) or not isinstance(fd_samples, (int, np.integer)) or fd_samples < 1:
        raise InputError(f"fd_samples must be a positive number of entries, got {fd_samples!r}")
    if fd_samples > FD_MAX_SAMPLES:
        raise InputError(
            f"fd_samples={fd_samples!r} would run {2 * fd_samples} forward passes per parameter tensor; the limit "
            f"is {FD_MAX_SAMPLES}. Fix: sample fewer entries (the default 32 covers every entry of small tensors)"
        )
    if training is not None and not isinstance(training, bool):
        raise InputError(f"training must be None, True or False, got {training!r}")
    if not isinstance(finite_differences, (bool, np.bool_)):
        raise InputError(f"finite_differences must be True or False, got {finite_differences!r}")
    ad = adapter(fw)
    shown = {"torch": "PyTorch", "keras": "Keras"}.get(adapter_info(fw).name, fw)
    check_loss_framework(loss, fw, where=f"explain on a {shown} model")
    run = (
        ad.run_explain(model, xa, ya, loss, reduction, training)
        if training is not None
        else (ad.run_explain(model, xa, ya, loss, reduction))
    )
    if isinstance(run, GraphRun):
        return derive_graph(run, finite_differences=finite_differences, fd_samples=fd_samples, fd_seed=fd_seed)
    return derive(run, finite_differences=finite_differences, fd_samples=fd_samples, fd_seed=fd_seed)
