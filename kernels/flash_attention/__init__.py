"""``flash_attention``: exact softmax attention, tiled so the (L, L) score matrix never reaches memory.

Two implementations behind one entry (see :mod:`sokhan.kernels.dispatch`): ``reference.py``
(``scaled_dot_product_attention``, the path ONNX traces) and ``triton.py`` (online-softmax forward storing the
log-sum-exp per row, and a backward that recomputes the probabilities from it; :class:`FlashAttentionFunction`).
"""

from __future__ import annotations

import torch

from sokhan import SokhanError
from sokhan.kernels import dispatch
from sokhan.kernels.flash_attention.reference import flash_attention_ref

__all__ = ["FlashAttentionFunction", "flash_attention", "flash_attention_ref"]


def check_inputs(q, k, v, causal: bool) -> None:
    """Raise one line naming the first argument that does not fit the others."""
    if q.dim() != 4 or q.shape[2] == 0:
        raise SokhanError(f"flash_attention: q has shape {tuple(q.shape)}, expected (batch, heads, seqlen, head_dim)")
    batch, heads, seqlen_q, head_dim = q.shape
    # A causal mask between different lengths is ambiguous (SDPA aligns it top-left, a KV cache wants
    # bottom-right), so causal attention takes one length; a decode step over a cache passes causal=False.
    seqlen_k = seqlen_q if causal else "seqlen_k"
    want = f"({batch}, {heads}, {seqlen_k}, {head_dim})"
    if k.dim() != 4 or k.shape[2] == 0 or (k.shape[:2], k.shape[3]) != (q.shape[:2], head_dim):
        raise SokhanError(f"flash_attention: k has shape {tuple(k.shape)}, expected {want}")
    if causal and k.shape[2] != seqlen_q:
        raise SokhanError(
            f"flash_attention: causal attention needs one length for q and k, got {seqlen_q} and {k.shape[2]}; "
            "pass causal=False for queries against a longer key cache"
        )
    if v.shape != k.shape:
        raise SokhanError(f"flash_attention: v has shape {tuple(v.shape)}, expected {tuple(k.shape)} like k")


class FlashAttentionFunction(torch.autograd.Function):
    """Triton forward saving (o, logsumexp); the backward recomputes the attention probabilities tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        from sokhan.kernels.flash_attention.triton import flash_attention_fwd

        o, lse = flash_attention_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        from sokhan.kernels.flash_attention.triton import flash_attention_bwd

        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_bwd(q, k, v, o, lse, do, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` per batch and head; scale defaults to 1 / sqrt(head_dim).

    q: (Bt, H, Lq, hd); k, v: (Bt, H, Lk, hd) with Lk == Lq when causal. Returns (Bt, H, Lq, hd) in q's dtype.
    """
    check_inputs(q, k, v, causal)
    if dispatch.resolve("flash_attention", q, k, v, backend=backend) == "reference":
        return flash_attention_ref(q, k, v, causal, scale)
    return FlashAttentionFunction.apply(q, k, v, causal, scale)
