"""``linear_cross_entropy``: the language model's output projection and its loss in one op, without the logits.

Three implementations behind one entry (see :mod:`sokhan.kernels.dispatch`): ``reference.py`` (``F.linear`` then
``F.cross_entropy`` on float32 logits), ``chunked.py`` (the ``cpu`` backend: rows in chunks, gradients formed in the
forward pass, no (N, V) tensor; :class:`LinearCrossEntropyFunction`) and, for ``triton``, the logits from
``F.linear`` (bf16 under autocast) read by the fused :func:`~sokhan.kernels.cross_entropy.cross_entropy` kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sokhan import SokhanError
from sokhan.kernels import dispatch
from sokhan.kernels.cross_entropy import cross_entropy
from sokhan.kernels.linear_cross_entropy.chunked import LinearCrossEntropyFunction, linear_cross_entropy_chunked
from sokhan.kernels.linear_cross_entropy.reference import linear_cross_entropy_ref

__all__ = ["LinearCrossEntropyFunction", "linear_cross_entropy", "linear_cross_entropy_ref"]

REDUCTIONS = ("mean", "sum")


def check_inputs(hidden, weight, targets, reduction) -> None:
    """Raise one line naming the first argument that does not fit the others."""
    if reduction not in REDUCTIONS:
        raise SokhanError(f"linear_cross_entropy: reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if hidden.dim() != 2:
        raise SokhanError(f"linear_cross_entropy: hidden has shape {tuple(hidden.shape)}, expected (rows, d)")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[1]:
        raise SokhanError(
            f"linear_cross_entropy: weight has shape {tuple(weight.shape)}, expected (vocab, {hidden.shape[1]})"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise SokhanError(
            f"linear_cross_entropy: targets has shape {tuple(targets.shape)} and dtype {targets.dtype}, "
            f"expected ({hidden.shape[0]},) integer class indices"
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy of the logits ``hidden @ weight.T`` against class indices ``targets``.

    hidden: (N, d); weight: (V, d), the output projection (an ``nn.Linear``'s weight, or a tied embedding table);
    targets: (N,) integer. Returns the "mean" over rows whose target is not ``ignore_index``, or the "sum", as a
    float32 scalar (float64 when an input is float64).
    """
    check_inputs(hidden, weight, targets, reduction)
    backend = dispatch.resolve("linear_cross_entropy", hidden, weight, targets, backend=backend, has_fast_path=True)
    if backend == "cpu":
        return linear_cross_entropy_chunked(hidden, weight, targets, ignore_index, reduction)
    if backend == "triton":
        return cross_entropy(F.linear(hidden, weight), targets, ignore_index, reduction, backend="triton")
    return linear_cross_entropy_ref(hidden, weight, targets, ignore_index, reduction)
