"""Keras 3 (TensorFlow backend) adapter of the Explain pillar: model → neutral layer specs + autodiff values.

Each layer is called in turn under one persistent ``tf.GradientTape`` with ``training=False``. For Dense and
Conv2D the pre-activation Z is recomputed through public ops (``keras.ops.matmul(h, kernel) + bias``,
``layer.convolution_op(h, kernel) + bias``), A = ``layer.activation(Z)``, and that is checked against
``layer(h)``. A functional model must be a single chain (each layer one input, the sequential run reproducing
``model(x)``), otherwise it is refused.

A layer listed several times in a Sequential runs at each place; its parameters get one per-use gradient per
layer (``tape.gradient`` of that call alone, re-run on its input with ``tf.stop_gradient``) plus their total
gradient. Layers with ``trainable=False`` are explained and checked like the others (the tape reads their
variables too). Only the TensorFlow backend is supported: the autodiff values come from ``tf.GradientTape``.

Keras quirk reproduced faithfully: ``keras.activations.softmax``/``sigmoid`` attach ``_keras_logits`` to their
output, and a probability cross-entropy (``from_logits=False``) whose dtype equals ŷ's then silently computes
the loss from those logits. J then does not depend on ŷ; :class:`FrameworkRun.keras_logits` records it.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..._errors import GradsightError, InputError, UnsupportedError
from ..._tolerance import tolerance_for
from ...explain import rules as R
from ...explain._adapter import check_loss_framework
from ...explain._graph import GraphRun
from ...explain._spec import Conventions, FrameworkRun, LayerSpec, LossConvention, LossSpec, SharedParam
from ...explain.rules import LOSS_KINDS
from ._graph import (
    check_model_j,
    is_functional_graph,
    logits_note,
    plain_loss_grad,
    refuse_masked_tensors,
    refuse_masks,
    run_graph,
)
from ._graph_examples import build_graph_example

__all__ = [
    "CONVENTIONS",
    "LOSS_CONVENTION",
    "build_dense_model",
    "build_graph_example",
    "classify_loss",
    "example_loss",
    "jacobian_and_gradient",
    "loss_probe",
    "matmul_target",
    "run_explain",
]

try:  # the class keras.Model(inputs, outputs) returns; subclassed models are not instances of it
    from keras.src.models.functional import Functional as _FUNCTIONAL
except ImportError:  # pragma: no cover - other Keras layouts
    _FUNCTIONAL = None

#: Keras' losses (3.15 sources): per-element losses average the last axis first; probabilities are clipped to
#: [ε, 1−ε] (ε = keras.config.epsilon()); targets one rank short are expanded; TensorFlow's softmax
#: cross-entropy gradient is softmax(Z) − Y.
LOSS_CONVENTION = LossConvention(
    name="keras",
    display="Keras",
    last_axis_mean=True,
    expand_rank=True,
    clip_probabilities=True,
    softmax_ce_grad_normalised=True,
    ce_needs_2d=False,
    reduction_words={
        (True, "mean"): "mean over the last axis, then over the batch",
        (True, "sum"): "mean over the last axis, then sum over the batch",
        (False, "mean"): "sum over classes, mean over the batch",
        (False, "sum"): "sum over classes, sum over the batch",
    },
)

#: what the explain core needs to know about Keras, as data.
CONVENTIONS = Conventions(
    name="keras",
    display="Keras",
    dense_weight="in_out",
    conv_weight="hwio",
    frozen_words="trainable=False",
    grad_words="the variable gradient",
    per_use_words="tape.gradient(Z, kernel, output_gradients=dJ/dZ) through this call alone",
    logits_reason="ŷ carried _keras_logits, set by its softmax/sigmoid",
    loss=LOSS_CONVENTION,
)

_A = keras.activations
_ACT_FUNCS: dict[Any, tuple[str, dict]] = {
    _A.relu: ("relu", {}),
    _A.leaky_relu: ("leaky_relu", {"slope": 0.2}),
    _A.elu: ("elu", {"alpha": 1.0}),
    _A.gelu: ("gelu", {}),
    _A.sigmoid: ("sigmoid", {}),
    _A.tanh: ("tanh", {}),
    _A.softplus: ("softplus", {}),
    _A.silu: ("silu", {}),
    _A.linear: ("identity", {}),
    _A.softmax: ("softmax", {"axis": -1}),
}


def _require_tf_backend() -> None:
    """Refuse Keras running on another backend: the autodiff values come from ``tf.GradientTape``."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise UnsupportedError(
            f"Keras is running on the {backend!r} backend, but gradsight's Keras explain supports only the "
            "TensorFlow backend (its autodiff values come from tf.GradientTape). Fix: set KERAS_BACKEND=tensorflow "
            "before keras is first imported (e.g. os.environ['KERAS_BACKEND'] = 'tensorflow' at the top of the "
            "script, or `KERAS_BACKEND=tensorflow python ...`); on the torch backend, explain an equivalent "
            "torch.nn.Sequential instead."
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300]


def _np(t: Any) -> np.ndarray | None:
    return None if t is None else np.array(keras.ops.convert_to_numpy(t), dtype=np.float64)


def _activation_fn(fn: Any) -> tuple[str, dict] | None:
    """Rule name and parameters of a Keras activation function (``functools.partial`` of one included)."""
    if isinstance(fn, functools.partial) and not fn.args:
        base = _ACT_FUNCS.get(fn.func)
        kw = dict(fn.keywords)
        if base is None:
            return None
        name, _params = base[0], dict(base[1])
        if name == "gelu" and set(kw) <= {"approximate"}:
            return ("gelu_tanh", {}) if kw.get("approximate") else ("gelu", {})
        if name == "leaky_relu" and set(kw) <= {"negative_slope"}:
            return name, {"slope": float(kw.get("negative_slope", 0.2))}
        if name == "elu" and set(kw) <= {"alpha"}:
            return name, {"alpha": float(kw.get("alpha", 1.0))}
        if name == "relu" and set(kw) <= {"negative_slope"}:
            slope = float(kw.get("negative_slope", 0.0))
            return ("relu", {}) if slope == 0.0 else ("leaky_relu", {"slope": slope})
        return base if not kw else None
    try:
        return _ACT_FUNCS.get(fn)
    except TypeError:  # unhashable callable
        return None


def _activation_layer(layer: keras.layers.Layer) -> tuple[str, dict] | None:
    L = keras.layers
    if isinstance(layer, L.Activation):
        return _activation_fn(layer.activation)
    if isinstance(layer, L.ReLU):
        if layer.max_value is None and float(layer.threshold) == 0.0:
            slope = float(layer.negative_slope)
            return ("relu", {}) if slope == 0.0 else ("leaky_relu", {"slope": slope})
        return None
    if isinstance(layer, L.LeakyReLU):
        return "leaky_relu", {"slope": float(layer.negative_slope)}
    if isinstance(layer, L.ELU):
        return "elu", {"alpha": float(layer.alpha)}
    if isinstance(layer, L.Softmax):
        return "softmax", {"axis": layer.axis}
    return None


def _conv_config(layer: keras.layers.Conv2D, in_shape: tuple[int, ...]) -> dict | str:
    if tuple(layer.dilation_rate) != (1, 1):
        return f"dilation_rate={layer.dilation_rate} (no rule for dilated convolutions)"
    if getattr(layer, "groups", 1) != 1:
        return f"groups={layer.groups} (no rule for grouped convolutions)"
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    cl = layer.data_format == "channels_last"
    h, w = (in_shape[1], in_shape[2]) if cl else (in_shape[2], in_shape[3])
    if layer.padding == "valid":
        pads = (0, 0, 0, 0)
    elif layer.padding == "same":
        pads = R.same_padding(h, kh, sh) + R.same_padding(w, kw, sw)
    else:
        return f"padding={layer.padding!r}"
    return {"stride": (sh, sw), "pads": pads, "channels_last": cl}


def _chain(model: Any) -> list[keras.layers.Layer]:
    """The layers of a Sequential (nested flattened) or single-chain functional model, InputLayer skipped."""
    if isinstance(model, keras.layers.InputLayer):
        return []
    if isinstance(model, keras.Sequential):
        out: list[keras.layers.Layer] = []
        for layer in model.layers:
            out += _chain(layer)
        return out
    if isinstance(model, keras.Model):
        if _FUNCTIONAL is None or not isinstance(model, _FUNCTIONAL):
            raise UnsupportedError(
                f"explain cannot follow the subclassed Keras model {type(model).__name__!r}: its call() is Python "
                "code with no graph to read. Fix: express it as a functional model, keras.Model(inputs, outputs) "
                "(branches, residual adds and attention are fine), or keras.Sequential([...])."
            )
        try:
            inputs, outputs = model.inputs, model.outputs
        except (AttributeError, ValueError) as exc:
            raise UnsupportedError(
                f"explain cannot read the graph of {type(model).__name__!r} ({exc}); use a Sequential or "
                "functional model"
            ) from exc
        if len(inputs) != 1 or len(outputs) != 1:
            raise UnsupportedError(
                f"explain follows a single chain of layers, but {model.name!r} has {len(inputs)} inputs and "
                f"{len(outputs)} outputs. Fix: explain a single-input, single-output sub-model."
            )
        layers = [ly for ly in model.layers if not isinstance(ly, keras.layers.InputLayer)]
        prev = inputs[0]
        for ly in layers:
            if len(ly._inbound_nodes) != 1:
                raise UnsupportedError(
                    f"layer {ly.name!r} ({type(ly).__name__}) is called {len(ly._inbound_nodes)} times in the "
                    f"functional model {model.name!r}; explain supports a layer used several times only in a "
                    "keras.Sequential. Fix: rebuild the chain as keras.Sequential([...]) listing the layer at each "
                    "place it is used."
                )
            if len(ly._inbound_nodes[0].input_tensors) != 1:
                raise UnsupportedError(
                    f"explain follows a single chain of layers, but layer {ly.name!r} "
                    f"({type(ly).__name__}) takes {len(ly._inbound_nodes[0].input_tensors)} inputs: the model "
                    "branches. Fix: explain a single-chain sub-model."
                )
            if ly._inbound_nodes[0].input_tensors[0] is not prev:
                raise UnsupportedError(
                    f"explain follows a single chain of layers, but layer {ly.name!r} does not consume the "
                    "previous layer's output: the model branches or skips (e.g. a residual connection)."
                )
            prev = ly._inbound_nodes[0].output_tensors[0]
        out = []
        for ly in layers:
            out += _chain(ly) if isinstance(ly, keras.Model) else [ly]
        return out
    if isinstance(model, keras.layers.Layer):
        return [model]
    raise UnsupportedError(f"explain needs a Keras model or layer, got {type(model).__name__!r}")


# ---------------------------------------------------------------------------------------------------- losses
_CLASSES = {
    "MeanSquaredError": "mse",
    "MeanAbsoluteError": "mae",
    "BinaryCrossentropy": "bce",
    "CategoricalCrossentropy": "cce",
    "SparseCategoricalCrossentropy": "sparse_cce",
}
_FUNCS = {
    keras.losses.mean_squared_error: "mse",
    keras.losses.mean_absolute_error: "mae",
    keras.losses.binary_crossentropy: "bce",
    keras.losses.categorical_crossentropy: "cce",
    keras.losses.sparse_categorical_crossentropy: "sparse_cce",
}


def _make_string_loss(kind: str, reduction: str, dtype: str) -> Callable:
    red = "sum_over_batch_size" if reduction == "mean" else "sum"
    L = keras.losses
    if kind == "output_mean":
        return lambda t, p: keras.ops.mean(p)
    if kind == "output_sum":
        return lambda t, p: keras.ops.sum(p)
    logits = kind.endswith("_logits")
    base = kind.removesuffix("_logits")
    cls = {
        "mse": L.MeanSquaredError,
        "mae": L.MeanAbsoluteError,
        "bce": L.BinaryCrossentropy,
        "cce": L.CategoricalCrossentropy,
        "sparse_cce": L.SparseCategoricalCrossentropy,
    }[base]
    kw = {"from_logits": logits} if base not in ("mse", "mae") else {}
    return cls(reduction=red, dtype=dtype, **kw)


def classify_loss(
    loss: Any, reduction: str = "mean", dtype: str = "float32"
) -> tuple[LossSpec | None, str, Callable, str | None]:
    """Map a Keras loss (object, function, or name) to ``(spec, display, fn(y_true, y_pred), loss dtype)``.

    Keras loss *functions* (``keras.losses.mean_squared_error``) return one value per sample; their spec has
    ``reduction="none"``. An arbitrary callable gets ``spec=None``.
    """
    if isinstance(loss, type):
        raise InputError(
            f"loss is the class {loss.__name__!r}, not a loss object; calling it on (y, ŷ) would construct a new "
            f"{loss.__name__}. Fix: pass an instance: keras.losses.{loss.__name__}()"
        )
    if isinstance(loss, str):
        if loss not in LOSS_KINDS:
            raise InputError(f"unknown loss name {loss!r}; expected one of {', '.join(LOSS_KINDS)}")
        if reduction not in ("mean", "sum"):
            raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        spec = LossSpec(loss, reduction, LOSS_CONVENTION, f"{loss!r} (Keras convention, {reduction})")
        return spec, repr(loss), _make_string_loss(loss, reduction, dtype), dtype
    if isinstance(loss, keras.losses.Loss):
        kind = _CLASSES.get(type(loss).__name__)
        kw = getattr(loss, "_fn_kwargs", {}) or {}
        red = {"sum_over_batch_size": "mean", "mean": "mean", "sum": "sum"}.get(loss.reduction)
        display = f"keras.losses.{type(loss).__name__}(reduction={loss.reduction!r}" + "".join(
            f", {k}={v!r}" for k, v in kw.items() if k != "axis"
        )
        display += ")"
        if kind is None or red is None or kw.get("axis", -1) != -1 or kw.get("ignore_class") is not None:
            return None, display, loss, loss.dtype
        if kw.get("from_logits"):
            kind += "_logits"
        spec = LossSpec(kind, red, LOSS_CONVENTION, display, float(kw.get("label_smoothing", 0.0) or 0.0))
        return spec, display, loss, loss.dtype
    if not callable(loss):
        raise InputError(
            "loss must be a Keras loss (e.g. keras.losses.MeanSquaredError()), a loss name such as 'mse', or a "
            f"callable loss(y_true, y_pred) returning a scalar; got {loss!r}"
        )
    name = getattr(loss, "__name__", repr(loss))
    if getattr(keras.losses, name, None) is loss:  # a Keras loss function: its public name, not keras.src.…
        display = f"keras.losses.{name}"
    else:
        display = f"{getattr(loss, '__module__', '')}.{name}".lstrip(".")
    kind = _FUNCS.get(loss)
    if kind is not None:
        return LossSpec(kind, "none", LOSS_CONVENTION, display), display, loss, None
    return None, display, loss, None


# ------------------------------------------------------------------------------------------------- explain
def _model_dtype(layers: list[keras.layers.Layer], model: Any) -> str:
    for ly in layers:
        if ly.weights:
            return str(ly.compute_dtype)
    return str(getattr(model, "compute_dtype", keras.config.floatx()))


def _as_graph(model: Any, x: np.ndarray) -> bool:
    """Explain ``model`` as a graph: integer ids, or a functional model the chain walker refuses (it branches)."""
    if np.issubdtype(np.asarray(x).dtype, np.integer):
        return isinstance(model, keras.Model)
    if not is_functional_graph(model):
        return False
    try:
        _chain(model)
    except UnsupportedError as exc:
        return "single chain" in str(exc) or "called" in str(exc)
    return False


def _w_and_b(layer: Any) -> bool:
    """Whether the chain can name a layer's variables W and b: at most a kernel-like one and a bias-like one."""
    names = [v.path.rsplit("/", 1)[-1] for v in layer.weights if getattr(v, "path", None)]
    if len(names) != len(layer.weights) or len(names) > 4:
        return False
    trainable = [v.path.rsplit("/", 1)[-1] for v in layer.trainable_weights]
    if len(trainable) > 2:
        return False
    kinds = {"kernel": 0, "embeddings": 0, "gamma": 0, "alpha": 0, "bias": 1, "beta": 1}
    slots = [kinds.get(n) for n in trainable]
    return None not in slots and slots == sorted(set(slots))


def _functional_view(model: Any) -> Any | None:
    """A functional model over a Sequential's own layers (``keras.Model(inputs, outputs)``), or ``None``.

    Needs the Sequential's symbolic input (built from a ``keras.Input``); the view shares every layer and weight.
    """
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        return None
    if not inputs or not outputs or len(inputs) != 1 or len(outputs) != 1:
        return None
    return keras.Model(inputs, outputs, name=model.name)


def _run_graph(model: Any, x: np.ndarray, y: np.ndarray, loss: Any, reduction: str, training: bool | None):
    layers = [ly for ly in model._flatten_layers(include_self=False) if ly.weights]
    dtype = str(layers[0].compute_dtype) if layers else str(getattr(model, "compute_dtype", keras.config.floatx()))
    spec, display, loss_fn, loss_dtype = classify_loss(loss, reduction, dtype)
    if spec is not None and spec.reduction == "none":
        spec = None
    run = run_graph(model, x, y, spec, display, loss_fn, CONVENTIONS, dtype, training)
    rank = {"float64": 2, "float32": 1}
    if loss_dtype is not None and rank.get(str(loss_dtype), 0) < rank.get(dtype, 0):
        run.dtype = str(loss_dtype)
        run.notes.append(f"the loss computes in {loss_dtype}: terms are compared with {loss_dtype}'s tolerance")
    return run


# long function: one persistent GradientTape spans the forward chain, the loss and every gradient read from it;
# to be split into forward / gradients / fill-specs helpers that pass the tape along.
def run_explain(
    model: Any, x: np.ndarray, y: np.ndarray, loss: Any, reduction: str = "mean", training: bool | None = None
) -> FrameworkRun | GraphRun:
    """Run ``model`` on ``x`` under one tape and collect Keras' value of every term.

    A ``keras.Sequential`` or a single-chain functional model is a chain (layer by layer, terms ``Z1``...); a
    functional model that branches (residual adds, attention, several consumers of a tensor), or any model fed
    integer ids, is a graph (:mod:`gradsight.frameworks.keras._graph`; terms ``A[layer]``, ``dJ/dW[layer]``).

    Args:
        model: a built ``keras.Sequential`` (nested allowed), a functional model, or a layer.
        x: the input batch.
        y: the targets.
        loss: see :func:`classify_loss`; callables are called as ``loss(y_true, y_pred)``.
        reduction: reduction of a loss given by name.
        training: True runs BatchNormalization on batch statistics (a chain with one is explained as a graph);
            otherwise inference mode.

    Returns:
        The :class:`~gradsight.explain._spec.FrameworkRun` of a chain or the
        :class:`~gradsight.explain._graph.GraphRun` of a graph.
    """
    _require_tf_backend()
    check_loss_framework(loss, "keras", where="explain on a Keras model")
    if isinstance(model, keras.Model) and not model.built:
        raise InputError(
            f"the Keras model {model.name!r} is not built yet, so it has no weights to explain. Fix: give it an "
            "input shape, e.g. keras.Sequential([keras.Input((3,)), ...]), or call model.build((None, 3))."
        )
    refuse_masks(model)
    if _as_graph(model, x):
        return _run_graph(model, x, y, loss, reduction, training)
    layers = _chain(model)
    unnamed = [ly.name for ly in layers if not _w_and_b(ly)]
    if unnamed or (training and any(isinstance(ly, keras.layers.BatchNormalization) for ly in layers)):
        # the chain derives inference mode only: batch statistics route to the graph explainer, as in torch
        graph = model if is_functional_graph(model) else _functional_view(model)
        if graph is None:
            why = (
                f"layers {unnamed!r} hold variables other than a kernel and a bias, which the chain cannot name"
                if unnamed
                else "BatchNormalization on batch statistics (training=True)"
            )
            raise UnsupportedError(
                f"explain on {type(model).__name__} {model.name!r}: {why}; the graph explainer derives it, and needs "
                "a model with a known input (a functional model, or a Sequential that starts with keras.Input). "
                "Fix: add keras.Input(shape) as the first layer."
            )
        return _run_graph(graph, x, y, loss, reduction, training)
    dtype = _model_dtype(layers, model)
    spec, display, loss_fn, loss_dtype = classify_loss(loss, reduction, dtype)
    eff_dtype = dtype
    if loss_dtype is not None and str(loss_dtype) != dtype and "float16" not in dtype:
        eff_dtype = min(dtype, str(loss_dtype), key=lambda d: {"float64": 2, "float32": 1}.get(d, 0))
    computes = {str(ly.compute_dtype) for ly in layers if ly.weights}
    mixed_note = ""
    if len(computes) > 1:
        lowest = min(computes, key=lambda d: {"float64": 3, "float32": 2}.get(d, 0))
        if {"float64": 3, "float32": 2}.get(lowest, 0) < {"float64": 3, "float32": 2}.get(eff_dtype, 0):
            eff_dtype = lowest
        mixed_note = (
            f"the layers compute in different dtypes ({', '.join(sorted(computes))}); each layer's input is cast to "
            f"its compute dtype, as Keras does, and terms are compared with {eff_dtype}'s tolerance"
        )
    x_t = tf.constant(np.asarray(x), dtype=dtype)
    x_shape = tuple(x_t.shape)
    sparse = np.issubdtype(np.asarray(y).dtype, np.integer)
    y_t = tf.constant(np.asarray(y), dtype="int64" if sparse else dtype)
    specs: list[LayerSpec] = []
    recs: list[dict[str, Any]] = []
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x_t)
        h = x_t
        i = 0
        while i < len(layers):
            ly = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            follow = None
            if (
                nxt is not None
                and isinstance(ly, (keras.layers.Dense, keras.layers.Conv2D))
                and _activation_fn(ly.activation) == ("identity", {})
                and _activation_layer(nxt) is not None
            ):
                follow = nxt  # Dense/Conv without activation + an activation layer = one layer l
                i += 1
            try:
                ls, rec, h = _layer_forward(ly, h, len(specs) + 1, follow)
            except GradsightError:
                raise
            except Exception as exc:
                raise InputError(
                    f"layer {len(specs) + 1} ({ly.name}: {type(ly).__name__}) {_expects(ly)}, but its input has "
                    f"shape {tuple(h.shape)!r}, dtype {h.dtype.name} (x has shape {x_shape!r}); Keras said: "
                    f"{_first_line(exc)}. Fix: pass x with the shape the model was built for."
                ) from exc
            specs.append(ls)
            recs.append(rec)
            i += 1
        y_hat = h
        refuse_masked_tensors({r["layer"].name: r["a"] for r in recs})
        if spec is not None and spec.kind not in ("output_mean", "output_sum") and not spec.kind.startswith("sparse"):
            yshape, pshape = tuple(y_t.shape), tuple(y_hat.shape)
            if yshape != pshape and not (len(yshape) == len(pshape) - 1 and pshape[-1] == 1 and yshape == pshape[:-1]):
                raise InputError(
                    f"y has shape {yshape!r} but the model's output ŷ has shape {pshape!r}; {display} would "
                    "broadcast them. Pass y with the output's shape, or run gradsight.check_loss(loss, y, y_hat) "
                    "to see what the broadcast does."
                )
        if spec is not None and spec.kind.startswith("sparse") and int(np.prod(y_t.shape)) != int(y_hat.shape[0]):
            raise InputError(
                f"{display} needs one class index per sample: y has shape {tuple(y_t.shape)!r} but ŷ has shape "
                f"{tuple(y_hat.shape)!r} ({y_hat.shape[0]} samples). Fix: pass integer class indices of shape "
                f"({y_hat.shape[0]},), or one-hot targets with keras.losses.CategoricalCrossentropy()."
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                j = loss_fn(y_t, y_hat)
            except GradsightError:
                raise
            except Exception as exc:
                raise InputError(
                    f"the loss {display} failed on y of shape {tuple(y_t.shape)!r} ({y_t.dtype.name}) and ŷ of shape "
                    f"{tuple(y_hat.shape)!r} ({y_hat.dtype.name}): {_first_line(exc)}. Fix: pass y in the form this "
                    "loss expects (integer class indices of shape (n,) for sparse cross-entropy, ŷ's shape "
                    "otherwise); gradsight.check_loss(loss, y, y_hat) shows what the loss does with them."
                ) from exc
    if not hasattr(j, "shape") or len(j.shape) != 0:
        shape = tuple(j.shape) if hasattr(j, "shape") else type(j).__name__
        raise InputError(
            f"the loss {display} returned {shape!r}, not a scalar: a Keras loss *function* such as "
            "keras.losses.mean_squared_error returns one value per sample, and autodiff differentiates their "
            "sum, n times the mean's gradient. Fix: use the loss object, keras.losses.MeanSquaredError(), or "
            "run gradsight.check_loss to see the consequence."
        )
    wrt: list[Any] = []
    seen: dict[int, int] = {}

    def slot(t: Any) -> int | None:
        if t is None:
            return None
        if id(t) not in seen:
            seen[id(t)] = len(wrt)
            wrt.append(t)
        return seen[id(t)]

    i_yhat = slot(y_hat)
    plan = [{"z": slot(r["z"]), "a": slot(r["a"]), "p": [slot(p) for p in r["params"]]} for r in recs]
    grads = tape.gradient(j, wrt, unconnected_gradients=tf.UnconnectedGradients.NONE)
    # parameters used by several layers (a layer listed more than once in a Sequential)
    uses: dict[int, list[int]] = {}
    for l, rec in enumerate(recs, start=1):
        for p in rec["params"]:
            if l not in uses.setdefault(id(p), []):
                uses[id(p)].append(l)
    shared: list[SharedParam] = []
    for l, rec in enumerate(recs, start=1):
        for which, p in zip("Wb", rec["params"], strict=False):
            if len(uses[id(p)]) > 1 and uses[id(p)][0] == l:
                g = grads[seen[id(p)]]
                total = _np(g) if g is not None else np.zeros(tuple(p.shape))
                shared.append(
                    SharedParam(str(getattr(p, "path", p.name)), which, rec["layer"].name, uses[id(p)], total)
                )
    keys = {(sp.which, l): sp.key for sp in shared for l in sp.layers}
    for ls, rec, pl in zip(specs, recs, plan, strict=False):
        ls.z = _np(rec["z"])
        ls.a = _np(rec["a"])
        ls.dz = _np(grads[pl["z"]]) if pl["z"] is not None else None
        ls.da = _np(grads[pl["a"]]) if pl["a"] is not None else None
        if ls.weight is not None:
            ls.shared = {w: keys[(w, ls.index)] for w in "Wb" if (w, ls.index) in keys}
            if ls.shared and rec["params"]:
                # this use's share: the call re-run on its input with stop_gradient, so earlier uses are cut
                out = rec["z"] if rec["z"] is not None else rec["a"]
                g_out = grads[seen[id(out)]] if id(out) in seen else None
                if g_out is None:
                    per_use = [None] * len(rec["params"])
                else:
                    with tf.GradientTape() as t2:
                        again = rec["zfn"](tf.stop_gradient(rec["in"]))
                    per_use = t2.gradient(again, rec["params"], output_gradients=g_out)
                pg = [
                    _np(g) if g is not None else np.zeros(tuple(p.shape))
                    for g, p in zip(per_use, rec["params"], strict=False)
                ]
            else:
                pg = [_np(grads[i]) if i is not None and grads[i] is not None else None for i in pl["p"]]
            ls.dw = pg[0] if pg else None
            ls.db = pg[1] if len(pg) > 1 else None
            if ls.dw is None:
                ls.dw = np.zeros_like(ls.weight)
            if ls.db is None and ls.bias is not None:
                ls.db = np.zeros_like(ls.bias)
        if rec["z"] is not None and ls.kind != "opaque":
            if ls.activation == "softmax" and R.jacobian_too_big(tuple(rec["z"].shape)):
                a, z = rec["a"], rec["z"]
                probe = tf.constant(R.softmax_probe(tuple(z.shape)), dtype=a.dtype)
                ls.s, ls.s_probe = _np(tape.gradient(a, z, output_gradients=probe)), True
            elif ls.activation == "softmax":
                # row j of every sample's Jacobian is the vjp with e_j: f calls, no pfor retracing
                a, z = rec["a"], rec["z"]
                f = int(a.shape[-1])
                rows = [
                    tape.gradient(a, z, output_gradients=tf.one_hot(tf.fill([a.shape[0]], k), f, dtype=a.dtype))
                    for k in range(f)
                ]
                ls.s = np.stack([_np(r) for r in rows], axis=1)
            elif rec["a"] is rec["z"]:
                ls.s = np.ones(tuple(rec["z"].shape))
            else:
                ls.s = _np(tape.gradient(rec["a"], rec["z"]))
    del tape
    dj = grads[i_yhat]
    keras_logits = bool(
        dj is None
        and spec is not None
        and spec.kind.split("_logits")[0] in ("bce", "cce", "sparse_cce")
        and specs
        and specs[-1].dz is not None
    )
    notes = [f"Keras warned: {w.message}" for w in caught]
    floor = 0.0
    if "float64" in eff_dtype and any(ls.activation in ("gelu", "gelu_tanh") for ls in specs):
        floor = 1e-7
        notes.append(
            "TensorFlow's float64 gelu deviates from the exact formula by up to ~5e-9 (relative), so terms are "
            "compared with rtol 1e-7 instead of float64's 1e-9"
        )
    if not keras_logits and getattr(y_hat, "_keras_logits", None) is not None:
        # the loss may read the logits for part of J only: dJ/dŶ of the loss on ŷ itself
        dj_plain, j_plain = plain_loss_grad(loss_fn, y_t, y_hat)
        note = logits_note(display, dj, dj_plain, float(np.asarray(j, dtype=np.float64)), j_plain, eff_dtype)
        notes += [note] if note else []
        dj = dj_plain
        if specs and recs[-1]["a"] is y_hat:
            specs[-1].da = _np(dj_plain)  # the output's own autodiff value is dJ/dŶ, not the tape's partial one
    if dj is None and not keras_logits:
        dj = tf.zeros_like(y_hat)
    check_model_j(model, x_t, y_t, loss_fn, j, bool(training), "chain of layers")
    frozen = [ls.index for ls in specs if ls.frozen]
    if frozen:
        notes.append(
            f"layer(s) {frozen} are frozen (trainable=False): explain derived and checked their gradients anyway "
            "(the tape reads their variables; nothing was changed)"
        )
    if mixed_note:
        notes.append(mixed_note)
    if any(k in eff_dtype for k in ("float16", "bfloat16")):
        tol = tolerance_for(eff_dtype)
        notes.append(
            f"the model computes in {eff_dtype}: autodiff ran in {eff_dtype}, the closed form in float64 from the "
            f"{eff_dtype} weights and x rounded to {eff_dtype}; terms are compared with {eff_dtype}'s tolerance "
            f"(rtol {tol.rtol:g}, atol {tol.atol:g}), so ✓ means agreement to {eff_dtype} precision"
        )
    return FrameworkRun(
        framework="keras",
        model_name=f"{type(model).__name__} {getattr(model, 'name', '')!r}",
        layers=specs,
        x=_np(x_t),
        y=np.asarray(y),
        dtype=eff_dtype,
        loss=spec,
        loss_display=display,
        j=float(np.asarray(j, dtype=np.float64)),
        dj_dyhat=_np(dj),
        keras_logits=keras_logits,
        notes=notes,
        rtol_floor=floor,
        shared=shared,
        conventions=CONVENTIONS,
    )


def _expects(ly: Any) -> str:
    if isinstance(ly, keras.layers.Dense) and ly.built:
        f = int(ly.kernel.shape[0])
        return f"expects inputs with {f} features in the last axis, shape (n, {f})"
    if isinstance(ly, keras.layers.Conv2D) and ly.built:
        c = int(ly.kernel.shape[2])
        return f"expects inputs with {c} channels ({ly.data_format})"
    return "cannot take that input"


# long function: one Keras layer's forward, Dense / Conv2D / activation / flatten / dropout / no rule, each a few
# lines reading the same layer attributes; to become a per-layer-type table like the rule table.
def _layer_forward(ly: Any, h: Any, index: int, follow: Any = None) -> tuple[LayerSpec, dict[str, Any], Any]:
    L = keras.layers
    name = f"{ly.name}: {type(ly).__name__}"
    ls = LayerSpec(index, "opaque", name, type(ly).__name__)
    if follow is not None:
        ls.name += f" + {follow.name}: {type(follow).__name__}"
    cd = getattr(ly, "compute_dtype", None)
    if ly.weights and cd is not None and str(h.dtype.name) != str(cd) and "float" in str(cd):
        h = keras.ops.cast(h, cd)  # Keras casts a layer's floating inputs to its compute dtype
    rec: dict[str, Any] = {"z": None, "a": None, "params": [], "in": h, "layer": ly}
    ls.frozen = not ly.trainable and bool(ly.weights)
    act = None
    zfn = None
    if isinstance(ly, L.Dense) and not getattr(ly, "lora_enabled", False) and ly.kernel.dtype == ly.compute_dtype:
        act = _activation_fn(ly.activation)

        def zfn(hh: Any) -> Any:
            zz = keras.ops.matmul(hh, ly.kernel)
            return zz + ly.bias if ly.bias is not None else zz

        z = zfn(h)
        ls.kind, ls.weight_layout = "dense", "Keras Dense kernel (in, out)"
    elif isinstance(ly, L.Conv2D) and not getattr(ly, "lora_enabled", False):
        cfg = _conv_config(ly, tuple(h.shape))
        if isinstance(cfg, str):
            ls.reason = cfg
            z = None
        else:
            act = _activation_fn(ly.activation)
            shape = (1, 1, 1, ly.filters) if cfg["channels_last"] else (1, ly.filters, 1, 1)

            def zfn(hh: Any) -> Any:
                zz = ly.convolution_op(hh, ly.kernel)
                return zz + keras.ops.reshape(ly.bias, shape) if ly.bias is not None else zz

            z = zfn(h)
            ls.kind, ls.conv = "conv2d", cfg
            ls.weight_layout = "Keras Conv2D kernel (kh, kw, cin, cout)"
    else:
        z = None
    rec["zfn"] = zfn
    if z is not None:
        ls.weight = _np(ly.kernel)
        ls.bias = _np(ly.bias) if ly.bias is not None else None
        rec["params"] = [ly.kernel] + ([ly.bias] if ly.bias is not None else [])
        name_act = "identity" if act is None else act[0]
        if act is None:
            ls.kind = "opaque"
            ls.reason = f"activation {getattr(ly.activation, '__name__', ly.activation)!r} has no rule"
        a = ly.activation(z)
        ref = ly(h, training=False)
        if not np.allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(ref), rtol=1e-5, atol=1e-6):
            ls.kind, ls.reason = "opaque", "layer(h) differs from Z = kernel op + bias, A = activation(Z)"
            a = ref
        if act is not None:
            ls.activation, ls.activation_params = name_act, dict(act[1])
        ls.type_name += f"(activation={getattr(ly.activation, '__name__', '?')})"
        if follow is not None:
            act2 = _activation_layer(follow)
            a = follow(a, training=False)
            ls.activation, ls.activation_params = act2[0], dict(act2[1])
            ls.type_name += f"+{type(follow).__name__}"
            if act2[0] == "softmax" and (len(z.shape) != 2 or act2[1].get("axis", -1) not in (-1, 1)):
                ls.kind, ls.reason = "opaque", f"softmax over axis={act2[1].get('axis')!r} of a {len(z.shape)}-D input"
        rec.update(z=z, a=a)
        return ls, rec, a
    act = _activation_layer(ly)
    if act is not None:
        ls.kind, ls.activation, ls.activation_params = "activation", act[0], dict(act[1])
        a = ly(h, training=False)
        rec.update(z=h, a=a)
    elif isinstance(ly, L.Flatten) and ly.data_format == "channels_last":
        ls.kind = "flatten"
        a = ly(h)
        rec["a"] = a
    elif isinstance(ly, L.Dropout):
        ls.kind = "dropout"
        a = ly(h, training=False)
        rec["a"] = a
    else:
        if isinstance(ly, L.Dense) and ly.kernel.dtype != ly.compute_dtype:
            ls.reason = f"mixed precision (kernel {ly.kernel.dtype}, computed in {ly.compute_dtype}): no rule"
        ls.reason = ls.reason or f"no rule for {type(ly).__name__}"
        a = ly(h, training=False)
        rec["a"] = a
        rec["zfn"] = lambda hh: ly(hh, training=False)
        weights = ly.trainable_weights if ly.trainable else [w for w in ly.weights if w.trainable] or ly.weights
        if weights:
            ls.weight = _np(weights[0])
            rec["params"] = list(weights[:2])
            if len(weights) > 1:
                ls.bias = _np(weights[1])
    if ls.activation == "softmax" and ls.kind == "activation":
        axis = ls.activation_params.get("axis", -1)
        if len(h.shape) != 2 or axis not in (-1, 1):
            ls.kind, ls.reason = "opaque", f"softmax over axis={axis!r} of a {len(h.shape)}-D input"
    return ls, rec, a


# -------------------------------------------------------------------------------------------- check_loss
def loss_probe(loss: Any, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Evaluate a Keras loss on given arrays: value, shape, dJ/dŶ of its sum, and its spec.

    Keras losses are called as ``loss(y_true, y_pred)``; ŷ is float32 unless the loss object says otherwise.
    """
    _require_tf_backend()
    spec, display, fn, ldtype = classify_loss(loss, "mean", "float32")
    dt = str(ldtype or "float32")
    yp = tf.constant(np.asarray(y_pred), dtype=dt)
    yt_np = np.asarray(y_true)
    yt = tf.constant(yt_np, dtype="int64" if np.issubdtype(yt_np.dtype, np.integer) else dt)
    with tf.GradientTape() as tape:
        tape.watch(yp)
        out = fn(yt, yp)
    g = tape.gradient(out, yp)
    return {
        "value": _np(out),
        "grad": _np(g) if g is not None else np.zeros(yp.shape),
        "warnings": [],
        "spec": spec,
        "display": display,
    }


# ------------------------------------------------------------------------------- jacobian_vs_gradient etc.
def matmul_target(s: np.ndarray) -> Callable:
    """``Z ↦ Z·S`` with TensorFlow ops (an activation written as a matrix)."""
    st = tf.constant(np.asarray(s, dtype=np.float64))
    return lambda z: tf.matmul(z, st)


def jacobian_and_gradient(fn: Callable, source: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(target, tape.jacobian, tape.gradient)`` of ``fn`` at ``source`` (float64)."""
    _require_tf_backend()
    src = tf.constant(np.asarray(source, dtype=np.float64))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(src)
        try:
            out = fn(src)
        except GradsightError:
            raise
        except Exception as exc:
            raise InputError(
                f"target_fn {getattr(fn, '__name__', fn)!r} failed on a float64 tensor of shape {tuple(src.shape)!r}: "
                f"{_first_line(exc)}. Fix: pass a function of one TensorFlow tensor, and a source it accepts"
            ) from exc
    if not hasattr(out, "shape") or not out.dtype.is_floating:
        raise InputError(f"target_fn must return a floating-point tensor, got {type(out).__name__!r}")
    nbytes = int(np.prod(out.shape)) * int(np.prod(src.shape)) * 8
    if nbytes > R.JACOBIAN_LIMIT_BYTES:
        raise InputError(
            f"the full Jacobian of a target of shape {tuple(out.shape)!r} w.r.t. a source of shape "
            f"{tuple(src.shape)!r} would take {R.fmt_bytes(nbytes)} (limit {R.fmt_bytes(R.JACOBIAN_LIMIT_BYTES)}). "
            "Fix: pass a smaller source (a few rows show the same relation)"
        )
    g = tape.gradient(out, src, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    jac = tape.jacobian(out, src, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return _np(out), _np(jac), _np(g)


def example_loss() -> tuple[Any, str]:
    """``keras.losses.mean_squared_error`` (one value per sample) and its display text (an example)."""
    return keras.losses.mean_squared_error, "keras.losses.mean_squared_error (= tf.keras.losses.MSE)"


def build_dense_model(
    weights: list[np.ndarray],
    biases: list[np.ndarray | None] | None = None,
    activations: list[str | None] | None = None,
    dtype: str = "float64",
) -> keras.Model:
    """A built ``keras.Sequential`` of Dense layers from ``(in, out)`` kernels, with activations."""
    biases = biases or [None] * len(weights)
    activations = activations or [None] * len(weights)
    layers: list[Any] = [keras.Input((weights[0].shape[0],), dtype=dtype)]
    for w, b, act in zip(weights, biases, activations, strict=False):
        layers.append(keras.layers.Dense(w.shape[1], activation=act, use_bias=b is not None, dtype=dtype))
    model = keras.Sequential(layers)
    for layer, w, b in zip(model.layers, weights, biases, strict=False):
        layer.set_weights([np.asarray(w)] + ([np.asarray(b)] if b is not None else []))
    return model
