"""Reference attention: ``torch.nn.functional.scaled_dot_product_attention``, the twin of the Triton kernel.

ONNX export traces this path, so it is one plain SDPA call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flash_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v, scale defaulting to 1 / sqrt(hd).

    q: (Bt, H, Lq, hd); k, v: (Bt, H, Lk, hd) (Lk == Lq when causal). Returns (Bt, H, Lq, hd) in q's dtype.
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
