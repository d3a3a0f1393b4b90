"""The built-in graph examples in Keras (functional models, float64, seeded): a pre-norm transformer block, a
ResNet basic block (BatchNormalization in training mode), an embedding classifier — the same three as torch's.
"""  # noqa: D205

from __future__ import annotations

from typing import Any

import keras
import numpy as np

__all__ = ["GRAPH_EXAMPLES", "build_graph_example"]

L = keras.layers
F64 = "float64"


def transformer_block(d: int = 16, heads: int = 4, hidden: int = 32, seq: int = 5) -> keras.Model:
    """``x + attn(ln1(x))``, then ``+ fc2(gelu(fc1(ln2(·))))``: the pre-norm block as a functional model."""
    x = keras.Input((seq, d), dtype=F64, name="x")
    h = L.LayerNormalization(epsilon=1e-5, dtype=F64, name="ln1")(x)
    a = L.MultiHeadAttention(heads, d // heads, dtype=F64, name="attn")(h, h)
    r = L.Add(dtype=F64, name="add")([x, a])
    h2 = L.LayerNormalization(epsilon=1e-5, dtype=F64, name="ln2")(r)
    f = L.Dense(hidden, activation="gelu", dtype=F64, name="fc1")(h2)
    f = L.Dense(d, dtype=F64, name="fc2")(f)
    out = L.Add(dtype=F64, name="add_1")([r, f])
    return keras.Model(x, out, name="transformer_block")


def resnet_block(c: int = 3, size: int = 5) -> keras.Model:
    """conv3×3 → BN → ReLU → conv3×3 → BN → + x → ReLU, channels last."""
    x = keras.Input((size, size, c), dtype=F64, name="x")
    h = L.Conv2D(c, 3, padding="same", use_bias=False, dtype=F64, name="conv1")(x)
    h = L.BatchNormalization(epsilon=1e-5, dtype=F64, name="bn1")(h)
    h = L.ReLU(dtype=F64, name="relu1")(h)
    h = L.Conv2D(c, 3, padding="same", use_bias=False, dtype=F64, name="conv2")(h)
    h = L.BatchNormalization(epsilon=1e-5, dtype=F64, name="bn2")(h)
    h = L.Add(dtype=F64, name="add")([h, x])
    out = L.ReLU(dtype=F64, name="relu2")(h)
    return keras.Model(x, out, name="resnet_block")


def embedding_classifier(vocab: int = 12, d: int = 6, classes: int = 3, seq: int = 4) -> keras.Model:
    """Token ids → Embedding → mean over the sequence → LayerNormalization → Dense logits."""
    ids = keras.Input((seq,), dtype="int64", name="ids")
    h = L.Embedding(vocab, d, dtype=F64, name="emb")(ids)
    h = L.GlobalAveragePooling1D(dtype=F64, name="mean")(h)
    h = L.LayerNormalization(epsilon=1e-5, dtype=F64, name="norm")(h)
    out = L.Dense(classes, dtype=F64, name="head")(h)
    return keras.Model(ids, out, name="embedding_classifier")


def _transformer(rng: np.random.Generator):
    model = transformer_block()
    x, y = rng.normal(size=(2, 5, 16)), rng.normal(size=(2, 5, 16))
    return (
        model,
        x,
        y,
        keras.losses.MeanSquaredError(dtype=F64),
        (
            "A pre-norm transformer block (d = 16, 4 heads, MLP 16→32→16 with GELU), x of shape (2, 5, 16), "
            "mean-squared error: LayerNormalization → MultiHeadAttention → + x → LayerNormalization → MLP → + residual."
        ),
        {},
    )


def _resnet(rng: np.random.Generator):
    model = resnet_block()
    x, y = rng.normal(size=(4, 5, 5, 3)), rng.normal(size=(4, 5, 5, 3))
    return (
        model,
        x,
        y,
        keras.losses.MeanSquaredError(dtype=F64),
        (
            "A ResNet basic block (3 channels, 3×3 convolutions, BatchNormalization in training mode: batch "
            "statistics), x of shape (4, 5, 5, 3) (channels last), mean-squared error: conv → BN → ReLU → conv → BN → "
            "+ x → ReLU."
        ),
        {"training": True},
    )


def _embedding(rng: np.random.Generator):
    model = embedding_classifier()
    ids = rng.integers(0, 12, size=(6, 4))
    y = np.eye(3)[rng.integers(0, 3, size=6)]
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, dtype=F64)
    return (
        model,
        ids,
        y,
        loss,
        (
            "An embedding classifier: 6 sequences of 4 token ids (vocabulary 12) → Embedding (dim 6) → mean over the "
            "sequence → LayerNormalization → Dense logits (3 classes), categorical cross-entropy from logits with "
            "label smoothing 0.1. The embedding's gradient is sparse: only the rows of ids that occur are non-zero."
        ),
        {},
    )


GRAPH_EXAMPLES = {"transformer-block": _transformer, "resnet-block": _resnet, "embedding-classifier": _embedding}


def build_graph_example(name: str, seed: int = 0) -> tuple[Any, np.ndarray, np.ndarray, Any, str, dict]:
    """``(model, x, y, loss, description, explain keyword arguments)`` of a built-in graph example."""
    keras.utils.set_random_seed(seed)
    return GRAPH_EXAMPLES[name](np.random.default_rng(seed))
