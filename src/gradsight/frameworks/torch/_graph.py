"""PyTorch graph adapter of the Explain pillar: any traceable module → neutral graph + torch's autodiff values.

Tracing: ``torch.fx.symbolic_trace`` first (torch.nn modules stay whole: a ``MultiheadAttention`` is one node),
then ``torch.export.export`` for a module that symbolic tracing cannot follow but that runs one fixed graph for
the given x (Python branches on shapes or config, ``*args`` unpacking, as in Hugging Face blocks). A forward
whose control flow depends on tensor *values* has no single graph; it is refused with an
:class:`~gradsight.UnsupportedError` that names the module and line where tracing stopped and the fix.

Running: the traced graph is run once on x by a recording ``torch.fx.Interpreter`` (every node's concrete
arguments and output kept), then one ``torch.autograd.grad`` call gives dJ/d(every intermediate) and
dJ/d(every parameter); each node without a rule gets its vector-Jacobian products from torch too. Nothing the
user owns is changed when it returns: training flags, ``requires_grad`` flags and buffers (BatchNorm running
statistics, updated by a training-mode forward) are restored exactly, ``.grad`` is never touched.

Modes: every module runs in eval mode, so that the run is deterministic: dropout in any form (``nn.Dropout``,
``F.dropout(x, p, self.training)``, a ``MultiheadAttention``'s or a Hugging Face attention's dropout) is the
identity. The exceptions are the normalisation layers with batch statistics (BatchNorm, InstanceNorm with running
statistics): by default each keeps its own ``training`` flag (in training mode it uses batch statistics, and its
gradient flows through them); ``training=False`` or ``True`` sets them all.
"""

from __future__ import annotations

import linecache
import operator
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..._errors import GradsightError, InputError, UnsupportedError
from ..._tolerance import tolerance_for
from ...explain._graph import GraphRun, prune
from ...explain._spec import Conventions, LossSpec
from ._graph_ops import Converter, fname, overrides_forward

__all__ = ["check_y", "is_chain", "loss_value", "run_graph", "trace_module"]

#: torch.nn modules with sub-modules that have a rule of their own (symbolic_trace keeps them whole)
_KNOWN_CONTAINERS = (nn.MultiheadAttention,)

_TORCH_DIR = torch.__file__.rsplit("/", 1)[0]


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().to(torch.float64).numpy().copy()


def is_chain(model: nn.Module) -> bool:
    """Whether the chain explainer can follow ``model`` (a plain ``nn.Sequential`` or one supported layer)."""
    if isinstance(model, nn.Sequential):
        if type(model).forward is not nn.Sequential.forward:
            return False
        return all(is_chain(m) for m in model.children())
    if next(model.children(), None) is not None or isinstance(model, nn.Embedding):  # ids: a graph
        return False
    if overrides_forward(model):  # class MyLinear(nn.Linear) with a forward of its own: not nn.Linear's rule
        return False
    # the chain names a layer's parameters W and b: other parameters (an LSTM's, a custom layer's) need the graph
    # explainer, which names each parameter by its own name
    return {n for n, _ in model.named_parameters(recurse=False)} <= {"weight", "bias"}


# --------------------------------------------------------------------------------------------------- trace
def _culprit(exc: BaseException) -> str:
    """``"Module (file:line: code)"`` of the innermost user frame of a tracing error, or ``""``."""
    best = ""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        fn = frame.f_code.co_filename
        if not fn.startswith(_TORCH_DIR) and "gradsight" not in fn:
            owner = frame.f_locals.get("self")
            what = type(owner).__name__ if isinstance(owner, nn.Module) else frame.f_code.co_name
            code = linecache.getline(fn, tb.tb_lineno).strip()
            best = f"{what} ({fn.rsplit('/', 1)[-1]}:{tb.tb_lineno}: `{code}`)"
        tb = tb.tb_next
    return best


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:240]


def _defaults(model: nn.Module) -> dict[str, Any] | None:
    """The forward's optional arguments at their defaults (``mask=None``), as ``concrete_args``.

    explain passes x alone, so they are constants of the graph, and a branch on them (``if mask is None``) is
    traced the way the call takes it.
    """
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    out = {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    return out or None


def _export(model: nn.Module, x_t: torch.Tensor) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (x_t,), strict=False).module()


def _opaque_containers(gm: fx.GraphModule) -> list[str]:
    """The torch.nn modules symbolic_trace kept whole that have sub-modules and no rule (nn.TransformerEncoder)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            if next(m.children(), None) is not None and not isinstance(m, _KNOWN_CONTAINERS):
                out.append(f"{n.target} ({type(m).__name__})")
    return out


class _Tracer(fx.Tracer):
    """``torch.fx.symbolic_trace``'s tracer, keeping a torch.nn layer's subclass with a forward of its own whole.

    Traced through, its inner op would take the module's name although the module's output is computed after it
    (``super().forward(x) * 3``); kept whole, it is one node, named after the module, with torch's gradients.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or overrides_forward(m)


def trace_module(model: nn.Module, x_t: torch.Tensor) -> tuple[fx.GraphModule, str]:
    """The model's graph: ``(graph module, how it was traced)``.

    Raises:
        UnsupportedError: neither ``torch.fx.symbolic_trace`` nor ``torch.export`` can trace it.
    """
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model, concrete_args=_defaults(model)), type(model).__name__)
    except Exception as exc:
        fx_exc = exc
    else:
        whole = _opaque_containers(gm)
        if not whole:
            return gm, "torch.fx.symbolic_trace"
        try:  # torch.export looks inside nn.TransformerEncoder & co., which symbolic_trace keeps whole
            return _export(model, x_t), f"torch.export (symbolic_trace keeps {', '.join(whole)} whole)"
        except Exception:
            return gm, "torch.fx.symbolic_trace"
    try:
        return _export(model, x_t), "torch.export (symbolic_trace failed: " + _first_line(fx_exc) + ")"
    except Exception as exc:
        where = _culprit(exc) or _culprit(fx_exc) or type(model).__name__
        raise UnsupportedError(
            f"explain cannot trace {type(model).__name__!r} into a graph: tracing stopped in {where}. "
            f"torch.fx.symbolic_trace said: {_first_line(fx_exc)}; torch.export said: {_first_line(exc)}. A forward "
            "whose control flow depends on tensor values (`if x.sum() > 0:`, `while err > tol:`, `.item()` in a "
            "condition) has no single graph to derive. Fix: write the branch with tensor ops "
            "(torch.where(cond, a, b)), move it out of forward(), or explain the traceable sub-modules before "
            "and after it, e.g. explain(model.encoder, x, y)."
        ) from exc


# ----------------------------------------------------------------------------------------------------- run
_INPLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


class _Recorder(fx.Interpreter):
    """Runs the graph node by node, keeping every node's concrete arguments and output.

    In-place ops run out of place, so no recorded value is overwritten.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.rec: dict[str, tuple[tuple, dict, Any]] = {}

    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            target = n.target
            if (
                n.op == "call_method"
                and isinstance(target, str)
                and target.endswith("_")
                and not target.startswith("_")
            ):
                target = target[:-1]  # x.add_(y) -> x.add(y)
            elif n.op == "call_function" and isinstance(target, torch._ops.OpOverload):
                name = target._opname
                if name.endswith("_") and not name.startswith("_") and hasattr(torch.ops.aten, name[:-1]):
                    target = (
                        getattr(torch.ops.aten, name[:-1]).default
                        if target._overloadname == "default"
                        else getattr(getattr(torch.ops.aten, name[:-1]), target._overloadname, target)
                    )
            elif n.op == "call_function" and target in _INPLACE_OPERATORS:
                target = _INPLACE_OPERATORS[target]
            out = getattr(self, n.op)(target, args, kwargs)
        self.rec[n.name] = (args, kwargs, out)
        return out


def _input_placeholder(gm: fx.GraphModule, model: nn.Module) -> str:
    """The placeholder x feeds; a forward that needs more than one tensor is refused (explain passes one x)."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not holders:
        raise UnsupportedError("the traced graph has no input")
    required = [n.name for n in holders if not n.args]  # a placeholder with a default value has args
    if len(required) > 1:
        raise UnsupportedError(
            f"{type(model).__name__}.forward takes {len(required)} inputs ({', '.join(required)}), but explain "
            "feeds one batch x. Fix: wrap it in a module that fixes the others, e.g. class One(nn.Module): "
            f"def forward(self, x): return model(x, mask) — then explain(One(), x, y)"
        )
    return holders[0].name


def _check_int_input(gm: fx.GraphModule, x: np.ndarray, name: str) -> None:
    """Integer x may only feed an embedding (or an op on ids); float x must not feed an embedding."""
    x_node = next(n for n in gm.graph.nodes if n.name == name)
    for user in x_node.users:
        if user.op == "call_module" and str(user.target).startswith("_guards"):
            continue  # torch.export's input guards (`_guards_fn`): they check shapes, they compute nothing
        if user.op == "call_module":
            m = gm.get_submodule(str(user.target))
            is_emb = isinstance(m, (nn.Embedding, nn.EmbeddingBag))
            what, kind = f"{user.target} ({type(m).__name__})", "embedding" if is_emb else "other"
        else:
            what = f"{user.name} ({fname(user)})"
            kind = "embedding" if fname(user) == "embedding" else ("ids" if fname(user) in _ID_OPS else "other")
            if fname(user) == "getattr" and len(user.args) > 1 and user.args[1] in ("shape", "dtype", "device", "ndim"):
                kind = "ids"  # ids.shape[1] (positions: torch.arange(ids.shape[1])) reads no value of x
        if np.issubdtype(x.dtype, np.integer) and kind == "other":
            raise InputError(
                f"x has dtype {x.dtype} but the first op reading it, {what}, needs floating-point inputs; integer "
                "inputs are token/category ids, which need an embedding first. Fix: x.float() (torch) or "
                "x.astype('float32') if these are features, or put an nn.Embedding before it if they are ids"
            )
        if not np.issubdtype(x.dtype, np.integer) and kind == "embedding":
            raise InputError(
                f"x has dtype {x.dtype} but feeds {what}, which looks rows up by integer id. Fix: pass the ids as "
                "integers, e.g. x.long()"
            )


_ID_OPS = frozenset(
    {
        "getitem",
        "size",
        "eq",
        "ne",
        "lt",
        "gt",
        "le",
        "ge",
        "select",
        "slice",
        "long",
        "int",
        "to",
        "view",
        "reshape",
        "sym_size",
        "dim",
    }
)


_INPLACE_MODULES: list[nn.Module] = []  # modules whose inplace=True is switched off for the run


#: Normalisation layers whose result depends on the training flag (batch or running statistics): the only
#: modules that keep their mode (their own, or the one ``training=`` asks for).
_MODAL_NORMS = (nn.modules.batchnorm._NormBase,)


def _modes(model: nn.Module, training: bool | None) -> list[tuple[nn.Module, bool]]:
    """Set the run's training flags (see the module docstring); returns what to restore."""
    flags = [(m, m.training) for m in model.modules()]
    for m in model.modules():
        if getattr(m, "inplace", False) is True:  # nn.ReLU(inplace=True) would overwrite a recorded value
            m.inplace = False
            _INPLACE_MODULES.append(m)
    if training is not None:
        model.train(bool(training))
    for m in model.modules():  # one module at a time: eval() would recurse into a BatchNorm's parents' children
        if not isinstance(m, _MODAL_NORMS):
            m.training = False
    return flags


def _dropout_config(model: nn.Module) -> list[Any]:
    """The dropout probabilities a Hugging Face model's config names (its attention and hidden dropouts)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    keys = ("attention_probs_dropout_prob", "hidden_dropout_prob", "attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout")
    return [getattr(config, k, None) for k in keys]


def loss_value(loss_fn: Callable, y_hat: torch.Tensor, y_t: torch.Tensor, display: str) -> torch.Tensor:
    """``loss_fn(ŷ, y)``, refusing a loss that warns, fails or is not a scalar (the chain and graph explain alike)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        try:
            j = loss_fn(y_hat, y_t)
        except UserWarning as exc:
            raise InputError(f"the loss {display} warned: {exc}. Run gradsight.check_loss to inspect it.") from exc
        except GradsightError:
            raise
        except Exception as exc:
            if "between 0 and 1" in str(exc) and y_hat.numel():
                lo, hi = float(y_hat.detach().min()), float(y_hat.detach().max())
                raise InputError(
                    f"the loss {display} takes probabilities, but the model's output ŷ ranges over [{lo:.4g}, "
                    f"{hi:.4g}], outside [0, 1]: it is not a probability. Fix: apply a sigmoid at the end of the "
                    "model, or (more stable) feed the logits to nn.BCEWithLogitsLoss."
                ) from exc
            raise InputError(
                f"the loss {display} failed on ŷ of shape {tuple(y_hat.shape)!r} ({y_hat.dtype}) and y of shape "
                f"{tuple(y_t.shape)!r} ({y_t.dtype}): {_first_line(exc)}. Fix: pass y in the form this loss expects "
                "(class indices of shape (n,) for cross-entropy, ŷ's shape otherwise); gradsight.check_loss(loss, y, "
                "y_hat) shows what the loss does with them."
            ) from exc
    if not isinstance(j, torch.Tensor) or j.numel() != 1 or j.ndim > 1:
        shape = tuple(j.shape) if isinstance(j, torch.Tensor) else type(j).__name__
        raise InputError(
            f"the loss {display} returned {shape!r}, not a scalar; autodiff would differentiate its sum, which "
            "changes every gradient's scale. Fix: reduce it (reduction='mean'), or run gradsight.check_loss to "
            "see the consequence."
        )
    return j


def check_y(spec: LossSpec | None, y_t: torch.Tensor, y_hat: torch.Tensor, display: str) -> None:
    """Refuse targets whose shape differs from ŷ's where the loss pairs them elementwise (it would broadcast)."""
    pairs = spec is not None and spec.kind not in ("output_mean", "output_sum") and not spec.kind.startswith("sparse")
    if pairs and tuple(y_t.shape) != tuple(y_hat.shape):
        if (
            spec.kind.startswith("cce")  # type: ignore[union-attr]
            and y_t.is_floating_point()
            and tuple(y_t.shape) == tuple(y_hat.shape[:1]) + tuple(y_hat.shape[2:])
            and bool(torch.all(y_t == torch.round(y_t)))
        ):
            raise InputError(
                f"y holds class numbers as floating point ({y_t.dtype}, shape {tuple(y_t.shape)!r}); {display} "
                f"reads floating-point targets as class probabilities of ŷ's shape {tuple(y_hat.shape)!r}, and "
                "class indices must be integers. Pass y.long()."
            )
        raise InputError(
            f"y has shape {tuple(y_t.shape)!r} but the model's output ŷ has shape {tuple(y_hat.shape)!r}; "
            f"{display} would broadcast them (or fail). Pass y with the output's shape, or run "
            "gradsight.check_loss(loss, y, y_hat) to see what the broadcast does."
        )


# long function: one autodiff pass — trace, recorded run, loss, the single autograd.grad call and the opaque
# nodes' vector-Jacobian products share the recorded tensors; the restore of every flag sits in its finally.
def run_graph(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    spec: LossSpec | None,
    display: str,
    loss_fn: Callable,
    conventions: Conventions,
    dtype: torch.dtype,
    training: bool | None = None,
) -> GraphRun:
    """Trace ``model``, run it once on ``x`` recording every node, and collect torch's value of every term.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` or ``torch.export`` can trace (float64 for ✓ to mean 1e-9).
        x: the input batch (floating point, or integer ids for a model that starts with an embedding).
        y: the targets.
        spec: the neutral loss (None for an arbitrary callable).
        display: how the loss is shown.
        loss_fn: ``loss_fn(ŷ, y) -> J``.
        conventions: torch's conventions.
        dtype: the model's dtype (autodiff runs in it).
        training: None (each module's own flag, dropout at inference), True or False (see the module docstring).

    Returns:
        The :class:`~gradsight.explain._graph.GraphRun`.
    """
    int_x = np.issubdtype(np.asarray(x).dtype, np.integer)
    x_t = torch.tensor(np.asarray(x), dtype=torch.long if int_x else dtype)
    sparse = (spec is not None and spec.kind.startswith("sparse")) or np.issubdtype(np.asarray(y).dtype, np.integer)
    y_t = torch.tensor(np.asarray(y), dtype=torch.long if sparse else dtype)
    notes: list[str] = []
    rng = torch.get_rng_state()  # restored on return: random ops in forward() must not move the user's RNG
    flags = _modes(model, training)
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    # an Embedding with max_norm renormalises the rows it looks up in place, in every forward (as in training)
    renormed = [
        (m, m.weight.detach().clone())
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
    ]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        gm, tracer = trace_module(model, x_t)
        name = _input_placeholder(gm, model)
        _check_int_input(gm, np.asarray(x), name)
        if not int_x:
            x_t.requires_grad_(True)
        params = dict(gm.named_parameters(remove_duplicate=True))
        for p in params.values():
            if not p.requires_grad:
                frozen.append(p)
                p.requires_grad_(True)
        rec = _Recorder(gm)
        try:
            rec.run(x_t)
        except GradsightError:
            raise
        except Exception as exc:
            tables = sorted({m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)})
            if isinstance(exc, IndexError) and tables and int_x and x_t.numel():
                raise InputError(
                    f"{type(model).__name__} looked up an id outside an embedding table: x holds ids from "
                    f"{int(x_t.min())} to {int(x_t.max())}, and the model's nn.Embedding tables have "
                    f"{', '.join(map(str, tables))} rows. Fix: ids must lie in [0, num_embeddings) — check the "
                    "tokenizer's vocabulary against the model's (config.vocab_size)."
                ) from exc
            raise InputError(
                f"{type(model).__name__} failed on x of shape {tuple(x_t.shape)!r} ({x_t.dtype}): {_first_line(exc)}. "
                "Fix: pass x with the shape and dtype the model was built for."
            ) from exc
        keys = {id(p): k for k, p in params.items()}
        frozen_ids = {id(p) for p in frozen}
        conv = Converter(gm, rec.rec, keys, frozen_ids, name)
        conv.convert()
        notes += conv.notes
        conv.nodes, dropped = prune(conv.nodes, conv.output)
        if dropped:
            notes.append(f"node(s) {dropped} do not reach the output (no gradient flows through them): left out")
        floor, afloor = _lower_precision_floor(conv, dtype, notes)
        y_hat = conv.tensors[conv.output]
        check_y(spec, y_t, y_hat, display)
        j = loss_value(loss_fn, y_hat, y_t, display)
        if not j.requires_grad:
            raise InputError(f"the loss {display} does not depend on ŷ; autodiff has nothing to check.")
        names = [nd.name for nd in conv.nodes if nd.op != "param"]
        wrt = [conv.tensors[n] for n in names]
        wrt_ok = [t for t in wrt if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(j, wrt_ok + list(params.values()), allow_unused=True, retain_graph=True)
        g_of: dict[int, torch.Tensor | None] = {id(t): g for t, g in zip(wrt_ok, grads[: len(wrt_ok)], strict=True)}
        param_grads = {
            k: _np(g if g is not None else torch.zeros_like(p))
            for (k, p), g in zip(params.items(), grads[len(wrt_ok) :], strict=True)
        }
        torch.set_rng_state(rng)  # the same random draws as the recorded run (F.dropout(..., training=True))
        _check_against_model(model, x_t, y_t, loss_fn, j, params, param_grads, tracer)
        mode_note = _own_mode_note(model, flags, x_t, y_t, loss_fn, j, rng)
        for nd in conv.nodes:
            t = conv.tensors[nd.name]
            nd.out = _np(t) if t.is_floating_point() else np.asarray(t.detach().cpu().numpy())
            if nd.op == "param":
                continue
            if t.requires_grad:
                g = g_of.get(id(t))
                nd.grad = _np(g if g is not None else torch.zeros_like(t))
            if nd.op == "opaque":
                nd.input_grads = _vjps(t, g_of.get(id(t)), conv.opaque_ins[nd.name])
    finally:
        torch.set_rng_state(rng)
        for m, flag in flags:
            m.training = flag
        while _INPLACE_MODULES:
            _INPLACE_MODULES.pop().inplace = True
        for p in frozen:
            p.requires_grad_(False)
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in buffers and b.shape == buffers[k].shape:
                    b.copy_(buffers[k])
            for m, w in renormed:
                m.weight.copy_(w)
    if renormed:
        notes.append(
            "an Embedding with max_norm renormalises the rows it looks up in place, in its forward (as in training): "
            "the run used the renormalised rows, and the weights were restored afterwards"
        )
    if mode_note:
        notes.append(mode_note)
    if (
        any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
        and training is not False
    ):
        notes.append(
            "BatchNorm in training mode: batch statistics, with the gradient flowing through the batch mean and "
            "variance; its running statistics were restored after the run (explain(..., training=False) derives "
            "inference mode)"
        )
    if frozen:
        notes.append(f"{len(frozen)} frozen parameter tensor(s): their gradients were derived and checked anyway")
    hooked = _hooked(model)
    if hooked:
        notes.append(
            f"module(s) {hooked} have forward hooks or pre-hooks: autodiff runs them, the closed forms derive each "
            "module without them, so a hook that changes a value shows as ✗ from that module on (remove the hooks "
            "while explaining to derive them)"
        )
    return GraphRun(
        framework="torch",
        model_name=type(model).__name__,
        tracer=tracer,
        nodes=conv.nodes,
        output=conv.output,
        x=np.asarray(x) if int_x else _np(x_t),
        y=np.asarray(y) if sparse else _np(y_t),
        dtype=str(dtype).replace("torch.", ""),
        loss=spec,
        loss_display=display,
        j=float(j.detach().double()),
        dj_dyhat=_np(g_of.get(id(y_hat))) if g_of.get(id(y_hat)) is not None else np.zeros(tuple(y_hat.shape)),
        param_grads=param_grads,
        notes=notes,
        rtol_floor=floor,
        atol_floor=afloor,
        conventions=conventions,
    )


_PRECISION = {torch.float64: 3, torch.float32: 2, torch.float16: 1, torch.bfloat16: 0}


def _lower_precision_floor(conv: Converter, dtype: torch.dtype, notes: list[str]) -> tuple[float, float]:
    """The (rtol, atol) floors of a model that computes part of its graph below its own dtype (0s if it does not).

    A float64 model whose forward casts to float32 (``.to(torch.float32)``, ``.float()``, ``type_as``, a softmax
    in float32) rounds there to float32, and every value downstream carries that rounding: compared with float64's
    tolerance they would all show ✗ although each closed form is right. The whole trace is compared with the
    lowest precision's tolerance instead, and a note says where the cast is.
    """
    low: dict[torch.dtype, str] = {}
    for nd in conv.nodes:
        t = conv.tensors.get(nd.name)
        if (
            isinstance(t, torch.Tensor)
            and t.is_floating_point()
            and _PRECISION.get(t.dtype, 9) < _PRECISION.get(dtype, 0)
        ):
            low.setdefault(t.dtype, nd.name)
    if not low:
        return 0.0, 0.0
    lowest = min(low, key=lambda d: _PRECISION[d])
    low_name, own = str(lowest).replace("torch.", ""), str(dtype).replace("torch.", "")
    tol = tolerance_for(low_name)
    notes.append(
        f"the model computes part of its graph in {low_name} although it is {own} (first at {low[lowest]}): every "
        f"value from there on carries that rounding, so terms are compared with {low_name}'s tolerance "
        f"(rtol {tol.rtol:g}, atol {tol.atol:g}) instead of {own}'s"
    )
    return tol.rtol, tol.atol


def _hooked(model: nn.Module) -> list[str]:
    """The modules with forward hooks or pre-hooks of the user's (a gradsight watch's own are left out)."""
    out = []
    for name, m in model.named_modules():
        hooks = list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())
        if any(not type(h).__module__.startswith("gradsight.") for h in hooks):
            out.append(name or type(model).__name__)
    return out


def _own_mode_note(
    model: nn.Module,
    flags: list[tuple[nn.Module, bool]],
    x_t: torch.Tensor,
    y_t: torch.Tensor,
    loss_fn: Callable,
    j: torch.Tensor,
    rng: torch.Tensor,
) -> str | None:
    """A note when the model's loss in its own train/eval modes differs from the one derived (eval-mode) loss.

    Dropout of any kind and a forward that branches on ``self.training`` compute something else in training
    mode; a model built and left in training mode without either computes the same, and gets no note.
    """
    changed = [(m, f) for m, f in flags if m.training != f]
    if not changed:
        return None
    for m, f in changed:
        m.training = f
    try:
        torch.set_rng_state(rng)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            j_own = float(loss_fn(model(x_t.detach()), y_t).double())
    except Exception:
        return None
    finally:
        for m, f in changed:
            m.training = not f
    j_run = float(j.detach().double())
    if abs(j_own - j_run) <= (1e-9 if x_t.dtype == torch.float64 else 1e-5) * max(abs(j_own), 1e-12):
        return None
    return (
        f"in its own modes (training mode) the model gives J = {j_own:.6g}; explain runs every module except "
        f"normalisation layers with batch statistics in eval mode, so dropout of every kind is the identity and a "
        f"forward that branches on self.training takes its eval branch: the terms derive J = {j_run:.6g} (the "
        "flags are restored)"
    )


def _check_against_model(
    model: nn.Module,
    x_t: torch.Tensor,
    y_t: torch.Tensor,
    loss_fn: Callable,
    j: torch.Tensor,
    params: dict[str, torch.Tensor],
    param_grads: dict[str, np.ndarray | None],
    tracer: str,
) -> None:
    """Run the model itself, in the modes of the recorded run, and refuse a graph that does not reproduce it.

    Tracing sees only what flows through tensors: a ``torch.no_grad()`` block or a forward hook inside the model,
    or an in-place write into a slice of a tensor (``h[:, 2] = ...``) under ``torch.export``, leaves a graph
    whose loss or gradients differ from the model's. Then every term would be derived, and checked, on a model
    that is not the user's; refused instead. Compared: J, and dJ/dW of every parameter the graph shares with the
    model, within float rounding (relative to the largest entry).

    Raises:
        UnsupportedError: the graph's J or a parameter's gradient differs from the model's.
    """
    x_m = x_t.detach().clone()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            j_m = loss_fn(model(x_m), y_t)
    except Exception:  # the graph ran: a model that fails on its own here is not what this check is about
        return
    if not isinstance(j_m, torch.Tensor) or j_m.numel() != 1:
        return
    exact = x_t.dtype == torch.float64
    tol = 1e-7 if exact else 1e-3
    j_g, j_r = float(j.detach().double()), float(j_m.detach().double())
    problem = None
    if abs(j_g - j_r) > tol * max(abs(j_r), 1e-12):
        problem = f"J = {j_r:.10g} from the model, {j_g:.10g} from its traced graph"
    elif j_m.requires_grad:
        shared = {k: p for k, p in params.items() if p.requires_grad}
        real = torch.autograd.grad(j_m, list(shared.values()), allow_unused=True)
        for (k, p), g in zip(shared.items(), real, strict=True):
            mine, theirs = param_grads.get(k), _np(g if g is not None else torch.zeros_like(p))
            if mine is None or theirs is None or mine.shape != theirs.shape:
                continue
            if not theirs.size:
                continue
            scale = max(float(np.max(np.abs(theirs))), float(np.max(np.abs(mine))), 1e-30)
            off = float(np.max(np.abs(mine - theirs)))
            if off > tol * scale:
                problem = (
                    f"dJ/d[{k}] differs between the model and its traced graph by up to {off:.3g} (of {scale:.2g})"
                )
                break
    if problem is not None:
        raise UnsupportedError(
            f"explain traced {type(model).__name__!r} with {tracer}, but the graph does not reproduce the model: "
            f"{problem}. Something in forward() is invisible to tracing: a torch.no_grad() block or .detach() "
            "under a condition, a forward hook or pre-hook, an in-place write into a slice of a tensor "
            "(h[:, 2] = ...), or state kept between calls. Fix: write that part with out-of-place tensor ops "
            "(torch.cat, torch.where, h * mask), remove the hook while explaining, or explain the sub-modules "
            "before and after it."
        )


def _reaches(u: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether autograd's graph of ``u`` leads back to ``t`` (``u`` was computed from ``t``).

    Matched by graph edge, ``(grad_fn, output_nr)``, from ``u``'s inputs on: two outputs of one op (``q, k =
    qk.chunk(2)``) share a ``grad_fn`` but neither is computed from the other.
    """
    target = (t.grad_fn, t.output_nr) if t.grad_fn is not None else None
    seen: set[tuple[int, int]] = set()
    stack = list(u.grad_fn.next_functions) if u.grad_fn is not None else []
    while stack:
        fn, nr = stack.pop()
        if fn is None or (id(fn), nr) in seen:
            continue
        seen.add((id(fn), nr))
        if (target is not None and fn is target[0] and nr == target[1]) or (
            target is None and getattr(fn, "variable", None) is t
        ):
            return True
        stack.extend(fn.next_functions)
    return False


def _own_parts(live: list[torch.Tensor], total: list[torch.Tensor | None]) -> dict[int, torch.Tensor | None]:
    """Each input's own part of an opaque node's vector-Jacobian product, by ``id`` of the input.

    ``autograd.grad(out, inputs)`` gives the *total* derivative: into ``x`` it also runs through any other input
    computed from ``x`` (an attention called as ``mha(x, k(x), v(x))``), which the explainer adds along those
    inputs' own paths as well. Every path from an input into the node enters it through exactly one input, the
    last on the path, so ``own(t) = total(t) - Σ_u (du/dt)ᵀ own(u)`` over the inputs ``u`` computed from ``t``,
    taken with ``u`` before ``t``.
    """
    by_id = {id(t): r for t, r in zip(live, total, strict=True)}
    after = {id(t): [u for u in live if u is not t and _reaches(u, t)] for t in live}
    if not any(after.values()):
        return by_id
    done: set[int] = set()
    pending = list(live)
    while pending:
        t = next((t for t in pending if all(id(u) in done for u in after[id(t)])), None)
        if t is None:  # (a cycle cannot happen in autograd's graph; keep the totals rather than loop)
            break
        pending = [p for p in pending if p is not t]  # (by identity: == on tensors compares their values)
        own = by_id[id(t)]
        for u in after[id(t)]:
            g_u = by_id[id(u)]
            if own is None or g_u is None:
                continue
            (through,) = torch.autograd.grad(u, t, grad_outputs=g_u, allow_unused=True, retain_graph=True)
            if through is not None:
                own = own - through
        by_id[id(t)] = own
        done.add(id(t))
    return by_id


def _vjps(out: torch.Tensor, g: torch.Tensor | None, ins: list[torch.Tensor | None]) -> list[np.ndarray | None]:
    """Torch's vector-Jacobian product of ``out`` into each input, given its dJ/d(out) ``g``."""
    live = [t for t in ins if isinstance(t, torch.Tensor) and t.requires_grad]
    if g is None or not live or not out.requires_grad:
        return [None if t is None else np.zeros(tuple(t.shape)) for t in ins]
    got = torch.autograd.grad(out, live, grad_outputs=g, allow_unused=True, retain_graph=True)
    by_id = _own_parts(live, list(got))
    res: list[np.ndarray | None] = []
    for t in ins:
        if t is None or id(t) not in by_id:
            res.append(None)
        else:
            r = by_id[id(t)]
            res.append(_np(r) if r is not None else np.zeros(tuple(t.shape)))
    return res
