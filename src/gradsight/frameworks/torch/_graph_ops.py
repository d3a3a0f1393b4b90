"""Torch graph → neutral graph nodes: one handler per module type and per function / method / aten op.

:class:`Converter` walks a traced ``torch.fx`` graph (from ``symbolic_trace`` or ``torch.export``) whose every
node was run once and recorded (concrete arguments and output), and writes one
:class:`~gradsight.explain._graph.GraphNode` per op, with the op's configuration read from the concrete
arguments. Python values computed in ``forward`` (``x.size(0)``, shapes, scalars) are folded into constants;
tensors that no gradient can reach (masks, integer ids derived from x, buffers) become constants too. An op
without a handler, or one the handler cannot express (``alpha != 1``, a random dropout mask), becomes an
``"opaque"`` node whose terms are autodiff only; it is never refused.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..._errors import UnsupportedError
from ...explain._graph import GraphNode, param_term, unique_name

__all__ = ["Const", "Converter"]


@dataclass
class Const:
    """A value that no gradient reaches: a Python number, a shape, a mask, a buffer, integer ids."""

    value: Any


@dataclass
class _Tuple:
    """A recorded op that returned several tensors (split, chunk, max with dim, MultiheadAttention...)."""

    fx_node: fx.Node
    kind: str  # "split", "unbind", "max", "mha", "other"
    neutral: str = ""  # mha: the node holding output 0


_OPERATORS: dict[Any, str] = {
    operator.add: "add",
    operator.iadd: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    operator.neg: "neg",
    operator.matmul: "matmul",
    operator.pow: "pow",
    operator.getitem: "getitem",
}

#: module types → elementwise activation rule names (parameters read by _module_act).
_ACT_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.Softplus: "softplus",
}

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_RESHAPES = frozenset(
    {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
)
_IDENTITIES = frozenset(
    {"contiguous", "clone", "to", "type", "float", "double", "alias", "lift_fresh_copy", "_to_copy"}
)
_UNARY = frozenset({"neg", "exp", "log", "sqrt", "rsqrt", "reciprocal", "abs", "square", "sin", "cos"})
_ACT_FUNCS = frozenset({"relu", "gelu", "silu", "tanh", "sigmoid", "leaky_relu", "elu", "softplus"})


def fname(n: fx.Node) -> str:
    """The canonical op name of a call node (``"add"`` for ``operator.add``, ``torch.add``, ``x.add``, ``aten.add``).

    In-place spellings map to their functional name (``add_`` → ``add``).
    """
    if n.op == "call_method":
        name = str(n.target)
    elif isinstance(n.target, torch._ops.OpOverload):
        name = n.target._opname
    elif n.target in _OPERATORS:
        return _OPERATORS[n.target]
    else:
        name = getattr(n.target, "__name__", str(n.target))
    if name.endswith("_") and not name.startswith("_") and name not in ("_",):
        name = name[:-1]  # add_ -> add, relu_ -> relu
    return {"true_divide": "div", "divide": "div", "multiply": "mul", "subtract": "sub", "negative": "neg"}.get(
        name, name
    )


def _is_aten(n: fx.Node) -> bool:
    return isinstance(n.target, torch._ops.OpOverload)


def _arg(args: tuple, kwargs: dict, k: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[k] if len(args) > k else default


def _dims(d: Any, ndim: int) -> tuple[int, ...] | None:
    if d is None:
        return None
    if isinstance(d, (int, np.integer)):
        d = [d]
    d = list(d)
    if not d:
        return None
    return tuple(int(a) % ndim for a in d)


def _pair(v: Any, nd: int) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * nd


def conv_pads(padding: Any, k: tuple[int, ...], dil: tuple[int, ...]) -> tuple[tuple[int, int], ...] | None:
    """Explicit ``(lo, hi)`` pads per spatial axis from torch's ``padding`` (ints, ``'valid'``, ``'same'``)."""
    nd = len(k)
    if padding == "valid":
        return ((0, 0),) * nd
    if padding == "same":
        out = []
        for ki, di in zip(k, dil, strict=True):
            total = di * (ki - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    if isinstance(padding, str):
        return None
    p = _pair(padding, nd)
    return tuple((a, a) for a in p)


class Converter:
    """Builds the neutral nodes of one recorded fx graph (see the module docstring).

    Args:
        gm: the traced graph module.
        rec: fx node name → ``(args, kwargs, output)`` as run.
        param_keys: ``id(parameter tensor)`` → its name in the model (``"blocks.0.fc.weight"``).
        frozen: ids of the parameters that were frozen.
        input_name: the placeholder that receives x.
    """

    def __init__(self, gm: fx.GraphModule, rec: dict, param_keys: dict[int, str], frozen: set[int], input_name: str):
        self.gm = gm
        self.rec = rec
        self.param_keys = param_keys
        self.frozen = frozen
        self.input_name = input_name
        self.nodes: list[GraphNode] = []
        self.ref: dict[str, Any] = {}  # fx node name -> neutral name | Const | _Tuple | ("param", tensor)
        self.tensors: dict[str, torch.Tensor] = {}  # neutral name -> the tensor it recorded
        self.opaque_ins: dict[str, list[torch.Tensor | None]] = {}  # opaque neutral name -> its input tensors
        self.param_names: dict[int, str] = {}  # id(param) -> neutral node name
        self.taken: set[str] = set()
        self.counts: dict[tuple[str, str], int] = {}
        self.notes: list[str] = []
        self.output: str = ""
        self.scope_ops: dict[str, int] = {}  # module path -> how many tensor ops run directly in it
        self.scope_last: dict[str, str] = {}  # module path -> the last node run in it or in its sub-modules
        for n in gm.graph.nodes:
            if n.op not in ("call_function", "call_method", "call_module"):
                continue
            if not isinstance(rec.get(n.name, (0, 0, None))[2], (torch.Tensor, tuple, list)):
                continue
            for path in self._scopes(n):
                self.scope_last[path] = n.name
            if n.op != "call_module":
                sc = self._scope(n)
                self.scope_ops[sc] = self.scope_ops.get(sc, 0) + 1

    # ----------------------------------------------------------------------------------------- plumbing
    def _scopes(self, n: fx.Node) -> list[str]:
        """The module paths a node runs in, outermost first (from ``nn_module_stack``)."""
        out = []
        for v in (n.meta.get("nn_module_stack") or {}).values():
            path = v[0] if isinstance(v, tuple) else v
            out.append(str(path).replace("L['self'].", "").replace("L__self___", ""))
        return out

    def _scope(self, n: fx.Node) -> str:
        scopes = self._scopes(n)
        return scopes[-1] if scopes else ""

    def _name(self, n: fx.Node, base: str | None = None, owners: frozenset[str] = frozenset()) -> str:
        if n.op == "call_module" and base is None:
            return unique_name(str(n.target), self.taken)
        scope = self._scope(n)
        single = self.scope_ops.get(scope) == 1 and self.scope_last.get(scope) == n.name
        if scope and scope not in self.taken and (scope in owners or single):
            self.taken.add(scope)  # the one op a module's output comes from, or the one reading its parameters
            return scope
        owner = next(iter(owners)) if len(owners) == 1 else ""
        if owner and owner.startswith(scope) and owner not in self.taken:
            self.taken.add(owner)  # F.linear(x, self.out_proj.weight, ...): named after its parameters' owner
            return owner
        op = base or fname(n)
        k = self.counts.get((scope, op), 0)
        self.counts[(scope, op)] = k + 1
        stem = op if k == 0 else f"{op}_{k}"
        return unique_name(f"{scope}.{stem}" if scope else stem, self.taken)

    def param(self, t: torch.Tensor, key: str | None = None) -> str:
        """The neutral node of a parameter tensor (created on first use, just before its first consumer)."""
        if id(t) in self.param_names:
            return self.param_names[id(t)]
        key = self.param_keys.get(id(t), key or f"param{len(self.param_names)}")
        term, _ = param_term(key)
        if any(nd.term == term for nd in self.nodes):
            term = f"dJ/dW[{key}]"
        name = unique_name(key, self.taken)
        kind = "weight" if term.startswith("dJ/dW") else "bias"
        self.nodes.append(
            GraphNode(
                name,
                "param",
                term=term,
                key=key,
                frozen=id(t) in self.frozen,
                type_name=f"nn.Parameter {tuple(t.shape)}",
                layout=f"torch {kind} {tuple(t.shape)}",
            )
        )
        self.tensors[name] = t
        self.param_names[id(t)] = name
        return name

    def inp(self, a: Any, value: Any) -> tuple[str, Any]:
        """``(producer name, "")``-style input: the neutral node an fx argument refers to, or a constant."""
        if isinstance(a, fx.Node):
            r = self.ref.get(a.name)
            if isinstance(r, str):
                return r, None
            if isinstance(r, tuple) and r[0] == "param":
                return self.param(r[1]), None
            if isinstance(r, Const):
                return "", _np_const(r.value)
            return "", _np_const(value)
        if isinstance(value, nn.Parameter):
            return self.param(value), None
        return "", _np_const(value)

    def add(
        self,
        n: fx.Node,
        op: str,
        ins: list[tuple[str, Any]],
        attrs: dict | None,
        type_name: str,
        out: torch.Tensor,
        base: str | None = None,
        layout: str = "",
        name: str | None = None,
    ) -> str:
        """Append an op node reading ``ins`` (each ``(producer, const)``) and map ``n`` to it."""
        owners = frozenset(
            param_term(nd.key)[1] for nd in self.nodes if nd.op == "param" and nd.name in {src for src, _ in ins}
        )
        name = name or self._name(n, base, owners)
        nd = GraphNode(
            name,
            op,
            inputs=[src for src, _ in ins],
            consts={k: c for k, (src, c) in enumerate(ins) if not src},
            attrs=attrs or {},
            type_name=type_name,
            layout=layout,
        )
        self.nodes.append(nd)
        self.tensors[name] = out
        self.ref[n.name] = name
        return name

    def opaque(
        self,
        n: fx.Node,
        out: torch.Tensor,
        type_name: str,
        reason: str,
        extra: list[torch.Tensor] = (),
        args_of: fx.Node | None = None,
    ) -> str:
        """An autodiff-only node for ``n``.

        It reads every tensor argument of ``args_of`` (default ``n``) and the ``extra`` parameters.
        """
        ins: list[tuple[str, Any]] = []
        tens: list[torch.Tensor | None] = []
        for a, v in self._tensor_args(args_of or n):
            src, _ = self.inp(a, v)
            if src and src not in [i for i, _ in ins]:
                ins.append((src, None))
                tens.append(v)
        for p in extra:
            ins.append((self.param(p), None))
            tens.append(p)
        name = self.add(n, "opaque", ins, {}, type_name, out)
        self.nodes[-1].reason = reason
        self.opaque_ins[name] = tens
        return name

    def _tensor_args(self, n: fx.Node, depth: int = 0):
        """``(fx node, tensor)`` of every tensor argument of ``n``.

        An argument that is a tuple of tensors (an LSTM's state) stands for the tensor arguments of its producer.
        """
        args, kwargs, _ = self.rec[n.name]
        for a, v in [*_pairs(n.args, args), *_pairs(n.kwargs, kwargs)]:
            r = self.ref.get(a.name)
            if isinstance(r, _Tuple) and depth < 8:
                yield from self._tensor_args(r.fx_node, depth + 1)
            elif isinstance(v, torch.Tensor):
                yield a, v

    # --------------------------------------------------------------------------------------------- walk
    def convert(self) -> None:
        """Convert every node of the graph, in order."""
        for n in self.gm.graph.nodes:
            if n.op == "output":
                self._output(n)
                continue
            args, kwargs, out = self.rec.get(n.name, ((), {}, None))
            if n.op == "placeholder":
                self._placeholder(n, out)
            elif n.op == "get_attr":
                self.ref[n.name] = (
                    ("param", out) if isinstance(out, nn.Parameter) or id(out) in self.param_keys else Const(out)
                )
            elif isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in _flat(out)):
                self._tuple(n, args, kwargs, out)
            elif not isinstance(out, torch.Tensor) or not _differentiable(out):
                self.ref[n.name] = Const(out)
            elif n.op == "call_module":
                self._module(n, self.gm.get_submodule(str(n.target)), args, kwargs, out)
            else:
                self._function(n, fname(n), args, kwargs, out)

    def _placeholder(self, n: fx.Node, out: Any) -> None:
        if n.name == self.input_name:
            self.nodes.append(GraphNode(n.name, "input", term=f"dJ/dA[{n.name}]", type_name="input", layout=""))
            self.taken.add(n.name)
            self.tensors[n.name] = out
            self.ref[n.name] = n.name
        else:
            self.ref[n.name] = Const(out)

    def _output(self, n: fx.Node) -> None:
        a = n.args[0]
        while isinstance(a, (tuple, list)) and a:
            a = a[0]
        if isinstance(a, dict) and a:
            a = next(iter(a.values()))
        r = self.ref.get(a.name) if isinstance(a, fx.Node) else None
        if isinstance(r, _Tuple) and r.neutral:
            r = r.neutral
        if not isinstance(r, str):
            what = "a tuple" if isinstance(r, _Tuple) else "not a tensor computed from x"
            raise UnsupportedError(
                f"the model's output is {what}: explain follows a model whose output is one tensor computed from x "
                "(nn.LSTM / nn.GRU return (output, state)). Fix: wrap the model so that forward returns the tensor "
                "the loss reads, e.g. `out, _ = self.lstm(x); return self.head(out)`."
            )
        if n.args and isinstance(n.args[0], (tuple, list, dict)):
            self.notes.append(f"the model returned several values; explain follows the first tensor, A[{r}]")
        self.output = r

    # ------------------------------------------------------------------------------------------- tuples
    def _tuple(self, n: fx.Node, args: tuple, kwargs: dict, out: tuple) -> None:
        f = fname(n) if n.op != "call_module" else ""
        mod = self.gm.get_submodule(str(n.target)) if n.op == "call_module" else None
        if f in ("split", "split_with_sizes", "chunk", "tensor_split"):
            self.ref[n.name] = _Tuple(n, "split")
        elif f in ("unbind",):
            self.ref[n.name] = _Tuple(n, "unbind")
        elif f in ("max", "min") and len(out) == 2 and out[1] is not None and not out[1].is_floating_point():
            self.ref[n.name] = _Tuple(n, "max")
        elif isinstance(mod, nn.MultiheadAttention):
            name = self._mha(n, mod, args, kwargs, out[0])
            self.ref[n.name] = _Tuple(n, "mha", name)
        else:
            self.ref[n.name] = _Tuple(n, "other")

    def _getitem(self, n: fx.Node, args: tuple, out: torch.Tensor) -> None:
        t: _Tuple = self.ref[n.args[0].name]
        i = int(args[1])
        pargs, pkw, pout = self.rec[t.fx_node.name]
        src_fx = t.fx_node.args[0]
        x = pargs[0]
        if t.kind in ("split", "unbind"):
            dim = int(_arg(pargs, pkw, 1 if t.kind == "unbind" else 2, "dim", 0)) % x.ndim
            if t.kind == "unbind":
                key = (slice(None),) * dim + (i,)
            else:
                start = sum(int(o.shape[dim]) for o in pout[:i])
                key = (slice(None),) * dim + (slice(start, start + int(pout[i].shape[dim])),)
            self.add(n, "index", [self.inp(src_fx, x)], {"key": key}, f"{fname(t.fx_node)}[{i}]", out, base="getitem")
        elif t.kind == "max" and i == 0:
            dim = int(_arg(pargs, pkw, 1, "dim"))
            keep = bool(_arg(pargs, pkw, 2, "keepdim", False))
            self.add(
                n, "max", [self.inp(src_fx, x)], {"axes": (dim % x.ndim,), "keepdims": keep, "ties": "first"},
                f"torch.{fname(t.fx_node)}(dim).values", out, base=fname(t.fx_node),
            )  # fmt: skip
        elif t.kind == "mha" and i == 0:
            self.ref[n.name] = t.neutral
        else:
            mod = self.gm.get_submodule(str(t.fx_node.target)) if t.fx_node.op == "call_module" else None
            extra = list(mod.parameters()) if mod is not None else []
            what = type(mod).__name__ if mod is not None else fname(t.fx_node)
            self.opaque(n, out, f"{what}[{i}]", f"no rule for output {i} of {what}", extra, args_of=t.fx_node)

    # ------------------------------------------------------------------------------------------ modules
    def _module(self, n: fx.Node, m: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        handler = _MODULES.get(type(m))
        if handler is None and not overrides_forward(m):  # a subclass with a forward of its own has no rule
            for cls, h in _MODULES.items():
                if isinstance(m, cls):
                    handler = h
                    break
        if handler is None or not handler(self, n, m, args, kwargs, out):
            self.opaque(n, out, f"nn.{type(m).__name__}", f"no rule for {type(m).__name__}", list(m.parameters()))

    def _mp(self, m: nn.Module, n: fx.Node, attr: str) -> tuple[str, Any]:
        """A module's parameter as an input (a constant when it is None or a plain tensor)."""
        p = getattr(m, attr, None)
        if p is None:
            return "", None
        if isinstance(p, nn.Parameter):
            return self.param(p, f"{n.target}.{attr}"), None
        return "", _np_const(p)

    def _mha(self, n: fx.Node, m: nn.MultiheadAttention, args: tuple, kwargs: dict, out: torch.Tensor) -> str:
        q_fx, k_fx, v_fx = (
            _arg(n.args, n.kwargs, 0, "query"),
            _arg(n.args, n.kwargs, 1, "key"),
            _arg(n.args, n.kwargs, 2, "value"),
        )
        q, k, v = _arg(args, kwargs, 0, "query"), _arg(args, kwargs, 1, "key"), _arg(args, kwargs, 2, "value")
        problems = []
        if not m._qkv_same_embed_dim:
            problems.append("kdim/vdim differ from embed_dim")
        if m.bias_k is not None or m.add_zero_attn:
            problems.append("add_bias_kv / add_zero_attn")
        if m.training and m.dropout > 0:
            problems.append(f"dropout={m.dropout} in training mode (a random mask)")
        mask = _arg(args, kwargs, 5, "attn_mask")
        if _arg(args, kwargs, 3, "key_padding_mask") is not None or _arg(args, kwargs, 7, "is_causal", False):
            problems.append("key_padding_mask / is_causal")
        if problems:
            name = self.opaque(
                n,
                out,
                "nn.MultiheadAttention",
                "no rule for MultiheadAttention with " + ", ".join(problems),
                list(m.parameters()),
            )
            self.ref[n.name] = name
            return name
        attrs = {"heads": m.num_heads, "batch_first": bool(m.batch_first), "layout": "torch"}
        if mask is not None:
            attrs["mask"] = (
                mask.detach().cpu().numpy() if mask.dtype == torch.bool else mask.detach().cpu().double().numpy()
            )
            attrs["mask_true_blocks"] = True  # MultiheadAttention: True marks a position that may NOT be attended
        ins = [self.inp(q_fx, q), self.inp(k_fx, k), self.inp(v_fx, v), self._mp(m, n, "in_proj_weight")]
        ins += [self._mp(m, n, "in_proj_bias"), self._mp(m.out_proj, n, "weight"), self._mp(m.out_proj, n, "bias")]
        # out_proj's parameters are named under the sub-module
        ins[5] = (self.param(m.out_proj.weight, f"{n.target}.out_proj.weight"), None)
        if m.out_proj.bias is not None:
            ins[6] = (self.param(m.out_proj.bias, f"{n.target}.out_proj.bias"), None)
        return self.add(
            n, "mha", ins, attrs, "nn.MultiheadAttention", out, layout="(n, L, E)" if m.batch_first else "(L, n, E)"
        )

    # ---------------------------------------------------------------------------------------- functions
    def _function(self, n: fx.Node, f: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        if f == "getitem" and isinstance(
            self.ref.get(n.args[0].name if isinstance(n.args[0], fx.Node) else ""), _Tuple
        ):
            self._getitem(n, args, out)
            return
        handler = _FUNCTIONS.get(f)
        tname = f"aten.{f}" if _is_aten(n) else (f"Tensor.{f}" if n.op == "call_method" else f"torch.{f}")
        if handler is None or not handler(self, n, f, args, kwargs, out, tname):
            self.opaque(n, out, tname, f"no rule for {tname}")


def _flat(obj: Any):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flat(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flat(o)
    else:
        yield obj


def _pairs(fx_obj: Any, value: Any):
    """``(fx node, its concrete value)`` for every node in an fx argument structure (lists, tuples, dicts)."""
    if isinstance(fx_obj, fx.Node):
        yield fx_obj, value
    elif isinstance(fx_obj, (list, tuple)) and isinstance(value, (list, tuple)):
        for a, v in zip(fx_obj, value, strict=False):
            yield from _pairs(a, v)
    elif isinstance(fx_obj, dict) and isinstance(value, dict):
        for k, a in fx_obj.items():
            yield from _pairs(a, value.get(k))


def _np_const(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu()
        return t.numpy().copy() if not t.is_floating_point() else t.to(torch.float64).numpy().copy()
    return v


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.requires_grad


# --------------------------------------------------------------------------------------- module handlers
def _m_linear(c: Converter, n, m: nn.Linear, args, kwargs, out) -> bool:
    ins = [c.inp(n.args[0], args[0]), c._mp(m, n, "weight")]
    if m.bias is not None:
        ins.append(c._mp(m, n, "bias"))
    c.add(n, "linear", ins, {"layout": "out_in"}, f"nn.Linear({m.in_features}→{m.out_features})", out)
    return True


def _m_conv(c: Converter, n, m: nn.Conv1d | nn.Conv2d, args, kwargs, out) -> bool:
    nd = 1 if isinstance(m, nn.Conv1d) else 2
    if m.padding_mode != "zeros":
        return False
    pads = conv_pads(m.padding, tuple(m.kernel_size), tuple(m.dilation))
    if pads is None:
        return False
    attrs = {
        "nd": nd,
        "stride": tuple(m.stride),
        "pads": pads,
        "dilation": tuple(m.dilation),
        "groups": int(m.groups),
        "channels_last": False,
        "weight_layout": "oi",
    }
    ins = [c.inp(n.args[0], args[0]), c._mp(m, n, "weight")] + ([c._mp(m, n, "bias")] if m.bias is not None else [])
    c.add(
        n,
        "conv",
        ins,
        attrs,
        f"nn.{type(m).__name__}({m.in_channels}→{m.out_channels}, k={m.kernel_size})",
        out,
        layout="NCHW" if nd == 2 else "NCL",
    )
    return True


def _m_bn(c: Converter, n, m: nn.modules.batchnorm._BatchNorm, args, kwargs, out) -> bool:
    training = m.training or not m.track_running_stats
    ins = [c.inp(n.args[0], args[0])]
    ins.append(c._mp(m, n, "weight") if m.affine else ("", 1.0))
    ins.append(c._mp(m, n, "bias") if m.affine else ("", 0.0))
    ins.append(("", _np_const(m.running_mean) if m.running_mean is not None else 0.0))
    ins.append(("", _np_const(m.running_var) if m.running_var is not None else 1.0))
    attrs = {
        "axis": 1,
        "eps": float(m.eps),
        "training": bool(training),
        "const_names": {3: "running_mean", 4: "running_var"},
    }
    mode = "training: batch statistics" if training else "eval: running statistics"
    c.add(n, "batch_norm", ins, attrs, f"nn.{type(m).__name__}({m.num_features}, {mode})", out)
    return True


def _m_ln(c: Converter, n, m: nn.LayerNorm, args, kwargs, out) -> bool:
    ins = [c.inp(n.args[0], args[0])]
    if m.weight is not None:
        ins.append(c._mp(m, n, "weight"))
        if m.bias is not None:
            ins.append(c._mp(m, n, "bias"))
    c.add(
        n,
        "layer_norm",
        ins,
        {"n_axes": len(m.normalized_shape), "eps": float(m.eps)},
        f"nn.LayerNorm({tuple(m.normalized_shape)})",
        out,
    )
    return True


def _m_rms(c: Converter, n, m: nn.Module, args, kwargs, out) -> bool:
    eps = m.eps if m.eps is not None else torch.finfo(args[0].dtype).eps
    ins = [c.inp(n.args[0], args[0])] + ([c._mp(m, n, "weight")] if m.weight is not None else [])
    c.add(
        n,
        "rms_norm",
        ins,
        {"n_axes": len(m.normalized_shape), "eps": float(eps)},
        f"nn.RMSNorm({tuple(m.normalized_shape)})",
        out,
    )
    return True


def _m_emb(c: Converter, n, m: nn.Embedding, args, kwargs, out) -> bool:
    if m.max_norm is not None or m.scale_grad_by_freq:
        return False  # max_norm renormalises (and rewrites) the weight rows in forward; the other scales the rows
    ins = [c.inp(n.args[0], args[0]), c._mp(m, n, "weight")]
    c.add(
        n, "embedding", ins, {"padding_idx": m.padding_idx}, f"nn.Embedding({m.num_embeddings}, {m.embedding_dim})", out
    )
    return True


def _m_act(c: Converter, n, m: nn.Module, args, kwargs, out) -> bool:
    name = _ACT_MODULES[type(m)]
    params: dict[str, Any] = {}
    if name == "gelu" and m.approximate == "tanh":
        name = "gelu_tanh"
    elif name == "leaky_relu":
        params = {"slope": float(m.negative_slope)}
    elif name == "elu":
        params = {"alpha": float(m.alpha)}
    elif name == "softplus":
        params = {"beta": float(m.beta), "threshold": float(m.threshold)}
    c.add(n, "act", [c.inp(n.args[0], args[0])], {"name": name, "params": params}, f"nn.{type(m).__name__}", out)
    return True


def _m_softmax(c: Converter, n, m: nn.Module, args, kwargs, out) -> bool:
    dim = m.dim if m.dim is not None else (0 if args[0].ndim in (0, 1, 3) else 1)
    op = "log_softmax" if isinstance(m, nn.LogSoftmax) else "softmax"
    c.add(
        n,
        op,
        [c.inp(n.args[0], args[0])],
        {"axis": int(dim) % args[0].ndim},
        f"nn.{type(m).__name__}(dim={m.dim})",
        out,
    )
    return True


def _m_identity(c: Converter, n, m: nn.Module, args, kwargs, out) -> bool:
    if isinstance(m, _DROPOUTS) and m.training and m.p > 0:
        return False
    what = "dropout at inference" if isinstance(m, _DROPOUTS) else ""
    c.add(n, "identity", [c.inp(n.args[0], args[0])], {"what": what}, f"nn.{type(m).__name__}", out)
    return True


def _m_reshape(c: Converter, n, m: nn.Module, args, kwargs, out) -> bool:
    c.add(n, "reshape", [c.inp(n.args[0], args[0])], {"shape": tuple(out.shape)}, f"nn.{type(m).__name__}", out)
    return True


def _m_pool(c: Converter, n, m: nn.Module, args, kwargs, out) -> bool:
    nd = 1 if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d)) else 2
    kind = "max" if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) else "avg"
    if getattr(m, "ceil_mode", False) or _pair(getattr(m, "dilation", 1), nd) != (1,) * nd:
        return False
    if kind == "max" and getattr(m, "return_indices", False):
        return False
    if kind == "avg" and getattr(m, "divisor_override", None) is not None:
        return False
    k = _pair(m.kernel_size, nd)
    s = _pair(m.stride if m.stride is not None else m.kernel_size, nd)
    p = _pair(m.padding, nd)
    attrs = {"nd": nd, "kind": kind, "kernel": k, "stride": s, "pads": tuple((a, a) for a in p), "channels_last": False}
    if kind == "avg":
        attrs["count_include_pad"] = bool(m.count_include_pad)
    c.add(n, "pool", [c.inp(n.args[0], args[0])], attrs, f"nn.{type(m).__name__}", out)
    return True


def _m_adaptive(c: Converter, n, m: nn.Module, args, kwargs, out) -> bool:
    size = _pair(m.output_size, 1 if isinstance(m, nn.AdaptiveAvgPool1d) else 2)
    x = args[0]
    if any(s not in (1, None) for s in size):
        return False
    axes = tuple(range(x.ndim - len(size), x.ndim))
    c.add(
        n,
        "mean",
        [c.inp(n.args[0], x)],
        {"axes": axes, "keepdims": True},
        f"nn.{type(m).__name__}({m.output_size})",
        out,
    )
    return True


_MODULES: dict[type, Callable[..., bool]] = {
    nn.Linear: _m_linear,
    nn.Conv1d: _m_conv,
    nn.Conv2d: _m_conv,
    nn.BatchNorm1d: _m_bn,
    nn.BatchNorm2d: _m_bn,
    nn.LayerNorm: _m_ln,
    nn.Embedding: _m_emb,
    nn.Softmax: _m_softmax,
    nn.LogSoftmax: _m_softmax,
    nn.Identity: _m_identity,
    nn.Flatten: _m_reshape,
    nn.Unflatten: _m_reshape,
    nn.MaxPool1d: _m_pool,
    nn.MaxPool2d: _m_pool,
    nn.AvgPool1d: _m_pool,
    nn.AvgPool2d: _m_pool,
    nn.AdaptiveAvgPool1d: _m_adaptive,
    nn.AdaptiveAvgPool2d: _m_adaptive,
    **{cls: _m_act for cls in _ACT_MODULES},
    **{cls: _m_identity for cls in _DROPOUTS},
}
if hasattr(nn, "RMSNorm"):
    _MODULES[nn.RMSNorm] = _m_rms


# ------------------------------------------------------------------------------------- function handlers
def _x(c: Converter, n, args, k: int = 0):
    return c.inp(n.args[k] if len(n.args) > k else None, args[k])


def _f_binary(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    alpha = kwargs.get("alpha", 1)
    if alpha != 1 or len(args) < 2:
        return False
    a_fx = n.args[0] if len(n.args) > 0 else None
    b_fx = n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
    a, b = c.inp(a_fx, args[0]), c.inp(b_fx, args[1] if len(args) > 1 else kwargs.get("other"))
    op = {"rsub": "sub"}.get(f, f)
    if f == "rsub":
        a, b = b, a
    if f == "div" and kwargs.get("rounding_mode") is not None:
        return False
    c.add(n, op, [a, b], {}, tname, out)
    return True


def _f_pow(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    a, b = c.inp(n.args[0], args[0]), c.inp(n.args[1] if len(n.args) > 1 else None, args[1])
    if not a[0] or b[0] or np.ndim(b[1]) != 0:
        return False
    c.add(n, "pow", [a, b], {}, tname, out)
    return True


def _f_unary(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    c.add(n, f, [_x(c, n, args)], {}, tname, out)
    return True


def _f_act(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    name, params = f, {}
    if f == "gelu" and _arg(args, kwargs, 1, "approximate", "none") == "tanh":
        name = "gelu_tanh"
    elif f == "leaky_relu":
        params = {"slope": float(_arg(args, kwargs, 1, "negative_slope", 0.01))}
    elif f == "elu":
        params = {"alpha": float(_arg(args, kwargs, 1, "alpha", 1.0))}
        if _arg(args, kwargs, 2, "scale", 1.0) != 1.0:
            return False
    elif f == "softplus":
        params = {
            "beta": float(_arg(args, kwargs, 1, "beta", 1.0)),
            "threshold": float(_arg(args, kwargs, 2, "threshold", 20.0)),
        }
    c.add(n, "act", [_x(c, n, args)], {"name": name, "params": params}, tname, out)
    return True


def _f_softmax(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    dim = _arg(args, kwargs, 1, "dim")
    if dim is None:
        return False
    op = "log_softmax" if "log" in f else "softmax"
    c.add(n, op, [_x(c, n, args)], {"axis": int(dim) % args[0].ndim}, tname, out)
    return True


def _f_matmul(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    if args[0].ndim < 2 or args[1].ndim < 2:
        return False
    c.add(n, "matmul", [_x(c, n, args, 0), _x(c, n, args, 1)], {}, tname, out)
    return True


def _f_linear(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    b_fx = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    ins = [_x(c, n, args, 0), _x(c, n, args, 1)]
    b = _arg(args, kwargs, 2, "bias")
    if b is not None:
        ins.append(c.inp(b_fx, b))
    c.add(n, "linear", ins, {"layout": "out_in"}, tname, out)
    return True


def _f_addmm(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    if _arg(args, kwargs, 3, "beta", 1) != 1 or _arg(args, kwargs, 4, "alpha", 1) != 1:
        return False
    ins = [_x(c, n, args, 1), _x(c, n, args, 2), _x(c, n, args, 0)]
    c.add(n, "linear", ins, {"layout": "in_out"}, tname, out)
    return True


def _f_reshape(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    c.add(n, "reshape", [_x(c, n, args)], {"shape": tuple(out.shape)}, tname, out)
    return True


def _f_identity(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    if tuple(out.shape) != tuple(args[0].shape):
        return False
    c.add(n, "identity", [_x(c, n, args)], {"what": f}, tname, out)
    return True


def _f_detach(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    c.add(n, "detach", [_x(c, n, args)], {}, tname, out)
    return True


def _f_transpose(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    x = args[0]
    nd = x.ndim
    if f in ("t", "numpy_T"):
        perm = tuple(reversed(range(nd)))
    elif f in ("permute",):
        dims = args[1:] if len(args) > 2 else _arg(args, kwargs, 1, "dims")
        perm = tuple(int(d) % nd for d in (dims if isinstance(dims, (list, tuple)) else [dims]))
    else:
        d0, d1 = int(_arg(args, kwargs, 1, "dim0")) % nd, int(_arg(args, kwargs, 2, "dim1")) % nd
        p = list(range(nd))
        p[d0], p[d1] = p[d1], p[d0]
        perm = tuple(p)
    c.add(n, "permute", [_x(c, n, args)], {"perm": perm}, tname, out)
    return True


def _f_getitem(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    key = args[1]
    parts = key if isinstance(key, tuple) else (key,)
    if any(isinstance(k, (torch.Tensor, list, np.ndarray)) for k in parts):
        return False
    c.add(n, "index", [_x(c, n, args)], {"key": key}, tname, out, base="getitem")
    return True


def _f_select(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    x = args[0]
    dim = int(_arg(args, kwargs, 1, "dim")) % x.ndim
    if f == "select":
        key = (slice(None),) * dim + (int(_arg(args, kwargs, 2, "index")),)
    elif f == "narrow":
        start, length = int(_arg(args, kwargs, 2, "start")), int(_arg(args, kwargs, 3, "length"))
        key = (slice(None),) * dim + (slice(start, start + length),)
    else:  # aten.slice.Tensor(self, dim, start, end, step)
        start, end, step = (
            _arg(args, kwargs, 2, "start"),
            _arg(args, kwargs, 3, "end"),
            _arg(args, kwargs, 4, "step", 1),
        )
        end = None if end is not None and end >= 2**62 else end
        key = (slice(None),) * dim + (slice(start, end, step),)
    c.add(n, "index", [_x(c, n, args)], {"key": key}, tname, out)
    return True


#: torch.nn classes a user's module extends without being one of its layers
_CONTAINERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def overrides_forward(m: nn.Module) -> bool:
    """Whether ``m``'s class subclasses a torch.nn layer and replaces its ``forward`` (the layer's rule is not its)."""
    if type(m).__module__.startswith("torch."):
        return False
    base = next((c for c in type(m).__mro__ if c.__module__.startswith("torch.nn.")), None)
    return base not in (None, *_CONTAINERS) and type(m).forward is not base.forward


def _f_cat(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    tensors_fx = n.args[0] if n.args else n.kwargs.get("tensors")
    if not isinstance(tensors_fx, (list, tuple)):  # one node holding the tuple (torch.cat(h.chunk(3))): no rule
        return False
    tensors = _arg(args, kwargs, 0, "tensors")
    dim = int(_arg(args, kwargs, 1, "dim", 0))
    ins = [c.inp(a, v) for a, v in zip(tensors_fx, tensors, strict=True)]
    attrs = {"axis": dim % out.ndim, "stack": f == "stack"}
    c.add(n, "concat", ins, attrs, tname, out)
    return True


def _f_expand(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    c.add(n, "expand", [_x(c, n, args)], {"shape": tuple(out.shape)}, tname, out)
    return True


def _f_reduce(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    x = args[0]
    dim = _arg(args, kwargs, 1, "dim")
    keep = bool(_arg(args, kwargs, 2, "keepdim", False))
    axes = _dims(dim, x.ndim) if dim is not None else None
    op = {"amax": "max", "max": "max"}.get(f, f)
    attrs = {"axes": axes, "keepdims": keep}
    if op == "max":
        attrs["ties"] = "split"
    c.add(n, op, [_x(c, n, args)], attrs, tname, out)
    return True


def _f_dropout(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    p = float(_arg(args, kwargs, 1, "p", 0.5))
    train = bool(_arg(args, kwargs, 2, "train" if _is_aten(n) else "training", not _is_aten(n)))
    if p > 0 and train:
        return False
    c.add(n, "identity", [_x(c, n, args)], {"what": "dropout at inference"}, tname, out)
    return True


def _f_layer_norm(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    shape = _arg(args, kwargs, 1, "normalized_shape")
    w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    eps = float(_arg(args, kwargs, 4, "eps", 1e-5))
    ins = [_x(c, n, args)]
    if w is not None:
        ins.append(c.inp(n.args[2] if len(n.args) > 2 else n.kwargs.get("weight"), w))
        if b is not None:
            ins.append(c.inp(n.args[3] if len(n.args) > 3 else n.kwargs.get("bias"), b))
    elif b is not None:
        ins += [("", 1.0), c.inp(n.args[3] if len(n.args) > 3 else n.kwargs.get("bias"), b)]
    c.add(n, "layer_norm", ins, {"n_axes": len(shape), "eps": eps}, tname, out)
    return True


def _f_rms_norm(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    shape = _arg(args, kwargs, 1, "normalized_shape")
    w = _arg(args, kwargs, 2, "weight")
    eps = _arg(args, kwargs, 3, "eps")
    eps = float(eps) if eps is not None else float(torch.finfo(args[0].dtype).eps)
    ins = [_x(c, n, args)] + (
        [c.inp(n.args[2] if len(n.args) > 2 else n.kwargs.get("weight"), w)] if w is not None else []
    )
    c.add(n, "rms_norm", ins, {"n_axes": len(shape), "eps": eps}, tname, out)
    return True


def _f_embedding(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    if _is_aten(n):  # aten.embedding(weight, indices, padding_idx, scale_grad_by_freq, sparse)
        w_fx, ids_fx, w, ids = n.args[0], n.args[1], args[0], args[1]
        pad = _arg(args, kwargs, 2, "padding_idx", -1)
        pad = None if pad is None or pad < 0 else int(pad)
        if _arg(args, kwargs, 3, "scale_grad_by_freq", False):
            return False
    else:
        ids_fx, w_fx, ids, w = n.args[0], n.args[1], args[0], args[1]
        pad = _arg(args, kwargs, 2, "padding_idx")
        if _arg(args, kwargs, 3, "max_norm") is not None or _arg(args, kwargs, 5, "scale_grad_by_freq", False):
            return False
        pad = None if pad is None else int(pad) % w.shape[0]
    c.add(n, "embedding", [c.inp(ids_fx, ids), c.inp(w_fx, w)], {"padding_idx": pad}, tname, out)
    return True


def _f_sdpa(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    if float(_arg(args, kwargs, 4, "dropout_p", 0.0)) > 0 or _arg(args, kwargs, 7, "enable_gqa", False):
        return False
    q, k = args[0], args[1]
    mask = _arg(args, kwargs, 3, "attn_mask")
    attrs = {"is_causal": bool(_arg(args, kwargs, 5, "is_causal", False)), "scale": _arg(args, kwargs, 6, "scale")}
    ins = [_x(c, n, args, 0), _x(c, n, args, 1), _x(c, n, args, 2)]
    if mask is not None:
        m_fx = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
        src, const = c.inp(m_fx, mask)
        if src:
            return False  # a learned (differentiable) mask
        ins.append(("", const))
        attrs["const_names"] = {3: "mask"}
    if q.shape[-3:-2] != k.shape[-3:-2] and q.ndim >= 3:
        return False
    c.add(n, "sdpa", ins, attrs, tname, out)
    return True


def _f_conv(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    w = args[1]
    nd = w.ndim - 2
    if nd not in (1, 2):
        return False
    b = _arg(args, kwargs, 2, "bias")
    stride = _pair(_arg(args, kwargs, 3, "stride", 1), nd)
    if f == "convolution":
        if _arg(args, kwargs, 6, "transposed", False):
            return False
        padding, dil, groups = (
            _arg(args, kwargs, 4, "padding", 0),
            _arg(args, kwargs, 5, "dilation", 1),
            _arg(args, kwargs, 8, "groups", 1),
        )
    else:
        padding, dil, groups = (
            _arg(args, kwargs, 4, "padding", 0),
            _arg(args, kwargs, 5, "dilation", 1),
            _arg(args, kwargs, 6, "groups", 1),
        )
    dil = _pair(dil, nd)
    pads = conv_pads(padding, tuple(w.shape[2:]), dil)
    if pads is None:
        return False
    attrs = {
        "nd": nd,
        "stride": stride,
        "pads": pads,
        "dilation": dil,
        "groups": int(groups),
        "channels_last": False,
        "weight_layout": "oi",
    }
    ins = [_x(c, n, args, 0), _x(c, n, args, 1)]
    if b is not None:
        ins.append(c.inp(n.args[2] if len(n.args) > 2 else n.kwargs.get("bias"), b))
    c.add(n, "conv", ins, attrs, tname, out)
    return True


def _f_batch_norm(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    if _is_aten(n):  # aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
        order = {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4, "training": 5, "eps": 7}
    else:  # F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        order = {"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4, "training": 5, "eps": 7}
    get = {k: (_arg(args, kwargs, i, k), n.args[i] if len(n.args) > i else n.kwargs.get(k)) for k, i in order.items()}
    training = bool(get["training"][0])
    ins = [_x(c, n, args)]
    for key, default in (("weight", 1.0), ("bias", 0.0)):
        v, a = get[key]
        ins.append(c.inp(a, v) if v is not None else ("", default))
    for key, default in (("running_mean", 0.0), ("running_var", 1.0)):
        v, _ = get[key]
        ins.append(("", _np_const(v) if v is not None else default))
    if not training and get["running_mean"][0] is None:
        return False
    attrs = {"axis": 1, "eps": float(get["eps"][0] if get["eps"][0] is not None else 1e-5), "training": training}
    c.add(n, "batch_norm", ins, attrs, tname, out)
    return True


def _f_pool(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    nd = 2 if "2d" in f else 1
    kind = "max" if f.startswith("max") else "avg"
    k = _pair(_arg(args, kwargs, 1, "kernel_size"), nd)
    s = _arg(args, kwargs, 2, "stride")
    s = k if s is None or s == [] else _pair(s, nd)
    p = _pair(_arg(args, kwargs, 3, "padding", 0), nd)
    if kind == "max":
        if _pair(_arg(args, kwargs, 4, "dilation", 1), nd) != (1,) * nd or _arg(args, kwargs, 5, "ceil_mode", False):
            return False
        if kwargs.get("return_indices"):
            return False
        attrs = {}
    else:
        if _arg(args, kwargs, 4, "ceil_mode", False) or _arg(args, kwargs, 6, "divisor_override") is not None:
            return False
        attrs = {"count_include_pad": bool(_arg(args, kwargs, 5, "count_include_pad", True))}
    attrs.update(nd=nd, kind=kind, kernel=k, stride=s, pads=tuple((a, a) for a in p), channels_last=False)
    c.add(n, "pool", [_x(c, n, args)], attrs, tname, out)
    return True


def _f_adaptive(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    size = _arg(args, kwargs, 1, "output_size")
    nd = 2 if "2d" in f else 1
    size = _pair(size, nd)
    if any(s not in (1, None) for s in size):
        return False
    x = args[0]
    c.add(n, "mean", [_x(c, n, args)], {"axes": tuple(range(x.ndim - nd, x.ndim)), "keepdims": True}, tname, out)
    return True


def _f_masked_fill(c: Converter, n, f, args, kwargs, out, tname) -> bool:
    mask_fx = n.args[1] if len(n.args) > 1 else n.kwargs.get("mask")
    src, mask = c.inp(mask_fx, _arg(args, kwargs, 1, "mask"))
    value = _arg(args, kwargs, 2, "value")
    if src or (isinstance(value, torch.Tensor) and value.requires_grad):
        return False
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    c.add(n, "masked_fill", [_x(c, n, args), ("", mask)], {"value": value, "const_names": {1: "mask"}}, tname, out)
    return True


_FUNCTIONS: dict[str, Callable[..., bool]] = {
    **{k: _f_binary for k in ("add", "sub", "mul", "div", "rsub")},
    "pow": _f_pow,
    **{k: _f_unary for k in _UNARY},
    **{k: _f_act for k in _ACT_FUNCS},
    "softmax": _f_softmax,
    "_softmax": _f_softmax,
    "log_softmax": _f_softmax,
    "_log_softmax": _f_softmax,
    "matmul": _f_matmul,
    "bmm": _f_matmul,
    "mm": _f_matmul,
    "linear": _f_linear,
    "addmm": _f_addmm,
    **{k: _f_reshape for k in _RESHAPES},
    **{k: _f_identity for k in _IDENTITIES},
    "detach": _f_detach,
    "transpose": _f_transpose,
    "swapaxes": _f_transpose,
    "permute": _f_transpose,
    "t": _f_transpose,
    "getitem": _f_getitem,
    "select": _f_select,
    "narrow": _f_select,
    "slice": _f_select,
    "cat": _f_cat,
    "concat": _f_cat,
    "concatenate": _f_cat,
    "stack": _f_cat,
    "expand": _f_expand,
    "expand_as": _f_expand,
    "broadcast_to": _f_expand,
    "mean": _f_reduce,
    "sum": _f_reduce,
    "amax": _f_reduce,
    "max": _f_reduce,
    "dropout": _f_dropout,
    "layer_norm": _f_layer_norm,
    "rms_norm": _f_rms_norm,
    "embedding": _f_embedding,
    "scaled_dot_product_attention": _f_sdpa,
    "conv1d": _f_conv,
    "conv2d": _f_conv,
    "convolution": _f_conv,
    "batch_norm": _f_batch_norm,
    "max_pool1d": _f_pool,
    "max_pool2d": _f_pool,
    "avg_pool1d": _f_pool,
    "avg_pool2d": _f_pool,
    "adaptive_avg_pool1d": _f_adaptive,
    "adaptive_avg_pool2d": _f_adaptive,
    "masked_fill": _f_masked_fill,
}
