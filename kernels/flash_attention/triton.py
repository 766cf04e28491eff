"""Triton flash attention (the Triton fused-attention tutorial's structure): exact softmax attention in tiles.

Forward: each program owns BLOCK_M queries and streams the keys in BLOCK_N tiles, keeping a running max and sum
(online softmax) so the (L, L) scores never leave registers; it stores the output and each row's log-sum-exp.
Backward: the probabilities are recomputed from q, k and that log-sum-exp; one kernel accumulates dk and dv per
key tile over the query tiles, another dq per query tile over the key tiles, so neither needs atomics.
Scores are kept in base 2 (scaled by log2 e) so the exponentials are ``exp2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sokhan import SokhanError
from sokhan.kernels import dispatch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tiles hold whole heads in registers; 16 is the narrowest tl.dot operand, 128 the widest that fits an H100 SM's
# registers at these tile sizes. Other head sizes up to 128 are zero-padded to the next power of two.
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634
# CUDA caps the second grid axis, which carries batch x heads (the first carries the query tiles, so programs of
# one head run together and share its K and V in L2).
MAX_GRID_Y = 65535


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """Like :func:`~sokhan.kernels.dispatch.output_buffer` with ``t``'s strides (a transposed (B, L, H, hd) view
    keeps its layout)."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if dispatch.interpreting() else out


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise SokhanError(
            f"flash_attention: the Triton kernel takes q, k, v of one dtype among float32/float16/bfloat16 "
            f"(got {q.dtype}, {k.dtype}, {v.dtype}); use backend='reference'"
        )
    if q.dtype == torch.bfloat16 and dispatch.interpreting():
        # Triton 3.9's interpreter multiplies bfloat16 tl.dot operands as raw bits (results ~1e8 off); on a GPU
        # bfloat16 is the intended training dtype.
        raise SokhanError(
            "flash_attention: Triton's CPU interpreter computes bfloat16 dot products wrongly; "
            "use float16/float32 under TRITON_INTERPRET=1, or backend='reference'"
        )
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        raise SokhanError(
            f"flash_attention: batch x heads = {q.shape[0] * q.shape[1]} exceeds the {MAX_GRID_Y} programs of the "
            "kernel's second grid axis; split the batch or use backend='reference'"
        )
    if q.shape[-1] > MAX_HEAD_DIM:
        raise SokhanError(
            f"flash_attention: head_dim {q.shape[-1]} exceeds the Triton kernel's maximum of {MAX_HEAD_DIM}; "
            "use backend='reference'"
        )


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _pad_heads(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero channels up to ``width``: zeros add nothing to q·k and give zero output channels, which are cut off.
    A copy only for head sizes that are not already a power of two >= 16."""
    return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def _block(seqlen: int, largest: int) -> int:
    """A power-of-two tile no longer than needed; 16 is the smallest shape ``tl.dot`` takes."""
    return max(16, min(largest, triton.next_power_of_2(seqlen)))


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products; TF32 would cost them ~1e-3 relative error. Half types use the
    # tensor cores natively either way.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _attn_fwd_tiles(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
    offs_m, offs_n, lo, hi, Lk, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fold key tiles [lo, hi) into the running (acc, l_i, m_i); ``MASKED`` tiles may cross the diagonal or Lk."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=cols[None, :] < Lk, other=0.0)  # (HEAD_DIM, BLOCK_N)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn)
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        if MASKED:
            valid = cols[None, :] < Lk
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= cols[None, :])
            qk = tl.where(valid, qk, float("-inf"))
        # Every row sees key 0 in the first tile, so m_new is finite and exp2(-inf - m_new) is a clean 0.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASKED:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=cols[:, None] < Lk, other=0.0)  # (BLOCK_N, HEAD_DIM)
        else:
            v = tl.load(v_ptrs + start_n * stride_vn)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    qk_scale, H, Lq, Lk,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < Lq

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    q = tl.load(q_ptrs, mask=mask_m[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    # Tiles wholly below the diagonal (causal) or wholly inside Lk need no mask; only the last stretch does.
    if CAUSAL:
        split = start_m * BLOCK_M
        hi = tl.minimum(split + BLOCK_M, Lk)
    else:
        split = (Lk // BLOCK_N) * BLOCK_N
        hi = Lk
    acc, l_i, m_i = _attn_fwd_tiles(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, 0, split, Lk, qk_scale,
        MASKED=False, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N, PRECISION=PRECISION,
    )
    acc, l_i, m_i = _attn_fwd_tiles(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, split, hi, Lk, qk_scale,
        MASKED=True, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N, PRECISION=PRECISION,
    )

    acc = acc / l_i[:, None]
    tl.store(LSE + off_bh.to(tl.int64) * Lq + offs_m, m_i + tl.log2(l_i), mask=mask_m)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None])


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    H, Lq,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d o_id * do_id, the row term of the softmax backward."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < Lq
    o = tl.load(
        O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        mask=mask_m[:, None], other=0.0,
    )
    do = tl.load(
        DO + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
        mask=mask_m[:, None], other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + off_bh.to(tl.int64) * Lq + offs_m, delta, mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    qk_scale, sm_scale, H, Lq, Lk,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dv = P^T dO and dk = dS^T Q * scale for one key tile, summed over the query tiles that see it."""
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < Lk

    k = tl.load(
        K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=mask_n[:, None], other=0.0,
    )  # (BLOCK_N, HEAD_DIM)
    v = tl.load(
        V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=mask_n[:, None], other=0.0,
    )
    qT_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd
    do_ptrs = DO + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd
    row_stats = off_bh.to(tl.int64) * Lq

    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    # Causal: queries before this tile's first key see none of it.
    lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start_m in range(lo, Lq, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < Lq
        qT = tl.load(qT_ptrs + start_m * stride_qm, mask=mask_m[None, :], other=0.0)  # (HEAD_DIM, BLOCK_M)
        do = tl.load(do_ptrs + start_m * stride_gm, mask=mask_m[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
        lse = tl.load(LSE + row_stats + rows, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + row_stats + rows, mask=mask_m, other=0.0)
        qkT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        valid = mask_n[:, None] & mask_m[None, :]
        if CAUSAL:
            valid = valid & (rows[None, :] >= offs_n[:, None])
        pT = tl.where(valid, tl.exp2(qkT - lse[None, :]), 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)

    dk_ptrs = DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    qk_scale, sm_scale, H, Lq, Lk,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq = dS K * scale for one query tile, summed over the key tiles it sees."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < Lq

    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None], other=0.0,
    )  # (BLOCK_M, HEAD_DIM)
    do = tl.load(
        DO + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
        mask=mask_m[:, None], other=0.0,
    )
    row_stats = off_bh.to(tl.int64) * Lq
    lse = tl.load(LSE + row_stats + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + row_stats + offs_m, mask=mask_m, other=0.0)
    kT_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vT_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd

    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, Lk) if CAUSAL else Lk
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < Lk
        kT = tl.load(kT_ptrs + start_n * stride_kn, mask=mask_n[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
        vT = tl.load(vT_ptrs + start_n * stride_vn, mask=mask_n[None, :], other=0.0)
        qk = tl.dot(q, kT, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        valid = mask_m[:, None] & mask_n[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        p = tl.where(valid, tl.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask_m[:, None])


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and warps for one dtype and head size: (queries, keys) per tile of each kernel."""

    fwd: tuple[int, int]
    dkdv: tuple[int, int]
    dq: tuple[int, int]
    fwd_warps: int
    bwd_warps: int


def _tiles(dtype: torch.dtype, head_dim: int) -> Tiles:
    """Tiles chosen by compiling for sm_90 and reading registers and spills (ptxas, via cuobjdump; 3 stages).

    Half precision runs on the tensor cores: the fused-attention tutorial's shapes (the dk/dv kernel owns 128 keys
    and streams 32 queries, dq the reverse); wide heads halve the forward's key tile. None of them spills at
    head_dim <= 64; at 128 the backward spills <= 112 bytes per thread. float32 with exact products runs on the
    FMA units, which hold every operand in registers, so its tiles are 4-8x smaller (no spills at head_dim <= 64).
    """
    if dtype == torch.float32:
        return Tiles(fwd=(64, 32), dkdv=(16, 32), dq=(32, 16), fwd_warps=8 if head_dim <= 64 else 4, bwd_warps=4)
    return Tiles(fwd=(128, 64 if head_dim <= 64 else 32), dkdv=(32, 128), dq=(128, 32), fwd_warps=8, bwd_warps=8)


def flash_attention_fwd(q, k, v, causal: bool, scale: float | None):
    """q: (Bt, H, Lq, hd); k, v: (Bt, H, Lk, hd). Returns (o (Bt, H, Lq, hd), lse (Bt * H, Lq) float32, base 2)."""
    _check(q, k, v)
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    width = _padded_head_dim(head_dim)
    q, k, v = (_pad_heads(t, width) for t in (q, k, v))
    tiles = _tiles(q.dtype, width)
    # BLOCK_N divides BLOCK_M (powers of two, BLOCK_N <= BLOCK_M), so the causal diagonal starts on a key-tile
    # boundary.
    block_m = _block(seqlen_q, tiles.fwd[0])
    block_n = min(_block(seqlen_k, tiles.fwd[1]), block_m)
    o = _empty_like(q)
    lse = dispatch.output_buffer((batch * heads, seqlen_q), torch.float32, q.device)
    grid = (triton.cdiv(seqlen_q, block_m), batch * heads)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse,
        sm_scale * LOG2E, heads, seqlen_q, seqlen_k,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        CAUSAL=causal, HEAD_DIM=width, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(q.dtype),
        num_warps=tiles.fwd_warps, num_stages=3,
    )
    return o[..., :head_dim], lse


def flash_attention_bwd(q, k, v, o, lse, do, causal: bool, scale: float | None):
    """Gradients (dq, dk, dv), each shaped like its input, from the forward's output and log-sum-exp."""
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    width = _padded_head_dim(head_dim)
    q, k, v, o, do = (_pad_heads(t, width) for t in (q, k, v, o, do))
    tiles = _tiles(q.dtype, width)
    config = {"num_warps": tiles.bwd_warps, "num_stages": 3}
    precision = _precision(q.dtype)
    delta = dispatch.output_buffer((batch * heads, seqlen_q), torch.float32, q.device)
    block_delta = _block(seqlen_q, 64)
    _attn_bwd_delta_kernel[(triton.cdiv(seqlen_q, block_delta), batch * heads)](
        o, do, delta, heads, seqlen_q, *o.stride(), *do.stride(), HEAD_DIM=width, BLOCK_M=block_delta,
    )
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    args = (sm_scale * LOG2E, sm_scale, heads, seqlen_q, seqlen_k)
    block_m, block_n = _block(seqlen_q, tiles.dkdv[0]), _block(seqlen_k, tiles.dkdv[1])
    _attn_bwd_dkdv_kernel[(triton.cdiv(seqlen_k, block_n), batch * heads)](
        q, k, v, do, lse, delta, dk, dv, *args,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        CAUSAL=causal, HEAD_DIM=width, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision, **config,
    )
    block_m, block_n = _block(seqlen_q, tiles.dq[0]), _block(seqlen_k, tiles.dq[1])
    _attn_bwd_dq_kernel[(triton.cdiv(seqlen_q, block_m), batch * heads)](
        q, k, v, do, lse, delta, dq, *args,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        CAUSAL=causal, HEAD_DIM=width, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision, **config,
    )
    return dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]
