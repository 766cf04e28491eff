"""Decoder-only transformer: causal multi-head attention with RoPE, pre-norm RMSNorm, SwiGLU/GELU MLP, tied embedding.

Three ways through the same attention code (``CausalSelfAttention._project`` and ``_attend``):
``forward`` (a whole sequence, training), ``forward_with_past`` (concatenate new keys onto a past, the form the
ONNX graph uses) and ``prefill`` / ``step`` (write into a ``KVCache`` preallocated to ``max_seq_len``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sokhan import SokhanError
from sokhan.kernels import flash_attention, linear_cross_entropy
from sokhan.pipeline.models.config import ModelConfig
from sokhan.pipeline.models.layers import MLP, RMSNorm, Rotary, apply_rotary
from sokhan.pipeline.models.state import KVCache

KV = tuple[torch.Tensor, torch.Tensor]


def attention_mask(position_ids: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(B, 1, T, n_keys) bool, true where the query at position_ids[b, t] may see key j, i.e. j ≤ its position.

    The keys are the tokens at positions 0 .. n_keys - 1 of the sequence, in order.
    """
    keys = torch.arange(n_keys, device=position_ids.device)
    return (keys[None, None, :] <= position_ids[:, :, None]).unsqueeze(1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # projects into the residual stream
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, T, C) -> q, k, v (B, nh, T, hs), q and k rotated by their positions' angles."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        B, nh, T, hs = y.shape
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q (B, nh, T, hs) against k, v (B, nh, S, hs) under mask (B, 1, T, S) -> (B, T, C)."""
        return self._output(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """A whole sequence from position 0: x (B, T, C) -> (B, T, C)."""
        q, k, v = self._project(x, cos, sin)
        return self._output(flash_attention(q, k, v, causal=True))  # (B, nh, T, hs) in

    def forward_with_past(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: KV, mask: torch.Tensor
    ) -> tuple[torch.Tensor, KV]:
        """x (B, T, C) after past keys/values (B, nh, P, hs) -> (B, T, C) and the present (B, nh, P + T, hs)."""
        q, k, v = self._project(x, cos, sin)
        k = torch.cat((past[0], k), dim=2)  # (B, nh, P + T, hs)
        v = torch.cat((past[1], v), dim=2)  # (B, nh, P + T, hs)
        # Attention written out rather than through SDPA: the exporter lowers SDPA to 3-D matmuls behind a
        # transpose that copies the whole key cache at every step; as 4-D q @ kᵀ ONNX Runtime fuses the transpose
        # into the matmul (FusedMatMul, transB) and reads the cache in place. Every query sees at least its own
        # key, so no row is fully masked and the softmax needs none of SDPA's NaN guarding.
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, P + T)
        scores = scores.masked_fill(~mask, float("-inf"))
        return self._output(torch.matmul(scores.softmax(dim=-1), v)), (k, v)

    def forward_cached(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KV, position: int, mask: torch.Tensor
    ) -> torch.Tensor:
        """x (B, T, C) at positions position .. position + T - 1; writes its keys/values into cache (B, nh, S, hs)."""
        q, k, v = self._project(x, cos, sin)
        end = position + x.shape[1]
        cache[0][:, :, position:end] = k
        cache[1][:, :, position:end] = v
        return self._attend(q, cache[0][:, :, :end], cache[1][:, :, :end], mask)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm_2 = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.mlp, dropout=cfg.dropout)

    def _with_mlp(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = x + attended
        return x + self.mlp(self.norm_2(x))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self._with_mlp(x, self.attn(self.norm_1(x), cos, sin))

    def forward_with_past(self, x, cos, sin, past: KV, mask) -> tuple[torch.Tensor, KV]:
        attended, present = self.attn.forward_with_past(self.norm_1(x), cos, sin, past, mask)
        return self._with_mlp(x, attended), present

    def forward_cached(self, x, cos, sin, cache: KV, position: int, mask) -> torch.Tensor:
        return self._with_mlp(x, self.attn.forward_cached(self.norm_1(x), cos, sin, cache, position, mask))


class Transformer(nn.Module):
    """The language model: ids (B, L) -> next-token logits (B, L, V)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embeddings.weight
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.max_seq_len)
        self.apply(self._init_weights)
        # GPT-2: each block adds two projections into the residual stream; shrink them so its variance stays O(1).
        for name, p in self.named_parameters():
            if name.endswith(("attn.c_proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def _check_length(self, position: int, n: int) -> None:
        if position + n > self.config.max_seq_len:
            raise SokhanError(
                f"transformer: {n} token(s) at position {position} go past model.max_seq_len = "
                f"{self.config.max_seq_len}; start a new state or use a model with a longer max_seq_len"
            )

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm_f(x))  # (B, T, V)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, L) -> logits (B, L, V); position t sees tokens 0..t.

        With ``targets`` (B, L), the mean next-token cross-entropy instead, without materialising the logits
        (``linear_cross_entropy``): what training calls.
        """
        self._check_length(0, ids.shape[1])
        cos, sin = self.rotary.tables(torch.arange(ids.shape[1], device=ids.device)[None])  # (1, 1, L, hs/2)
        x = self.dropout(self.embeddings(ids))  # (B, L, C)
        for block in self.layers:
            x = block(x, cos, sin)
        if targets is None:
            return self._logits(x)
        return linear_cross_entropy(self.norm_f(x).flatten(0, 1), self.lm_head.weight, targets.flatten())

    def forward_with_past(
        self, ids: torch.Tensor, position_ids: torch.Tensor, past: list[KV]
    ) -> tuple[torch.Tensor, list[KV]]:
        """ids, position_ids (B, T) after ``past`` (per layer k, v (B, nh, P, hs), P ≥ 0, positions 0 .. P - 1).

        Returns logits (B, T, V) and the present: per layer k, v (B, nh, P + T, hs). No preallocated cache, no
        Python-side position: the form an ONNX graph can take with dynamic P.
        """
        cos, sin = self.rotary.tables(position_ids)  # (B, 1, T, hs/2)
        mask = attention_mask(position_ids, past[0][0].shape[2] + ids.shape[1])  # (B, 1, T, P + T)
        x = self.embeddings(ids)  # (B, T, C)
        present = []
        for block, layer_past in zip(self.layers, past):
            x, layer_present = block.forward_with_past(x, cos, sin, layer_past, mask)
            present.append(layer_present)
        return self._logits(x), present

    def init_state(self, batch_size: int, device=None, dtype=None) -> KVCache:
        """An empty cache for ``batch_size`` sequences: (B, nh, max_seq_len, hs) per layer, position 0."""
        device = device if device is not None else self.embeddings.weight.device
        dtype = dtype if dtype is not None else self.embeddings.weight.dtype
        shape = (batch_size, self.config.n_heads, self.config.max_seq_len, self.config.d_model // self.config.n_heads)
        n = self.config.n_layers
        return KVCache(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            position=torch.zeros((), dtype=torch.long, device=device),
        )

    def prefill(self, ids: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Consume ids (B, T) in one parallel pass after ``state`` (None: a fresh one) -> (logits (B, T, V), state).

        The state's caches are written in place and its position advanced; the same object is returned.
        """
        B, T = ids.shape
        if state is None:
            state = self.init_state(B, ids.device)
        position = int(state.position)
        self._check_length(position, T)
        if T == 0:
            return self._logits(self.embeddings(ids)), state
        position_ids = torch.arange(position, position + T, device=ids.device)[None]  # (1, T)
        cos, sin = self.rotary.tables(position_ids)  # (1, 1, T, hs/2)
        mask = attention_mask(position_ids, position + T)  # (1, 1, T, position + T)
        x = self.embeddings(ids)  # (B, T, C)
        for block, k, v in zip(self.layers, state.keys, state.values):
            x = block.forward_cached(x, cos, sin, (k, v), position, mask)
        state.position = state.position + T
        return self._logits(x), state

    def step(self, ids: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One token per sequence: ids (B,) -> (logits (B, V), state), the state updated in place."""
        logits, state = self.prefill(ids[:, None], state)
        return logits[:, 0], state
