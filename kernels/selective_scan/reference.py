"""The selective scan in plain PyTorch, one time step at a time: the definition the fast paths are checked against.

Same semantics as mamba-ssm's ``selective_scan_ref`` for real A and input-dependent B, C (the Mamba block's case):

    Δ = softplus(Δ + Δ_bias)                     (bias and softplus optional)
    x_t = exp(Δ_t A) ⊙ x_{t-1} + Δ_t B_t u_t      per channel d: x (N,), A (N,), B_t (N,)
    y_t = C_t · x_t + D u_t,   out_t = y_t · silu(z_t)

One difference: mamba-ssm computes in float32 whatever the input; here the compute dtype is the input's promoted to
at least float32, so a float64 call is a float64 reference for the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_groups(M: torch.Tensor, dim: int) -> torch.Tensor:
    """(Bt, N, L) or grouped (Bt, G, N, L) -> (Bt, dim, N, L); channel d reads group d // (dim // G)."""
    if M.dim() == 3:
        return M.unsqueeze(1).expand(-1, dim, -1, -1)
    return M.repeat_interleave(dim // M.shape[1], dim=1)


def discretize_delta(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Δ + bias, then softplus if asked, in ``dtype``. delta (Bt, D, L), delta_bias (D,)."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """``(y + D u) · silu(z)``, D and z optional, in u's (the compute) dtype. y, u, z: (Bt, D, L); D: (D,)."""
    out = y if D is None else y + u * D.to(u.dtype)[:, None]
    return out if z is None else out * F.silu(z.to(u.dtype))


def selective_scan_ref(
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequential selective scan.

    u, delta, z: (Bt, D, L); A: (D, N); B, C: (Bt, N, L) or grouped (Bt, G, N, L) with D % G == 0;
    D, delta_bias: (D,). Returns out (Bt, D, L) in u's dtype, and with ``return_last_state`` also the state after the
    last step, (Bt, D, N) in the compute dtype.
    """
    dtype_in = u.dtype
    dtype = torch.promote_types(dtype_in, torch.float32)
    dim = u.shape[1]
    u = u.to(dtype)
    delta = discretize_delta(delta, delta_bias, delta_softplus, dtype)  # (Bt, D, L)
    A = A.to(dtype)
    B = expand_groups(B.to(dtype), dim)  # (Bt, D, N, L)
    C = expand_groups(C.to(dtype), dim)  # (Bt, D, N, L)

    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))  # (Bt, D, L, N)
    deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)  # (Bt, D, L, N)
    x = u.new_zeros(u.shape[0], dim, A.shape[1])  # (Bt, D, N)
    ys = []
    # unbind rather than indexing step by step: the backward of L index ops would each fill a (Bt, D, L, N) zero
    # tensor (quadratic in L), the backward of unbind is one stack.
    for dA_t, dBu_t, C_t in zip(deltaA.unbind(2), deltaB_u.unbind(2), C.unbind(3)):
        x = dA_t * x + dBu_t
        ys.append(torch.einsum("bdn,bdn->bd", x, C_t))
    y = torch.stack(ys, dim=2)  # (Bt, D, L)
    out = skip_and_gate(y, u, D, z).to(dtype_in)
    return (out, x) if return_last_state else out
