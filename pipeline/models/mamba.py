"""Mamba (Gu & Dao, 2023): a stack of selective state-space blocks, laid out as HF ``MambaForCausalLM``.

Parameter names match HF (``backbone.embeddings``, ``backbone.layers.{i}.norm``, ``backbone.layers.{i}.mixer.
{A_log, D, conv1d, in_proj, x_proj, dt_proj, out_proj}``, ``backbone.norm_f``, ``lm_head``), so a checkpoint maps to
HF without renaming. ``selective = False`` gives the LTI ablation: Δ (per channel), B and C (per channel and state)
become learned input-independent parameters, an S4D-style model inside the same block; from a zero state its
recurrence runs as one convolution, as S4 runs it, and through the same scan where a state is carried.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sokhan.kernels import (
    causal_conv1d,
    causal_conv1d_update,
    linear_cross_entropy,
    selective_scan,
    selective_state_update,
)
from sokhan.kernels.selective_scan.reference import skip_and_gate
from sokhan.pipeline.models.config import ModelConfig
from sokhan.pipeline.models.layers import RMSNorm
from sokhan.pipeline.models.state import MambaState


def _inverse_softplus_dt(d_inner: int, dt_min: float, dt_max: float) -> torch.Tensor:
    """Biases b with softplus(b) log-uniform in [dt_min, dt_max]: each channel starts at its own time scale."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))  # (D,)
    dt = dt.clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt) = log(exp(dt) - 1), written to stay finite


def channel_major(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A projection along the channel dimension of x (Bt, I, L) -> (Bt, O, L), contiguous; weight (O, I).

    The mixer works in (Bt, D, L) (the scan's layout, mamba-ssm's too). ``nn.Linear`` on a transposed view makes a
    (Bt, L, D) result and, in the backward pass, a (Bt, L, D) gradient: a transposed copy either side, and every
    elementwise op between the two layouts (the gate, silu's backward) runs strided, several times slower on CPU.
    A batched product with the weight broadcast reads the transposed operand in place and writes (Bt, O, L)
    directly: the tiny Mamba's training step went from 375 to 314 ms on one CPU thread (benchmarks/train.py).
    """
    return torch.bmm(weight.expand(x.shape[0], *weight.shape), x)


class MambaMixer(nn.Module):
    """The Mamba block: in_proj -> (x, z); x -> causal conv -> silu -> selective SSM (+ D x); · silu(z); out_proj."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d_inner, n = cfg.d_inner, cfg.d_state
        self.selective = cfg.selective
        self.d_state = n
        self.dt_rank = cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, padding=cfg.d_conv - 1, bias=True)
        if cfg.selective:
            self.x_proj = nn.Linear(d_inner, cfg.dt_rank + 2 * n, bias=False)  # x -> (Δ low-rank, B, C)
            self.dt_proj = nn.Linear(cfg.dt_rank, d_inner, bias=True)
            std = cfg.dt_rank**-0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            with torch.no_grad():
                self.dt_proj.bias.copy_(_inverse_softplus_dt(d_inner, cfg.dt_min, cfg.dt_max))
        else:
            self.dt_bias = nn.Parameter(_inverse_softplus_dt(d_inner, cfg.dt_min, cfg.dt_max))  # Δ = softplus(dt_bias)
            # One B and C per channel, as S4D (and the Mamba paper's S4 baseline) learn them: shared across channels
            # they would leave each channel's kernel differing only through Δ, a weaker ablation than the paper's.
            # The scan takes them as D groups of one channel. S4D init: B = 1, C ~ N(0, 1).
            self.B = nn.Parameter(torch.ones(d_inner, n))
            self.C = nn.Parameter(torch.randn(d_inner, n))
        # S4D-real: A = -(1, 2, ..., N) in every channel, stored as log so A stays negative.
        A = torch.arange(1, n + 1, dtype=torch.float32).repeat(d_inner, 1)  # (D, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))  # skip connection
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=False)

    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)  # (D, 1, W) -> (D, W)

    def _ssm_params(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., D) -> Δ before bias and softplus (..., D), B, C (..., N) (LTI: (..., D, N), a group per channel),
        and Δ's bias (D,)."""
        if self.selective:
            dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            return F.linear(dt, self.dt_proj.weight), B, C, self.dt_proj.bias
        lead = x.shape[:-1]
        return torch.zeros_like(x), self.B.expand(*lead, -1, -1), self.C.expand(*lead, -1, -1), self.dt_bias

    def _ssm_params_channel_major(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`_ssm_params` for x (B, D, L): Δ before bias and softplus (B, D, L), B, C (B, N, L) (LTI: (B, D, N,
        L)), Δ's bias."""
        if not self.selective:
            batch, length = x.shape[0], x.shape[2]
            B, C = (p[None, :, :, None].expand(batch, -1, -1, length) for p in (self.B, self.C))
            return torch.zeros_like(x), B, C, self.dt_bias
        dt, B, C = channel_major(self.x_proj.weight, x).split([self.dt_rank, self.d_state, self.d_state], dim=1)
        return channel_major(self.dt_proj.weight, dt), B, C, self.dt_proj.bias

    def forward(
        self,
        hidden: torch.Tensor,
        conv_state: torch.Tensor | None = None,
        ssm_state: torch.Tensor | None = None,
        continue_state: bool = False,
    ) -> torch.Tensor:
        """hidden (B, L, d) -> (B, L, d), all positions in parallel.

        With conv_state (B, D, W) and ssm_state (B, D, N) given, they are overwritten with the state after the
        sequence; ``continue_state`` says whether they also hold a past to continue from (else: a fresh start).
        """
        x, z = channel_major(self.in_proj.weight, hidden.transpose(1, 2)).chunk(2, dim=1)  # (B, D, L) each
        if conv_state is None:
            x = causal_conv1d(x, self._conv_weight(), self.conv1d.bias, activation="silu")  # (B, D, L)
        else:
            width = conv_state.shape[2]
            # The conv sees the last W - 1 inputs before the sequence (zeros in a fresh state) as its left context.
            x_in = torch.cat((conv_state[:, :, 1:].to(x.dtype), x), dim=2)  # (B, D, W - 1 + L)
            conv_state.copy_(x_in[:, :, -width:])
            x = causal_conv1d(x_in, self._conv_weight(), self.conv1d.bias, activation="silu")[:, :, width - 1 :]
        delta, B, C, delta_bias = self._ssm_params_channel_major(x)  # (B, D, L), (B, N, L) twice (LTI: (B, D, N, L)), (D,)
        A = -torch.exp(self.A_log)  # (D, N)
        scan = dict(D=self.D, z=z, delta_bias=delta_bias, delta_softplus=True)
        if ssm_state is None and not self.selective:
            y = self._lti_convolution(x, A, z)  # the same recurrence, as one convolution (no per-step parameters)
        elif ssm_state is None:
            y = selective_scan(x, delta, A, B, C, **scan)  # (B, D, L)
        else:
            y, last = selective_scan(x, delta, A, B, C, return_last_state=True, **scan)
            if continue_state:
                # The scan starts from h = 0; an initial h0 adds C_t · exp(A · Σ_{s≤t} Δ_s) h0 at step t (ZOH).
                h0 = ssm_state.to(y.dtype)  # (B, D, N)
                dt = F.softplus(delta + delta_bias[:, None])  # (B, D, L)
                decay = torch.exp(A[None, :, :, None] * dt.cumsum(dim=-1)[:, :, None, :])  # (B, D, N, L)
                # Two broadcast products and a sum: 2.3× faster than the same contraction through einsum on CPU.
                Cg = C if C.dim() == 4 else C[:, None]  # (B, D or 1, N, L): the LTI ablation's C is per channel
                y = y + ((decay * h0[..., None]) * Cg).sum(2) * F.silu(z)
                last = last + decay[..., -1] * h0
            ssm_state.copy_(last)
        return channel_major(self.out_proj.weight, y).transpose(1, 2).contiguous()  # (B, L, d)

    def _lti_convolution(self, x: torch.Tensor, A: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The LTI ablation's scan from a zero state, as S4 runs it: x (B, D, L) -> (B, D, L), skip and gate included.

        With Δ, B and C constant in time, h_t = exp(Δ A) h_{t-1} + Δ B x_t and y_t = C · h_t unroll to a causal
        convolution y = K * x with K_d[k] = Δ_d Σ_n C_dn B_dn exp(k Δ_d A_dn): the scan's own discretization, so the
        result is the scan's (tested against it), without its (B, D, N, L) per-channel B and C, which made the
        ablation train 4× slower. The convolution runs through an FFT of length 2L.
        """
        length = x.shape[-1]
        dt = F.softplus(self.dt_bias.to(x.dtype))  # (D,)
        k = torch.arange(length, dtype=x.dtype, device=x.device)
        decay = torch.exp((dt[:, None] * A.to(x.dtype))[:, :, None] * k)  # (D, N, L)
        kernel = torch.einsum("dn,dnk->dk", (self.C * self.B).to(x.dtype), decay) * dt[:, None]  # (D, L)
        n = 2 * length  # zero-padded: no wrap-around of the circular convolution
        y = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(kernel, n=n), n=n)[..., :length]
        return skip_and_gate(y, x, self.D, z)

    def step(self, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """hidden (B, d) -> (B, d) for one position; conv_state (B, D, W) and ssm_state (B, D, N) updated in place."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, D) each
        x = causal_conv1d_update(x, conv_state, self._conv_weight(), self.conv1d.bias, activation="silu")  # (B, D)
        delta, B, C, delta_bias = self._ssm_params(x)  # (B, D), (B, N) (LTI: (B, D, N)) twice, (D,)
        A = -torch.exp(self.A_log)  # (D, N)
        y = selective_state_update(ssm_state, x, delta, A, B, C, D=self.D, z=z, dt_bias=delta_bias, dt_softplus=True)
        return self.out_proj(y)  # (B, d)


class MambaBlock(nn.Module):
    """Pre-norm residual around the mixer; the add is fused into the norm (residual stream carried alongside)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = MambaMixer(cfg)
        # On the branch before it joins the residual stream (the next norm adds it), as the transformer does.
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, hidden, residual, conv_state=None, ssm_state=None, continue_state=False):
        """(hidden, residual) (B, L, d) -> (mixer(norm(hidden + residual)), hidden + residual).

        ``residual`` is None at the first layer: the stream starts as the embeddings.
        """
        hidden, residual = self.norm(hidden, residual=residual, prenorm=True)
        return self.dropout(self.mixer(hidden, conv_state, ssm_state, continue_state)), residual

    def step(self, hidden, residual, conv_state, ssm_state):
        """As ``forward`` for one position: (B, d) tensors."""
        hidden, residual = self.norm(hidden, residual=residual, prenorm=True)
        return self.mixer.step(hidden, conv_state, ssm_state), residual


class MambaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, ids: torch.Tensor, state: MambaState | None = None, continue_state: bool = False):
        """ids (B, L) -> normalized hidden states (B, L, d); fills ``state`` when given (see ``MambaMixer``)."""
        hidden, residual = self.dropout(self.embeddings(ids)), None  # (B, L, d)
        for i, layer in enumerate(self.layers):
            states = (state.conv_states[i], state.ssm_states[i]) if state is not None else (None, None)
            hidden, residual = layer(hidden, residual, *states, continue_state)
        return self.norm_f(hidden, residual=residual)

    def step(self, ids: torch.Tensor, state: MambaState) -> torch.Tensor:
        """ids (B,) -> normalized hidden states (B, d), the state updated in place."""
        hidden, residual = self.embeddings(ids), None  # (B, d)
        for layer, conv_state, ssm_state in zip(self.layers, state.conv_states, state.ssm_states):
            hidden, residual = layer.step(hidden, residual, conv_state, ssm_state)
        return self.norm_f(hidden, residual=residual)


class MambaLM(nn.Module):
    """The language model: ids (B, L) -> next-token logits (B, L, V)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = MambaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # mamba-ssm's init: embeddings N(0, 0.02); the Linear and Conv1d defaults elsewhere; the one projection
        # per layer into the residual stream scaled by 1/sqrt(n_layers) so the stream's variance stays O(1).
        nn.init.normal_(self.backbone.embeddings.weight, std=0.02)
        for layer in self.backbone.layers:
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(cfg.n_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, L) -> logits (B, L, V); position t sees tokens 0..t.

        With ``targets`` (B, L), the mean next-token cross-entropy instead, without materialising the logits
        (``linear_cross_entropy``): what training calls.
        """
        hidden = self.backbone(ids)
        if targets is None:
            return self.lm_head(hidden)
        return linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten())

    def init_state(self, batch_size: int, device=None, dtype=None) -> MambaState:
        """A fresh (zero) state for ``batch_size`` sequences."""
        weight = self.backbone.embeddings.weight
        device = device if device is not None else weight.device
        dtype = dtype if dtype is not None else weight.dtype
        cfg = self.config
        conv_shape = (batch_size, cfg.d_inner, cfg.d_conv)
        ssm_shape = (batch_size, cfg.d_inner, cfg.d_state)
        return MambaState(
            conv_states=[torch.zeros(conv_shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            ssm_states=[torch.zeros(ssm_shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
        )

    def prefill(self, ids: torch.Tensor, state: MambaState | None = None) -> tuple[torch.Tensor, MambaState]:
        """Consume ids (B, T) in one parallel pass after ``state`` (None: a fresh one) -> (logits (B, T, V), state).

        The state's tensors are overwritten in place with the state after the last token; the same object is returned.
        """
        continue_state = state is not None
        if state is None:
            state = self.init_state(ids.shape[0], ids.device)
        if ids.shape[1] == 0:
            return self.lm_head(self.backbone.embeddings(ids)), state
        return self.lm_head(self.backbone(ids, state, continue_state)), state

    def step(self, ids: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """One token per sequence: ids (B,) -> (logits (B, V), state), the state updated in place."""
        return self.lm_head(self.backbone.step(ids, state)), state
