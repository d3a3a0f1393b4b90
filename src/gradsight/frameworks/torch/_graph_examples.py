"""The built-in graph examples in PyTorch: a pre-norm transformer block, a ResNet basic block, an embedding
classifier (``gradsight explain --example transformer-block|resnet-block|embedding-classifier``).

Each is small, float64 and seeded, so every term checks against autodiff to ~1e-15 and against finite
differences; the Keras adapter builds the same three with Keras layers.
"""  # noqa: D205

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["GRAPH_EXAMPLES", "MLP", "EmbeddingClassifier", "PreNormBlock", "ResNetBlock", "build_graph_example"]


class MLP(nn.Module):
    """``fc2(GELU(fc1(x)))``, the transformer's feed-forward part."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PreNormBlock(nn.Module):
    """``x + attn(ln1(x))``, then ``+ mlp(ln2(·))``: the pre-norm transformer block (GPT-2's layout)."""

    def __init__(self, d: int = 16, heads: int = 4, hidden: int = 32):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        x = x + a
        return x + self.mlp(self.ln2(x))


class TransformerExample(nn.Module):
    """One :class:`PreNormBlock` under the name ``block`` (so its nodes read ``block.ln1``, ``block.add``...)."""

    def __init__(self, d: int = 16, heads: int = 4, hidden: int = 32):
        super().__init__()
        self.block = PreNormBlock(d, heads, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ResNetBlock(nn.Module):
    """torchvision's BasicBlock: conv3×3 → BN → ReLU → conv3×3 → BN → + x → ReLU (one ReLU module, used twice)."""

    def __init__(self, c: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu(out)


class ResNetExample(nn.Module):
    """One :class:`ResNetBlock` under the name ``block``."""

    def __init__(self, c: int = 3):
        super().__init__()
        self.block = ResNetBlock(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class EmbeddingClassifier(nn.Module):
    """Token ids → embedding → mean over the sequence → LayerNorm → linear logits."""

    def __init__(self, vocab: int = 12, d: int = 6, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(ids).mean(dim=1)))


def _transformer(rng: np.random.Generator) -> tuple[nn.Module, np.ndarray, np.ndarray, Any, str, dict]:
    model = TransformerExample().double()
    x = rng.normal(size=(2, 5, 16))
    y = rng.normal(size=(2, 5, 16))
    return (
        model,
        x,
        y,
        nn.MSELoss(),
        (
            "A pre-norm transformer block (d = 16, 4 heads, MLP 16→32→16 with GELU), x of shape (2, 5, 16), "
            "mean-squared error: LayerNorm → multi-head self-attention → + x → LayerNorm → MLP → + residual."
        ),
        {},
    )


def _resnet(rng: np.random.Generator) -> tuple[nn.Module, np.ndarray, np.ndarray, Any, str, dict]:
    model = ResNetExample().double().train()
    x = rng.normal(size=(4, 3, 5, 5))
    y = rng.normal(size=(4, 3, 5, 5))
    return (
        model,
        x,
        y,
        nn.MSELoss(),
        (
            "A ResNet basic block (3 channels, 3×3 convolutions, BatchNorm in training mode: batch statistics), x of "
            "shape (4, 3, 5, 5), mean-squared error: conv → BN → ReLU → conv → BN → + x → ReLU."
        ),
        {},
    )


def _embedding(rng: np.random.Generator) -> tuple[nn.Module, np.ndarray, np.ndarray, Any, str, dict]:
    model = EmbeddingClassifier().double()
    ids = rng.integers(0, 12, size=(6, 4))
    y = rng.integers(0, 3, size=6)
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    return (
        model,
        ids,
        y,
        nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1),
        (
            "An embedding classifier: 6 sequences of 4 token ids (vocabulary 12) → embedding (dim 6) → mean over the "
            "sequence → LayerNorm → linear logits (3 classes), cross-entropy with class weights [1, 2, 0.5] and label "
            "smoothing 0.1. The embedding's gradient is sparse: only the rows of ids that occur are non-zero."
        ),
        {},
    )


GRAPH_EXAMPLES = {"transformer-block": _transformer, "resnet-block": _resnet, "embedding-classifier": _embedding}


def build_graph_example(name: str, seed: int = 0) -> tuple[nn.Module, np.ndarray, np.ndarray, Any, str, dict]:
    """``(model, x, y, loss, description, explain keyword arguments)`` of a built-in graph example."""
    torch.manual_seed(seed)
    return GRAPH_EXAMPLES[name](np.random.default_rng(seed))
