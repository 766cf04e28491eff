"""The language-model head and its loss as plain PyTorch: logits ``hidden @ weight.T``, then ``cross_entropy_ref``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sokhan.kernels.cross_entropy.reference import cross_entropy_ref


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """``cross_entropy_ref(hidden @ weight.T, targets)``: hidden (N, d), weight (V, d), targets (N,).

    Materialises the (N, V) logits and, for backward, their float32 log-probabilities: what the chunked path avoids.
    """
    return cross_entropy_ref(F.linear(hidden, weight), targets, ignore_index, reduction)
