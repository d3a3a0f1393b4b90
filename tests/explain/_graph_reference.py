"""Autodiff references for graph traces, computed here with the frameworks' own APIs (independent of gradsight).

Keras: every operation's output of a functional model becomes an output of one probe model run under a tape.
Torch: forward hooks on every leaf module capture its output (and, on request, a module's input, which is the
output of a functional node such as a residual add); ``torch.autograd.grad`` then gives dJ/d(each of them),
dJ/dX and dJ/d(every parameter). Term names are written here from the module paths, the way issue #15 specifies
them (``A[path]``, ``dJ/dA[path]``, ``dJ/dW[owner]``, ``dJ/db[owner]``), not taken from gradsight.
"""

from __future__ import annotations

import numpy as np


def torch_param_term(name: str) -> str:
    """``"blocks.0.fc.weight"`` → ``"dJ/dW[blocks.0.fc]"`` (``in_proj_weight`` → ``dJ/dW[….in_proj]``)."""
    owner, last = name.rsplit(".", 1) if "." in name else ("", name)
    if last == "in_proj_weight":
        return f"dJ/dW[{owner}.in_proj]"
    if last == "in_proj_bias":
        return f"dJ/db[{owner}.in_proj]"
    if last in ("weight", "bias"):
        return f"dJ/d{'b' if last == 'bias' else 'W'}[{owner}]"
    return f"dJ/dW[{name}]"


def torch_reference(
    model, x, y, loss_fn, inputs_of: dict[str, str] | None = None, x_name: str = "x", output: str | None = None
) -> dict:
    """Term name → float64 autodiff value (see the module docstring).

    Args:
        model: the torch module (float64), run eagerly here.
        x, y: numpy input and target.
        loss_fn: ``loss_fn(y_hat, y_tensor) -> J``.
        inputs_of: ``{functional node name: module path}``: the node's value is that module's input (``path#2``:
            at its second call).
        x_name: the name of the input node.
        output: the name of the output node, when it is a functional op (its value is the model's output).
    """
    import torch
    from torch import nn

    for m in model.modules():  # in-place ReLU would overwrite the captured values
        if getattr(m, "inplace", False):
            m.inplace = False
    outs: dict[str, list] = {}
    values: dict[str, list] = {}
    ins: dict[str, list] = {}
    hooks = []
    for path, m in model.named_modules():
        if not path:
            continue
        leaf = next(m.children(), None) is None or isinstance(m, nn.MultiheadAttention)
        hooks.append(m.register_forward_pre_hook(lambda mod, a, p=path: ins.setdefault(p, []).append(a[0])))
        if leaf:
            hooks.append(
                m.register_forward_hook(
                    lambda mod, a, o, p=path: outs.setdefault(p, []).append(o[0] if isinstance(o, tuple) else o)
                )
            )
            hooks.append(  # the value as it left the module (an in-place op later may change the tensor)
                m.register_forward_hook(
                    lambda mod, a, o, p=path: values.setdefault(p, []).append(
                        (o[0] if isinstance(o, tuple) else o).detach().clone()
                    )
                )
            )
    int_x = np.issubdtype(np.asarray(x).dtype, np.integer)
    xt = torch.tensor(np.asarray(x)) if int_x else torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
    yt = torch.tensor(np.asarray(y))
    try:
        y_hat = model(xt)
    finally:
        for h in hooks:
            h.remove()
    if isinstance(y_hat, tuple):
        y_hat = y_hat[0]
    j = loss_fn(y_hat, yt)
    named: dict[str, object] = {}
    kept: dict[str, object] = {}
    for p, vals in outs.items():
        for k, v in enumerate(vals):
            if isinstance(v, torch.Tensor) and v.requires_grad:
                named[p if k == 0 else f"{p}#{k + 1}"] = v
                kept[p if k == 0 else f"{p}#{k + 1}"] = values[p][k]
    for node, path in (inputs_of or {}).items():
        base, _, k = path.partition("#")
        named[node] = ins[base][int(k or 1) - 1]
    if output is not None:
        named[output] = y_hat
    if not int_x:
        named[x_name] = xt
    params = dict(model.named_parameters())
    keys = list(named)
    grads = torch.autograd.grad(j, [named[k] for k in keys] + list(params.values()), allow_unused=True)
    ref: dict[str, np.ndarray] = {"J": np.float64(j.item())}
    for k, g in zip(keys, grads[: len(keys)], strict=True):
        if k != x_name:
            ref[f"A[{k}]"] = kept.get(k, named[k]).detach().numpy().copy()
        ref[f"dJ/dA[{k}]"] = (torch.zeros_like(named[k]) if g is None else g).numpy().copy()
    for (name, p), g in zip(params.items(), grads[len(keys) :], strict=True):
        ref[torch_param_term(name)] = (torch.zeros_like(p) if g is None else g).detach().numpy().copy()
    return ref


def assert_matches(
    trace, ref: dict, *, require: tuple[str, ...] = ("dJ/dW[", "dJ/db[", "dJ/dA["), skip=(), rtol: float = 1e-9
) -> int:
    """Every reference term the trace has agrees (normwise, float64: 1e-9·max + 1e-12); every trace term
    starting with one of ``require`` has a reference (unless it ends with one of ``skip``). Returns how many were
    compared.
    """
    compared = 0
    for name, want in ref.items():
        if name not in trace:
            continue
        got = trace[name].value
        assert got is not None, f"{name}: no closed form ({trace[name].note})"
        got, want = np.asarray(got), np.asarray(want)
        assert got.shape == want.shape, f"{name}: shape {got.shape} vs reference {want.shape}"
        err = float(np.max(np.abs(got - want))) if got.size else 0.0
        assert err <= 1e-12 + rtol * float(np.max(np.abs(want), initial=0.0)), f"{name}: max|err| {err:.3g}"
        compared += 1
    missing = [
        t.name for t in trace.terms if t.name.startswith(require) and t.name not in ref and not t.name.endswith(skip)
    ]
    assert not missing, f"terms without an independent reference: {missing}"
    return compared


def keras_param_term(path: str) -> str:
    """``"attn/query/kernel"`` → ``"dJ/dW[attn.query]"``; ``bias``/``beta`` → ``dJ/db[…]``."""
    owner, last = path.rsplit("/", 1)
    owner = owner.replace("/", ".")
    if last in ("bias", "beta"):
        return f"dJ/db[{owner}]"
    if last in ("kernel", "gamma", "embeddings", "scale"):
        return f"dJ/dW[{owner}]"
    return f"dJ/dW[{owner}.{last}]"


def keras_reference(model, x, y, loss_fn, training: bool = False) -> dict:
    """Term name → float64 autodiff value of a Keras functional model (see the module docstring).

    Every operation's output (layers and ``keras.ops`` calls) becomes an output of one multi-output model, run
    under a tape; its moving statistics are restored afterwards.
    """
    import keras
    import tensorflow as tf

    ops = [op for op in model.operations if not isinstance(op, keras.layers.InputLayer)]
    probe = keras.Model(model.inputs, [op.output for op in ops])
    state = [(v, v.numpy().copy()) for v in model.non_trainable_weights]
    int_x = np.issubdtype(np.asarray(x).dtype, np.integer)
    xt = tf.constant(np.asarray(x))
    yt = tf.constant(np.asarray(y))
    try:
        with tf.GradientTape() as tape:
            if not int_x:
                tape.watch(xt)
            outs = probe(xt, training=training)
            j = loss_fn(yt, outs[-1] if ops[-1].output is model.outputs[0] else model(xt, training=training))
        variables = list(model.trainable_weights)
        grads = tape.gradient(j, list(outs) + ([] if int_x else [xt]) + variables)
    finally:
        for v, val in state:
            v.assign(val)
    ref: dict[str, np.ndarray] = {"J": np.float64(j.numpy())}
    for op, o, g in zip(ops, outs, grads[: len(ops)], strict=True):
        ref[f"A[{op.name}]"] = np.asarray(o, dtype=np.float64)
        ref[f"dJ/dA[{op.name}]"] = np.zeros(o.shape) if g is None else np.asarray(g, dtype=np.float64)
    if not int_x:
        ref[f"dJ/dA[{model.inputs[0].name}]"] = np.asarray(grads[len(ops)], dtype=np.float64)
    for v, g in zip(variables, grads[len(ops) + (0 if int_x else 1) :], strict=True):
        g = None if g is None else tf.convert_to_tensor(g)  # an Embedding's gradient arrives as IndexedSlices
        ref[keras_param_term(v.path)] = np.zeros(v.shape) if g is None else np.asarray(g, dtype=np.float64)
    return ref
