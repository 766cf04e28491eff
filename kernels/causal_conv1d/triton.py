"""Triton kernels for the depthwise causal convolution: forward, backward and the one-token decode update.

Each program owns a (BLOCK_D, BLOCK_L) tile of one batch row. The W shifted reads of x, one per tap, overlap
in all but W - 1 columns, so they hit L1/L2: DRAM sees x once and out once, and the bias add and SiLU are applied
in registers instead of as two more passes over (Bt, D, L).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sokhan import SokhanError
from sokhan.kernels import dispatch

# Taps are unrolled at compile time (and W^2 times in the SiLU backward); Mamba uses W = 4.
MAX_WIDTH = 16
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype not in DTYPES or weight.dtype not in DTYPES:
        raise SokhanError(
            f"{op}: the Triton kernel takes float32/float16/bfloat16/float64 "
            f"(got x {x.dtype}, weight {weight.dtype}); use backend='reference' for other dtypes"
        )
    if weight.shape[1] > MAX_WIDTH:
        raise SokhanError(f"{op}: kernel width {weight.shape[1]} exceeds the Triton kernel's maximum of {MAX_WIDTH}")


def _dense(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read the bias as ``BIAS + channel``: a strided view (``big[::2]``) must be copied first."""
    return bias.contiguous() if bias is not None else None


def _acc(*tensors: torch.Tensor | None) -> tuple[torch.dtype, tl.dtype]:
    """Accumulate in float32, or float64 when an input is float64 (a float64 call is then exact to float64)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _blocks(dim: int, seqlen: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_L): 1024-element tiles, long along L, taller in D when the sequence is short.

    The W shifted loads of a tile are in flight together (W^2 in the SiLU backward): at 16 x 64 with 4 warps
    neither kernel spills on sm_90 (ptxas: <= 184 registers), while 32 x 128 spills in both.
    """
    block_l = min(64, triton.next_power_of_2(seqlen))
    block_d = min(max(1024 // block_l, 1), triton.next_power_of_2(dim))
    return block_d, block_l


@triton.jit
def _conv_fwd_kernel(
    X, Wt, BIAS, OUT,
    D, L,
    stride_xb, stride_xd, stride_xl,
    stride_wd, stride_wk,
    stride_ob, stride_od, stride_ol,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < D
    x_rows = X + pid_b * stride_xb + offs_d[:, None] * stride_xd  # (BLOCK_D, 1)

    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=ACC)
    for k in tl.static_range(WIDTH):
        src = offs_l - (WIDTH - 1) + k  # tap k reads x[t - (W - 1) + k]; negative t is the zero padding
        in_seq = (src[None, :] >= 0) & (src[None, :] < L)
        xk = tl.load(x_rows + src[None, :] * stride_xl, mask=mask_d[:, None] & in_seq, other=0.0)
        wk = tl.load(Wt + offs_d * stride_wd + k * stride_wk, mask=mask_d, other=0.0)
        acc += wk.to(ACC)[:, None] * xk.to(ACC)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(ACC)[:, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    out_ptrs = OUT + pid_b * stride_ob + offs_d[:, None] * stride_od + offs_l[None, :] * stride_ol
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_d[:, None] & (offs_l < L)[None, :])


@triton.jit
def _conv_bwd_kernel(
    X, Wt, BIAS, DOUT, DX, DW_PART, DB_PART,
    D, L,
    stride_xb, stride_xd, stride_xl,
    stride_wd, stride_wk,
    stride_gb, stride_gd, stride_gl,
    stride_dxb, stride_dxd, stride_dxl,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < D
    x_rows = X + pid_b * stride_xb + offs_d[:, None] * stride_xd
    g_rows = DOUT + pid_b * stride_gb + offs_d[:, None] * stride_gd

    # dx[t] = sum_s w[W - 1 - s] * dy[t + s], where dy is the gradient before the activation. With SiLU, dy at
    # t + s needs the pre-activation there, recomputed from x (W more cached loads) rather than stored forward.
    dx = tl.zeros((BLOCK_D, BLOCK_L), dtype=ACC)
    dy0 = tl.zeros((BLOCK_D, BLOCK_L), dtype=ACC)
    for s in tl.static_range(WIDTH):
        pos = offs_l + s
        dy = tl.load(g_rows + pos[None, :] * stride_gl, mask=mask_d[:, None] & (pos < L)[None, :], other=0.0)
        dy = dy.to(ACC)
        if SILU:
            y = tl.zeros((BLOCK_D, BLOCK_L), dtype=ACC)
            if HAS_BIAS:
                y += tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(ACC)[:, None]
            for j in tl.static_range(WIDTH):
                src = pos - (WIDTH - 1) + j
                xj = tl.load(
                    x_rows + src[None, :] * stride_xl,
                    mask=mask_d[:, None] & (src[None, :] >= 0) & (src[None, :] < L),
                    other=0.0,
                )
                wj = tl.load(Wt + offs_d * stride_wd + j * stride_wk, mask=mask_d, other=0.0)
                y += wj.to(ACC)[:, None] * xj.to(ACC)
            sig = tl.sigmoid(y)
            dy = dy * sig * (1.0 + y * (1.0 - sig))
        w_tap = tl.load(Wt + offs_d * stride_wd + (WIDTH - 1 - s) * stride_wk, mask=mask_d, other=0.0)
        dx += w_tap.to(ACC)[:, None] * dy
        if s == 0:
            dy0 = dy
    dx_ptrs = DX + pid_b * stride_dxb + offs_d[:, None] * stride_dxd + offs_l[None, :] * stride_dxl
    tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask_d[:, None] & (offs_l < L)[None, :])

    # Per-tile partial sums for weight and bias (columns t >= L carry dy0 = 0); the host sums the tiles, which
    # keeps the reduction deterministic where atomics would not be.
    part = pid_b * tl.num_programs(0) + pid_l
    for k in tl.static_range(WIDTH):
        src = offs_l - (WIDTH - 1) + k
        in_seq = (src[None, :] >= 0) & (src[None, :] < L)
        xk = tl.load(x_rows + src[None, :] * stride_xl, mask=mask_d[:, None] & in_seq, other=0.0)
        tl.store(DW_PART + (part * D + offs_d) * WIDTH + k, tl.sum(dy0 * xk.to(ACC), axis=1), mask=mask_d)
    if HAS_BIAS:
        tl.store(DB_PART + part * D + offs_d, tl.sum(dy0, axis=1), mask=mask_d)


@triton.jit
def _conv_update_kernel(
    X, STATE, Wt, BIAS, OUT,
    D,
    stride_xb, stride_xd,
    stride_sb, stride_sd, stride_sw,
    stride_wd, stride_wk,
    stride_ob, stride_od,
    WIDTH: tl.constexpr, WIDTH_P2: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.arange(0, WIDTH_P2)
    mask_d = offs_d < D
    mask = mask_d[:, None] & (cols < WIDTH)[None, :]
    state_ptrs = STATE + pid_b * stride_sb + offs_d[:, None] * stride_sd

    # Shift left by reading column k + 1 into column k; the last column takes x. Every read precedes the store
    # below and each program owns its rows, so updating the state in place is safe.
    shifted = tl.load(
        state_ptrs + (cols[None, :] + 1) * stride_sw, mask=mask_d[:, None] & (cols[None, :] + 1 < WIDTH), other=0.0
    )
    x = tl.load(X + pid_b * stride_xb + offs_d * stride_xd, mask=mask_d, other=0.0)
    window = tl.where(cols[None, :] == WIDTH - 1, x.to(shifted.dtype)[:, None], shifted)  # (BLOCK_D, WIDTH_P2)
    w = tl.load(Wt + offs_d[:, None] * stride_wd + cols[None, :] * stride_wk, mask=mask, other=0.0)
    acc = tl.sum(window.to(ACC) * w.to(ACC), axis=1)  # (BLOCK_D,)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(ACC)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(state_ptrs + cols[None, :] * stride_sw, window, mask=mask)
    tl.store(OUT + pid_b * stride_ob + offs_d * stride_od, acc.to(OUT.dtype.element_ty), mask=mask_d)


def causal_conv1d_fwd(x, weight, bias, activation) -> torch.Tensor:
    """x: (Bt, D, L) any strides; weight: (D, W); bias: (D,) or None. Returns (Bt, D, L) in x's dtype."""
    _check("causal_conv1d", x, weight)
    bias = _dense(bias)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    out = dispatch.output_buffer((batch, dim, seqlen), x.dtype, x.device)
    block_d, block_l = _blocks(dim, seqlen)
    grid = (triton.cdiv(seqlen, block_l), triton.cdiv(dim, block_d), batch)
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, out,
        dim, seqlen,
        *x.stride(), *weight.stride(), *out.stride(),
        WIDTH=width, HAS_BIAS=bias is not None, SILU=activation is not None, ACC=_acc(x, weight, bias)[1],
        BLOCK_D=block_d, BLOCK_L=block_l, num_warps=4,
    )
    return out


def causal_conv1d_bwd(x, weight, bias, dout, activation):
    """Gradients (dx (Bt, D, L), dweight (D, W), dbias (D,) or None) for the forward above."""
    bias = _dense(bias)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    block_d, block_l = _blocks(dim, seqlen)
    grid = (triton.cdiv(seqlen, block_l), triton.cdiv(dim, block_d), batch)
    n_parts = grid[0] * batch
    dx = dispatch.output_buffer((batch, dim, seqlen), x.dtype, x.device)
    acc_dtype, acc = _acc(x, weight, bias)
    dw_part = dispatch.output_buffer((n_parts, dim, width), acc_dtype, x.device)
    db_part = dispatch.output_buffer((n_parts, dim), acc_dtype, x.device) if bias is not None else None
    _conv_bwd_kernel[grid](
        x, weight, bias if bias is not None else weight, dout, dx, dw_part,
        db_part if db_part is not None else dw_part,
        dim, seqlen,
        *x.stride(), *weight.stride(), *dout.stride(), *dx.stride(),
        WIDTH=width, HAS_BIAS=bias is not None, SILU=activation is not None, ACC=acc,
        BLOCK_D=block_d, BLOCK_L=block_l, num_warps=4,
    )
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


def causal_conv1d_update_fwd(x, conv_state, weight, bias, activation) -> torch.Tensor:
    """x: (Bt, D); conv_state: (Bt, D, W), shifted in place. Returns (Bt, D) in x's dtype."""
    _check("causal_conv1d_update", x, weight)
    if conv_state.dtype not in DTYPES:
        raise SokhanError(
            f"causal_conv1d_update: conv_state dtype {conv_state.dtype} is not float32/float16/bfloat16/float64"
        )
    bias = _dense(bias)
    batch, dim = x.shape
    width = weight.shape[1]
    out = dispatch.output_buffer((batch, dim), x.dtype, x.device)
    block_d = min(256, triton.next_power_of_2(dim))
    grid = (triton.cdiv(dim, block_d), batch)
    _conv_update_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight, out,
        dim,
        *x.stride(), *conv_state.stride(), *weight.stride(), *out.stride(),
        WIDTH=width, WIDTH_P2=triton.next_power_of_2(width), HAS_BIAS=bias is not None,
        SILU=activation is not None, ACC=_acc(x, conv_state, weight, bias)[1], BLOCK_D=block_d, num_warps=4,
    )
    return out
