"""Plain-PyTorch cross-entropy over the vocabulary: the twin the Triton kernel is checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """``logsumexp(logits_i) - logits_i[targets_i]`` per row, rows whose target is ``ignore_index`` excluded.

    logits: (N, V), half precision upcast to float32; targets: (N,) integer. Returns a float32 (float64 for float64
    logits) scalar for "mean" (over the rows not ignored) and "sum", or (N,) for "none" (0 on ignored rows).
    """
    upcast = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return F.cross_entropy(upcast, targets, ignore_index=ignore_index, reduction=reduction)
