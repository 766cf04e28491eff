"""Plain-PyTorch RMSNorm with the residual add: the twin the Triton kernels are checked against and ONNX traces.

Same semantics as mamba-ssm's ``rms_norm_ref`` (``layer_norm_fn(..., is_rms_norm=True)`` without bias or dropout).
"""

from __future__ import annotations

import torch


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """out = h / sqrt(mean(h^2, -1) + eps) * weight with h = x + residual (or x).

    x, residual: (..., D); weight: (D,). Returns out (..., D) in x's dtype, or (out, h) with ``prenorm`` so the
    residual stream h can be carried on; like mamba-ssm, h keeps the residual's dtype (x's without a residual),
    so a float32 stream stays float32 beside half-precision blocks.
    """
    dtype = x.dtype
    h = x if residual is None else (x + residual).to(residual.dtype)
    # Half-precision inputs are normalized in float32, as the kernel does; float64 stays float64.
    hf = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    # Written as a division by sqrt (not a product with rsqrt): the form ONNX Runtime fuses into one
    # (Skip)SimplifiedLayerNormalization node when the exported graph loads.
    out = (hf / torch.sqrt(hf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight).to(dtype)
    return (out, h) if prenorm else out
