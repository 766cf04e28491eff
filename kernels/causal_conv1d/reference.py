"""Plain-PyTorch depthwise causal convolution: the twin the Triton kernels are checked against and ONNX traces.

Same semantics as mamba-ssm's ``causal_conv1d_ref`` / ``causal_conv1d_update_ref``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (W - 1) + k]), with x[..., t < 0] = 0.

    x: (Bt, D, L); weight: (D, W); bias: (D,) or None; activation: None or "silu". Returns (Bt, D, L) in x's dtype.
    """
    dtype_in = x.dtype
    seqlen = x.shape[-1]
    dim, width = weight.shape
    # Left padding by W - 1 and keeping the first L outputs makes the convolution causal.
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1, groups=dim)  # (Bt, D, L + W - 1)
    out = out[..., :seqlen]
    if activation is not None:
        out = F.silu(out)
    return out.to(dtype_in)


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decode step: shift ``conv_state`` left by one, write x last (in place), and convolve the window.

    x: (Bt, D); conv_state: (Bt, D, W), updated in place; weight: (D, W); bias: (D,) or None.
    Returns (Bt, D) in x's dtype.
    """
    dtype_in = x.dtype
    conv_state.copy_(torch.cat([conv_state[:, :, 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1))
    out = torch.sum(conv_state.to(weight.dtype) * weight, dim=-1)  # (Bt, D)
    if bias is not None:
        out = out + bias
    if activation is not None:
        out = F.silu(out)
    return out.to(dtype_in)
