"""Triton kernels for RMSNorm fused with the residual add (the Triton layer-norm tutorial's structure).

Forward: one program per row reads x (and the residual), writes h = x + residual (the carried stream), the
normalized output and 1/rms. Backward: each program walks a contiguous run of rows, writing dx (and the residual's
gradient) and keeping its share of the weight gradient in registers; the host sums those partial rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sokhan import SokhanError
from sokhan.kernels import dispatch

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# A whole row lives in registers as float32; past 64 KB per row (the layer-norm tutorial's limit) it would spill.
MAX_BLOCK_N = 65536 // 4


def _block(dim: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for rows of ``dim`` elements, or one clear error when a row cannot fit."""
    block_n = triton.next_power_of_2(dim)
    if block_n > MAX_BLOCK_N:
        raise SokhanError(
            f"rms_norm: rows of {dim} elements exceed the Triton kernel's limit of {MAX_BLOCK_N}; "
            "use backend='reference'"
        )
    # One warp per 256 elements, up to 16: with 8 warps the backward spills from 8192-element rows on sm_90.
    return block_n, min(max(block_n // 256, 1), 16)


def _acc(*tensors: torch.Tensor | None) -> tuple[torch.dtype, tl.dtype]:
    """Statistics in float32, or float64 when an input is float64 (a float64 call is then exact to float64)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(M, N) view with unit stride along N, copying only when the last dimension is strided."""
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def _rms_norm_fwd_kernel(
    X, RES, Wt, OUT, H, RSTD,
    N,
    stride_x, stride_res, stride_out, stride_h,
    eps,
    HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        r = tl.load(RES + row * stride_res + cols, mask=mask, other=0.0).to(ACC)
        # The stream is stored in the residual's dtype and normalized as stored, so out == rms_norm(h) exactly.
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=mask)
        x = h.to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(Wt + cols, mask=mask, other=0.0).to(ACC)
    tl.store(OUT + row * stride_out + cols, (x * rstd * w).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    H, Wt, DY, DH, DX, DRES, DW_PART, RSTD,
    M, N,
    stride_h, stride_dy, stride_dh, stride_dx, stride_dres,
    rows_per_program,
    HAS_DH: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(Wt + cols, mask=mask, other=0.0).to(ACC)
    dw = tl.zeros((BLOCK_N,), dtype=ACC)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # Pointers advance one row per step from an int64 start, so M * N past 2^31 elements cannot overflow.
    start = row_start.to(tl.int64)
    H += start * stride_h
    DY += start * stride_dy
    DH += start * stride_dh
    DX += start * stride_dx
    DRES += start * stride_dres
    RSTD += start
    for _ in range(row_start, row_end):
        h = tl.load(H + cols, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD)
        xhat = h * rstd
        wdy = w * dy
        dw += dy * xhat
        # d/dh of h * rstd(h): the direct term minus the projection through rstd's dependence on every h_j.
        dx = (wdy - xhat * (tl.sum(xhat * wdy, axis=0) / N)) * rstd
        if HAS_DH:
            dx += tl.load(DH + cols, mask=mask, other=0.0).to(ACC)
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_RESIDUAL:
            tl.store(DRES + cols, dx.to(DRES.dtype.element_ty), mask=mask)
        H += stride_h
        DY += stride_dy
        DH += stride_dh
        DX += stride_dx
        DRES += stride_dres
        RSTD += 1
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)


def rms_norm_fwd(x, weight, eps, residual):
    """x, residual: (M, N); weight: (N,). Returns (out (M, N) in x's dtype, h (M, N) in the residual's dtype,
    rstd (M,) float32, float64 for float64 inputs).

    h is x itself without a residual (nothing extra is written).
    """
    if x.dtype not in DTYPES or weight.dtype not in DTYPES or (residual is not None and residual.dtype not in DTYPES):
        raise SokhanError("rms_norm: the Triton kernel takes float32/float16/bfloat16/float64; use backend='reference'")
    x = _rows(x)
    weight = weight.contiguous()  # read as ``Wt + column``: a strided view (``big[::2]``) is copied first
    M, N = x.shape
    block_n, num_warps = _block(N)
    out = dispatch.output_buffer((M, N), x.dtype, x.device)
    acc_dtype, acc = _acc(x, weight, residual)
    rstd = dispatch.output_buffer((M,), acc_dtype, x.device)
    if residual is not None:
        residual = _rows(residual)
        h = dispatch.output_buffer((M, N), residual.dtype, x.device)
    else:
        h = x
    _rms_norm_fwd_kernel[(M,)](
        x, residual if residual is not None else x, weight, out, h, rstd,
        N,
        x.stride(0), (residual if residual is not None else x).stride(0), out.stride(0), h.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None, ACC=acc, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out, h, rstd


def rms_norm_bwd(dy, dh, h, weight, rstd, x_dtype, residual_dtype):
    """Gradients (dx (M, N), dresidual (M, N) or None, dweight (N,)); ``dh`` is the gradient of the returned stream."""
    dy = _rows(dy)
    dh = _rows(dh) if dh is not None else None
    weight = weight.contiguous()
    M, N = h.shape
    block_n, num_warps = _block(N)
    # One program per SM on a GPU, each reducing its rows' weight gradient in registers.
    if h.is_cuda:
        n_programs = torch.cuda.get_device_properties(h.device).multi_processor_count
    else:
        n_programs = 4
    n_programs = min(n_programs, M)
    rows_per_program = triton.cdiv(M, n_programs)
    dx = dispatch.output_buffer((M, N), x_dtype, h.device)
    dres = dispatch.output_buffer((M, N), residual_dtype, h.device) if residual_dtype is not None else None
    acc_dtype, acc = _acc(rstd)
    dw_part = dispatch.output_buffer((n_programs, N), acc_dtype, h.device)
    _rms_norm_bwd_kernel[(n_programs,)](
        h, weight, dy, dh if dh is not None else dy, dx, dres if dres is not None else dx, dw_part, rstd,
        M, N,
        h.stride(0), dy.stride(0), (dh if dh is not None else dy).stride(0), dx.stride(0),
        (dres if dres is not None else dx).stride(0),
        rows_per_program,
        HAS_DH=dh is not None, HAS_RESIDUAL=dres is not None, ACC=acc, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dx, dres, dw_part.sum(0).to(weight.dtype)
