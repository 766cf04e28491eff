"""The selective scan as a chunked scan in pure PyTorch: the fast CPU path, differentiable by autograd.

Within a chunk starting at step t0, let S_t = Σ_{t0 < s ≤ t} Δ_s (a cumulative sum over the chunk) and c_t = A S_t
(≤ 0 for A < 0). The recurrence unrolls to

    x_t = exp(c_t) · (exp(Δ_{t0} A) x_{t0-1} + Σ_{t0 ≤ s ≤ t} exp(-c_s) Δ_s B_s u_s)

so a chunk is a few elementwise ops and one cumsum over its steps, and only the chunk's last state is carried on:
the Python loop runs L / T times instead of L. Splitting exp(c_t - c_s) into exp(c_t) · exp(-c_s) is exact in
exact arithmetic but overflows once |c| passes the dtype's exponent range. So c is measured from a step m in the
middle of the chunk (the factors become exp(c_t - c_m) · exp(c_m - c_s)), and chunks are cut where the decay of the
fastest-decaying channel, Σ max |Δ_t A|, reaches ``_MAX_LOG_DECAY`` on either side of m (or at ``max_chunk`` steps):
every factor stays within exp(±bound). The first step's own decay is applied to the carried state directly, so a
single step with a huge decay costs nothing in range.

Accuracy: outputs and states are exact to float32 rounding (relative RMS error ~2e-7 against float64, like the
reference run in float32). Gradients with respect to A and Δ are less so: autograd differentiates exp(c_t) and
exp(-c_s) separately, and for nearby steps the two terms of (c_t - c_s)' cancel, losing up to |c| / |c_t - c_s| of
their digits; the tests observe up to 3.4e-6 (in dA, against 2e-7 for the float32 reference), far below what
training notices.

Cost: about ten elementwise passes over (Bt, D, T, N) per chunk, one exp among them (exp(-c) is its reciprocal);
autograd keeps a handful of those tensors per chunk, the same order of memory as the reference's (Bt, D, L, N)
discretized inputs.
"""

from __future__ import annotations

import torch

from sokhan.kernels.selective_scan.reference import discretize_delta, skip_and_gate

# Largest |A| · Σ Δ allowed inside one chunk, per dtype: exp(±bound) must stay far inside the finite range.
_MAX_LOG_DECAY = {torch.float32: 60.0, torch.float64: 600.0}


class _ExpPair(torch.autograd.Function):
    """(exp(c), exp(-c)) for one exp and a reciprocal; exact while exp(±c) stay finite, as the chunking ensures.

    Autograd of ``1 / exp(c)`` would square exp(c) in its backward and leave the range; this backward,
    dc = dE · E - dF · F with E = exp(c), F = exp(-c), only forms products that stay in it.
    """

    @staticmethod
    def forward(ctx, c):
        decay = torch.exp(c)
        growth = torch.reciprocal(decay)
        ctx.save_for_backward(decay, growth)
        return decay, growth

    @staticmethod
    def backward(ctx, d_decay, d_growth):
        decay, growth = ctx.saved_tensors
        return d_decay * decay - d_growth * growth


def chunk_bounds(delta: torch.Tensor, A: torch.Tensor, max_chunk: int, bound: float) -> list[tuple[int, int, int]]:
    """[(t0, m, t1), ...] covering 0..L: chunks [t0, t1) of at most ``max_chunk`` steps and a step m in each with
    |R_t - R_m| ≤ ``bound`` for every t in the chunk, where R_t = Σ_{t0 < s ≤ t} max |Δ_s A| (the decay of the
    fastest-decaying channel). m is the last step with R_m ≤ bound, so the chunk may span up to 2 · bound.

    delta (Bt, D, L) after bias and softplus; A (D, N). |Δ| because without softplus Δ may be negative.
    """
    with torch.no_grad():
        rate = (delta.abs() * A.abs().amax(dim=1)[:, None]).amax(dim=(0, 1))  # (L,)
    bounds = []
    t0 = m = 0
    R = Rm = 0.0
    for t, r in enumerate(rate.tolist()):
        if t == t0:
            continue
        R += r
        if t - t0 == max_chunk or R - Rm > bound:
            bounds.append((t0, m, t))
            t0 = m = t
            R = Rm = 0.0
        elif R <= bound:
            m, Rm = t, R
    bounds.append((t0, m, delta.shape[2]))
    return bounds


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    max_chunk: int = 64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same signature, shapes and results as :func:`~sokhan.kernels.selective_scan.reference.selective_scan_ref`."""
    dtype_in = u.dtype
    dtype = torch.promote_types(dtype_in, torch.float32)
    batch, dim, L = u.shape
    N = A.shape[1]
    # Channels d = g * H + h share group g's B and C; an ungrouped B is one group, broadcast instead of copied.
    G = 1 if B.dim() == 3 else B.shape[1]
    H = dim // G
    u = u.to(dtype)
    delta = discretize_delta(delta, delta_bias, delta_softplus, dtype)  # (Bt, D, L)
    A = A.to(dtype)
    # (Bt, G, 1, L, N): time-major so a chunk's slice is contiguous rows of N; the 1 broadcasts over the channels.
    Bg = B.to(dtype).reshape(batch, G, N, L).transpose(-1, -2).contiguous().unsqueeze(2)
    Cg = C.to(dtype).reshape(batch, G, N, L).transpose(-1, -2).contiguous().unsqueeze(2)
    Ag = A.view(1, G, H, 1, N)
    deltag = delta.view(batch, G, H, L)
    du = (delta * u).view(batch, G, H, L)

    x = u.new_zeros(batch, G, H, N)  # (Bt, G, H, N) state before the chunk
    ys = []
    for t0, m, t1 in chunk_bounds(delta, A, max_chunk, _MAX_LOG_DECAY.get(dtype, 60.0)):
        dlt = deltag[..., t0:t1]  # (Bt, G, H, T)
        S = dlt.cumsum(dim=-1)
        S = (S - S[..., m - t0, None]).unsqueeze(-1)  # (Bt, G, H, T, 1) Σ_{m < s ≤ t} Δ_s, negative before m
        # The state carried in, decayed by step t0 and moved to the reference step m: exp(Δ_{t0} A - (c_{t0} - c_m)).
        x0 = torch.exp((dlt[..., 0, None] - S[..., 0, :]) * Ag[..., 0, :]) * x  # (Bt, G, H, N)
        decay, growth = _ExpPair.apply(S * Ag)  # (Bt, G, H, T, N) exp(c_t - c_m) and its reciprocal
        w = growth * (du[..., t0:t1, None] * Bg[..., t0:t1, :])  # (Bt, G, H, T, N)
        # The carried state joins the first term of the sum (in place: no autograd node here needs w itself).
        w[..., 0, :] += x0
        xs = decay * torch.cumsum(w, dim=-2)  # (Bt, G, H, T, N) states after each step
        ys.append((xs * Cg[..., t0:t1, :]).sum(dim=-1))  # (Bt, G, H, T)
        x = xs[..., -1, :]
    y = torch.cat(ys, dim=-1).reshape(batch, dim, L)  # (Bt, D, L)
    out = skip_and_gate(y, u, D, z).to(dtype_in)
    return (out, x.reshape(batch, dim, N)) if return_last_state else out
