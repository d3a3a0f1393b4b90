"""The neutral description an adapter hands to the explainer: layer specs, conventions and autodiff values.

Everything here is numpy float64 in the *framework's own layout* (e.g. a ``(out, in)`` or an ``(in, out)``
dense weight, NCHW or NHWC activations). What differs between frameworks is stated as data, never by name:
:class:`Conventions` (weight layouts and the words a trace uses) and :class:`LossConvention` (how a loss
reduces, clips and pairs shapes). The explain core reads these fields; it never asks which framework it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Conventions", "FrameworkRun", "LayerSpec", "LossConvention", "LossSpec", "SharedParam"]

#: Keras' default clipping epsilon (``keras.config.epsilon()``); a loss convention's default.
DEFAULT_EPSILON = 1e-7

_PLAIN_WORDS: Mapping[tuple[bool, str], str] = {
    (True, "mean"): "mean over all elements",
    (True, "sum"): "sum over all elements",
    (False, "mean"): "mean over the batch",
    (False, "sum"): "sum over the batch",
}


@dataclass(frozen=True)
class LossConvention:
    """How a framework's losses reduce, clip and pair shapes, as data (see :mod:`gradsight.explain.rules`).

    Attributes:
        name: shown in formulas, e.g. ``"torch"`` → ``"(torch convention)"``.
        display: the framework's display name in findings, e.g. ``"Keras"``.
        last_axis_mean: per-element losses (mse, mae, bce, bce_logits) first average the last axis of each
            sample, then reduce the per-sample values (Keras); otherwise they reduce all elements at once.
        expand_rank: targets of shape ``ŷ.shape[:-1]`` are expanded to ŷ's rank when ŷ's last axis is 1.
        clip_probabilities: probability losses clip ŷ to ``[ε, 1−ε]`` (gradient zero where clipped), and
            probability cross-entropy normalises ŷ by its sum over the last axis first.
        softmax_ce_grad_normalised: the gradient of softmax cross-entropy is ``softmax(Z) − Y`` (it assumes
            each row of Y sums to 1) instead of ``softmax(Z)·ΣY − Y``.
        ce_needs_2d: the cross-entropy closed form needs 2-D ``(n, C)`` predictions.
        reduction_words: ``{(per_element, reduction): words}`` for the formula, e.g. "mean over all elements".
    """

    name: str = "plain"
    display: str = ""
    last_axis_mean: bool = False
    expand_rank: bool = False
    clip_probabilities: bool = False
    softmax_ce_grad_normalised: bool = False
    ce_needs_2d: bool = True
    reduction_words: Mapping[tuple[bool, str], str] = field(default_factory=lambda: dict(_PLAIN_WORDS))


@dataclass(frozen=True)
class LossSpec:
    """A framework-neutral loss description.

    Attributes:
        kind: a registered loss rule (see :data:`gradsight.explain.rules.LOSS_KINDS`), or ``"custom"``.
        reduction: ``"mean"`` or ``"sum"``.
        convention: the framework's :class:`LossConvention`.
        display: how the user's loss is shown, e.g. ``"torch.nn.MSELoss(reduction='mean')"``.
        label_smoothing: label smoothing (bce, cce), 0 otherwise.
        epsilon: the clipping epsilon (used when ``convention.clip_probabilities``).
        class_weights: per-class weights w_c of a softmax cross-entropy (torch ``CrossEntropyLoss(weight=...)``),
            or None. Each sample's loss is ``−Σ_c w_c·t_c·log softmax(ŷ)_c``; with class-index targets the mean
            divides by ``Σ_i w_{y_i}`` (torch's convention), with probability targets by n.
        ignore_index: a class index whose samples are left out (torch ``ignore_index``), or None.
    """

    kind: str
    reduction: str = "mean"
    convention: LossConvention = field(default_factory=LossConvention)
    display: str = ""
    label_smoothing: float = 0.0
    epsilon: float = DEFAULT_EPSILON
    class_weights: tuple[float, ...] | None = None
    ignore_index: int | None = None


@dataclass(frozen=True)
class Conventions:
    """What an adapter states about its framework, as data, for the explain core.

    Attributes:
        name: the framework's short name (``Trace.framework``), e.g. ``"torch"``.
        display: its display name in notes, e.g. ``"Keras"``.
        dense_weight: the dense weight layout, ``"in_out"`` (the rules' own) or ``"out_in"`` (transposed).
        conv_weight: the conv2d kernel layout, ``"oihw"`` (the rules' own) or ``"hwio"``.
        frozen_words: how a frozen parameter is spelled, e.g. ``"requires_grad=False"``.
        grad_words: where a parameter's gradient lives, e.g. ``".grad"``.
        per_use_words: how autodiff computes one use's share of a shared parameter's gradient.
        logits_reason: why the framework computed a probability loss from the logits Z_L (see
            ``FrameworkRun.keras_logits``), for the trace's note.
        loss: the :class:`LossConvention`.
    """

    name: str = "plain"
    display: str = ""
    dense_weight: str = "in_out"
    conv_weight: str = "oihw"
    frozen_words: str = "frozen"
    grad_words: str = "the parameter's gradient"
    per_use_words: str = "autodiff through this call alone"
    logits_reason: str = "the framework used the logits"
    loss: LossConvention = field(default_factory=LossConvention)


@dataclass
class LayerSpec:
    """One explained layer l: a weighted op with the activation right after it, or a parameter-free layer.

    Attributes:
        index: l = 1..L.
        kind: a registered layer rule (``"dense"``, ``"conv2d"``, ``"activation"``, ``"flatten"``,
            ``"dropout"``, see :data:`gradsight.explain.rules.LAYER_RULES`) or ``"opaque"``. A kind without a
            registered rule is traced with autodiff values only, never by another rule.
        name: display name, e.g. ``"0: Linear(3→4) + 1: ReLU()"``.
        type_name: the framework class names, e.g. ``"Linear+ReLU"``.
        weight: the weight (framework layout) or None.
        bias: the bias or None.
        weight_layout: words for the weight layout, e.g. ``"torch Linear weight (out, in)"``.
        activation: a registered activation rule (see :data:`gradsight.explain.rules.ACTIVATION_RULES`).
        activation_params: the activation's parameters.
        conv: for conv2d: ``{"stride": (sh, sw), "pads": (top, bottom, left, right), "channels_last": bool}``.
        reason: why a layer is ``opaque``.
        frozen: its parameters are frozen (torch ``requires_grad=False``, Keras ``trainable=False``); their
            gradients are still derived and checked (the adapter differentiates without changing the flags).
        shared: ``{"W": key, "b": key}`` for a parameter this layer shares with other layers (a module used
            several times in the chain); ``dw``/``db`` are then the gradient of *this use* alone.
        s_probe: ``s`` is the Jacobian-vector product ``S_iᵀ·u_i`` with the fixed probe of
            :func:`gradsight.explain.rules.softmax_probe` (softmax Jacobians too large to build).
        z, s, a, da, dz, dw, db: the framework's values of Z, S, A, dJ/dA, dJ/dZ, dJ/dW, dJ/db (None when n/a).
    """

    index: int
    kind: str
    name: str
    type_name: str
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    weight_layout: str = ""
    activation: str = "identity"
    activation_params: dict = field(default_factory=dict)
    conv: dict | None = None
    reason: str = ""
    frozen: bool = False
    shared: dict[str, str] = field(default_factory=dict)
    s_probe: bool = False
    z: np.ndarray | None = None
    s: np.ndarray | None = None
    a: np.ndarray | None = None
    da: np.ndarray | None = None
    dz: np.ndarray | None = None
    dw: np.ndarray | None = None
    db: np.ndarray | None = None


@dataclass
class SharedParam:
    """A parameter used by several layers (one module called at several places of the chain).

    Attributes:
        key: the parameter's name, e.g. ``"0.weight"`` (torch) or ``"dense/kernel"`` (Keras).
        which: ``"W"`` or ``"b"``.
        module: the module/layer name shown to the user, e.g. ``"0"``.
        layers: the layers l that use it.
        autodiff: the framework's gradient of J w.r.t. the parameter: the sum over every use.
    """

    key: str
    which: str
    module: str
    layers: list[int]
    autodiff: np.ndarray | None


@dataclass
class FrameworkRun:
    """What an adapter returns: the neutral model description and every autodiff value.

    Attributes:
        framework: ``"torch"`` or ``"keras"``.
        model_name: the model's class name.
        layers: the layer specs, l = 1..L.
        x: the input batch (float64).
        y: the targets (float64, or integer class indices).
        dtype: the model's dtype name (autodiff values were computed in it).
        loss: the neutral loss (None for an arbitrary callable: dJ/dŶ then comes from autodiff).
        loss_display: how the user's loss is shown.
        j: the framework's loss value.
        dj_dyhat: the framework's dJ/dŶ (None when the loss does not depend on Ŷ, see ``keras_logits``).
        keras_logits: True when the framework computed a cross-entropy from the last layer's logits Z_L
            (Keras: ŷ carried ``_keras_logits``), so J depends on Z_L directly.
        notes: remarks for the trace (framework warnings, widened tolerances).
        rtol_floor: a documented minimum rtol where the framework's own kernel is less accurate than its dtype
            (TensorFlow's float64 gelu).
        shared: parameters used by several layers; their gradient is the sum of the per-use terms.
        model_dtype: the model's own dtype when autodiff ran on a float64 copy of it (float16/bfloat16 models),
            else ``""``.
        conventions: the framework's :class:`Conventions` (layouts, words, loss convention).
    """

    framework: str
    model_name: str
    layers: list[LayerSpec]
    x: np.ndarray
    y: np.ndarray
    dtype: str
    loss: LossSpec | None
    loss_display: str
    j: float
    dj_dyhat: np.ndarray | None
    keras_logits: bool = False
    notes: list[str] = field(default_factory=list)
    rtol_floor: float = 0.0
    shared: list[SharedParam] = field(default_factory=list)
    model_dtype: str = ""
    conventions: Conventions = field(default_factory=Conventions)
