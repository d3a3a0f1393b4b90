"""The neutral description an adapter hands to the explainer: layer specs plus the framework's autodiff values.

Everything here is numpy float64 in the *framework's own layout* (torch Linear weight ``(out, in)``, Conv2d
``(cout, cin, kh, kw)``, NCHW; Keras Dense kernel ``(in, out)``, Conv2D ``(kh, kw, cin, cout)``, NHWC).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._losses import LossSpec

__all__ = ["FrameworkRun", "LayerSpec", "SharedParam"]


@dataclass
class LayerSpec:
    """One explained layer l: a weighted op with the activation right after it, or a parameter-free layer.

    Attributes:
        index: l = 1..L.
        kind: ``"dense"``, ``"conv2d"``, ``"activation"``, ``"flatten"``, ``"dropout"`` or ``"opaque"`` (no
            rule: traced with autodiff values only).
        name: display name, e.g. ``"0: Linear(3→4) + 1: ReLU()"``.
        type_name: the framework class names, e.g. ``"Linear+ReLU"``.
        weight: the weight (framework layout) or None.
        bias: the bias or None.
        weight_layout: words for the weight layout, e.g. ``"torch Linear weight (out, in)"``.
        activation: rule name (see :data:`gradsight.explain._rules.ACTIVATIONS`, plus ``"softmax"``).
        activation_params: the activation's parameters.
        conv: for conv2d: ``{"stride": (sh, sw), "pads": (top, bottom, left, right), "channels_last": bool}``.
        reason: why a layer is ``opaque``.
        frozen: its parameters are frozen (torch ``requires_grad=False``, Keras ``trainable=False``); their
            gradients are still derived and checked (the adapter differentiates without changing the flags).
        shared: ``{"W": key, "b": key}`` for a parameter this layer shares with other layers (a module used
            several times in the chain); ``dw``/``db`` are then the gradient of *this use* alone.
        s_probe: ``s`` is the Jacobian-vector product ``S_iᵀ·u_i`` with the fixed probe of
            :func:`gradsight.explain._rules.softmax_probe` (softmax Jacobians too large to build).
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
        keras_logits: True when Keras computed a cross-entropy from the last layer's logits Z_L
            (ŷ carried ``_keras_logits``), so J depends on Z_L directly.
        notes: remarks for the trace (framework warnings, widened tolerances).
        rtol_floor: a documented minimum rtol where the framework's own kernel is less accurate than its dtype
            (TensorFlow's float64 gelu).
        shared: parameters used by several layers; their gradient is the sum of the per-use terms.
        model_dtype: the model's own dtype when autodiff ran on a float64 copy of it (float16/bfloat16 models),
            else ``""``.
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
