"""Export the whole-prompt prefill graph (``prefill.onnx``) of a sokhan model: a prompt in, the step graph's state out.

Both architectures start from an empty state and return the last position's logits and the state after the prompt,
named as the step graph's outputs, so ``present.*`` feeds ``decoder.onnx``'s ``past_key_values.*`` directly:

- Transformer: ``input_ids``, ``position_ids`` (B, T) -> ``logits`` (B, V), ``present.{i}.key`` / ``.value``
  (B, nh, T, hs); ``forward_with_past`` from an empty cache.
- Mamba: ``input_ids`` (B, T) -> ``logits`` (B, V), ``present.{i}.conv_state`` (B, D_inner, d_conv) and
  ``present.{i}.recurrent_state`` (B, D_inner, N). Everything parallel over T runs for all positions at once; the
  recurrence goes through ``torch.ops.higher_order.scan`` (``selective_scan_hop``), which exports as one ONNX
  ``Scan`` node per layer with T left dynamic (the reference scan's Python loop would unroll for one length).

T is a dynamic axis; the example prompt has ``EXAMPLE_PROMPT`` = 5 tokens (at least 2, or the exporter specialises
the axis, and more than d_conv - 1 = 3 so the conv-state slice is exercised past the zero padding).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sokhan.export.onnx import EXAMPLE_BATCH, export_graph, state_layout
from sokhan.pipeline.models.config import ModelConfig

EXAMPLE_PROMPT = 5
MAX_PROMPT = 1 << 20  # Mamba has no context limit; the exporter wants a finite bound on the axis.


def export_prefill(model: nn.Module, cfg: ModelConfig, path: Path, opset: int = 18) -> None:
    """Write the prefill graph of ``model`` (eval mode, float32, CPU) to ``path``, weights inside."""
    from torch.export import Dim

    layout = state_layout(cfg)
    transformer = cfg.arch == "transformer"
    batch = Dim("batch", min=1, max=4096)
    seq = Dim("seq", min=1, max=cfg.max_seq_len if transformer else MAX_PROMPT)
    ids = torch.randint(0, cfg.vocab_size, (EXAMPLE_BATCH, EXAMPLE_PROMPT))
    names_out = ["logits"] + [s["output"] for s in layout]
    if transformer:
        positions = torch.arange(EXAMPLE_PROMPT).expand(EXAMPLE_BATCH, -1).contiguous()
        dynamic = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}}
        export_graph(TransformerPrefill(model, cfg).eval(), (ids, positions), dynamic, ["input_ids", "position_ids"], names_out, path, opset)
    else:
        export_graph(MambaPrefill(model).eval(), (ids,), {"input_ids": {0: batch, 1: seq}}, ["input_ids"], names_out, path, opset)


class TransformerPrefill(nn.Module):
    """input_ids, position_ids (B, T) -> last logits (B, V), present k/v (B, nh, T, hs) per layer."""

    def __init__(self, model: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        self.model = model
        self.n_layers, self.n_heads, self.head_dim = cfg.n_layers, cfg.n_heads, cfg.d_model // cfg.n_heads

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        empty = input_ids.new_zeros((input_ids.shape[0], self.n_heads, 0, self.head_dim), dtype=torch.float32)
        logits, present = self.model.forward_with_past(input_ids, position_ids, [(empty, empty)] * self.n_layers)
        return (logits[:, -1], *[t for kv in present for t in kv])


class MambaPrefill(nn.Module):
    """input_ids (B, T) -> last logits (B, V), then per layer conv_state (B, D, W) and recurrent_state (B, D, N).

    ``MambaLM.prefill`` from a fresh state, written with the model's own modules but the scan through
    ``selective_scan_hop``; the lm_head runs on the last position only.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        backbone = self.model.backbone
        hidden, residual = backbone.embeddings(input_ids), None  # (B, T, d)
        state: list[torch.Tensor] = []
        for layer in backbone.layers:
            hidden, residual = layer.norm(hidden, residual=residual, prenorm=True)
            hidden, conv_state, ssm_state = mixer_prefill(layer.mixer, hidden)
            state += [conv_state, ssm_state]
        last = backbone.norm_f(hidden[:, -1], residual=residual[:, -1])  # (B, d)
        return (self.model.lm_head(last), *state)


def mixer_prefill(mixer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``MambaMixer.forward`` from a zero state: hidden (B, T, d) -> (B, T, d), conv_state (B, D, W), ssm_state (B, D, N)."""
    from sokhan.kernels import causal_conv1d
    from sokhan.kernels.selective_scan.scan_hop import selective_scan_hop

    x, z = mixer.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (B, D, T) each
    width = mixer.conv1d.kernel_size[0]
    # The conv state holds the last W conv inputs, oldest first; a fresh state's zeros fill in when T < W.
    conv_state = F.pad(x, (width - 1, 0))[:, :, -width:]  # (B, D, W)
    x = causal_conv1d(x, mixer._conv_weight(), mixer.conv1d.bias, activation="silu")  # (B, D, T)
    delta, B, C, delta_bias = mixer._ssm_params(x.transpose(1, 2))
    # (B, D, T), and B, C (B, N, T) or, for the LTI ablation's per-channel groups, (B, D, N, T)
    delta, B, C = delta.transpose(1, 2), B.movedim(1, -1), C.movedim(1, -1)
    A = -torch.exp(mixer.A_log)  # (D, N)
    y, ssm_state = selective_scan_hop(
        x, delta, A, B, C, D=mixer.D, z=z, delta_bias=delta_bias, delta_softplus=True, return_last_state=True
    )
    return mixer.out_proj(y.transpose(1, 2)), conv_state, ssm_state
