"""``cross_entropy``: the language-model loss over a long vocabulary, without float32 copies of the logits.

Two implementations behind one entry (see :mod:`sokhan.kernels.dispatch`): ``reference.py`` (``F.cross_entropy``
on float32-upcast logits, what the training loop would otherwise run) and ``triton.py`` (one streaming pass over
each row forward, one read and one write backward; :class:`CrossEntropyFunction`).
"""

from __future__ import annotations

import torch

from sokhan import SokhanError
from sokhan.kernels import dispatch
from sokhan.kernels.cross_entropy.reference import cross_entropy_ref

__all__ = ["CrossEntropyFunction", "cross_entropy", "cross_entropy_ref"]

REDUCTIONS = ("mean", "sum", "none")


def check_inputs(logits, targets, reduction) -> None:
    """Raise one line naming the first argument that does not fit the others."""
    if reduction not in REDUCTIONS:
        raise SokhanError(f"cross_entropy: reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise SokhanError(f"cross_entropy: logits has shape {tuple(logits.shape)}, expected (rows, vocab)")
    if targets.shape != logits.shape[:1] or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise SokhanError(
            f"cross_entropy: targets has shape {tuple(targets.shape)} and dtype {targets.dtype}, "
            f"expected ({logits.shape[0]},) integer class indices"
        )


class CrossEntropyFunction(torch.autograd.Function):
    """Triton forward storing each row's log-sum-exp; the backward writes softmax − one-hot in one pass."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction):
        from sokhan.kernels.cross_entropy.triton import cross_entropy_fwd

        losses, lse = cross_entropy_fwd(logits, targets, ignore_index)  # (N,), (N,)
        valid = targets != ignore_index
        ctx.save_for_backward(logits, targets, lse, valid)
        ctx.ignore_index = ignore_index
        ctx.reduction = reduction
        if reduction == "none":
            return losses
        total = losses.sum()
        # "mean" over the rows not ignored, as F.cross_entropy (NaN when every row is ignored, as there).
        return total / valid.sum() if reduction == "mean" else total

    @staticmethod
    def backward(ctx, dloss):
        from sokhan.kernels.cross_entropy.triton import cross_entropy_bwd

        logits, targets, lse, valid = ctx.saved_tensors
        if ctx.reduction == "mean":
            dloss = dloss / valid.sum()
        row_scale = dloss.to(lse.dtype).expand(logits.shape[0])  # (N,), stride 0 for the reductions
        dlogits = cross_entropy_bwd(logits, targets, lse, row_scale, ctx.ignore_index)
        return dlogits, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy of ``logits`` (N, V) against class indices ``targets`` (N,), computed in float32
    (float64 for float64 logits).

    Returns a scalar for "mean" (over rows whose target is not ``ignore_index``) and "sum", or (N,) for "none".
    """
    check_inputs(logits, targets, reduction)
    if dispatch.resolve("cross_entropy", logits, targets, backend=backend) == "reference":
        return cross_entropy_ref(logits, targets, ignore_index, reduction)
    return CrossEntropyFunction.apply(logits, targets, ignore_index, reduction)
