"""Ecosystem integrations, framework-free: each name here imports its library only when it is first used.

``import gradsight`` (and ``import gradsight.integrations``) never imports Lightning, transformers, TensorBoard or
a deep-learning framework. Each integration is an optional extra::

    pip install "gradsight[lightning]"      # GradsightLightningCallback for PyTorch Lightning
    pip install "gradsight[transformers]"   # GradsightTrainerCallback for the Hugging Face Trainer
    pip install "gradsight[tensorboard]"    # TensorBoard export and live sink (gradsight.export)
    pip install "gradsight[parquet]"        # Parquet export

Names:

* :class:`GradsightLightningCallback` / :func:`lightning_callback`: a ``lightning.pytorch.Callback`` that watches the
  LightningModule (see :mod:`gradsight.frameworks.torch._lightning`).
* :class:`GradsightTrainerCallback` / :func:`hf_callback`: a ``transformers.TrainerCallback`` that watches the
  Trainer's model (see :mod:`gradsight.frameworks.torch._hf`).
* :func:`to_tensorboard`, :class:`LiveTensorBoard`, :class:`TensorBoardSink`: see :mod:`gradsight.export`.
* :func:`torch_sharding`: how a ``torch.nn.Module`` is sharded — ``"fully_shard"`` (FSDP2), ``"fsdp1"`` (FSDP1 with
  ``use_orig_params=True``) or ``None`` — raising :class:`~gradsight.UnsupportedError` for a sharding gradsight
  cannot merge exactly (for integrations that pick the module to watch; see
  :mod:`gradsight.frameworks.torch._fsdp`).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [  # noqa: F822 - the classes are provided lazily by __getattr__
    "GradsightLightningCallback",
    "GradsightTrainerCallback",
    "LiveTensorBoard",
    "TensorBoardSink",
    "hf_callback",
    "lightning_callback",
    "to_tensorboard",
    "torch_sharding",
]

# public name -> (module, attribute)
_LAZY: dict[str, tuple[str, str]] = {
    "GradsightLightningCallback": ("gradsight.frameworks.torch._lightning", "GradsightLightningCallback"),
    "GradsightTrainerCallback": ("gradsight.frameworks.torch._hf", "GradsightTrainerCallback"),
    "LiveTensorBoard": ("gradsight.export._tensorboard", "LiveTensorBoard"),
    "TensorBoardSink": ("gradsight.export._tensorboard", "TensorBoardSink"),
    "to_tensorboard": ("gradsight.export._tensorboard", "to_tensorboard"),
    "torch_sharding": ("gradsight.frameworks.torch._fsdp", "sharding"),
}


def __getattr__(name: str) -> Any:
    """Import an integration on first access (PEP 562)."""
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'gradsight.integrations' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def lightning_callback(**kwargs: Any) -> Any:
    """A :class:`GradsightLightningCallback` for ``lightning.pytorch.Trainer(callbacks=[...])``; imports Lightning now.

    Args:
        **kwargs: see :class:`gradsight.frameworks.torch._lightning.GradsightLightningCallback`.
    """
    return __getattr__("GradsightLightningCallback")(**kwargs)


def hf_callback(**kwargs: Any) -> Any:
    """A :class:`GradsightTrainerCallback` for ``transformers.Trainer(callbacks=[...])``; imports transformers now.

    Args:
        **kwargs: see :class:`gradsight.frameworks.torch._hf.GradsightTrainerCallback`.
    """
    return __getattr__("GradsightTrainerCallback")(**kwargs)
