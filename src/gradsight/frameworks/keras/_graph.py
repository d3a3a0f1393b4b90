"""Keras 3 (TensorFlow backend) graph adapter of the Explain pillar: a functional model → nodes + autodiff values.

The model's own graph (``model._nodes_by_depth``: every layer call and every ``keras.ops`` call in a functional
model, with the tensors each reads) is walked in topological order under one persistent ``tf.GradientTape``,
each call run on the recorded values of its inputs, exactly as ``Functional`` runs it. One layer call becomes one
node named after the layer (``ln1``, ``attn``); a ``Dense``/``Conv`` with an activation becomes two, the linear
part ``<name>.linear`` (recomputed with ``keras.ops`` and checked against the layer) and the activation
``<name>`` (so ``A[<name>]`` is always the layer's output). A ``keras.Sequential`` fed integer ids is walked the
same way, layer after layer. Layers and ops without a rule become autodiff-only nodes, with the tape's
vector-Jacobian products; they are never refused.

Modes: layers run with ``training=False`` (dropout is the identity, BatchNormalization uses its moving
statistics) unless ``training=True`` is asked for, which runs BatchNormalization on batch statistics (its
moving statistics are restored afterwards). Keras' logits shortcut is reproduced: when the output carries
``_keras_logits`` (a softmax/sigmoid output) and the loss is a probability cross-entropy, Keras computes J from
the logits, so the graph's output becomes the logits node.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..._errors import GradsightError, InputError, UnsupportedError
from ..._tolerance import tolerance_for
from ...explain._graph import GraphNode, GraphRun, param_term, prune, unique_name
from ...explain._spec import Conventions, LossSpec
from ...explain.rules import logits_variant, same_padding

__all__ = [
    "check_model_j",
    "is_functional_graph",
    "mask_sources",
    "plain_loss_grad",
    "refuse_masked_tensors",
    "refuse_masks",
    "run_graph",
]

try:
    from keras.src.models.functional import Functional as _FUNCTIONAL
except ImportError:  # pragma: no cover - other Keras layouts
    _FUNCTIONAL = None

L = keras.layers


def _np(t: Any) -> np.ndarray | None:
    return None if t is None else np.array(keras.ops.convert_to_numpy(t), dtype=np.float64)


def is_functional_graph(model: Any) -> bool:
    """A Keras functional model (not a Sequential, not subclassed) with one input and one output."""
    return _FUNCTIONAL is not None and isinstance(model, _FUNCTIONAL) and not isinstance(model, keras.Sequential)


# ------------------------------------------------------------------------------------------ activations
_ACT = {
    "relu": "relu",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "elu": "elu",
    "softplus": "softplus",
    "leaky_relu": "leaky_relu",
}


def _act_of(fn: Any) -> tuple[str, dict] | None:
    """``(op, attrs)`` of a Keras activation function: ``("act", {...})``, ``("softmax", {...})``, identity."""
    kw: dict = {}
    if isinstance(fn, functools.partial):
        kw, fn = dict(fn.keywords), fn.func
    name = getattr(fn, "__name__", "")
    if name == "linear":
        return "identity", {}
    if name == "softmax":
        return "softmax", {"axis": int(kw.get("axis", -1))}
    if name not in _ACT:
        return None
    rule = _ACT[name]
    params: dict[str, Any] = {}
    if rule == "gelu" and kw.get("approximate", False):
        rule = "gelu_tanh"
    elif rule == "leaky_relu":
        params = {"slope": float(kw.get("negative_slope", 0.2))}
    elif rule == "elu":
        params = {"alpha": float(kw.get("alpha", 1.0))}
    elif rule == "relu" and kw.get("negative_slope", 0.0):
        rule, params = "leaky_relu", {"slope": float(kw["negative_slope"])}
    elif rule == "relu" and (kw.get("max_value") is not None or kw.get("threshold", 0.0)):
        return None
    return "act", {"name": rule, "params": params}


# ------------------------------------------------------------------------------------------- the walker
class _Walker:
    """Runs the graph under the tape and writes the neutral nodes (see the module docstring)."""

    def __init__(self, model: Any, tape: tf.GradientTape, training: bool, dtype: str):
        self.model = model
        self.tape = tape
        self.training = training
        self.dtype = dtype
        self.nodes: list[GraphNode] = []
        self.tensors: dict[str, Any] = {}  # neutral name -> tf tensor (or variable)
        self.opaque_ins: dict[str, list[Any]] = {}
        self.by_id: dict[int, str] = {}  # id(tf tensor) -> neutral name
        self.var_names: dict[int, str] = {}  # id(variable) -> neutral name
        self.taken: set[str] = set()
        self.frozen: set[int] = set()

    # ------------------------------------------------------------------------------------------- plumbing
    def param(self, v: Any) -> str:
        if id(v) in self.var_names:
            return self.var_names[id(v)]
        key = str(getattr(v, "path", v.name))
        shown = key.removeprefix(f"{self.model.name}/")  # a Sequential's variables: "sequential/dense/kernel"
        term, _ = param_term(shown)
        if any(nd.term == term for nd in self.nodes):
            term = f"dJ/dW[{shown.replace('/', '.')}]"
        name = unique_name(shown.replace("/", "."), self.taken)
        self.nodes.append(
            GraphNode(
                name,
                "param",
                term=term,
                key=key,
                frozen=not v.trainable,
                type_name=f"keras.Variable {tuple(v.shape)}",
                layout=f"Keras {key.rsplit('/', 1)[-1]} {tuple(v.shape)}",
            )
        )
        self.tape.watch(getattr(v, "value", v))
        self.tensors[name] = v
        self.var_names[id(v)] = name
        return name

    def inp(self, t: Any) -> tuple[str, Any]:
        """The node a recorded tensor came from, or a constant."""
        if t is None:
            return "", None
        name = self.by_id.get(id(t))
        if name is not None:
            return name, None
        if isinstance(t, (int, float)):
            return "", np.float64(t)
        return "", np.asarray(keras.ops.convert_to_numpy(t))

    def add(self, name: str, op: str, ins: list[tuple[str, Any]], attrs: dict, type_name: str, out: Any, **kw) -> str:
        name = unique_name(name, self.taken)
        nd = GraphNode(
            name,
            op,
            inputs=[s for s, _ in ins],
            consts={k: c for k, (s, c) in enumerate(ins) if not s},
            attrs=attrs,
            type_name=type_name,
            **kw,
        )
        self.nodes.append(nd)
        self.tensors[name] = out
        self.by_id[id(out)] = name
        return name

    def opaque(self, name: str, out: Any, ins: list[Any], params: list[Any], type_name: str, reason: str) -> str:
        srcs = [(self.inp(t)[0], t) for t in ins]
        srcs = [(s, t) for s, t in srcs if s]
        srcs += [(self.param(v), v) for v in params]
        nm = self.add(name, "opaque", [(s, None) for s, _ in srcs], {}, type_name, out, reason=reason)
        self.opaque_ins[nm] = [t for _, t in srcs]
        return nm

    # --------------------------------------------------------------------------------------------- walk
    def steps(self) -> list[tuple[Any, Any, list[Any]]]:
        """``(operation, node, input KerasTensors)`` in topological order (a Sequential: its layers in order)."""
        if isinstance(self.model, keras.Sequential):
            return [(ly, None, []) for ly in self.model.layers if not isinstance(ly, L.InputLayer)]
        out = []
        for depth in sorted(self.model._nodes_by_depth, reverse=True):
            for node in self.model._nodes_by_depth[depth]:
                if node.operation is None or node.is_input:
                    continue
                out.append((node.operation, node, list(node.input_tensors)))
        return out

    def run(self, x_t: Any, input_name: str) -> str:
        """Walk every step; returns the output node's name."""
        self.add(input_name, "input", [], {}, "input", x_t, term=f"dJ/dA[{input_name}]")
        if isinstance(self.model, keras.Sequential):
            h = x_t
            for op, *_ in self.steps():
                h = self.call_layer(op, (h,), {}, [h])
            return self.by_id[id(h)]
        values = {id(self.model.inputs[0]): x_t}
        for op, node, kts in self.steps():
            if any(id(k) not in values for k in kts):
                continue
            args, kwargs = node.arguments.fill_in(values)
            ins = [values[id(k)] for k in kts]
            out = self.call_layer(op, args, kwargs, ins)
            for kt, o in zip(node.outputs, keras.tree.flatten(out), strict=False):
                values[id(kt)] = o
        y = values[id(self.model.outputs[0])]
        return self.by_id[id(y)]

    def call_layer(self, op: Any, args: tuple, kwargs: dict, ins: list[Any]) -> Any:
        """Run one operation on recorded values and write its node(s)."""
        handler = _h_op if _is_op(op) else None
        for cls, h in _HANDLERS:
            if handler is None and (type(op).__name__ == cls if isinstance(cls, str) else isinstance(op, cls)):
                handler = h
        if handler is not None:
            got = handler(self, op, args, kwargs, ins)
            if got is not None:
                return got
        out = self._plain(op, args, kwargs)
        params = list(op.weights) if hasattr(op, "weights") else []
        if isinstance(out, (tuple, list)):
            for k, o in enumerate(keras.tree.flatten(out)):
                self.opaque(f"{op.name}[{k}]", o, ins, params, type(op).__name__, f"no rule for {type(op).__name__}")
            return out
        self.opaque(op.name, out, ins, params, type(op).__name__, f"no rule for {type(op).__name__}")
        return out

    def _plain(self, op: Any, args: tuple, kwargs: dict) -> Any:
        if isinstance(op, L.Layer):
            kw = dict(kwargs)
            if _takes_training(op):
                kw["training"] = self.training and isinstance(op, L.BatchNormalization)
            return op(*args, **kw)
        return op(*args, **kwargs)


@functools.cache
def _call_params(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.call).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return frozenset()


def _takes_training(op: Any) -> bool:
    """Whether the layer's ``call`` takes ``training=``."""
    return "training" in _call_params(type(op))


# --------------------------------------------------------------------------------------------- handlers
def _h_dense(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    if getattr(ly, "lora_enabled", False) or ly.kernel.dtype != ly.compute_dtype:
        return None
    h = ins[0]
    act = _act_of(ly.activation)
    z = keras.ops.matmul(h, ly.kernel)
    if ly.bias is not None:
        z = z + ly.bias
    a = ly.activation(z)
    if act is None or not np.allclose(_np(a), _np(ly(h)), rtol=1e-6, atol=1e-8):
        return None
    params = [(w.param(ly.kernel), None)] + ([(w.param(ly.bias), None)] if ly.bias is not None else [])
    lin_name = ly.name if act[0] == "identity" else f"{ly.name}.linear"
    w.add(lin_name, "linear", [w.inp(h), *params], {"layout": "in_out"}, f"Dense({ly.units})", z, layout="(..., units)")
    if act[0] == "identity":
        return z
    w.add(ly.name, act[0], [w.inp(z)], act[1], f"Dense activation {getattr(ly.activation, '__name__', '?')}", a)
    return a


def _conv_attrs(ly: Any, x_shape: tuple) -> dict | None:
    nd = len(ly.kernel_size)
    if nd not in (1, 2):
        return None
    cl = ly.data_format == "channels_last"
    sizes = x_shape[1:-1] if cl else x_shape[2:]
    k, s, d = tuple(ly.kernel_size), tuple(ly.strides), tuple(ly.dilation_rate)
    if ly.padding == "valid":
        pads = ((0, 0),) * nd
    elif ly.padding == "same":
        pads = tuple(
            same_padding(int(sz), dd * (kk - 1) + 1, ss) for sz, kk, ss, dd in zip(sizes, k, s, d, strict=True)
        )
    elif ly.padding == "causal" and nd == 1:
        pads = ((d[0] * (k[0] - 1), 0),)
    else:
        return None
    return {
        "nd": nd,
        "stride": s,
        "pads": pads,
        "dilation": d,
        "groups": int(getattr(ly, "groups", 1)),
        "channels_last": cl,
        "weight_layout": "io",
    }


def _h_conv(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    if getattr(ly, "lora_enabled", False) or type(ly).__name__ not in ("Conv1D", "Conv2D"):
        return None
    h = ins[0]
    attrs = _conv_attrs(ly, tuple(h.shape))
    act = _act_of(ly.activation)
    if attrs is None or act is None:
        return None
    z = ly.convolution_op(h, ly.kernel)
    if ly.bias is not None:
        shape = [1] * len(z.shape)
        shape[-1 if attrs["channels_last"] else 1] = ly.filters
        z = z + keras.ops.reshape(ly.bias, shape)
    a = ly.activation(z)
    if not np.allclose(_np(a), _np(ly(h)), rtol=1e-6, atol=1e-8):
        return None
    params = [(w.param(ly.kernel), None)] + ([(w.param(ly.bias), None)] if ly.bias is not None else [])
    lin_name = ly.name if act[0] == "identity" else f"{ly.name}.linear"
    w.add(lin_name, "conv", [w.inp(h), *params], attrs, f"{type(ly).__name__}({ly.filters})", z)
    if act[0] == "identity":
        return z
    w.add(ly.name, act[0], [w.inp(z)], act[1], f"{type(ly).__name__} activation", a)
    return a


def _axes(ly_axis: Any, ndim: int) -> list[int]:
    ax = [ly_axis] if isinstance(ly_axis, int) else list(ly_axis)
    return sorted(int(a) % ndim for a in ax)


def _h_bn(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    h = ins[0]
    axes = _axes(ly.axis, len(h.shape))
    if len(axes) != 1 or getattr(ly, "renorm", False) or getattr(ly, "synchronized", False):
        return None
    training = bool(w.training)
    out = ly(h, training=training)
    gamma = (w.param(ly.gamma), None) if ly.scale else ("", np.float64(1.0))
    beta = (w.param(ly.beta), None) if ly.center else ("", np.float64(0.0))
    ins_ = [w.inp(h), gamma, beta, ("", _np(ly.moving_mean)), ("", _np(ly.moving_variance))]
    attrs = {
        "axis": axes[0],
        "eps": float(ly.epsilon),
        "training": training,
        "const_names": {3: "moving_mean", 4: "moving_variance"},
    }
    mode = "training: batch statistics" if training else "inference: moving statistics"
    w.add(ly.name, "batch_norm", ins_, attrs, f"BatchNormalization({mode})", out)
    return out


def _h_ln(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    h = ins[0]
    nd = len(h.shape)
    axes = _axes(ly.axis, nd)
    if getattr(ly, "rms_scaling", False) or axes != list(range(nd - len(axes), nd)):
        return None
    out = ly(h)
    ins_ = [w.inp(h), (w.param(ly.gamma), None) if ly.scale else ("", np.float64(1.0))]
    if ly.center:
        ins_.append((w.param(ly.beta), None))
    w.add(ly.name, "layer_norm", ins_, {"n_axes": len(axes), "eps": float(ly.epsilon)}, "LayerNormalization", out)
    return out


def _h_rms(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    h = ins[0]
    nd = len(h.shape)
    axes = _axes(ly.axis, nd)
    if axes != list(range(nd - len(axes), nd)):
        return None
    out = ly(h)
    ins_ = [w.inp(h), (w.param(ly.scale), None)]
    w.add(ly.name, "rms_norm", ins_, {"n_axes": len(axes), "eps": float(ly.epsilon)}, "RMSNormalization", out)
    return out


def _h_embedding(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    if getattr(ly, "lora_enabled", False):
        return None
    h = ins[0]
    out = ly(h)
    w.add(ly.name, "embedding", [w.inp(h), (w.param(ly.embeddings), None)], {"padding_idx": None}, "Embedding", out)
    return out


def _h_identity(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    out = ly(ins[0], training=False) if _takes_training(ly) else ly(ins[0])
    w.add(ly.name, "identity", [w.inp(ins[0])], {"what": f"{type(ly).__name__} at inference"}, type(ly).__name__, out)
    return out


def _h_activation(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    h = ins[0]
    if isinstance(ly, L.Activation):
        act = _act_of(ly.activation)
    elif isinstance(ly, L.ReLU):
        act = (
            ("act", {"name": "relu", "params": {}})
            if ly.max_value is None and float(ly.threshold) == 0.0 and float(ly.negative_slope) == 0.0
            else None
        )
    elif isinstance(ly, L.LeakyReLU):
        act = ("act", {"name": "leaky_relu", "params": {"slope": float(ly.negative_slope)}})
    elif isinstance(ly, L.ELU):
        act = ("act", {"name": "elu", "params": {"alpha": float(ly.alpha)}})
    elif isinstance(ly, L.Softmax):
        axes = _axes(ly.axis, len(h.shape))
        act = ("softmax", {"axis": axes[0]}) if len(axes) == 1 else None
    else:
        act = None
    if act is None:
        return None
    out = ly(h)
    w.add(ly.name, act[0], [w.inp(h)], act[1], type(ly).__name__, out)
    return out


def _h_merge(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    op = {"Add": "add", "Subtract": "sub", "Multiply": "mul"}[type(ly).__name__]
    out = ly(list(ins))
    if len(ins) == 2:
        w.add(ly.name, op, [w.inp(ins[0]), w.inp(ins[1])], {}, type(ly).__name__, out)
        return out
    if op == "sub":
        return None
    acc = ins[0]
    fn = keras.ops.add if op == "add" else keras.ops.multiply
    for k, t in enumerate(ins[1:], start=1):
        nxt = fn(acc, t) if k < len(ins) - 1 else out
        w.add(
            ly.name if k == len(ins) - 1 else f"{ly.name}.{k}", op, [w.inp(acc), w.inp(t)], {}, type(ly).__name__, nxt
        )
        acc = nxt
    return out


def _h_concat(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    out = ly(list(ins))
    w.add(ly.name, "concat", [w.inp(t) for t in ins], {"axis": int(ly.axis) % len(out.shape)}, "Concatenate", out)
    return out


def _h_reshape(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    if isinstance(ly, L.Flatten) and ly.data_format != "channels_last":
        return None
    out = ly(ins[0])
    w.add(ly.name, "reshape", [w.inp(ins[0])], {"shape": tuple(out.shape)}, type(ly).__name__, out)
    return out


def _h_permute(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    out = ly(ins[0])
    perm = (0, *(int(d) for d in ly.dims))
    w.add(ly.name, "permute", [w.inp(ins[0])], {"perm": perm}, "Permute", out)
    return out


def _h_global_pool(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    h = ins[0]
    out = ly(h)
    nd = len(h.shape) - 2
    cl = ly.data_format == "channels_last"
    axes = tuple(range(1, 1 + nd)) if cl else tuple(range(2, 2 + nd))
    op = "mean" if "Average" in type(ly).__name__ else "max"
    attrs = {"axes": axes, "keepdims": bool(ly.keepdims)}
    if op == "max":
        attrs["ties"] = "split"
    w.add(ly.name, op, [w.inp(h)], attrs, type(ly).__name__, out)
    return out


def _h_pool(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    h = ins[0]
    nd = len(h.shape) - 2
    if nd not in (1, 2):
        return None
    cl = ly.data_format == "channels_last"
    sizes = tuple(h.shape[1:-1] if cl else h.shape[2:])
    k, s = tuple(ly.pool_size), tuple(ly.strides)
    if ly.padding == "valid":
        pads = ((0, 0),) * nd
    else:
        pads = tuple(same_padding(int(sz), kk, ss) for sz, kk, ss in zip(sizes, k, s, strict=True))
    out = ly(h)
    kind = "max" if "Max" in type(ly).__name__ else "avg"
    attrs = {"nd": nd, "kind": kind, "kernel": k, "stride": s, "pads": pads, "channels_last": cl}
    if kind == "avg":
        attrs["count_include_pad"] = False  # TensorFlow's 'same' average pooling counts only real entries
    w.add(ly.name, "pool", [w.inp(h)], attrs, type(ly).__name__, out)
    return out


def _h_mha(w: _Walker, ly: Any, args, kwargs, ins) -> Any:
    query = args[0] if args else kwargs.get("query")
    value = args[1] if len(args) > 1 else kwargs.get("value")
    key = args[2] if len(args) > 2 else kwargs.get("key")
    key = value if key is None else key
    bad = [k for k in ("query_mask", "value_mask", "key_mask", "attention_mask") if kwargs.get(k) is not None]
    if bad or kwargs.get("return_attention_scores") or len(query.shape) != 3 or ly._attention_axes not in (None, (1,)):
        return None
    causal = bool(kwargs.get("use_causal_mask", False))
    out = ly(query, value, key, use_causal_mask=causal, training=False)
    dense = [ly._query_dense, ly._key_dense, ly._value_dense, ly._output_dense]
    params: list[tuple[str, Any]] = []
    for d in dense:
        params.append((w.param(d.kernel), None))
        params.append((w.param(d.bias), None) if d.bias is not None else ("", None))
    attrs = {"heads": int(ly._num_heads), "batch_first": True, "layout": "keras", "is_causal": causal}
    w.add(ly.name, "mha", [w.inp(query), w.inp(key), w.inp(value), *params], attrs, "MultiHeadAttention", out)
    return out


# --------------------------------------------------------------------------------------- keras.ops calls
_OPS_BINARY = {"Add": "add", "Subtract": "sub", "Multiply": "mul", "Divide": "div", "TrueDivide": "div"}
_OPS_UNARY = {
    "Negative": "neg",
    "Exp": "exp",
    "Log": "log",
    "Sqrt": "sqrt",
    "Square": "square",
    "Abs": "abs",
    "Absolute": "abs",
}
_OPS_ACT = {"Relu": "relu", "Silu": "silu", "Sigmoid": "sigmoid", "Tanh": "tanh"}


def _h_op(w: _Walker, op: Any, args, kwargs, ins) -> Any:
    cls = type(op).__name__
    out = op(*args, **kwargs)
    if not hasattr(out, "shape"):
        return None
    name = op.name
    if cls in _OPS_BINARY and len(args) == 2:
        w.add(name, _OPS_BINARY[cls], [w.inp(args[0]), w.inp(args[1])], {}, f"keras.ops.{cls}", out)
    elif cls == "Matmul" and len(args[0].shape) >= 2 and len(args[1].shape) >= 2:
        w.add(name, "matmul", [w.inp(args[0]), w.inp(args[1])], {}, "keras.ops.matmul", out)
    elif cls in _OPS_UNARY:
        w.add(name, _OPS_UNARY[cls], [w.inp(args[0])], {}, f"keras.ops.{cls}", out)
    elif cls in _OPS_ACT or cls == "Gelu":
        act = _OPS_ACT.get(cls) or ("gelu_tanh" if getattr(op, "approximate", True) else "gelu")
        w.add(name, "act", [w.inp(args[0])], {"name": act, "params": {}}, f"keras.ops.{cls}", out)
    elif cls in ("Softmax", "LogSoftmax"):
        axis = op.axis if isinstance(op.axis, int) else None
        if axis is None:
            return _undo(w, op, out, ins)
        kind = "softmax" if cls == "Softmax" else "log_softmax"
        w.add(name, kind, [w.inp(args[0])], {"axis": axis % len(out.shape)}, f"keras.ops.{cls}", out)
    elif cls in ("Mean", "Sum", "Max"):
        axis = op.axis
        axes = None if axis is None else tuple(int(a) % len(args[0].shape) for a in np.atleast_1d(axis))
        attrs = {"axes": axes, "keepdims": bool(op.keepdims)}
        if cls == "Max":
            attrs["ties"] = "split"
        w.add(name, cls.lower(), [w.inp(args[0])], attrs, f"keras.ops.{cls}", out)
    elif cls in ("Reshape", "ExpandDims", "Squeeze"):
        w.add(name, "reshape", [w.inp(args[0])], {"shape": tuple(out.shape)}, f"keras.ops.{cls}", out)
    elif cls in ("Transpose", "Swapaxes"):
        nd = len(args[0].shape)
        if cls == "Transpose":
            perm = tuple(range(nd))[::-1] if op.axes is None else tuple(int(a) % nd for a in op.axes)
        else:
            p = list(range(nd))
            a, b = int(op.axis1) % nd, int(op.axis2) % nd
            p[a], p[b] = p[b], p[a]
            perm = tuple(p)
        w.add(name, "permute", [w.inp(args[0])], {"perm": perm}, f"keras.ops.{cls}", out)
    elif cls == "Concatenate":
        tensors = list(args[0])
        w.add(name, "concat", [w.inp(t) for t in tensors], {"axis": int(op.axis) % len(out.shape)}, "keras.ops", out)
    else:
        return _undo(w, op, out, ins)
    return out


def _undo(w: _Walker, op: Any, out: Any, ins: list[Any]) -> Any:
    w.opaque(op.name, out, ins, [], f"keras.ops.{type(op).__name__}", f"no rule for keras.ops.{type(op).__name__}")
    return out


_HANDLERS: list[tuple[Any, Callable]] = [
    (L.Dense, _h_dense),
    ("Conv1D", _h_conv),
    ("Conv2D", _h_conv),
    (L.BatchNormalization, _h_bn),
    (L.LayerNormalization, _h_ln),
    (L.Embedding, _h_embedding),
    (L.Dropout, _h_identity),
    (L.Activation, _h_activation),
    (L.ReLU, _h_activation),
    (L.LeakyReLU, _h_activation),
    (L.ELU, _h_activation),
    (L.Softmax, _h_activation),
    (L.Add, _h_merge),
    (L.Subtract, _h_merge),
    (L.Multiply, _h_merge),
    (L.Concatenate, _h_concat),
    (L.Reshape, _h_reshape),
    (L.Flatten, _h_reshape),
    (L.Permute, _h_permute),
    (L.GlobalAveragePooling1D, _h_global_pool),
    (L.GlobalAveragePooling2D, _h_global_pool),
    (L.GlobalMaxPooling1D, _h_global_pool),
    (L.GlobalMaxPooling2D, _h_global_pool),
    (L.MaxPooling1D, _h_pool),
    (L.MaxPooling2D, _h_pool),
    (L.AveragePooling1D, _h_pool),
    (L.AveragePooling2D, _h_pool),
    (L.MultiHeadAttention, _h_mha),
]
if hasattr(L, "RMSNormalization"):
    _HANDLERS.append((L.RMSNormalization, _h_rms))
for _cls in ("SpatialDropout1D", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout"):
    if hasattr(L, _cls):
        _HANDLERS.append((getattr(L, _cls), _h_identity))


def _is_op(op: Any) -> bool:
    return not isinstance(op, L.Layer) and hasattr(op, "compute_output_spec")


# ------------------------------------------------------------------------------------- shared checks
def plain_loss_grad(loss_fn: Callable, y_t: Any, y_hat: Any) -> tuple[Any, float]:
    """dJ/dŶ and J of the loss evaluated on a copy of ŷ that carries no ``_keras_logits``.

    A Keras probability cross-entropy reads the logits its softmax/sigmoid attached to ŷ; a loss that does so for
    only part of its computation (``BinaryFocalCrossentropy``, a custom sum of terms) leaves ``dJ/dŶ`` partial,
    the rest flowing through the logits. On a fresh tensor every term is a function of ŷ itself.

    Args:
        loss_fn: ``loss_fn(y_true, y_pred) -> J``.
        y_t: the targets.
        y_hat: the model's output.

    Returns:
        ``(dJ/dŶ, J)`` of the loss as a function of ŷ.
    """
    plain = tf.identity(y_hat)  # a new tensor: Python attributes such as _keras_logits are not copied
    with tf.GradientTape() as tape:
        tape.watch(plain)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            j = loss_fn(y_t, plain)
    g = tape.gradient(j, plain)
    return (g if g is not None else tf.zeros_like(plain)), float(np.asarray(j, dtype=np.float64))


def logits_note(display: str, dj_tape: Any, dj_plain: Any, j_model: float, j_plain: float, dtype: str) -> str | None:
    """The note for a loss that read ŷ's ``_keras_logits`` for part of its computation (None if it did not)."""
    if dj_tape is not None and np.allclose(_np(dj_tape), _np(dj_plain), rtol=1e-12, atol=0.0):
        return None
    note = (
        f"the loss {display} read the logits Keras attached to Ŷ (_keras_logits, set by its softmax/sigmoid) for "
        "part of its computation, so the tape's dJ/dŶ missed the part that flows through the logits; dJ/dŶ is "
        "the gradient of the loss evaluated on a plain copy of Ŷ, and J is the model's (Keras trains with the "
        "logits path)"
    )
    tol = 1e-9 if "float64" in dtype else 1e-4
    if abs(j_model - j_plain) > tol * max(abs(j_model), 1e-12):
        note += (
            f". The two differ: J = {j_model:.10g} through the logits, {j_plain:.10g} on Ŷ itself (the probability "
            "form clips Ŷ to [ε, 1 − ε]), so terms from dJ/dŶ on compare the probability form's closed form with "
            "Keras' logits-path gradients and can show ✗ for that reason alone"
        )
    return note


def mask_sources(model: Any) -> list[str]:
    """The layers of ``model`` that produce a Keras mask.

    ``Masking``, ``Embedding(mask_zero=True)``, and any layer of a functional graph (a Sequential's included)
    whose output carries a mask its inputs did not (its ``compute_mask`` returned one when the graph was built).
    """
    found: list[str] = []

    def add(ly: Any) -> None:
        what = f"{ly.name} ({type(ly).__name__}{'(mask_zero=True)' if getattr(ly, 'mask_zero', False) else ''})"
        if what not in found:
            found.append(what)

    if not isinstance(model, L.Layer):
        return found
    for ly in model._flatten_layers(include_self=False):
        if isinstance(ly, L.Masking) or getattr(ly, "mask_zero", False):
            add(ly)
    for graph in [model, *model._flatten_layers(include_self=False)]:
        graph = graph if is_functional_graph(graph) else getattr(graph, "_functional", None)
        for nodes in getattr(graph, "_nodes_by_depth", {}).values():
            for node in nodes:
                masked = [getattr(t, "_keras_mask", None) is not None for t in (*node.input_tensors, *node.outputs)]
                n_in = len(node.input_tensors)
                if isinstance(node.operation, L.Layer) and any(masked[n_in:]) and not any(masked[:n_in]):
                    add(node.operation)
    return found


def refuse_masks(model: Any) -> None:
    """Refuse a model in which a Keras mask flows: the closed forms have no rule for masks.

    Raises:
        UnsupportedError: naming the layers that produce the mask.
    """
    found = mask_sources(model)
    if found:
        raise UnsupportedError(
            f"{', '.join(found)} produce(s) a Keras mask (an Embedding(mask_zero=True) computes a padding mask from "
            "the ids, a Masking layer marks the steps equal to its mask_value), which later layers (pooling, "
            "attention, RNNs) and the loss use to skip the masked steps; explain has no rule for masks, so its "
            "terms would not be the model's. Fix: explain the model with mask_zero=False (or without the Masking "
            "layer) on a batch without padding, or explain the layers after the mask, with their input as x."
        )


def refuse_masked_tensors(tensors: dict[str, Any]) -> None:
    """Refuse a run in which a recorded tensor carries a Keras mask (one the static check could not see).

    Raises:
        UnsupportedError: naming the first tensors that carry a mask.
    """
    masked = [name for name, t in tensors.items() if getattr(t, "_keras_mask", None) is not None]
    if masked:
        raise UnsupportedError(
            f"the output(s) of {', '.join(masked[:3])} carry a Keras mask, which later layers (pooling, attention, "
            "RNNs) and the loss use to skip the masked steps; explain has no rule for masks, so its terms would not "
            "be the model's. Fix: explain the model without the layer that computes the mask (compute_mask), or "
            "explain the layers after the mask, with their input as x."
        )


_RANDOM_LAYERS = ("Dropout", "Noise")


def check_model_j(model: Any, x_t: Any, y_t: Any, loss_fn: Callable, j: Any, training: bool, tracer: str) -> None:
    """Run the model itself, in the mode of the recorded run, and refuse a walk whose J is not the model's.

    The walk calls each layer on its own; anything the model does between its layers that the walk does not see
    (a mask passed along, state) would leave a reference column that is not the model. Skipped when the run
    trains and the model holds random layers (their draws differ between calls).

    Raises:
        UnsupportedError: the walk's J differs from the model's beyond float rounding.
    """
    layers = model._flatten_layers(include_self=False) if isinstance(model, L.Layer) else []
    if training and any(any(k in type(ly).__name__ for k in _RANDOM_LAYERS) for ly in layers):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            j_m = loss_fn(y_t, model(x_t, training=bool(training)))
        j_r, j_g = float(np.asarray(j_m, dtype=np.float64)), float(np.asarray(j, dtype=np.float64))
    except Exception:  # the walk ran: a model that fails when called whole is not what this check is about
        return
    tol = 1e-7 if "float64" in str(getattr(j_m, "dtype", "")) else 1e-3
    if abs(j_g - j_r) > tol * max(abs(j_r), 1e-12):
        raise UnsupportedError(
            f"explain walked {type(model).__name__} {model.name!r} as a {tracer}, but the walk does not reproduce "
            f"the model: J = {j_r:.10g} from the model, {j_g:.10g} from the layer-by-layer walk. Something the "
            "model passes between its layers is invisible to the walk (a Keras mask, a layer's call arguments, "
            "state kept between calls). Fix: explain the layers after that point, with their input as x, or "
            "rebuild the model without it."
        )


# ------------------------------------------------------------------------------------------------- run
def _check_ids(nodes: list[GraphNode], x: np.ndarray) -> None:
    """Integer x may only feed an Embedding; floating x must not."""
    name = nodes[0].name
    readers = [nd for nd in nodes if name in nd.inputs]
    for nd in readers:
        is_emb = nd.op == "embedding"
        if np.issubdtype(x.dtype, np.integer) and not is_emb and any(r.op == "embedding" for r in readers):
            if "equal" in nd.type_name.lower():  # keras.ops.NotEqual: the padding mask of Embedding(mask_zero=True)
                raise UnsupportedError(
                    f"the ids feed an Embedding and also {nd.name} ({nd.type_name}): an Embedding(mask_zero=True) "
                    "computes a padding mask from the ids, which changes what later layers average or attend to, "
                    "and the graph explainer has no rule for masks. Fix: explain the model with mask_zero=False on "
                    "a batch without padding, or on the layers after the embedding."
                )
            raise UnsupportedError(
                f"the ids feed an Embedding and also {nd.name} ({nd.type_name}), which computes on the ids "
                "themselves; the graph explainer follows integer inputs through embeddings only. Fix: explain the "
                "layers after the embedding, with its output as x."
            )
        if np.issubdtype(x.dtype, np.integer) and not is_emb:
            raise InputError(
                f"x has dtype {x.dtype} but the first op reading it, {nd.name} ({nd.type_name}), needs "
                "floating-point inputs; integer inputs are token/category ids, which need an embedding first. Fix: "
                "x.astype('float32') if these are features, or put a keras.layers.Embedding before it if they are ids"
            )


# long function: one persistent tape spans the walk, the loss and every gradient read from it (and the
# opaque nodes' vector-Jacobian products); the restore of BatchNormalization's moving statistics sits in finally.
def run_graph(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    spec: LossSpec | None,
    display: str,
    loss_fn: Callable,
    conventions: Conventions,
    dtype: str,
    training: bool | None = None,
) -> GraphRun:
    """Walk a Keras functional model (or a Sequential fed ids) node by node under one tape.

    Args:
        model: a built Keras functional model with one input and one output, or a Sequential.
        x: the input batch (floating point, or integer ids for a model starting with an Embedding).
        y: the targets.
        spec: the neutral loss (None for an arbitrary callable).
        display: how the loss is shown.
        loss_fn: ``loss_fn(y_true, y_pred) -> J``.
        conventions: Keras' conventions.
        dtype: the model's compute dtype.
        training: True: BatchNormalization on batch statistics; otherwise inference mode.

    Returns:
        The :class:`~gradsight.explain._graph.GraphRun`.
    """
    if not isinstance(model, keras.Sequential) and (len(model.inputs) != 1 or len(model.outputs) != 1):
        raise UnsupportedError(
            f"explain takes one input batch x, but {model.name!r} has {len(model.inputs)} inputs and "
            f"{len(model.outputs)} outputs. Fix: explain a single-input, single-output sub-model, e.g. "
            "keras.Model(model.inputs[0], model.outputs[0]) when the other inputs are constants."
        )
    int_x = np.issubdtype(np.asarray(x).dtype, np.integer)
    x_t = tf.constant(np.asarray(x), dtype="int64" if int_x else dtype)
    sparse = np.issubdtype(np.asarray(y).dtype, np.integer)
    y_t = tf.constant(np.asarray(y), dtype="int64" if sparse else dtype)
    bn_state = [(v, v.numpy().copy()) for ly in model._flatten_layers() for v in ly.non_trainable_weights]
    notes: list[str] = []
    input_name = "x" if isinstance(model, keras.Sequential) else (model.inputs[0].name or "x")
    if input_name.startswith(("keras_tensor", "input_layer")):
        input_name = "x"  # an automatic name says nothing; X is what the derivation calls it
    try:
        with tf.GradientTape(persistent=True) as tape:
            if not int_x:
                tape.watch(x_t)
            walker = _Walker(model, tape, bool(training), dtype)
            try:
                output = walker.run(x_t, input_name)
            except GradsightError:
                raise
            except Exception as exc:
                raise InputError(
                    f"{model.name!r} failed on x of shape {tuple(x_t.shape)!r} ({x_t.dtype.name}): "
                    f"{str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__}. Fix: "
                    "pass x with the shape and dtype the model was built for."
                ) from exc
            _check_ids(walker.nodes, np.asarray(x))
            refuse_masked_tensors(walker.tensors)
            y_hat = walker.tensors[output]
            logits = getattr(y_hat, "_keras_logits", None)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                j = loss_fn(y_t, y_hat)
        if not hasattr(j, "shape") or len(j.shape) != 0:
            raise InputError(
                f"the loss {display} returned {tuple(getattr(j, 'shape', ()))!r}, not a scalar; use the loss object, "
                "e.g. keras.losses.MeanSquaredError()"
            )
        dj = tape.gradient(j, y_hat)
        g_out = None
        if dj is None and logits is not None and id(logits) in walker.by_id and spec is not None:
            output = walker.by_id[id(logits)]
            spec = logits_variant(spec)
            notes.append(
                f"Keras computed the {display} from the logits A[{output}] (the output carried _keras_logits, set by "
                "its softmax/sigmoid), so Ŷ is the logits node here and the closed form is the logits rule"
            )
            dj = tape.gradient(j, walker.tensors[output])
        elif logits is not None:  # the loss may read the logits for part of J only: dJ/dŶ of the loss on ŷ itself
            dj_plain, j_plain = plain_loss_grad(loss_fn, y_t, y_hat)
            note = logits_note(display, dj, dj_plain, float(np.asarray(j, dtype=np.float64)), j_plain, dtype)
            notes += [note] if note else []
            dj = dj_plain
            g_out = dj_plain  # the output node's own autodiff value is dJ/dŶ, not the tape's partial one
        check_model_j(model, x_t, y_t, loss_fn, j, bool(training), walker_tracer(model))
        nodes, dropped = prune(walker.nodes, output)
        if dropped:
            notes.append(f"node(s) {dropped} do not reach the output (no gradient flows through them): left out")
        ops = [nd for nd in nodes if nd.op != "param"]
        variables = [nd for nd in nodes if nd.op == "param"]
        wrt = [walker.tensors[nd.name] for nd in ops] + [walker.tensors[nd.name] for nd in variables]
        grads = tape.gradient(j, wrt, unconnected_gradients=tf.UnconnectedGradients.NONE)
        g_of = {nd.name: g for nd, g in zip(ops + variables, grads, strict=True)}
        if g_out is not None:
            g_of[output] = g_out
        param_grads: dict[str, np.ndarray] = {}
        for nd in nodes:
            t = walker.tensors[nd.name]
            int_node = nd.op == "input" and int_x
            nd.out = np.asarray(keras.ops.convert_to_numpy(t)) if int_node else _np(t)
            g = g_of.get(nd.name)
            if nd.op == "param":
                param_grads[nd.key] = _np(g) if g is not None else np.zeros(tuple(t.shape))
                continue
            if not int_node:
                nd.grad = _np(g) if g is not None else np.zeros(tuple(t.shape))
            if nd.op == "opaque":
                nd.input_grads = _vjps(tape, t, g, walker.opaque_ins[nd.name])
        del tape
    finally:
        for v, val in bn_state:
            v.assign(val)
    notes += [f"Keras warned: {c.message}" for c in caught]
    if training:
        notes += _training_notes(model)
    floor = 0.0
    if "float64" in dtype and any(nd.op == "act" and nd.attrs.get("name") in ("gelu", "gelu_tanh") for nd in nodes):
        floor = 1e-7
        notes.append(
            "TensorFlow's float64 gelu deviates from the exact formula by up to ~5e-9 (relative), so terms are "
            "compared with rtol 1e-7 instead of float64's 1e-9"
        )
    mha, afloor = [nd.name for nd in nodes if nd.type_name == "MultiHeadAttention"], 0.0
    if "float64" in dtype and mha:
        floor, afloor = max(floor, tolerance_for("float32").rtol), tolerance_for("float32").atol
        notes.append(
            f"Keras' MultiHeadAttention ({', '.join(mha)}) computes part of its attention in float32 in a float64 "
            "model (ops.dot_product_attention converts its scale 1/√d through a float32 tensor), so its output "
            f"carries float32 rounding: terms are compared with float32's tolerance (rtol {floor:g}, atol {afloor:g})"
        )
    return GraphRun(
        framework="keras",
        model_name=f"{type(model).__name__} {model.name!r}",
        tracer=walker_tracer(model),
        nodes=nodes,
        output=output,
        x=np.asarray(x) if int_x else _np(x_t),
        y=np.asarray(y),
        dtype=dtype,
        loss=spec,
        loss_display=display,
        j=float(np.asarray(j, dtype=np.float64)),
        dj_dyhat=_np(dj) if dj is not None else np.zeros(tuple(walker.tensors[output].shape)),
        param_grads=param_grads,
        notes=notes,
        rtol_floor=floor,
        atol_floor=afloor,
        conventions=conventions,
    )


def _training_notes(model: Any) -> list[str]:
    """What ``training=True`` did: BatchNormalization on batch statistics; random layers stay the identity."""
    layers = list(model._flatten_layers(include_self=False))
    out = []
    if any(isinstance(ly, L.BatchNormalization) for ly in layers):
        out.append("BatchNormalization ran in training mode (batch statistics); its moving statistics were restored")
    rand = [ly.name for ly in layers if any(k in type(ly).__name__ for k in _RANDOM_LAYERS)]
    if rand:
        out.append(
            f"{', '.join(rand)} ran at inference (the identity) although training=True: their random draws are "
            "not derived, so the terms are those of the model without them"
        )
    return out


def walker_tracer(model: Any) -> str:
    """How the graph of ``model`` was read."""
    return "Keras functional graph" if not isinstance(model, keras.Sequential) else "Keras Sequential layers"


def _vjps(tape: tf.GradientTape, out: Any, g: Any, ins: list[Any]) -> list[np.ndarray | None]:
    if g is None:
        return [np.zeros(tuple(t.shape)) for t in ins]
    got = tape.gradient(out, ins, output_gradients=g, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [_np(r) for r in got]
