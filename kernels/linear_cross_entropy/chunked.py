"""The language-model head and its loss over row chunks, gradients formed in the forward pass.

A small model's largest activation is its logits: 16 × 256 tokens × 16000 words of vocabulary are 262 MB in
float32, and ``F.cross_entropy`` on them writes the log-probabilities (as large) in the forward pass and, in the
backward, a dense one-hot gradient and the logits' gradient (each as large again), every pass memory-bound. Here the
logits of ``rows`` tokens at a time (a few MB, sized to stay near the cache) are computed, turned into the loss
and, in place, into their gradient ``softmax − one-hot``, which is multiplied straight into the gradients of the
hidden states and of the weight; the chunk's buffer is then reused. No (N, V) tensor exists. The gradients are
kept, unscaled, for the backward pass, which only multiplies them by the incoming gradient (the idea of Liger
Kernel's fused linear cross-entropy, here in plain PyTorch for CPU).

The matrix products are the same three as unfused (logits, their gradient into the hidden states and into the
weight); what goes is the log-softmax's memory traffic. On one CPU thread this makes the ``tiny`` models' training
step ≈ 1.4× (Mamba) and 1.5× (transformer) faster at vocabularies of 8000 and 16000 (``benchmarks/train.py``).
"""

from __future__ import annotations

import torch

# Logit elements per chunk: 2^21 float32 values = 8 MB (about 130 rows at V = 16000, 260 at V = 8000). On the
# 2-core development machine (4 MB of L2 per core) a training step was fastest with 128 to 256 rows at V = 8000
# and 16000; chunks of 512 rows and more were slower.
CHUNK_ELEMENTS = 1 << 21


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs (as the reference's upcast), float64 when either input is float64."""
    return torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)


def chunked_loss(hidden, weight, targets, ignore_index: int, rows: int, grads: bool):
    """Summed loss over the rows not ignored, their count and, with ``grads``, the unscaled gradients of that sum
    with respect to ``hidden`` and ``weight`` (in the compute dtype)."""
    dtype = compute_dtype(hidden, weight)
    w = weight.to(dtype)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if grads else None
    grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if grads else None
    valid = targets != ignore_index
    for start in range(0, hidden.shape[0], rows):
        h = hidden[start : start + rows].to(dtype)
        keep = valid[start : start + rows]
        t = torch.where(keep, targets[start : start + rows], 0)
        logits = h @ w.T  # (rows, V)
        target_logit = logits.gather(1, t[:, None])  # (rows, 1)
        # log-sum-exp by hand rather than torch.logsumexp, so that exp(logits - max) is computed once, in place,
        # and serves both the loss and the gradient: five passes over the chunk where logsumexp and a softmax
        # after it take eight.
        top = logits.amax(dim=1, keepdim=True)
        total_exp = logits.sub_(top).exp_().sum(dim=1, keepdim=True)
        row_loss = (top + total_exp.log() - target_logit).squeeze(1)
        total += torch.where(keep, row_loss, 0).sum(dtype=torch.float64)
        if grads:
            # softmax − one-hot, in the logits' own buffer; ignored rows (weight 0) contribute nothing.
            weight_row = keep.to(dtype)[:, None]
            logits.mul_(weight_row / total_exp)
            logits.scatter_add_(1, t[:, None], -weight_row)
            torch.mm(logits, w, out=grad_hidden[start : start + rows])
            grad_weight.addmm_(logits.T, h)
    return total, valid.sum(), grad_hidden, grad_weight


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Loss of ``hidden @ weight.T`` against ``targets``, "mean" (over rows not ignored) or "sum"; the gradients
    are computed in :meth:`forward` and scaled by the incoming gradient in :meth:`backward`."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, reduction: str, rows: int):
        total, count, grad_hidden, grad_weight = chunked_loss(hidden, weight, targets, ignore_index, rows, grads=True)
        ones = torch.ones((), dtype=torch.float64, device=hidden.device)
        scale = 1.0 / count.double() if reduction == "mean" else ones
        # "mean" with every row ignored is 0 / 0 = NaN, as in F.cross_entropy, and its gradients 0 as there: scaled
        # by 1 / 0 they were 0 * inf = NaN, which one all-padding micro-batch spread through gradient accumulation.
        ctx.save_for_backward(grad_hidden, grad_weight, torch.where(count > 0, scale, torch.zeros_like(scale)))
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return (total * scale).to(grad_hidden.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        factor = (dloss.double() * scale).to(grad_hidden.dtype)
        dh = (grad_hidden * factor).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dw = (grad_weight * factor).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None


def linear_cross_entropy_chunked(hidden, weight, targets, ignore_index=-100, reduction="mean", rows=None):
    rows = rows or chunk_rows(weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, reduction, rows)
    # No graph to build (validation, evaluation): the loss alone, chunk by chunk.
    total, count, _, _ = chunked_loss(hidden, weight, targets, ignore_index, rows, grads=False)
    loss = total / count.double() if reduction == "mean" else total
    return loss.to(compute_dtype(hidden, weight))
