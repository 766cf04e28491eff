"""Pieces both architectures share: RMSNorm (through the kernels' ``rms_norm``), rotary embeddings, the MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sokhan.kernels import rms_norm


class RMSNorm(nn.Module):
    """x / rms(x) · weight over the last dimension; optionally fused with the residual add, as in mamba-ssm.

    ``norm(x)`` -> normalized x. ``norm(x, residual=r, prenorm=True)`` -> (normalized x + r, x + r), so a pre-norm
    block can carry the residual stream without a separate add. ``residual=None, prenorm=True`` starts the stream.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False):
        return rms_norm(x, self.weight, eps=self.eps, residual=residual, prenorm=prenorm)


class Rotary(nn.Module):
    """Rotary position embedding tables (rotate-half form, as in GPT-NeoX / LLaMA) up to ``max_seq_len``.

    ``tables(position_ids (B, T))`` -> (cos, sin), each (B, 1, T, hs/2), broadcasting over heads. The tables are
    non-persistent buffers: derived from the config, never stored in a checkpoint.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head size, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hs/2,)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (max_seq_len, hs/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)  # (B, 1, T, hs/2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hs/2]) of x (B, nh, T, hs) by the angles in cos, sin (B, 1, T, hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def swiglu_hidden(d_model: int, multiple_of: int = 64) -> int:
    """SwiGLU width: 8/3 · d_model (three matrices cost what GELU's two at 4 · d_model do), rounded up."""
    return multiple_of * math.ceil(8 * d_model / 3 / multiple_of)


class MLP(nn.Module):
    """The feed-forward block: SwiGLU (down(silu(gate(x)) · up(x))) or GELU (down(gelu(up(x))))."""

    def __init__(self, d_model: int, kind: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            hidden = swiglu_hidden(d_model)
            self.gate = nn.Linear(d_model, hidden, bias=False)
        elif kind == "gelu":
            hidden = 4 * d_model
        else:
            raise ValueError(f"unknown MLP kind {kind!r}; valid: 'swiglu', 'gelu'")
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)  # projects into the residual stream
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        h = F.silu(self.gate(x)) * self.up(x) if self.kind == "swiglu" else F.gelu(self.up(x))  # (B, T, hidden)
        return self.dropout(self.down(h))
