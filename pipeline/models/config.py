"""Model configuration shared by both architectures; torch-free so the CLI and config loader stay light."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from sokhan import SokhanError

# Sizes per preset. Mamba gets twice the layers of the transformer at the same width: one Mamba block has about
# half a transformer block's parameters (6·d² against 12·d²), as in the Mamba paper's comparisons.
PRESETS: dict[str, dict[str, dict[str, int]]] = {
    "transformer": {
        "tiny": {"d_model": 128, "n_layers": 2, "n_heads": 4},
        "small": {"d_model": 256, "n_layers": 4, "n_heads": 4},
        "base": {"d_model": 512, "n_layers": 8, "n_heads": 8},
    },
    "mamba": {
        "tiny": {"d_model": 128, "n_layers": 4},
        "small": {"d_model": 256, "n_layers": 8},
        "base": {"d_model": 512, "n_layers": 16},
    },
}


@dataclass
class ModelConfig:
    """The network. Sizes left unset come from ``preset``; ``resolve`` fills them and the vocabulary size."""

    arch: Literal["transformer", "mamba"] = "mamba"
    """Decoder-only transformer (causal attention, KV cache) or Mamba (selective state space)."""
    preset: Literal["tiny", "small", "base"] = "tiny"
    """Size preset; d_model / n_layers / n_heads set explicitly override it."""
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    """Transformer only: attention heads (d_model must divide by it)."""
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """Transformer only: the feed-forward block."""
    max_seq_len: int = 1024
    """Transformer only: RoPE table and KV-cache length."""
    d_state: int = 16
    """Mamba only: N, the state size per channel."""
    d_conv: int = 4
    """Mamba only: width of the depthwise causal convolution."""
    expand: int = 2
    """Mamba only: D_inner = expand · d_model."""
    dt_rank: int | None = None
    """Mamba only: rank of Δ's projection; default ceil(d_model / 16)."""
    dt_min: float = 0.001
    """Mamba: Δ starts log-uniform in [dt_min, dt_max] per channel (Δ's bias is set to softplus⁻¹ of the draw)."""
    dt_max: float = 0.1
    selective: bool = True
    """Mamba only: false gives the LTI ablation (Δ, B, C learned but input-independent, an S4D-style model)."""
    dropout: float = 0.0
    """Dropout on the token embeddings and on each residual branch (attention and MLP; Mamba's mixer), in training."""
    tie_embeddings: bool = True
    """lm_head shares the token embedding matrix."""
    norm_eps: float = 1e-5
    """RMSNorm's ε: x / sqrt(mean(x²) + ε)."""
    vocab_size: int | None = None
    """Set from the tokenizer by ``resolve``; set it only to build a model without a run."""

    def __post_init__(self) -> None:
        for key in ("d_model", "n_layers", "n_heads", "dt_rank", "vocab_size", "max_seq_len", "d_state", "d_conv", "expand"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise SokhanError(f"config: model.{key} = {v} must be ≥ 1")
        if not 0 < self.dt_min <= self.dt_max < math.inf:
            raise SokhanError(f"config: model.dt_min = {self.dt_min} must be > 0 and ≤ model.dt_max = {self.dt_max}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):  # RMSNorm divides by sqrt(mean² + eps)
            raise SokhanError(f"config: model.norm_eps = {self.norm_eps} must be a finite number > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise SokhanError(f"config: model.dropout = {self.dropout} must be in [0, 1)")
        if self.d_model is not None and self.n_heads is not None and self.arch == "transformer" and self.d_model % self.n_heads:
            raise SokhanError(f"config: model.d_model = {self.d_model} must be divisible by model.n_heads = {self.n_heads}")

    def resolve(self, vocab_size: int | None = None) -> "ModelConfig":
        """A copy with every size filled in (from the preset, the defaults and ``vocab_size``)."""
        sizes = {k: v for k, v in PRESETS[self.arch][self.preset].items() if getattr(self, k) is None}
        cfg = replace(self, **sizes)
        if cfg.dt_rank is None:
            cfg = replace(cfg, dt_rank=math.ceil(cfg.d_model / 16))
        if vocab_size is not None:
            cfg = replace(cfg, vocab_size=vocab_size)
        if cfg.vocab_size is None:
            raise SokhanError("config: model.vocab_size is unset; it comes from the tokenizer (run the tokenize stage)")
        if cfg.arch == "transformer":
            if cfg.n_heads is None:
                raise SokhanError("config: model.n_heads must be set for a transformer")
            # Rotary embeddings rotate pairs of channels, so each head needs an even size.
            if cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2:
                raise SokhanError(
                    f"config: model.d_model = {cfg.d_model} must split into model.n_heads = {cfg.n_heads} heads of "
                    "an even size"
                )
        return cfg

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model
