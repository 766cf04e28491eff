"""The two architectures behind one decode contract.

``build(cfg)`` makes a ``Transformer`` or a ``MambaLM`` from a resolved ``ModelConfig``. Every model has
``forward(ids (B, L)) -> logits (B, L, V)``, ``init_state(batch_size, device, dtype)``, ``prefill(ids (B, T), state)
-> (logits (B, T, V), state)`` and ``step(ids (B,), state) -> (logits (B, V), state)``.

Importing this package does not import torch (the CLI and the config loader import ``ModelConfig`` from here);
the torch modules load on first use of ``build`` or of a model or state class.
"""

from __future__ import annotations

import importlib

from sokhan.pipeline.models.config import PRESETS, ModelConfig

_LAZY = {
    "Transformer": "sokhan.pipeline.models.transformer",
    "MambaLM": "sokhan.pipeline.models.mamba",
    "KVCache": "sokhan.pipeline.models.state",
    "MambaState": "sokhan.pipeline.models.state",
}

__all__ = ["PRESETS", "ModelConfig", "build", *_LAZY]


def build(cfg: ModelConfig):
    """The model ``cfg`` describes (``cfg`` resolved: ``ModelConfig.resolve(vocab_size)``), freshly initialised.

    Parameters are created on torch's default device; build under ``torch.device("meta")`` to size a model cheaply.
    """
    if cfg.vocab_size is None or cfg.d_model is None or cfg.n_layers is None:
        raise ValueError("build() needs a resolved config: call cfg.resolve(vocab_size) first")
    if cfg.arch == "transformer":
        from sokhan.pipeline.models.transformer import Transformer

        return Transformer(cfg)
    from sokhan.pipeline.models.mamba import MambaLM

    return MambaLM(cfg)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
