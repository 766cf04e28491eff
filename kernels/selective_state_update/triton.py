"""Triton kernel for one decode step of the selective scan: the state is read once, updated and written back in place.

One program per (batch, block of BLOCK_D channels). Per step it reads the state (Bt, D, N) and x, dt, z (Bt, D) and
B, C (Bt, G, N), and writes the state and out (Bt, D): the state dominates, so the step costs about two passes over
it, against the reference's half dozen (exp(ΔA), ΔBx, the update, the copy back, C · state).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sokhan import SokhanError
from sokhan.kernels.selective_scan.triton import _softplus

# Elements of the (BLOCK_D, BLOCK_N) state tile per program: small, so a decode batch of one still spreads over
# many programs (D / 32 of them at N = 16).
_TILE = 512


@triton.jit
def _selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    dim, N, G, H,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    DT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = mask_d[:, None] & mask_n[None, :]
    group = offs_d // H  # (BLOCK_D,) which group's B and C each channel reads
    rows = (pid_b * dim + offs_d).to(tl.int64)  # int64: a large decode batch's state may pass 2^31 elements
    state_tile = rows[:, None] * N + offs_n[None, :]  # (BLOCK_D, BLOCK_N)
    bc_tile = ((pid_b * G + group) * N)[:, None] + offs_n[None, :]

    state = tl.load(state_ptr + state_tile, mask=mask, other=0.0).to(DT)
    x = tl.load(x_ptr + rows, mask=mask_d, other=0.0).to(DT)
    dt = tl.load(dt_ptr + rows, mask=mask_d, other=0.0).to(DT)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(DT)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(DT)
    Bm = tl.load(B_ptr + bc_tile, mask=mask, other=0.0).to(DT)
    Cm = tl.load(C_ptr + bc_tile, mask=mask, other=0.0).to(DT)
    state = state * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bm
    tl.store(state_ptr + state_tile, state.to(state_ptr.dtype.element_ty), mask=mask)
    out = tl.sum(state * Cm, axis=1)  # (BLOCK_D,)
    if HAS_D:
        out += x * tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(DT)
    if HAS_Z:
        z = tl.load(z_ptr + rows, mask=mask_d, other=0.0).to(DT)
        out *= z / (1.0 + tl.exp(-z))
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def selective_state_update_fwd(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, block_d=None):
    """Updates ``state`` (Bt, D, N) in place and returns out (Bt, D) in x's dtype."""
    batch, dim, N = state.shape
    if not state.is_contiguous():
        raise SokhanError("selective_state_update: the Triton kernel updates state in place and needs it contiguous")
    Bg = (B.unsqueeze(1) if B.dim() == 2 else B).contiguous()  # (Bt, G, N)
    Cg = (C.unsqueeze(1) if C.dim() == 2 else C).contiguous()
    G = Bg.shape[1]
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_D = block_d or max(1, min(triton.next_power_of_2(dim), _TILE // BLOCK_N))
    wide = any(t is not None and t.dtype == torch.float64 for t in (state, x, dt, A, B, C, D, z, dt_bias))
    x = x.contiguous()
    # NaN-filled so an element the kernel fails to write shows; out (Bt, D) is tiny next to the state it updates.
    out = torch.full_like(x, float("nan"))
    _selective_state_update_kernel[(batch, triton.cdiv(dim, BLOCK_D))](
        state, x, dt.contiguous(), A.contiguous(), Bg, Cg,
        D.contiguous() if D is not None else x, z.contiguous() if z is not None else x,
        dt_bias.contiguous() if dt_bias is not None else x, out,
        dim, N, G, dim // G,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        DT=tl.float64 if wide else tl.float32, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
    )
    return out
