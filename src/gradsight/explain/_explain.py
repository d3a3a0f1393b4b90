"""``explain``: derive backprop layer by layer in closed form (numpy float64) and check every term against autodiff.

Flow: the framework adapter (``gradsight.frameworks._torch_explain`` / ``_keras_explain``, imported lazily)
turns the model into layer specs and computes the framework's own value of every term. This module then
recomputes the forward pass from X and the parameters, the loss and dJ/dŶ from the closed-form loss rule, and
the backward pass from dJ/dŶ, all in float64 numpy, and compares term by term.

A layer without a rule is traced with its autodiff values only ("autodiff only"): its terms have ``value=None``
and count as ok; the chain continues with the framework's A through it (forward) and the framework's
dJ/dA_{l-1} (backward), and every term computed from those borrowed values says so in its ``note``.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from .._errors import InputError, UnsupportedError
from .._frameworks import framework_of
from .._tolerance import Tolerance, tolerance_for
from . import _rules as R
from ._losses import LossSpec, evaluate_loss, logits_variant
from ._spec import FrameworkRun, LayerSpec
from ._trace import FiniteDifference, LayerInfo, Term, Trace

__all__ = ["check_loss_arg", "explain", "to_numpy"]

_ADAPTERS = {"torch": "gradsight.frameworks._torch_explain", "keras": "gradsight.frameworks._keras_explain"}

#: finite differences: relative step per entry, and the normwise tolerance of the comparison.
FD_STEP = 1e-6
FD_TOL = Tolerance(rtol=1e-5, atol=1e-7)
#: the most entries finite differences check per parameter tensor (two forward passes each).
FD_MAX_SAMPLES = 10_000


def adapter(framework: str) -> Any:
    """Import the adapter of ``framework`` (``"torch"``, ``"keras"``/``"tensorflow"``) lazily."""
    fw = {"tensorflow": "keras", "tf": "keras"}.get(framework, framework)
    if fw not in _ADAPTERS:
        raise InputError(f"unknown framework {framework!r}; expected 'torch' or 'tensorflow' (alias 'keras')")
    try:
        return importlib.import_module(_ADAPTERS[fw])
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UnsupportedError(
            f"framework {framework!r} is not installed ({exc}); "
            f"pip install 'gradsight[{'torch' if fw == 'torch' else 'tensorflow'}]'"
        ) from exc


def to_numpy(obj: Any, what: str) -> np.ndarray:
    """Convert a torch/TF tensor, numpy array or nested list to numpy without importing a framework."""
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):
        obj = obj.detach().cpu().numpy()
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
    if not np.issubdtype(xa.dtype, np.floating):
        raise InputError(
            f"x has dtype {xa.dtype} but the model needs floating-point inputs. Fix: x.float() (torch), "
            "x.astype('float32') (numpy) or tf.cast(x, 'float32')"
        )
    if not np.all(np.isfinite(xa)):
        bad, rows = _nonfinite(xa)
        raise InputError(
            f"x contains {bad} NaN or infinite values (in samples {rows}{' …' if len(rows) == 5 else ''}); every "
            "term would be NaN, so nothing could be checked. explain needs finite inputs. Fix: drop or impute "
            "those samples, e.g. keep = np.isfinite(x).reshape(len(x), -1).all(1); explain(model, x[keep], y[keep])"
        )
    if ya.ndim == 0 or ya.shape[0] != xa.shape[0]:
        raise InputError(
            f"y must have one target per sample: x has {xa.shape[0]} samples (shape {xa.shape!r}) but y has "
            f"shape {ya.shape!r}. Fix: pass the targets of the same batch, y[:{xa.shape[0]}]"
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
    mod = getattr(loss, "__module__", "") or ""
    if mod.startswith("torch"):
        example = f"nn.{loss.__name__}()"
    elif mod.startswith(("keras", "tensorflow", "tf_keras")):
        example = f"keras.losses.{loss.__name__}()"
    else:
        example = f"{loss.__name__}()"
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
) -> Trace:
    """Derive backprop through ``model`` for one batch, layer by layer, and check every term against autodiff.

    Layer indexing: l = 1..L, A_0 = X, Ŷ = A_L; a layer is one weighted op (Linear/Dense/Conv) together with
    the activation right after it (a torch activation module, a Keras ``activation=`` or activation layer);
    nested Sequentials are flattened; parameter-free layers (Flatten, Dropout, a lone activation) get their
    own index. Terms per layer: ``Z{l}``, ``S{l}``, ``A{l}``, ``dJ/dA{l}``, ``dJ/dZ{l}``, ``dJ/dW{l}``,
    ``dJ/db{l}`` (where they exist; Flatten/Dropout/no-rule layers have ``A{l}`` and ``dJ/dA{l}`` only), plus
    ``J`` and ``dJ/dY_hat``. Values are in the framework's own layout (see each term's ``layout``).

    Args:
        model: a ``torch.nn.Sequential`` (nested allowed) or a built Keras Sequential / single-chain
            functional model. Not modified: weights, ``.grad`` and ``training`` flags are left as they were.
        x: the input batch (array or tensor, floating point).
        y: the targets (same shape as the output; integer class indices for sparse cross-entropy).
        loss: a framework loss object (``nn.MSELoss()``, ``keras.losses.MeanSquaredError()``, ...), a name
            (``"mse"``, ``"mae"``, ``"bce"``, ``"bce_logits"``, ``"cce"``, ``"cce_logits"``, ``"sparse_cce"``,
            ``"sparse_cce_logits"``, ``"output_mean"``, ``"output_sum"``; computed in the framework's own
            convention), or any callable returning a scalar (torch: ``loss(y_hat, y)``, Keras:
            ``loss(y_true, y_pred)``; dJ/dŶ then comes from autodiff).
        reduction: ``"mean"`` or ``"sum"``, for a loss given by name.
        finite_differences: also check dJ/dW and dJ/db against float64 central differences of the loss
            (closed-form forward) on sampled entries.
        fd_samples: entries checked per parameter tensor (all entries when the tensor is smaller).
        fd_seed: seed of the entry sampling.

    A module used several times in the chain is one layer per use; its per-use dJ/dW terms are checked against
    autodiff through each call alone, and a term ``dJ/dW[<module>]`` states and checks their sum (the
    parameter's ``.grad``). Frozen layers are derived and checked too. float16/bfloat16 torch models are
    explained on a float64 copy; Keras float16/bfloat16 models are compared with that dtype's tolerance.
    NaN/inf in x or y are refused (every term would be NaN). Works under ``torch.no_grad()`` and
    ``torch.inference_mode()``.

    Returns:
        The :class:`Trace`.

    Raises:
        UnsupportedError: not a model, a model that branches / takes several inputs, a module that does not
            map one tensor to one tensor, or Keras on a backend other than TensorFlow.
        InputError: bad x/y (shape, dtype, NaN/inf, empty, wrong feature count), a loss class instead of an
            instance, an invalid reduction, a loss that fails or does not return a scalar.
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
    run = adapter(fw).run_explain(model, xa, ya, loss, reduction)
    return derive(run, finite_differences=finite_differences, fd_samples=fd_samples, fd_seed=fd_seed)


# ------------------------------------------------------------------------------------------- layout helpers
def _torch(run: FrameworkRun) -> bool:
    return run.framework == "torch"


def _w_io(ls: LayerSpec, w: np.ndarray, torch: bool) -> np.ndarray:
    return w.T if torch else w


def _w_conv(ls: LayerSpec, w: np.ndarray, torch: bool) -> np.ndarray:
    return w if torch else w.transpose(3, 2, 0, 1)


def _to_nchw(a: np.ndarray, ls: LayerSpec) -> np.ndarray:
    return a.transpose(0, 3, 1, 2) if ls.conv["channels_last"] else a


def _from_nchw(a: np.ndarray, ls: LayerSpec) -> np.ndarray:
    return a.transpose(0, 2, 3, 1) if ls.conv["channels_last"] else a


def _act_forward(ls: LayerSpec, z: np.ndarray) -> np.ndarray:
    if ls.activation == "softmax":
        return R.softmax_forward(z)
    return R.elementwise_rule(ls.activation, **ls.activation_params).forward(z)


def _has_rule(ls: LayerSpec) -> bool:
    return ls.kind != "opaque"


def _forward_layer(
    ls: LayerSpec, a_prev: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, torch: bool
) -> tuple[np.ndarray | None, np.ndarray]:
    """Closed-form (Z, A) of one layer from A_{l-1} (framework layout). Opaque layers return the framework's A."""
    if ls.kind == "dense":
        z = R.dense_forward(a_prev, _w_io(ls, w, torch), b)
    elif ls.kind == "conv2d":
        c = ls.conv
        z = _from_nchw(R.conv2d_forward(_to_nchw(a_prev, ls), _w_conv(ls, w, torch), b, c["stride"], c["pads"]), ls)
    elif ls.kind == "activation":
        z = a_prev
    elif ls.kind == "flatten":
        return None, a_prev.reshape(a_prev.shape[0], -1)
    elif ls.kind == "dropout":
        return None, a_prev
    else:
        return None, ls.a
    return z, _act_forward(ls, z)


# ------------------------------------------------------------------------------------------------- compare
def _compare(term: Term, tol: Tolerance) -> Term:
    v, a = term.value, term.autodiff
    if v is None or a is None:
        return term
    v = np.asarray(v, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    if v.shape != a.shape:
        term.max_abs_err = term.max_rel_err = float("inf")
        term.ok = False
        term.note = (term.note + "; " if term.note else "") + f"shape mismatch: autodiff has shape {a.shape}"
        return term
    if v.size == 0:
        term.max_abs_err = term.max_rel_err = 0.0
        return term
    diff = np.abs(v - a)
    err = float(np.max(diff)) if np.all(np.isfinite(diff)) else float("inf")
    ref = float(np.max(np.abs(a)))
    term.max_abs_err = err
    term.max_rel_err = err / ref if ref > 0 else (0.0 if err == 0 else float("inf"))
    term.ok = tol.allows(err, float(np.max(np.abs(v))))
    if not term.ok:
        worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if np.all(np.isfinite(diff)) else None
        n_bad = int(np.sum(diff > tol.atol + tol.rtol * np.max(np.abs(v))))
        term.note = (term.note + "; " if term.note else "") + (
            f"{n_bad} of {v.size} elements differ; worst at {worst}: closed form "
            f"{v[worst] if worst is not None else 'nan'!s:.10} vs autodiff "
            f"{a[worst] if worst is not None else 'nan'!s:.10}; allowed {tol.atol:g} + {tol.rtol:g}·max|value|"
        )
    return term


def _term(name, layer, formula, latex, value, autodiff, note="", layout="") -> Term:
    shape = (
        tuple(np.shape(value if value is not None else autodiff)) if (value is not None or autodiff is not None) else ()
    )
    return Term(name, layer, formula, latex, shape, value, autodiff, note=note, layout=layout)


def _layouts(run: FrameworkRun, ls: LayerSpec) -> tuple[str, str]:
    """(activation layout, weight layout) words."""
    if ls.kind == "conv2d":
        act = "NHWC" if ls.conv.get("channels_last") else "NCHW"
    else:
        act = "(n, features)" if ls.a is None or np.ndim(ls.a) == 2 else f"{np.ndim(ls.a)}-D, framework layout"
    return act, ls.weight_layout


def _frozen_words(run: FrameworkRun) -> str:
    return "requires_grad=False" if _torch(run) else "trainable=False"


def _remarks(run: FrameworkRun, ls: LayerSpec) -> list[str]:
    out = []
    if ls.frozen:
        out.append(
            f"frozen ({_frozen_words(run)}): its gradients are derived and checked, but the optimizer does not "
            "update it"
        )
    mine = [sp for sp in run.shared if ls.index in sp.layers and ls.shared.get(sp.which) == sp.key]
    if mine:
        others = sorted({k for sp in mine for k in sp.layers if k != ls.index})
        sums = ", ".join(f"dJ/d{sp.which}[{sp.module}]" for sp in mine)
        out.append(
            f"shares {' and '.join(sp.which for sp in mine)} with layer(s) {others}: module {mine[0].module!r} is "
            f"used {len(mine[0].layers)} times; its gradient is the sum over the uses ({sums})"
        )
    return out


def _param_note(run: FrameworkRun, ls: LayerSpec, which: str) -> str:
    """Per-use and frozen remarks on the dJ/dW / dJ/db term of layer ``ls``."""
    bits = []
    key = ls.shared.get(which)
    sp = next((p for p in run.shared if p.key == key and p.which == which), None) if key else None
    if sp is not None:
        how = (
            "torch.autograd.grad(Z, W, dJ/dZ) through this call alone"
            if _torch(run)
            else "tape.gradient(Z, kernel, output_gradients=dJ/dZ) through this call alone"
        )
        bits.append(
            f"one use of module {sp.module!r} (layers {sp.layers}): this is this use's share of the parameter's "
            f"gradient; its autodiff value is {how}; the sum over the uses is the term dJ/d{which}[{sp.module}]"
        )
    if ls.frozen:
        bits.append(f"frozen ({_frozen_words(run)}): derived and checked, not updated by the optimizer")
    return "; ".join(bits)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


# --------------------------------------------------------------------------------------------------- derive
def derive(run: FrameworkRun, *, finite_differences: bool = False, fd_samples: int = 32, fd_seed: int = 0) -> Trace:
    """Build the :class:`Trace` from an adapter's :class:`FrameworkRun` (the framework-free half of explain)."""
    tol = tolerance_for(run.dtype)
    if run.rtol_floor > tol.rtol:
        tol = Tolerance(rtol=run.rtol_floor, atol=tol.atol)
    torch = _torch(run)
    L = len(run.layers)
    layers_info = [
        LayerInfo(
            ls.index,
            ls.kind,
            ls.name,
            ls.type_name,
            ls.activation if ls.kind in ("dense", "conv2d", "activation") else "—",
            _has_rule(ls),
            ls.reason,
            ls.weight_layout,
            _remarks(run, ls),
        )
        for ls in run.layers
    ]
    terms: list[Term] = []
    notes: list[str] = list(run.notes)
    # ------------------------------------------------------------------------------------------ forward
    a_prev = run.x
    acts: list[np.ndarray] = [run.x]  # closed-form A_0..A_L (borrowed through opaque layers)
    zs: list[np.ndarray | None] = [None]
    borrowed: list[int] = []  # opaque layers whose framework A the forward has used so far
    for ls in run.layers:
        l = ls.index
        fwd_note = f"uses the framework's A of layer(s) {borrowed} (no rule there)" if borrowed else ""
        act_layout, _ = _layouts(run, ls)
        z, a = _forward_layer(ls, a_prev, ls.weight, ls.bias, torch)
        if ls.kind in ("dense", "conv2d", "activation"):
            if ls.kind == "dense":
                zf = f"Z{l} = A{l - 1} · W{l}{'ᵀ' if torch else ''}" + (f" + b{l}" if ls.bias is not None else "")
                tr = r"^\top" if torch else ""
                zl = rf"Z_{{{l}}} = A_{{{l - 1}}} W_{{{l}}}{tr}" + (rf" + b_{{{l}}}" if ls.bias is not None else "")
            elif ls.kind == "conv2d":
                c = ls.conv
                zf = (
                    f"Z{l} = conv2d(A{l - 1}, W{l}, stride={c['stride']}, pads(t,b,l,r)={c['pads']})"
                    + (f" + b{l}" if ls.bias is not None else "")
                    + f"; {R.CONV_TEXT}"
                )
                zl = R.CONV_LATEX
            else:
                zf, zl = f"Z{l} = A{l - 1} (activation layer: its input)", rf"Z_{{{l}}} = A_{{{l - 1}}}"
            terms.append(_term(f"Z{l}", l, zf, zl, z, ls.z, fwd_note, act_layout))
            if ls.activation == "softmax" and R.jacobian_too_big(z.shape):
                s_val = R.softmax_vjp(z)
                s_text, s_latex = R.SOFTMAX_PROBE_TEXT, R.SOFTMAX_LATEX
                nbytes = R.fmt_bytes(z.shape[0] * z.shape[-1] ** 2 * 8)
                s_layout = (
                    f"(n, f): S_iᵀ·u_i for a fixed probe u; the (n, f, f) Jacobians would take {nbytes} "
                    f"(limit {R.fmt_bytes(R.JACOBIAN_LIMIT_BYTES)})"
                )
            elif ls.activation == "softmax":
                s_val = R.softmax_jacobian(z)
                s_text, s_latex = R.SOFTMAX_TEXT, R.SOFTMAX_LATEX
                s_layout = "(n, f, f): S[i, j, k] = ∂A_ij/∂Z_ik"
            else:
                rule = R.elementwise_rule(ls.activation, **ls.activation_params)
                s_val = rule.derivative(z)
                s_text, s_latex = rule.text, rule.latex
                s_layout = "diagonal of S, same shape as Z (elementwise activation)"
            terms.append(_term(f"S{l}", l, f"S{l} = ∂A{l}/∂Z{l}: {s_text}", s_latex, s_val, ls.s, fwd_note, s_layout))
            terms.append(
                _term(
                    f"A{l}",
                    l,
                    f"A{l} = {ls.activation}(Z{l})",
                    rf"A_{{{l}}} = f(Z_{{{l}}})",
                    a,
                    ls.a,
                    fwd_note,
                    act_layout,
                )
            )
        elif ls.kind == "flatten":
            terms.append(
                _term(
                    f"A{l}",
                    l,
                    f"A{l} = reshape(A{l - 1}, (n, −1))",
                    r"A_l = \mathrm{flatten}(A_{l-1})",
                    a,
                    ls.a,
                    fwd_note,
                )
            )
        elif ls.kind == "dropout":
            terms.append(
                _term(f"A{l}", l, f"A{l} = A{l - 1} (dropout at inference)", r"A_l = A_{l-1}", a, ls.a, fwd_note)
            )
        else:
            terms.append(
                _term(
                    f"A{l}",
                    l,
                    f"A{l} = {ls.type_name}(A{l - 1}) — autodiff only",
                    r"A_l = g(A_{l-1})",
                    None,
                    ls.a,
                    f"autodiff only: {ls.reason}; the chain continues with the framework's A{l}",
                )
            )
            borrowed.append(l)
        zs.append(z)
        acts.append(a)
        a_prev = a
    # ---------------------------------------------------------------------------------------------- loss
    spec = run.loss
    y_hat = acts[-1]
    dj_dz_last: np.ndarray | None = None
    loss_formula = "autodiff only (arbitrary callable)"
    tail_note = f"uses the framework's A of layer(s) {borrowed}" if borrowed else ""
    if spec is not None and spec.reduction == "none":  # pragma: no cover - adapters refuse non-scalar losses
        spec = None
    if spec is None:
        terms.append(
            _term(
                "J",
                0,
                f"J = {run.loss_display}(…) — autodiff only",
                "J",
                None,
                np.float64(run.j),
                "arbitrary callable: no closed form",
            )
        )
        dA = run.dj_dyhat
        terms.append(
            _term(
                "dJ/dY_hat",
                0,
                "dJ/dŶ from autodiff (arbitrary callable)",
                r"\partial J/\partial\hat Y",
                None,
                dA,
                "arbitrary callable: dJ/dŶ comes from autodiff; the backward chain starts from it",
            )
        )
        chain_note = "starts from the autodiff dJ/dŶ (arbitrary loss)"
    elif run.keras_logits:
        lspec = logits_variant(spec)
        z_last = zs[-1]
        res = evaluate_loss(lspec, z_last, run.y)
        loss_formula = res.formula
        note = (
            f"Keras computed {spec.kind} from the logits Z{L} (ŷ carried _keras_logits, set by its softmax/sigmoid), "
            f"so J does not depend on Ŷ; the closed form is the {lspec.kind} rule at Z{L}"
        )
        terms.append(_term("J", 0, res.formula, res.latex, np.float64(res.value), np.float64(run.j), note))
        terms.append(_term("dJ/dY_hat", 0, "not defined: J is computed from Z_L", r"—", None, None, note))
        dA = None
        dj_dz_last = res.grad
        notes.append(note)
        chain_note = ""
    else:
        res = evaluate_loss(spec, y_hat, run.y)
        loss_formula = res.formula
        terms.append(_term("J", 0, res.formula, res.latex, np.float64(res.value), np.float64(run.j), tail_note))
        dA = res.grad
        terms.append(
            _term(
                "dJ/dY_hat", 0, f"dJ/dŶ = {res.formula.split('dJ/dŶ = ')[-1]}", res.latex, dA, run.dj_dyhat, tail_note
            )
        )
        chain_note = ""
    # ------------------------------------------------------------------------------------------ backward
    used_fw_back: list[int] = []
    params_grad: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = {}
    for ls in reversed(run.layers):
        l = ls.index
        bits = [chain_note] if chain_note else []
        if borrowed:
            bits.append(f"forward uses the framework's A of layer(s) {borrowed}")
        if used_fw_back:
            bits.append(f"backward uses the framework's dJ/dA through layer(s) {used_fw_back}")
        note = "; ".join(bits)
        act_layout, w_layout = _layouts(run, ls)
        a_in = acts[l - 1]
        if not _has_rule(ls):
            terms.append(
                _term(
                    f"dJ/dA{l}",
                    l,
                    f"dJ/dA{l} — autodiff only",
                    r"\partial J/\partial A_l",
                    None,
                    ls.da,
                    f"autodiff only: {ls.reason}",
                )
            )
            if ls.weight is not None:
                terms.append(
                    _term(
                        f"dJ/dW{l}",
                        l,
                        f"dJ/dW{l} — autodiff only",
                        r"\partial J/\partial W_l",
                        None,
                        ls.dw,
                        f"autodiff only: {ls.reason}",
                        w_layout,
                    )
                )
                if ls.bias is not None:
                    terms.append(
                        _term(
                            f"dJ/db{l}",
                            l,
                            f"dJ/db{l} — autodiff only",
                            r"\partial J/\partial b_l",
                            None,
                            ls.db,
                            f"autodiff only: {ls.reason}",
                        )
                    )
            dA = run.layers[l - 2].da if l >= 2 else None
            used_fw_back.append(l)
            continue
        da_formula = "dJ/dA{L} = dJ/dŶ".replace("{L}", str(l)) if l == L else f"dJ/dA{l} = dJ/d(input of layer {l + 1})"
        if not (l == L and dj_dz_last is not None):
            terms.append(
                _term(f"dJ/dA{l}", l, da_formula, rf"\partial J/\partial A_{{{l}}}", dA, ls.da, note, act_layout)
            )
        else:
            terms.append(
                _term(
                    f"dJ/dA{l}",
                    l,
                    "not defined: Keras computes J from Z_L",
                    "—",
                    None,
                    None,
                    "Keras logits shortcut: J does not depend on A_L",
                )
            )
        if ls.kind in ("flatten", "dropout"):
            dA = None if dA is None else (dA.reshape(a_in.shape) if ls.kind == "flatten" else dA)
            continue
        z = zs[l]
        if l == L and dj_dz_last is not None:
            dZ = dj_dz_last
            dz_formula = f"dJ/dZ{l} = {loss_formula.split('dJ/dŶ = ')[-1]} (logits form, at Z{l})"
        elif dA is None:
            dZ = None
            dz_formula = f"dJ/dZ{l}"
        elif ls.activation == "softmax":
            dZ = R.softmax_backward(z, dA)
            dz_formula = (
                f"dJ/dZ{l}_i = S{l}_iᵀ · dJ/dA{l}_i = A{l}_i ⊙ (dJ/dA{l}_i − dJ/dA{l}_i·A{l}_i) (per sample, "
                "without building S)"
            )
        else:
            dZ = dA * R.elementwise_rule(ls.activation, **ls.activation_params).derivative(z)
            dz_formula = f"dJ/dZ{l} = dJ/dA{l} ⊙ S{l}"
        terms.append(
            _term(
                f"dJ/dZ{l}",
                l,
                dz_formula,
                rf"\frac{{\partial J}}{{\partial Z_{{{l}}}}} = "
                rf"\frac{{\partial J}}{{\partial A_{{{l}}}}} \odot S_{{{l}}}",
                dZ,
                ls.dz,
                note,
                act_layout,
            )
        )
        if ls.kind == "activation":
            dA = dZ
            continue
        if dZ is None:
            dA = run.layers[l - 2].da if l >= 2 else None
            continue
        if ls.kind == "dense":
            dw_io, db, dA = R.dense_backward(dZ, a_in, _w_io(ls, ls.weight, torch))
            dw = dw_io.T if torch else dw_io
            wf = f"dJ/dW{l} = (A{l - 1}ᵀ · dJ/dZ{l}){'ᵀ' if torch else ''}  (summed over the batch)"
            wl = (
                rf"\frac{{\partial J}}{{\partial W_{{{l}}}}} = "
                rf"A_{{{l - 1}}}^\top \frac{{\partial J}}{{\partial Z_{{{l}}}}}"
            )
        else:
            c = ls.conv
            dw_t, db, dx = R.conv2d_backward(
                _to_nchw(dZ, ls), _to_nchw(a_in, ls), _w_conv(ls, ls.weight, torch), c["stride"], c["pads"]
            )
            dw = dw_t if torch else dw_t.transpose(2, 3, 1, 0)
            dA = _from_nchw(dx, ls)
            wf = (
                f"dJ/dW{l} = Σ_n dJ/dZ{l}_col · X_colᵀ (im2col of A{l - 1}); "
                f"dJ/dA{l - 1} = col2im(W_colᵀ · dJ/dZ{l}_col)"
            )
            wl = R.CONV_LATEX
        terms.append(_term(f"dJ/dW{l}", l, wf, wl, dw, ls.dw, _join(note, _param_note(run, ls, "W")), w_layout))
        params_grad[l] = (dw, db)
        if ls.bias is not None:
            terms.append(
                _term(
                    f"dJ/db{l}",
                    l,
                    f"dJ/db{l} = Σ dJ/dZ{l} over every axis but the channel/feature",
                    rf"\frac{{\partial J}}{{\partial b_{{{l}}}}} = \sum_n \frac{{\partial J}}{{\partial Z_{{{l}}}}}",
                    db,
                    ls.db,
                    _join(note, _param_note(run, ls, "b")),
                )
            )
    terms += _shared_terms(run, params_grad)
    for t in terms:
        _compare(t, tol)
    # order: forward, loss, backward (already in that order; backward runs L..1)
    trace = Trace(
        framework=run.framework,
        model_name=run.model_name,
        loss=run.loss_display,
        loss_formula=loss_formula,
        dtype=run.dtype,
        n=int(run.x.shape[0]),
        layers=layers_info,
        terms=terms,
        notes=notes,
        model_dtype=run.model_dtype,
    )
    if finite_differences:
        _finite_differences(run, trace, acts, fd_samples, fd_seed)
    return trace


def _shared_terms(run: FrameworkRun, params_grad: dict[int, tuple[np.ndarray | None, np.ndarray | None]]) -> list[Term]:
    """One term per parameter used by several layers: the sum of its per-use terms, checked against the
    framework's gradient of the parameter itself (the ``.grad`` a ``backward()`` would leave).
    """  # noqa: D205
    out = []
    for sp in run.shared:
        parts = [params_grad.get(l, (None, None))[0 if sp.which == "W" else 1] for l in sp.layers]
        value = None if any(p is None for p in parts) else np.sum(parts, axis=0)
        uses = " + ".join(f"dJ/d{sp.which}{l}" for l in sp.layers)
        name = f"dJ/d{sp.which}[{sp.module}]"
        formula = (
            f"{name} = {uses}  (shared module {sp.module!r} used at layers "
            f"{', '.join(map(str, sp.layers[:-1]))} and {sp.layers[-1]}: its parameter's gradient is the sum of "
            "the per-use terms)"
        )
        note = (
            "autodiff value: the framework's gradient of the parameter itself (what backward() accumulates in "
            f"{'.grad' if _torch(run) else 'the variable gradient'})"
        )
        if value is None:
            note += "; no closed form: a use has no rule"
        ls0 = run.layers[sp.layers[0] - 1]
        layout = ls0.weight_layout if sp.which == "W" else ""
        latex = rf"\frac{{\partial J}}{{\partial {sp.which}}} = \sum_{{l \in \{{{','.join(map(str, sp.layers))}\}}}}"
        latex += rf" \frac{{\partial J}}{{\partial {sp.which}_l}}"
        out.append(_term(name, sp.layers[0], formula, latex, value, sp.autodiff, note, layout))
    return out


# --------------------------------------------------------------------------------------- finite differences
def _loss_from(run: FrameworkRun, l: int, a_prev: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> float:
    """J recomputed in float64 from layer l on, with layer l's parameters replaced by (w, b)."""
    torch = _torch(run)
    z = None
    for ls in run.layers[l - 1 :]:
        if ls.index == l:
            z, a_prev = _forward_layer(ls, a_prev, w, b, torch)
        else:
            z, a_prev = _forward_layer(ls, a_prev, ls.weight, ls.bias, torch)
    spec: LossSpec = run.loss
    if run.keras_logits:
        return evaluate_loss(logits_variant(spec), z, run.y).value
    return evaluate_loss(spec, a_prev, run.y).value


def _finite_differences(run: FrameworkRun, trace: Trace, acts: list[np.ndarray], samples: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    opaque = [ls.index for ls in run.layers if not _has_rule(ls)]
    for ls in run.layers:
        if ls.weight is None:
            continue
        l = ls.index
        for which in ("W", "b"):
            name = f"dJ/d{which}{l}"
            if name not in trace:
                continue
            term = trace[name]
            reason = ""
            if run.loss is None:
                reason = "the loss is an arbitrary callable (no closed-form J to difference)"
            elif any(k >= l for k in opaque):
                reason = f"layer(s) {[k for k in opaque if k >= l]} at or after layer {l} have no rule"
            if reason:
                term.note = (term.note + "; " if term.note else "") + f"finite differences not available: {reason}"
                continue
            p = (ls.weight if which == "W" else ls.bias).astype(np.float64)
            flat = p.ravel()
            entries = (
                list(range(flat.size))
                if flat.size <= samples
                else sorted(int(i) for i in rng.choice(flat.size, samples, replace=False))
            )
            vals = np.empty(len(entries))
            work = flat.copy()  # perturbed in place, one entry at a time: no per-entry copies of the tensor
            for k, e in enumerate(entries):
                h = FD_STEP * max(1.0, abs(flat[e]))
                js = []
                for step in (h, -h):
                    work[e] = flat[e] + step
                    pw = work.reshape(p.shape)
                    if which == "W":
                        js.append(_loss_from(run, l, acts[l - 1], pw, ls.bias))
                    else:
                        js.append(_loss_from(run, l, acts[l - 1], ls.weight, pw))
                work[e] = flat[e]
                vals[k] = (js[0] - js[1]) / (2 * h)
            ref_full = term.autodiff if term.autodiff is not None else term.value
            ref = np.asarray(ref_full, dtype=np.float64).ravel()[entries]
            err = float(np.max(np.abs(vals - ref))) if len(entries) else 0.0
            tol = Tolerance(
                max(FD_TOL.rtol, tolerance_for(run.dtype).rtol), max(FD_TOL.atol, tolerance_for(run.dtype).atol)
            )
            kinks = ""
            if any(x.activation in ("relu", "leaky_relu") for x in run.layers):
                kinks = "ReLU-type kinks within h of a pre-activation make FD unreliable there"
            term.fd = FiniteDifference(
                entries, vals, ref, err, tol.allows(err, float(np.max(np.abs(ref))) if ref.size else 0.0), kinks
            )
