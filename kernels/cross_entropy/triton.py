"""Triton kernels for the vocabulary cross-entropy: a streaming log-sum-exp forward and a one-pass backward.

Forward: one program per row walks the vocabulary in BLOCK_V chunks keeping a running max and sum (online
softmax), picks out the target's logit on the way, and writes the row's loss and log-sum-exp: the logits are read
once, in their own dtype, with no float32 copy. Backward: one program per row writes
``(softmax - onehot(target)) * dloss_row`` from the stored log-sum-exp: one read and one write of the logits' size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sokhan import SokhanError
from sokhan.kernels import dispatch

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# One chunk of a row in registers: 4096 float32 per program over 8 warps is 16 per thread.
MAX_BLOCK_V = 4096


def _block(vocab: int) -> tuple[int, int]:
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    return block_v, min(max(block_v // 512, 1), 8)


@triton.jit
def _ce_fwd_kernel(
    LOGITS, TARGETS, LOSS, LSE,
    V, stride_row, ignore_index,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_row
    target = tl.load(TARGETS + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), dtype=ACC)
    s = tl.full([], 0.0, dtype=ACC)
    # Running max and sum over chunks: one exp per logit. A chunk of -inf logits only (masked logits, or the
    # padding of a short last chunk) leaves m_new = -inf, and exp(-inf - -inf) would be NaN: until a finite logit
    # comes, the exponents are taken against 0 instead, which makes every term exp(-inf) = 0, as it should be.
    for start in range(0, V, BLOCK_V):
        x = tl.load(row_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
        m = m_new
    lse = m + tl.log(s)
    valid = target != ignore_index
    # A target outside [0, V) read another row's logit (or past the tensor) into a finite loss; its loss is NaN
    # instead, which the training loop stops on. F.cross_entropy raises, at the cost of a host sync per call.
    inside = (target >= 0) & (target < V)
    target_logit = tl.load(row_ptr + target, mask=valid & inside, other=0.0).to(ACC)
    tl.store(LOSS + row, tl.where(valid, tl.where(inside, lse - target_logit, float("nan")), 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _ce_bwd_kernel(
    LOGITS, TARGETS, LSE, SCALE, DLOGITS,
    V, stride_row, stride_drow, stride_scale, ignore_index,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row).to(tl.int64)
    lse = tl.load(LSE + row)
    scale = tl.where(target != ignore_index, tl.load(SCALE + row * stride_scale), 0.0)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        mask = idx < V
        x = tl.load(LOGITS + row * stride_row + idx, mask=mask, other=0.0).to(ACC)
        grad = (tl.exp(x - lse) - tl.where(idx == target, 1.0, 0.0)) * scale
        tl.store(DLOGITS + row * stride_drow + idx, grad.to(DLOGITS.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def cross_entropy_fwd(logits, targets, ignore_index: int):
    """logits: (N, V); targets: (N,). Returns (loss per row (N,), 0 where ignored; lse (N,)), float32 (float64
    for float64 logits)."""
    if logits.dtype not in DTYPES:
        raise SokhanError(
            f"cross_entropy: the Triton kernel takes float32/float16/bfloat16/float64 logits (got {logits.dtype}); "
            "use backend='reference'"
        )
    logits = _rows(logits)
    n_rows, vocab = logits.shape
    block_v, num_warps = _block(vocab)
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    losses = dispatch.output_buffer((n_rows,), acc_dtype, logits.device)
    lse = dispatch.output_buffer((n_rows,), acc_dtype, logits.device)
    _ce_fwd_kernel[(n_rows,)](
        logits, targets.contiguous(), losses, lse, vocab, logits.stride(0), ignore_index,
        ACC=tl.float64 if logits.dtype == torch.float64 else tl.float32, BLOCK_V=block_v, num_warps=num_warps,
    )
    return losses, lse


def cross_entropy_bwd(logits, targets, lse, row_scale, ignore_index: int) -> torch.Tensor:
    """d loss / d logits (N, V) in the logits' dtype; ``row_scale`` (N,) is the gradient reaching each row's loss."""
    logits = _rows(logits)
    n_rows, vocab = logits.shape
    block_v, num_warps = _block(vocab)
    dlogits = dispatch.output_buffer((n_rows, vocab), logits.dtype, logits.device)
    _ce_bwd_kernel[(n_rows,)](
        logits, targets.contiguous(), lse, row_scale, dlogits,
        vocab, logits.stride(0), dlogits.stride(0), row_scale.stride(0), ignore_index,
        ACC=tl.float64 if logits.dtype == torch.float64 else tl.float32, BLOCK_V=block_v, num_warps=num_warps,
    )
    return dlogits
