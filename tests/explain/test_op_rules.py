"""The graph-op rule table, entry by entry: forward and every input's vector-Jacobian product against torch
autodiff (float64) on seeded random inputs. Adding an op rule means adding its case here
(``test_every_op_rule_has_a_reference``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradsight.explain.rules import OP_RULES, OpNames

pytestmark = pytest.mark.torch
RNG = np.random.default_rng(20240611)


def _r(*shape, pos=False):
    a = RNG.normal(size=shape)
    return np.abs(a) + 0.5 if pos else a


def _cases(torch):
    F = torch.nn.functional
    x4 = _r(2, 3, 7, 6)
    cases = {
        "add": ([_r(2, 3, 4), _r(3, 1)], {}, lambda a, b: a + b),
        "sub": ([_r(2, 3), _r(2, 3)], {}, lambda a, b: a - b),
        "mul": ([_r(2, 3, 4), _r(4)], {}, lambda a, b: a * b),
        "div": ([_r(2, 3), _r(2, 3, pos=True)], {}, lambda a, b: a / b),
        "pow": ([_r(2, 3, pos=True), np.float64(3.0)], {}, lambda a, p: a**3.0),
        "neg": ([_r(3, 2)], {}, lambda a: -a),
        "exp": ([_r(3, 2)], {}, torch.exp),
        "log": ([_r(3, 2, pos=True)], {}, torch.log),
        "sqrt": ([_r(3, 2, pos=True)], {}, torch.sqrt),
        "rsqrt": ([_r(3, 2, pos=True)], {}, torch.rsqrt),
        "reciprocal": ([_r(3, 2, pos=True)], {}, torch.reciprocal),
        "abs": ([_r(3, 2)], {}, torch.abs),
        "square": ([_r(3, 2)], {}, torch.square),
        "sin": ([_r(3, 2)], {}, torch.sin),
        "cos": ([_r(3, 2)], {}, torch.cos),
        "act": ([_r(3, 4)], {"name": "leaky_relu", "params": {"slope": 0.1}}, lambda a: F.leaky_relu(a, 0.1)),
        "masked_fill": (
            [_r(2, 4), RNG.integers(0, 2, (1, 4)).astype(bool)],
            {"value": -3.0},
            None,  # reference below (the mask is not differentiable)
        ),
        "identity": ([_r(3, 2)], {}, lambda a: a.clone()),
        "detach": ([_r(3, 2)], {}, lambda a: a.detach()),
        "reshape": ([_r(2, 3, 4)], {"shape": (6, 4)}, lambda a: a.reshape(6, 4)),
        "permute": ([_r(2, 3, 4)], {"perm": (2, 0, 1)}, lambda a: a.permute(2, 0, 1)),
        "index": ([_r(4, 5, 3)], {"key": (slice(None), slice(1, 4), 2)}, lambda a: a[:, 1:4, 2]),
        "concat": ([_r(2, 3), _r(2, 5)], {"axis": 1}, lambda a, b: torch.cat([a, b], 1)),
        "expand": ([_r(3, 1)], {"shape": (2, 3, 4)}, lambda a: a.expand(2, 3, 4)),
        "mean": ([_r(2, 3, 4)], {"axes": (0, 2), "keepdims": False}, lambda a: a.mean(dim=(0, 2))),
        "sum": ([_r(2, 3, 4)], {"axes": (1,), "keepdims": True}, lambda a: a.sum(dim=1, keepdim=True)),
        "max": ([_r(2, 3, 4)], {"axes": (2,), "keepdims": False, "ties": "first"}, lambda a: a.max(dim=2).values),
        "linear": ([_r(2, 3, 4), _r(5, 4), _r(5)], {"layout": "out_in"}, F.linear),
        "conv": (
            [x4, _r(6, 1, 3, 2), _r(6)],
            {"nd": 2, "stride": (2, 1), "pads": ((1, 1), (0, 2)), "dilation": (1, 2), "groups": 3},
            None,
        ),
        "batch_norm": (
            [_r(4, 3, 5), _r(3), _r(3), _r(3), _r(3, pos=True)],
            {"axis": 1, "eps": 1e-5, "training": True},
            lambda x, w, b, m, v: F.batch_norm(x, None, None, w, b, training=True, eps=1e-5),
        ),
        "layer_norm": ([_r(2, 3, 4, 5), _r(4, 5), _r(4, 5)], {"n_axes": 2, "eps": 1e-5}, None),
        "rms_norm": ([_r(2, 3, 5), _r(5)], {"n_axes": 1, "eps": 1e-6}, lambda x, w: F.rms_norm(x, (5,), w, 1e-6)),
        "embedding": (
            [RNG.integers(0, 6, (3, 4)), _r(6, 5)],
            {"padding_idx": 2},
            None,
        ),
        "pool": (
            [_r(2, 3, 7, 6)],
            {
                "nd": 2,
                "kind": "avg",
                "kernel": (3, 2),
                "stride": (2, 2),
                "pads": ((1, 1), (1, 1)),
                "channels_last": False,
                "count_include_pad": False,
            },
            lambda a: F.avg_pool2d(a, (3, 2), (2, 2), (1, 1), count_include_pad=False),
        ),
        "matmul": ([_r(2, 1, 3, 4), _r(5, 4, 2)], {}, torch.matmul),
        "softmax": ([_r(2, 3, 4)], {"axis": 1}, lambda a: torch.softmax(a, 1)),
        "log_softmax": ([_r(2, 3, 4)], {"axis": 2}, lambda a: torch.log_softmax(a, 2)),
        "sdpa": (
            [
                _r(2, 2, 4, 3),
                _r(2, 2, 5, 3),
                _r(2, 2, 5, 6),
                RNG.integers(0, 2, (4, 5)).astype(bool) | np.eye(4, 5, dtype=bool),
            ],
            {"scale": 0.7},
            lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m.bool(), scale=0.7),
        ),
        "mha": None,  # below
    }
    return cases


def test_every_op_rule_has_a_reference(torch):
    assert set(OP_RULES) == set(_cases(torch))


def _check(torch, kind, ins, attrs, fn, diff=None):
    rule = OP_RULES[kind]
    out = rule.forward(ins, attrs)
    diff = diff if diff is not None else [isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.ndim > 0 for a in ins]
    ts = [
        torch.tensor(a, requires_grad=bool(d)) if isinstance(a, np.ndarray) else a
        for a, d in zip(ins, diff, strict=True)
    ]
    want = fn(*ts)
    np.testing.assert_allclose(out, want.detach().numpy(), rtol=1e-12, atol=1e-12)
    g = RNG.normal(size=out.shape)
    got = rule.backward(g, ins, attrs, out)
    live = [t for t, d in zip(ts, diff, strict=True) if d]
    if not want.requires_grad:
        assert all(x is None for x in got)
        return
    ref = iter(torch.autograd.grad(want, live, torch.tensor(g), allow_unused=True))
    for k, d in enumerate(diff):
        if d:
            r = next(ref)
            r = np.zeros(ins[k].shape) if r is None else r.numpy()
            np.testing.assert_allclose(got[k], r, rtol=1e-10, atol=1e-12, err_msg=f"{kind} input {k}")
        else:
            assert k >= len(got) or got[k] is None or kind in ("pow",), (kind, k)
    assert rule.text(OpNames("A[n]", "dJ/dA[n]", tuple(f"A[i{k}]" for k in range(len(ins))), attrs)).startswith("A[n]")


@pytest.mark.parametrize("kind", sorted(k for k in OP_RULES if k not in ("mha",)))
def test_op_rule_against_torch(torch, kind):
    F = torch.nn.functional
    ins, attrs, fn = _cases(torch)[kind]
    if kind == "masked_fill":
        fn = lambda a, m: a.masked_fill(m, -3.0)  # noqa: E731
        _check(torch, kind, ins, attrs, fn, diff=[True, False])
    elif kind == "conv":
        fn = lambda x, w, b: F.conv2d(x, w, b, (2, 1), 0, (1, 2), 3)  # noqa: E731
        pad = [np.pad(ins[0], ((0, 0), (0, 0), (1, 1), (0, 2))), ins[1], ins[2]]
        out = OP_RULES["conv"].forward(ins, attrs)
        np.testing.assert_allclose(out, OP_RULES["conv"].forward(pad, {**attrs, "pads": ((0, 0), (0, 0))}))
        _check(torch, kind, ins, attrs, lambda x, w, b: fn(F.pad(x, (0, 2, 1, 1)), w, b))
        conv1 = {"nd": 1, "stride": (2,), "pads": ((2, 1),), "dilation": (2,), "groups": 1, "channels_last": True}
        x1, w1 = _r(2, 9, 4), _r(3, 4, 5)  # NWC input, Keras (k, cin, cout) kernel
        _check(
            torch,
            kind,
            [x1, w1],
            {**conv1, "weight_layout": "io"},
            lambda x, w: F.conv1d(F.pad(x.transpose(1, 2), (2, 1)), w.permute(2, 1, 0), None, 2, 0, 2).transpose(1, 2),
        )
    elif kind == "layer_norm":
        _check(torch, kind, ins, attrs, lambda x, w, b: F.layer_norm(x, (4, 5), w, b, 1e-5))
    elif kind == "embedding":
        _check(torch, kind, ins, attrs, lambda i, w: F.embedding(i, w, padding_idx=2), diff=[False, True])
    elif kind == "batch_norm":
        _check(torch, kind, ins, attrs, fn, diff=[True, True, True, False, False])
        m, v = ins[3], ins[4]
        _check(
            torch,
            kind,
            ins,
            {**attrs, "training": False},
            lambda x, w, b, mm, vv: F.batch_norm(x, torch.tensor(m), torch.tensor(v), w, b, training=False),
            diff=[True, True, True, False, False],
        )
    elif kind == "pool":
        _check(torch, kind, ins, attrs, fn)
        mx = {**attrs, "kind": "max", "kernel": (2, 3), "stride": (2, 1), "pads": ((1, 1), (0, 0))}
        _check(torch, kind, ins, mx, lambda a: F.max_pool2d(a, (2, 3), (2, 1), (1, 0)))
    elif kind == "max":
        _check(torch, kind, ins, attrs, fn)
        _check(
            torch,
            kind,
            ins,
            {"axes": (0, 2), "keepdims": True, "ties": "split"},
            lambda a: a.amax(dim=(0, 2), keepdim=True),
        )
    elif kind == "sdpa":
        _check(torch, kind, ins, attrs, fn, diff=[True, True, True, False])
        q, k, v = ins[0], _r(2, 2, 4, 3), _r(2, 2, 4, 6)
        _check(
            torch, kind, [q, k, v], {"is_causal": True, "scale": None},
            lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
        )  # fmt: skip
    elif kind == "pow":
        _check(torch, kind, ins, attrs, fn, diff=[True, False])
    elif kind == "concat":
        _check(torch, kind, ins, attrs, fn)
        _check(torch, kind, [_r(2, 3), _r(2, 3)], {"axis": 1, "stack": True}, lambda a, b: torch.stack([a, b], 1))
    else:
        _check(torch, kind, ins, attrs, fn)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_rule_against_torch(torch, batch_first):
    mha = torch.nn.MultiheadAttention(6, 3, batch_first=batch_first).double()
    q = _r(2, 4, 6) if batch_first else _r(4, 2, 6)
    kv = _r(2, 5, 6) if batch_first else _r(5, 2, 6)
    params = [mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias]
    ins = [q, kv, kv] + [p.detach().numpy().copy() for p in params]
    attrs = {"heads": 3, "batch_first": batch_first, "layout": "torch"}
    rule = OP_RULES["mha"]
    out = rule.forward(ins, attrs)
    qt, kt = torch.tensor(q, requires_grad=True), torch.tensor(kv, requires_grad=True)
    want = mha(qt, kt, kt, need_weights=False)[0]
    np.testing.assert_allclose(out, want.detach().numpy(), rtol=1e-12, atol=1e-13)
    g = _r(*out.shape)
    got = rule.backward(g, ins, attrs, out)
    ref = torch.autograd.grad(want, [qt, kt, *params], torch.tensor(g))
    np.testing.assert_allclose(got[1] + got[2], ref[1].numpy(), rtol=1e-10, atol=1e-13)
    for k, r in zip([0, 3, 4, 5, 6], [ref[0], *ref[2:]], strict=True):
        np.testing.assert_allclose(got[k], r.numpy(), rtol=1e-10, atol=1e-13, err_msg=f"mha input {k}")
    # the Keras layout: the same attention written with (E, H, d) kernels
    e, h, d = 6, 3, 2
    w_in, b_in, w_out, b_out = (p.detach().numpy() for p in params)
    kq = [w_in[i * e : (i + 1) * e].reshape(h, d, e).transpose(2, 0, 1) for i in range(3)]
    kb = [b_in[i * e : (i + 1) * e].reshape(h, d) for i in range(3)]
    keras_ins = [q, kv, kv, kq[0], kb[0], kq[1], kb[1], kq[2], kb[2], w_out.T.reshape(h, d, e), b_out]
    out_k = rule.forward(keras_ins, {**attrs, "layout": "keras"})
    np.testing.assert_allclose(out_k, out, rtol=1e-12, atol=1e-13)
    got_k = rule.backward(g, keras_ins, {**attrs, "layout": "keras"}, out_k)
    np.testing.assert_allclose(got_k[3].transpose(1, 2, 0).reshape(e, e), ref[2].numpy()[:e], rtol=1e-10, atol=1e-13)
    assert math.isclose(float(np.sum(got_k[10])), float(ref[5].sum()), rel_tol=1e-10, abs_tol=1e-13)
