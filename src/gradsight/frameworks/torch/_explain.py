"""PyTorch adapter of the Explain pillar: model → neutral layer specs, plus torch's autodiff value of every term.

The model is run module by module on a copy of ``x`` (nested ``nn.Sequential`` flattened, a module listed
several times run at each place, exactly as ``Sequential.forward`` does), holding every intermediate, then
``torch.autograd.grad(loss, [intermediates..., params...])`` gives every gradient at once: no ``.backward()``,
no ``.grad`` is touched, no hooks. What is changed for the run is restored in ``finally``, exactly:

* every module is switched to ``eval()`` (dropout at inference), and its ``training`` flag restored;
* frozen parameters (``requires_grad=False``) get ``requires_grad=True`` so autodiff can check their gradient,
  and the flag is restored;
* grad mode is enabled locally (``torch.inference_mode(False)``, ``torch.enable_grad()``), so explain works
  under ``torch.no_grad()`` and ``torch.inference_mode()``.

A parameter used by several layers (a shared module) gets one per-use gradient per layer, computed by torch as
``autograd.grad(Z_l, W, dJ/dZ_l)`` through that call alone, plus the parameter's total gradient. float16 and
bfloat16 models are explained on a float64 copy (their weights are exact in float64; x is rounded to the
model's dtype first), so every ✓ checks the derivation to float64 precision.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..._errors import GradsightError, InputError, UnsupportedError
from ...explain import rules as R
from ...explain._graph import GraphRun
from ...explain._spec import Conventions, FrameworkRun, LayerSpec, LossConvention, LossSpec, SharedParam
from ...explain.rules import LOSS_KINDS
from ._graph import check_y, is_chain, loss_value, run_graph
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

#: torch's losses average (or sum) over all elements; cross-entropy needs (n, C) and returns softmax·ΣY − Y.
LOSS_CONVENTION = LossConvention(name="torch", display="torch")

#: what the explain core needs to know about torch, as data.
CONVENTIONS = Conventions(
    name="torch",
    display="torch",
    dense_weight="out_in",
    conv_weight="oihw",
    frozen_words="requires_grad=False",
    grad_words=".grad",
    per_use_words="torch.autograd.grad(Z, W, dJ/dZ) through this call alone",
    loss=LOSS_CONVENTION,
)

_ACT_TYPES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.GELU: "gelu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Softplus: "softplus",
    nn.SiLU: "silu",
    nn.Identity: "identity",
    nn.Softmax: "softmax",
}


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().to(torch.float64).numpy().copy()


def _activation_of(m: nn.Module) -> tuple[str, dict] | None:
    name = _ACT_TYPES.get(type(m))
    if name is None:
        return None
    if name == "leaky_relu":
        return name, {"slope": float(m.negative_slope)}
    if name == "elu":
        return name, {"alpha": float(m.alpha)}
    if name == "gelu":
        return ("gelu_tanh", {}) if m.approximate == "tanh" else ("gelu", {})
    if name == "softplus":
        return name, {"beta": float(m.beta), "threshold": float(m.threshold)}
    if name == "softmax":
        return name, {"dim": m.dim}
    return name, {}


def _conv_config(m: nn.Conv2d) -> dict | str:
    """The conv rule's config, or the reason it has no rule."""
    if m.dilation != (1, 1):
        return f"dilation={m.dilation} (no rule for dilated convolutions)"
    if m.groups != 1:
        return f"groups={m.groups} (no rule for grouped convolutions)"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (only zero padding has a rule)"
    kh, kw = m.kernel_size
    if m.padding == "valid":
        pads = (0, 0, 0, 0)
    elif m.padding == "same":
        th, tw = kh - 1, kw - 1
        pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    else:
        ph, pw = m.padding
        pads = (ph, ph, pw, pw)
    return {"stride": tuple(m.stride), "pads": pads, "channels_last": False}


def _flatten_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential) and type(model).forward is not nn.Sequential.forward:
        raise UnsupportedError(
            f"explain follows the chain nn.Sequential.forward runs, but {type(model).__name__!r} overrides "
            "forward(), which may do something else. Fix: explain a plain nn.Sequential(...) of the same modules."
        )
    if isinstance(model, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        # _modules, not named_children(): named_children() skips a module listed twice, forward() runs it twice
        for name, child in model._modules.items():
            if child is None:
                continue
            for sub, m in _flatten_modules(child):
                out.append((f"{name}.{sub}" if sub else name, m))
        return out
    if isinstance(model, (nn.ModuleList, nn.ModuleDict)) or (
        next(model.children(), None) is not None and type(model) not in (nn.Linear, nn.Conv2d)
    ):
        raise UnsupportedError(
            f"explain follows a single chain of layers, so it needs an nn.Sequential (nested Sequentials are "
            f"fine); got {type(model).__name__!r}, a module with its own forward() that may branch, skip or "
            "take several inputs. Fix: rebuild the chain as nn.Sequential(...), or explain a Sequential "
            "sub-module of it."
        )
    return [("", model)]


def _describe(model: nn.Module) -> list[dict[str, Any]]:
    """Group the flattened modules into layers (weighted op + the activation right after it)."""
    mods = _flatten_modules(model)
    groups: list[dict[str, Any]] = []
    i = 0
    while i < len(mods):
        name, m = mods[i]
        label = f"{name}: {m!r}" if name else repr(m)
        g: dict[str, Any] = {"modules": [m], "label": label, "type": type(m).__name__}
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            cfg = _conv_config(m) if isinstance(m, nn.Conv2d) else None
            if isinstance(cfg, str):
                g.update(kind="opaque", reason=cfg)
            else:
                g.update(kind="dense" if isinstance(m, nn.Linear) else "conv2d", conv=cfg)
                if i + 1 < len(mods) and _activation_of(mods[i + 1][1]) is not None:
                    nxt_name, nxt = mods[i + 1]
                    g["modules"].append(nxt)
                    g["label"] += f" + {nxt_name}: {nxt!r}" if nxt_name else f" + {nxt!r}"
                    g["type"] += f"+{type(nxt).__name__}"
                    i += 1
        elif _activation_of(m) is not None:
            g["kind"] = "activation"
        elif isinstance(m, nn.Flatten):
            if m.start_dim == 1 and m.end_dim == -1:
                g["kind"] = "flatten"
            else:
                g.update(kind="opaque", reason=f"Flatten(start_dim={m.start_dim}, end_dim={m.end_dim})")
        elif isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)):
            g["kind"] = "dropout"
        else:
            g.update(kind="opaque", reason=f"no rule for {type(m).__name__}")
        groups.append(g)
        i += 1
    return groups


# ---------------------------------------------------------------------------------------------------- losses
_FUNCTIONAL = {
    F.mse_loss: "mse",
    F.l1_loss: "mae",
    F.binary_cross_entropy: "bce",
    F.binary_cross_entropy_with_logits: "bce_logits",
    F.cross_entropy: "cross_entropy",
}


def classify_loss(loss: Any, y: np.ndarray, reduction: str = "mean") -> tuple[LossSpec | None, str, Callable]:
    """Map a torch loss (object, function, or name) to a neutral spec and a callable ``fn(y_hat, y) -> J``.

    Args:
        loss: an ``nn`` loss module, a ``torch.nn.functional`` loss, one of
            :data:`gradsight.explain.rules.LOSS_KINDS`, or any callable ``loss(y_hat, y)``.
        y: the targets (decides sparse vs dense cross-entropy).
        reduction: the reduction for a loss given by name.

    Returns:
        ``(spec or None for an arbitrary callable, display text, callable)``.
    """
    sparse = np.issubdtype(np.asarray(y).dtype, np.integer)
    if isinstance(loss, type):
        raise InputError(
            f"loss is the class {loss.__name__!r}, not a loss object; calling it on (ŷ, y) would construct a new "
            f"{loss.__name__}. Fix: pass an instance: nn.{loss.__name__}()"
        )
    if isinstance(loss, str):
        if loss not in LOSS_KINDS:
            raise InputError(f"unknown loss name {loss!r}; expected one of {', '.join(LOSS_KINDS)}")
        if reduction not in ("mean", "sum"):
            raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        fns: dict[str, Callable] = {
            "mse": lambda p, t: F.mse_loss(p, t, reduction=reduction),
            "mae": lambda p, t: F.l1_loss(p, t, reduction=reduction),
            "bce": lambda p, t: F.binary_cross_entropy(p, t, reduction=reduction),
            "bce_logits": lambda p, t: F.binary_cross_entropy_with_logits(p, t, reduction=reduction),
            "cce_logits": lambda p, t: F.cross_entropy(p, t, reduction=reduction),
            "sparse_cce_logits": lambda p, t: F.cross_entropy(p, t.reshape(-1), reduction=reduction),
            "cce": lambda p, t: getattr(-(t * torch.log(p)).sum(dim=-1), reduction)(),
            "sparse_cce": lambda p, t: F.nll_loss(torch.log(p), t.reshape(-1), reduction=reduction),
            "output_mean": lambda p, t: p.mean(),
            "output_sum": lambda p, t: p.sum(),
        }
        spec = LossSpec(loss, reduction, LOSS_CONVENTION, f"{loss!r} (torch convention, {reduction})")
        return spec, repr(loss), fns[loss]
    kind = None
    red = "mean"
    if isinstance(loss, nn.MSELoss):
        kind = "mse"
    elif isinstance(loss, nn.L1Loss):
        kind = "mae"
    elif isinstance(loss, nn.BCELoss) and loss.weight is None:
        kind = "bce"
    elif isinstance(loss, nn.BCEWithLogitsLoss) and loss.weight is None and loss.pos_weight is None:
        kind = "bce_logits"
    elif isinstance(loss, nn.CrossEntropyLoss):
        kind = "sparse_cce_logits" if sparse else "cce_logits"
    if isinstance(loss, nn.Module):
        red = getattr(loss, "reduction", "mean")
        display = f"torch.nn.{type(loss).__name__}(reduction={red!r})"
        _check_reduction(loss, red)
    else:
        display = getattr(loss, "__qualname__", repr(loss))
        fk = _FUNCTIONAL.get(loss)
        if fk is not None:
            kind = ("sparse_cce_logits" if sparse else "cce_logits") if fk == "cross_entropy" else fk
            display = f"torch.nn.functional.{loss.__name__}"
    if not callable(loss):
        raise InputError(
            f"loss must be a torch loss (e.g. nn.MSELoss()), a loss name such as 'mse', or a callable "
            f"loss(y_hat, y) returning a scalar; got {loss!r}"
        )

    def fn(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if kind == "sparse_cce_logits" and t.ndim == p.ndim:
            t = t.reshape(-1)
        return loss(p, t)

    if kind in ("sparse_cce_logits", "cce_logits") and _k_dimensional(y, sparse):
        kind = None  # (N, C, d1, ...) logits: the closed form is for (N, C); autodiff only
    if kind is None or red not in ("mean", "sum"):
        return None, display, fn
    if isinstance(loss, nn.CrossEntropyLoss):
        spec = _ce_spec(loss, kind, red, display, y, sparse)
        return spec, spec.display, fn
    return LossSpec(kind, red, LOSS_CONVENTION, display), display, fn


def _check_reduction(loss: nn.Module, red: str) -> None:
    """Refuse a loss module's reduction that torch itself does not accept for it."""
    valid = ("mean", "sum", "none", "batchmean") if isinstance(loss, nn.KLDivLoss) else ("mean", "sum", "none")
    if red not in valid:
        raise InputError(
            f"the loss {type(loss).__name__} has reduction={red!r}; torch accepts {', '.join(map(repr, valid))} "
            f"(and explain needs a scalar). Fix: nn.{type(loss).__name__}(reduction='mean')"
        )


def _k_dimensional(y: np.ndarray, sparse: bool) -> bool:
    """Whether cross-entropy targets are K-dimensional: class indices of shape (N, d1, ...), not (N,) or (N, 1)."""
    shape = np.asarray(y).shape
    return sparse and len(shape) >= 2 and shape[1:] != (1,)


def _ce_spec(loss: nn.CrossEntropyLoss, kind: str, red: str, display: str, y: np.ndarray, sparse: bool) -> LossSpec:
    """The spec of a ``CrossEntropyLoss``: its class weights, label smoothing and ``ignore_index`` included."""
    weights = None if loss.weight is None else tuple(float(w) for w in loss.weight.detach().double().cpu())
    ignore = loss.ignore_index if sparse and np.any(np.asarray(y) == loss.ignore_index) else None
    extra = "".join(
        [
            f", weight={list(weights)}" if weights is not None else "",
            f", label_smoothing={loss.label_smoothing:g}" if loss.label_smoothing else "",
            f", ignore_index={ignore}" if ignore is not None else "",
        ]
    )
    return LossSpec(
        kind,
        red,
        LOSS_CONVENTION,
        display[:-1] + extra + ")",
        label_smoothing=float(loss.label_smoothing),
        class_weights=weights,
        ignore_index=ignore,
    )


# ------------------------------------------------------------------------------------------------- explain
def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.get_default_dtype()


def _expects(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"expects inputs with {m.in_features} features in the last axis, shape (n, {m.in_features})"
    if isinstance(m, nn.Conv2d):
        return f"expects inputs of shape (n, {m.in_channels}, H, W) (NCHW, {m.in_channels} channels)"
    return "cannot take that input"


def _call(m: nn.Module, h: torch.Tensor, idx: int, label: str, x_shape: tuple[int, ...]) -> torch.Tensor:
    """``m(h)``, with a documentary error instead of torch's when the input does not fit or the output is odd."""
    try:
        out = m(h)
    except GradsightError:
        raise
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"layer {idx} ({label}) {_expects(m)}, but its input has shape {tuple(h.shape)!r} "
            f"(x has shape {x_shape!r}); torch said: {first}. Fix: pass x with the shape the model was built "
            "for, or explain the model this chain belongs to."
        ) from exc
    except TypeError as exc:
        raise UnsupportedError(
            f"layer {idx} ({label}) cannot be called with one tensor ({exc}); explain follows a chain in which "
            "every module maps one tensor to one tensor. Fix: explain the sub-chain before or after it."
        ) from exc
    if not isinstance(out, torch.Tensor):
        raise UnsupportedError(
            f"layer {idx} ({label}) returned a {type(out).__name__}, not a tensor; explain follows a chain in which "
            "every module maps one tensor to one tensor (nn.LSTM/nn.GRU return tuples). Fix: explain the "
            "sub-chain before or after it."
        )
    return out


_LOW = (torch.float16, torch.bfloat16)


# long function: the one entry for chains and graphs; the grad-mode context, the float64 copy, the dispatch and
# the chain's flag restore share one with-block (about half of it is the docstring).
def run_explain(
    model: nn.Module, x: np.ndarray, y: np.ndarray, loss: Any, reduction: str = "mean", training: bool | None = None
) -> FrameworkRun | GraphRun:
    """Run ``model`` on ``x`` and collect torch's value of every term: layer by layer for a chain, node by node
    for a graph.

    A plain ``nn.Sequential`` (nested allowed) or a single layer is a chain (terms ``Z1``, ``A1``, ``dJ/dW1``);
    any other module, or integer x (ids for an embedding), is traced into a graph
    (:mod:`gradsight.frameworks.torch._graph`; terms ``A[node]``, ``dJ/dW[module]``). Works under
    ``torch.no_grad()`` / ``torch.inference_mode()`` (grad mode is enabled locally). Nothing the user owns is
    changed when it returns: ``training`` and ``requires_grad`` flags and buffers are restored exactly,
    ``.grad`` is never touched.

    Args:
        model: an ``nn.Module``.
        x: the input batch (numpy, validated by the caller).
        y: the targets (numpy).
        loss: see :func:`classify_loss`.
        reduction: reduction of a loss given by name.
        training: graphs only: None (each module's own mode, dropout at inference), True or False.

    Returns:
        The :class:`~gradsight.explain._spec.FrameworkRun` of a chain or the
        :class:`~gradsight.explain._graph.GraphRun` of a graph.
    """  # noqa: D205
    if not isinstance(model, nn.Module):
        raise UnsupportedError(f"explain needs a torch.nn.Module, got {type(model).__name__!r}")
    spec, display, loss_fn = classify_loss(loss, y, reduction)
    dtype = _model_dtype(model)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise InputError(
            f"the parameters of {type(model).__name__!r} are on the 'meta' device: they have shapes but no values, "
            "so there is nothing to compute. Fix: materialise the model first, e.g. model.to_empty(device='cpu') "
            "and load its weights (load_state_dict), or build it without device='meta'."
        )
    if any(p.is_inference() for p in model.parameters()):
        raise InputError(
            f"the parameters of {type(model).__name__!r} were created inside torch.inference_mode(), so autograd "
            "can never differentiate through them. Fix: build or load the model outside inference_mode (calling "
            "explain inside inference_mode is fine)."
        )
    notes: list[str] = []
    with torch.inference_mode(False), torch.enable_grad():
        work, model_dtype = _float64_copy(model, dtype)
        # a BatchNorm that runs on batch statistics (training mode, its own or asked for with training=True)
        # needs the graph explainer: the chain explainer runs the model in eval mode
        bn_training = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training if training is None else training)
            for m in work.modules()
        )
        if np.issubdtype(np.asarray(x).dtype, np.integer) or not is_chain(work) or bn_training:
            wdtype = torch.float64 if dtype in _LOW else dtype
            with _no_kv_cache(work) as turned_off:
                grun = run_graph(work, x, y, spec, display, loss_fn, CONVENTIONS, wdtype, training)
            if turned_off:
                grun.notes.append(
                    "the Hugging Face key/value cache (config.use_cache) was off for the run and is restored: it "
                    "changes no value of this forward, and its concatenations have no rule (with it on, the "
                    "gradient of every attention's keys and values was missing)"
                )
            if model_dtype:
                grun.model_dtype = model_dtype
                grun.notes.append(
                    f"the model is {model_dtype}: explained on a float64 copy of its weights (exact in float64)"
                )
            return grun
        groups = _describe(work)
        dropout_training = [m for m in work.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
        if dropout_training:
            notes.append(
                f"{len(dropout_training)} dropout module(s) were in training mode; explain runs the model in eval "
                "mode (dropout is the identity), so the terms are those of inference, and the training flags are "
                "restored afterwards"
            )
        flags = [(m, m.training) for m in work.modules()]
        frozen = [p for p in work.parameters() if not p.requires_grad]
        try:
            work.eval()
            for p in frozen:
                p.requires_grad_(True)
            run = _run(work, groups, x, y, spec, display, loss_fn, dtype, {id(p) for p in frozen})
        finally:
            for m, flag in flags:
                m.training = flag
            for p in frozen:
                p.requires_grad_(False)
        if frozen:
            notes.append(
                f"{len(frozen)} parameter tensor(s) are frozen (requires_grad=False): explain derived and checked "
                "their gradients anyway (requires_grad was enabled for the run and restored afterwards)"
            )
        if model_dtype:
            run.model_dtype = model_dtype
            own = _own_loss(model, x, y, loss_fn, dtype, spec)
            notes.append(
                f"the model is {model_dtype}: explained on a float64 copy of its weights (exact in float64), with x "
                f"rounded to {model_dtype}; autodiff ran on that copy too, so ✓ checks the derivation to float64 "
                f"precision, not {model_dtype} rounding"
                + (
                    f". The model's own {model_dtype} forward gives J = {own:.6g} (float64 copy: {run.j:.6g})"
                    if own is not None
                    else ""
                )
            )
    run.notes = notes + run.notes
    return run


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[bool]:
    """Turn off ``config.use_cache`` of the Hugging Face models inside ``model`` for the block; whether any was on.

    A cache-using forward concatenates each attention's keys and values onto the (empty) cache of earlier tokens;
    those concatenations come out of torch.export as constants, which cut the keys' and values' gradients.
    """
    configs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "use_cache", None) is True}
    for c in configs.values():
        c.use_cache = False
    try:
        yield bool(configs)
    finally:
        for c in configs.values():
            c.use_cache = True


def _float64_copy(model: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """``(model, "")``, or a float64 copy of a float16/bfloat16 model and its dtype's name."""
    if dtype not in _LOW:
        return model, ""
    try:
        return copy.deepcopy(model).to(torch.float64), str(dtype).replace("torch.", "")
    except Exception as exc:
        raise UnsupportedError(
            f"explain checks a {str(dtype)[6:]} model on a float64 copy, but {type(model).__name__!r} "
            f"cannot be deep-copied ({exc}). Fix: explain model.double() (a float64 copy you make)."
        ) from exc


def _own_loss(model: nn.Module, x: np.ndarray, y: np.ndarray, loss_fn: Callable, dtype, spec) -> float | None:
    """J computed by the model itself in its own (low) precision, for the trace's note; None if that fails."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            sparse = (spec is not None and spec.kind.startswith("sparse")) or np.issubdtype(
                np.asarray(y).dtype, np.integer
            )
            y_t = torch.tensor(np.asarray(y), dtype=torch.long if sparse else dtype)
            return float(loss_fn(model(torch.tensor(np.asarray(x), dtype=dtype)), y_t).double())
    except Exception:
        return None
    finally:
        for m, flag in flags:
            m.training = flag


# long function: one autodiff pass — the forward chain, the single autograd.grad call and the unpacking of its
# results share one slot table of intermediates; to be split into forward / gradients / fill-specs helpers.
def _run(model, groups, x, y, spec, display, loss_fn, dtype, frozen_ids) -> FrameworkRun:
    x_t = torch.tensor(np.asarray(x), dtype=dtype).to(torch.float64 if dtype in _LOW else dtype)
    x_t.requires_grad_(True)
    wdtype = x_t.dtype
    sparse = (spec is not None and spec.kind.startswith("sparse")) or np.issubdtype(np.asarray(y).dtype, np.integer)
    # targets in the model's dtype (rounded like x for a float16/bfloat16 model explained on a float64 copy)
    y_t = torch.tensor(np.asarray(y), dtype=torch.long if sparse else dtype).to(torch.long if sparse else wdtype)
    x_shape = tuple(x_t.shape)
    h = x_t
    layers: list[LayerSpec] = []
    tensors: list[dict[str, Any]] = []
    for idx, g in enumerate(groups, start=1):
        mods = g["modules"]
        kind = g["kind"]
        ls = LayerSpec(idx, kind, g["label"], g["type"], reason=g.get("reason", ""), conv=g.get("conv"))
        rec: dict[str, Any] = {"out": None, "in": h, "mod": mods[0]}
        if kind in ("dense", "conv2d"):
            w = mods[0]
            ls.weight, ls.bias = _np(w.weight), _np(w.bias)
            ls.weight_layout = (
                "torch Linear weight (out, in)" if kind == "dense" else "torch Conv2d weight (cout, cin, kh, kw)"
            )
            rec["params"] = [w.weight] + ([w.bias] if w.bias is not None else [])
            z = _call(w, h, idx, g["label"], x_shape)
            rec["out"] = z
            act = mods[1] if len(mods) > 1 else None
            a = act(z) if act is not None else z
            if act is not None:
                ls.activation, ls.activation_params = _activation_of(act)
        elif kind == "activation":
            act = mods[0]
            ls.activation, ls.activation_params = _activation_of(act)
            z = h
            a = _call(act, z, idx, g["label"], x_shape)
        else:  # flatten, dropout, opaque
            act = None
            z = None
            a = _call(mods[0], h, idx, g["label"], x_shape)
            params = list(mods[0].parameters())
            if kind == "opaque" and params:
                rec["params"] = params[:2]
                rec["out"] = a
                ls.weight = _np(params[0])
                ls.bias = _np(params[1]) if len(params) > 1 else None
                ls.weight_layout = f"torch {type(mods[0]).__name__} parameters"
        ls.frozen = any(id(p) in frozen_ids for m in mods for p in m.parameters())
        if ls.activation == "softmax":
            dim = ls.activation_params.get("dim")
            if z.ndim != 2 or dim not in (-1, 1):
                ls.kind = "opaque"
                ls.reason = f"softmax over dim={dim!r} of a {z.ndim}-D input (rule: last axis of 2-D)"
        rec.update(z=z, a=a, act=act)
        layers.append(ls)
        tensors.append(rec)
        h = a
    y_hat = h
    check_y(spec, y_t, y_hat, display)
    if spec is not None and spec.kind.startswith("sparse") and y_t.numel() != y_hat.shape[0]:
        raise InputError(
            f"{display} with integer targets needs one class index per sample: y has shape {tuple(y_t.shape)!r} "
            f"but ŷ has shape {tuple(y_hat.shape)!r} ({y_hat.shape[0]} samples). Fix: pass y of shape "
            f"({y_hat.shape[0]},) with class indices, or float class probabilities of ŷ's shape."
        )
    j = loss_value(loss_fn, y_hat, y_t, display)
    if not j.requires_grad:
        raise InputError(
            f"the loss {display} returned a value that does not depend on ŷ (no gradient flows back); autodiff "
            "has nothing to check. Fix: compute the loss from its first argument ŷ with torch operations."
        )
    # gradients of J w.r.t. every intermediate and parameter, in one call
    wrt: list[torch.Tensor] = []
    seen: dict[int, int] = {}

    def slot(t: torch.Tensor | None) -> int | None:
        if t is None or not t.requires_grad:
            return None
        if id(t) not in seen:
            seen[id(t)] = len(wrt)
            wrt.append(t)
        return seen[id(t)]

    idx_yhat = slot(y_hat)
    plan = []
    for rec in tensors:
        plan.append(
            {
                "z": slot(rec["z"]),
                "a": slot(rec["a"]),
                "out": slot(rec["out"]),
                "p": [slot(p) for p in rec.get("params", [])],
            }
        )
    grads = torch.autograd.grad(j, wrt, allow_unused=True, retain_graph=True)
    # parameters used by several layers (a module listed more than once)
    uses: dict[int, list[int]] = {}
    for l, rec in enumerate(tensors, start=1):
        for p in rec.get("params", []):
            if l not in uses.setdefault(id(p), []):
                uses[id(p)].append(l)
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)  # the first place the parameter is listed
    shared: list[SharedParam] = []
    for l, rec in enumerate(tensors, start=1):
        for which, p in zip("Wb", rec.get("params", []), strict=False):
            if len(uses[id(p)]) > 1 and uses[id(p)][0] == l:
                key = names.get(id(p), f"layer{l}.{which}")
                module = key.rsplit(".", 1)[0] if "." in key else key
                total = grads[seen[id(p)]]
                shared.append(SharedParam(key, which, module, list(uses[id(p)]), _zeros_if_none(total, p)))
    keys = {(sp.which, l): sp.key for sp in shared for l in sp.layers}
    for ls, rec, pl in zip(layers, tensors, plan, strict=False):
        ls.z = _np(rec["z"])
        ls.a = _np(rec["a"])
        ls.dz = _np(grads[pl["z"]]) if pl["z"] is not None else None
        ls.da = _np(grads[pl["a"]]) if pl["a"] is not None else None
        if ls.weight is not None:
            params = rec["params"]
            ls.shared = {w: keys[(w, ls.index)] for w in "Wb" if (w, ls.index) in keys}
            if ls.shared:
                # this use's share: torch's vjp through this call alone (the module re-run on its detached input,
                # so the path through earlier uses is cut), with torch's dJ/d(output of the call)
                g_out = grads[pl["out"]] if pl["out"] is not None else None
                if g_out is None:
                    per_use = [torch.zeros_like(p) for p in params]
                else:
                    again = rec["mod"](rec["in"].detach())
                    per_use = torch.autograd.grad(again, params, grad_outputs=g_out, allow_unused=True)
                pg = [_zeros_if_none(g, p) for g, p in zip(per_use, params, strict=False)]
            else:
                pg = [
                    _zeros_if_none(grads[i] if i is not None else None, p)
                    for i, p in zip(pl["p"], params, strict=False)
                ]
            ls.dw = _np(pg[0])
            ls.db = _np(pg[1]) if len(pg) > 1 else None
        if rec["act"] is not None and rec["z"] is not None and ls.kind != "opaque":
            z, a, act = rec["z"], rec["a"], rec["act"]
            if ls.activation == "softmax" and R.jacobian_too_big(tuple(z.shape)):
                probe = torch.tensor(R.softmax_probe(tuple(z.shape)), dtype=a.dtype)
                (s,) = torch.autograd.grad(a, z, probe, retain_graph=True)
                ls.s, ls.s_probe = _np(s), True
            elif ls.activation == "softmax":
                zd = z.detach()
                ls.s = _np(torch.func.vmap(torch.func.jacrev(lambda zi, act=act: act(zi[None])[0]))(zd))
            elif a is z:
                ls.s = np.ones(tuple(z.shape))
            else:
                (s,) = torch.autograd.grad(a, z, torch.ones_like(a), retain_graph=True)
                ls.s = _np(s)
    dj = grads[idx_yhat] if idx_yhat is not None else None
    return FrameworkRun(
        framework="torch",
        model_name=type(model).__name__,
        layers=layers,
        x=_np(x_t),
        y=np.asarray(y) if sparse else _np(y_t),
        dtype=str(wdtype).replace("torch.", ""),
        loss=spec,
        loss_display=display,
        j=float(j.detach().double()),
        dj_dyhat=_np(dj),
        shared=shared,
        conventions=CONVENTIONS,
    )


def _zeros_if_none(g: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if g is None else g


# -------------------------------------------------------------------------------------------- check_loss
def loss_probe(loss: Any, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Evaluate a torch loss on given arrays: value, shape, dJ/dŶ of its sum, warnings, and its spec.

    Torch losses are called as ``loss(y_pred, y_true)``.
    """
    dtype = torch.float64
    if isinstance(loss, nn.Module) and any(t.is_floating_point() for t in [*loss.parameters(), *loss.buffers()]):
        loss = copy.deepcopy(loss).double()  # its class weights in the float64 the probe computes in
    yp = torch.tensor(np.asarray(y_pred, dtype=np.float64), dtype=dtype, requires_grad=True)
    yt_np = np.asarray(y_true)
    sparse = np.issubdtype(yt_np.dtype, np.integer)
    yt = torch.tensor(yt_np, dtype=torch.long if sparse else dtype)
    spec, display, fn = classify_loss(loss, yt_np) if not isinstance(loss, str) else classify_loss(loss, yt_np, "mean")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(yp, yt)
    (g,) = torch.autograd.grad(out.sum(), yp, allow_unused=True)
    return {
        "value": _np(out),
        "grad": _np(g) if g is not None else np.zeros(yp.shape),
        "warnings": [str(w.message) for w in caught],
        "spec": spec,
        "display": display,
    }


# ------------------------------------------------------------------------------- jacobian_vs_gradient etc.
def matmul_target(s: np.ndarray) -> Callable:
    """``Z ↦ Z·S`` as a torch function (an activation written as a matrix)."""
    st = torch.tensor(np.asarray(s, dtype=np.float64))
    return lambda z: z @ st


def jacobian_and_gradient(fn: Callable, source: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(target, full Jacobian, what backward(ones) gives)`` of ``fn`` at ``source`` (float64)."""
    src = torch.tensor(np.asarray(source, dtype=np.float64), requires_grad=True)
    try:
        out = fn(src)
    except GradsightError:
        raise
    except Exception as exc:
        raise InputError(
            f"target_fn {getattr(fn, '__name__', fn)!r} failed on a float64 tensor of shape {tuple(src.shape)!r}: "
            f"{exc}. Fix: pass a function of one torch tensor (torch ops), and a source it accepts"
        ) from exc
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise InputError(
            f"target_fn must return a floating-point torch tensor, got {type(out).__name__!r}"
            + (f" of dtype {out.dtype}" if isinstance(out, torch.Tensor) else "")
        )
    nbytes = out.numel() * src.numel() * 8
    if nbytes > R.JACOBIAN_LIMIT_BYTES:
        raise InputError(
            f"the full Jacobian of a target of shape {tuple(out.shape)!r} w.r.t. a source of shape "
            f"{tuple(src.shape)!r} would take {R.fmt_bytes(nbytes)} (limit {R.fmt_bytes(R.JACOBIAN_LIMIT_BYTES)}). "
            "Fix: pass a smaller source (a few rows show the same relation)"
        )
    (g,) = torch.autograd.grad(out, src, torch.ones_like(out), allow_unused=True)
    jac = torch.autograd.functional.jacobian(fn, src.detach())
    g = torch.zeros_like(src) if g is None else g
    return _np(out), _np(jac), _np(g)


def example_loss() -> tuple[Any, str]:
    """``nn.MSELoss()`` and its display text (the training-loop example)."""
    return nn.MSELoss(), "torch.nn.MSELoss()"


def build_dense_model(
    weights: list[np.ndarray],
    biases: list[np.ndarray | None] | None = None,
    activations: list[str | None] | None = None,
    dtype: str = "float64",
) -> nn.Module:
    """An ``nn.Sequential`` of Linear layers from kernels in ``(in, out)`` layout, with activations."""
    biases = biases or [None] * len(weights)
    activations = activations or [None] * len(weights)
    mods: list[nn.Module] = []
    tdtype = getattr(torch, dtype)
    make = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softmax": lambda: nn.Softmax(dim=-1)}
    for w, b, act in zip(weights, biases, activations, strict=False):
        lin = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, dtype=tdtype)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(np.asarray(w).T))
            if b is not None:
                lin.bias.copy_(torch.tensor(np.asarray(b)))
        mods.append(lin)
        if act is not None:
            mods.append(make[act]())
    return nn.Sequential(*mods)
