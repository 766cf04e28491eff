"""Triton kernels for the selective scan: a fused forward and a backward that recomputes the states.

Layout: one program per (batch, group, block of BLOCK_D channels of that group); it walks the sequence in chunks of
BLOCK_L steps, holding the state x (BLOCK_D, BLOCK_N) in registers from chunk to chunk. Inside a chunk the
discretization (exp(Δ A), Δ B u) is computed on a (BLOCK_D, BLOCK_L, BLOCK_N) register tile and the recurrence
x_t = a_t x_{t-1} + b_t is an associative scan over the chunk's steps, so Ā and B̄u never touch memory: the forward
reads u, Δ, z (Bt, D, L) and B, C (Bt, G, N, L) once and writes out (Bt, D, L), plus the state at the start of each
chunk (Bt, D, L / BLOCK_L, N): the only states kept for the backward.

The backward walks the chunks from last to first. It restarts each chunk from its saved state, recomputes the states
(a second scan, on inputs shifted by one step, gives x_{t-1} exactly, without dividing by a), and runs the adjoint
recurrence h_t = C_t g_t + a_{t+1} h_{t+1} as a reverse scan, carrying h between chunks the way the forward carries x.
dB and dC, sums over the channels of a group, are accumulated with atomic adds into (Bt, G, N, L) float32 buffers:
per-block partials would need (Bt, D / BLOCK_D, N, L), a large fraction of the states the backward avoids storing.
Atomics make dB and dC bitwise nondeterministic on GPU (the order of the float adds varies); every other gradient is
deterministic: dA, dD and dΔ_bias (sums over batch and time) are per-(batch, channel) partials reduced by PyTorch.
Offsets are int64, so tensors past 2^31 elements index correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sokhan import SokhanError

# Elements of one (BLOCK_D, BLOCK_L, BLOCK_N) tile: the forward keeps about five such tiles in registers, the
# backward about fifteen, so its channel blocks are smaller (the chunk length must match the forward's).
_TILE_FWD = 4096
_TILE_BWD = 1024


@triton.jit
def _first_order(a1, b1, a2, b2):
    """Compose x -> a1 x + b1 then x -> a2 x + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    # log1p(exp(-|x|)) without log1p: log(w) · v / (w - 1) with w = 1 + v is exact to rounding (Goldberg's trick).
    v = tl.exp(-tl.abs(x))
    w = 1.0 + v
    log1p = tl.where(w == 1.0, v, tl.log(w) * v / (w - 1.0))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load_delta(delta_ptr, rows, offs_l, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, DT: tl.constexpr):
    """Δ (BLOCK_D, BLOCK_L) after bias and softplus, and its value before softplus; 0 where masked."""
    raw = tl.load(delta_ptr + rows[:, None] + offs_l[None, :], mask=mask, other=0.0).to(DT)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dl = raw
    if SOFTPLUS:
        dl = _softplus(raw)
    return tl.where(mask, dl, 0.0), raw


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, last_ptr, ckpt_ptr,
    dim, L, N, G, H, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    DT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b, pid_g, pid_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_h = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_h < H
    offs_d = pid_g * H + offs_h  # (BLOCK_D,) channel indices
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(DT)  # (BLOCK_D, BLOCK_N)
    Dv = tl.zeros((BLOCK_D,), dtype=DT)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(DT)
    bias = tl.zeros((BLOCK_D,), dtype=DT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(DT)
    channel = (pid_b * dim + offs_d).to(tl.int64)  # (BLOCK_D,) row of (Bt, D)
    rows = channel * L  # start of each channel's sequence in u, Δ, z, out
    bc = (pid_b * G + pid_g).to(tl.int64) * N * L  # start of this group's B and C
    state_rows = channel[:, None] * N + offs_n[None, :]  # (BLOCK_D, BLOCK_N)
    last_col = (tl.arange(0, BLOCK_L) == BLOCK_L - 1)[None, :, None]

    x = tl.zeros((BLOCK_D, BLOCK_N), dtype=DT)
    for k in range(n_chunks):
        tl.store(ckpt_ptr + (channel[:, None] * n_chunks + k) * N + offs_n[None, :], x, mask=mask_dn)
        offs_l = k * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        mask = mask_d[:, None] & mask_l[None, :]  # (BLOCK_D, BLOCK_L)
        mask_ln = mask_l[:, None] & mask_n[None, :]  # (BLOCK_L, BLOCK_N)
        u = tl.load(u_ptr + rows[:, None] + offs_l[None, :], mask=mask, other=0.0).to(DT)
        dl, _ = _load_delta(delta_ptr, rows, offs_l, mask, bias, HAS_BIAS, SOFTPLUS, DT)
        Bm = tl.load(B_ptr + bc + offs_n[None, :] * L + offs_l[:, None], mask=mask_ln, other=0.0).to(DT)
        Cm = tl.load(C_ptr + bc + offs_n[None, :] * L + offs_l[:, None], mask=mask_ln, other=0.0).to(DT)
        # Masked steps have Δ = 0, so a = 1 and b = 0: they carry the state through unchanged.
        a = tl.exp(dl[:, :, None] * A[:, None, :])  # (BLOCK_D, BLOCK_L, BLOCK_N)
        b = (dl * u)[:, :, None] * Bm[None, :, :]
        pa, pb = tl.associative_scan((a, b), axis=1, combine_fn=_first_order)
        xs = pa * x[:, None, :] + pb  # (BLOCK_D, BLOCK_L, BLOCK_N) states after each step
        y = tl.sum(xs * Cm[None, :, :], axis=2)  # (BLOCK_D, BLOCK_L)
        if HAS_D:
            y += u * Dv[:, None]
        if HAS_Z:
            z = tl.load(z_ptr + rows[:, None] + offs_l[None, :], mask=mask, other=0.0).to(DT)
            y *= z * _sigmoid(z)
        tl.store(out_ptr + rows[:, None] + offs_l[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
        x = tl.sum(tl.where(last_col, xs, 0.0), axis=1)
    tl.store(last_ptr + state_rows, x, mask=mask_dn)


@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    dim, L, N, G, H, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    DT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b, pid_g, pid_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_h = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_h < H
    offs_d = pid_g * H + offs_h
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(DT)
    Dv = tl.zeros((BLOCK_D,), dtype=DT)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(DT)
    bias = tl.zeros((BLOCK_D,), dtype=DT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(DT)
    channel = (pid_b * dim + offs_d).to(tl.int64)
    rows = channel * L
    bc = (pid_b * G + pid_g).to(tl.int64) * N * L  # B, C and their gradients share this layout
    state_rows = channel[:, None] * N + offs_n[None, :]
    first_col = (tl.arange(0, BLOCK_L) == 0)[None, :, None]

    h_carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=DT)  # dLoss/dx at the first step of the chunk after this one
    if HAS_DLAST:
        h_carry = tl.load(dlast_ptr + state_rows, mask=mask_dn, other=0.0).to(DT)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=DT)
    dD_acc = tl.zeros((BLOCK_D,), dtype=DT)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=DT)
    for kk in range(n_chunks):
        k = n_chunks - 1 - kk
        offs_l = k * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        mask = mask_d[:, None] & mask_l[None, :]
        mask_ln = mask_l[:, None] & mask_n[None, :]
        tile = rows[:, None] + offs_l[None, :]  # (BLOCK_D, BLOCK_L)
        bc_tile = bc + offs_n[None, :] * L + offs_l[:, None]  # (BLOCK_L, BLOCK_N)
        u = tl.load(u_ptr + tile, mask=mask, other=0.0).to(DT)
        dl, raw = _load_delta(delta_ptr, rows, offs_l, mask, bias, HAS_BIAS, SOFTPLUS, DT)
        Bm = tl.load(B_ptr + bc_tile, mask=mask_ln, other=0.0).to(DT)
        Cm = tl.load(C_ptr + bc_tile, mask=mask_ln, other=0.0).to(DT)
        a = tl.exp(dl[:, :, None] * A[:, None, :])  # (BLOCK_D, BLOCK_L, BLOCK_N)
        b = (dl * u)[:, :, None] * Bm[None, :, :]

        # x_{t-1}: scan the previous step's (a, b), with the chunk's first position the identity, from the saved state.
        prev_l = offs_l - 1
        in_chunk = (prev_l >= k * BLOCK_L) & (prev_l < L)
        mask_p = mask_d[:, None] & in_chunk[None, :]
        mask_pn = in_chunk[:, None] & mask_n[None, :]
        u_p = tl.load(u_ptr + rows[:, None] + prev_l[None, :], mask=mask_p, other=0.0).to(DT)
        dl_p, _ = _load_delta(delta_ptr, rows, prev_l, mask_p, bias, HAS_BIAS, SOFTPLUS, DT)
        B_p = tl.load(B_ptr + bc + offs_n[None, :] * L + prev_l[:, None], mask=mask_pn, other=0.0).to(DT)
        a_p = tl.exp(dl_p[:, :, None] * A[:, None, :])
        b_p = (dl_p * u_p)[:, :, None] * B_p[None, :, :]
        pa, pb = tl.associative_scan((a_p, b_p), axis=1, combine_fn=_first_order)
        x0 = tl.load(ckpt_ptr + (channel[:, None] * n_chunks + k) * N + offs_n[None, :], mask=mask_dn, other=0.0).to(DT)
        x_prev = pa * x0[:, None, :] + pb  # (BLOCK_D, BLOCK_L, BLOCK_N)
        xs = a * x_prev + b

        dout = tl.load(dout_ptr + tile, mask=mask, other=0.0).to(DT)
        g = dout  # dLoss/dy, y = C·x + D u before gating
        if HAS_Z:
            z = tl.load(z_ptr + tile, mask=mask, other=0.0).to(DT)
            sig = _sigmoid(z)
            y = tl.sum(xs * Cm[None, :, :], axis=2)
            if HAS_D:
                y += u * Dv[:, None]
            tl.store(dz_ptr + tile, (dout * y * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=mask)
            g = dout * z * sig
        tl.atomic_add(dC_ptr + bc_tile, tl.sum(g[:, :, None] * xs, axis=0), mask=mask_ln)

        # Adjoint: h_t = C_t g_t + a_{t+1} h_{t+1}; a_{t+1} = 1 past the end, where h_L = dLoss/d(last state).
        next_l = offs_l + 1
        mask_nx = mask_d[:, None] & (next_l < L)[None, :]
        dl_n, _ = _load_delta(delta_ptr, rows, next_l, mask_nx, bias, HAS_BIAS, SOFTPLUS, DT)
        a_n = tl.exp(dl_n[:, :, None] * A[:, None, :])
        e = g[:, :, None] * Cm[None, :, :]
        ph, vh = tl.associative_scan((a_n, e), axis=1, combine_fn=_first_order, reverse=True)
        h = vh + ph * h_carry[:, None, :]  # (BLOCK_D, BLOCK_L, BLOCK_N)
        h_carry = tl.sum(tl.where(first_col, h, 0.0), axis=1)

        # b = Δ u B and a = exp(Δ A): their inputs' gradients.
        hax = h * a * x_prev
        ddl = tl.sum(h * (u[:, :, None] * Bm[None, :, :]) + hax * A[:, None, :], axis=2)  # (BLOCK_D, BLOCK_L)
        du = dl * tl.sum(h * Bm[None, :, :], axis=2)
        if HAS_D:
            du += g * Dv[:, None]
            dD_acc += tl.sum(g * u, axis=1)
        tl.store(du_ptr + tile, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.atomic_add(dB_ptr + bc_tile, tl.sum(h * (dl * u)[:, :, None], axis=0), mask=mask_ln)
        dA_acc += tl.sum(hax * dl[:, :, None], axis=1)
        if SOFTPLUS:
            ddl = ddl * _sigmoid(raw)
        ddl = tl.where(mask, ddl, 0.0)
        dbias_acc += tl.sum(ddl, axis=1)
        tl.store(ddelta_ptr + tile, ddl.to(ddelta_ptr.dtype.element_ty), mask=mask)
    tl.store(dA_ptr + state_rows, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * dim + offs_d, dbias_acc, mask=mask_d)


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is, else float32 (half-precision inputs are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _blocks(N: int, H: int, L: int, block_l: int | None, block_d: int | None, tile: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_L, BLOCK_N): N padded to a power of two, chunks of up to 32 steps, channels to fill a tile."""
    BLOCK_N = triton.next_power_of_2(N)
    if BLOCK_N > 256:
        raise SokhanError(
            f"selective_scan: the Triton kernel supports dstate up to 256, got {N}; use backend='reference'"
        )
    BLOCK_L = block_l or max(1, min(32, _TILE_FWD // BLOCK_N, triton.next_power_of_2(L)))
    BLOCK_D = block_d or max(1, min(triton.next_power_of_2(H), tile // (BLOCK_L * BLOCK_N)))
    return BLOCK_D, BLOCK_L, BLOCK_N


def _new(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer: NaN-filled off CUDA (the interpreter, i.e. the tests), so an element a kernel never writes
    shows; uninitialised on CUDA, where the fill would be one more pass over memory."""
    if device.type == "cuda":
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _grouped(M: torch.Tensor) -> torch.Tensor:
    """(Bt, N, L) or (Bt, G, N, L) -> contiguous (Bt, G, N, L)."""
    return (M.unsqueeze(1) if M.dim() == 3 else M).contiguous()


def _dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Triton needs a pointer for absent optional inputs; the kernels never read it (HAS_* is False)."""
    return t.contiguous() if t is not None else like


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_l=None, block_d=None):
    """Returns out (Bt, D, L) in u's dtype, last_state (Bt, D, N) and the chunk-start states (Bt, D, n_chunks, N)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    Bg, Cg = _grouped(B), _grouped(C)
    G = Bg.shape[1]
    H = dim // G
    BLOCK_D, BLOCK_L, BLOCK_N = _blocks(N, H, L, block_l, block_d, _TILE_FWD)
    n_chunks = triton.cdiv(L, BLOCK_L)
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    has_z = z is not None
    u, delta, z = u.contiguous(), delta.contiguous(), _dummy(z, u)
    out = _new(u.shape, u.dtype, u.device)
    last_state = _new((batch, dim, N), dtype, u.device)
    ckpt = _new((batch, dim, n_chunks, N), dtype, u.device)
    grid = (batch, G, triton.cdiv(H, BLOCK_D))
    _selective_scan_fwd_kernel[grid](
        u, delta, A.contiguous(), Bg, Cg, _dummy(D, u), z, _dummy(delta_bias, u),
        out, last_state, ckpt,
        dim, L, N, G, H, n_chunks,
        HAS_D=D is not None, HAS_Z=has_z, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        DT=tl.float64 if dtype == torch.float64 else tl.float32,
        BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, BLOCK_N=BLOCK_N,
    )
    return out, last_state, ckpt


def selective_scan_bwd(
    dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, ckpt, block_l=None, block_d=None
):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), None for absent inputs, from the saved chunk states."""
    batch, dim, L = u.shape
    N = A.shape[1]
    Bg, Cg = _grouped(B), _grouped(C)
    G = Bg.shape[1]
    H = dim // G
    BLOCK_D, BLOCK_L, BLOCK_N = _blocks(N, H, L, block_l, block_d, _TILE_BWD)
    n_chunks = triton.cdiv(L, BLOCK_L)
    if n_chunks != ckpt.shape[2]:
        raise SokhanError(
            "selective_scan: the backward's chunk length differs from the forward's; pass the same block_l"
        )
    n_dblocks = triton.cdiv(H, BLOCK_D)
    dtype = ckpt.dtype
    dev = u.device
    u, delta, zc = u.contiguous(), delta.contiguous(), _dummy(z, u)
    dout = torch.zeros_like(u) if dout is None else dout.contiguous()

    def nan(*shape, dt=dtype):
        return _new(shape, dt, dev)

    du, ddelta = nan(batch, dim, L, dt=u.dtype), nan(batch, dim, L, dt=delta.dtype)
    dz = nan(batch, dim, L, dt=z.dtype) if z is not None else du
    dA_part, dD_part, dbias_part = nan(batch, dim, N), nan(batch, dim), nan(batch, dim)
    dBg = torch.zeros(batch, G, N, L, dtype=dtype, device=dev)  # atomic-add targets
    dCg = torch.zeros(batch, G, N, L, dtype=dtype, device=dev)
    _selective_scan_bwd_kernel[(batch, G, n_dblocks)](
        u, delta, A.contiguous(), Bg, Cg, _dummy(D, u), zc, _dummy(delta_bias, u), ckpt, dout,
        _dummy(dlast_state, u),
        du, ddelta, dz, dA_part, dBg, dCg, dD_part, dbias_part,
        dim, L, N, G, H, n_chunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_DLAST=dlast_state is not None,
        DT=tl.float64 if dtype == torch.float64 else tl.float32,
        BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, BLOCK_N=BLOCK_N,
    )
    dA = dA_part.sum(0).to(A.dtype)
    dB = dBg.to(B.dtype).reshape(B.shape)
    dC = dCg.to(C.dtype).reshape(C.shape)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz if z is not None else None, dbias
