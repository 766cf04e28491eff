"""One decode step of the selective scan in plain PyTorch, updating the state in place.

Same semantics as mamba-ssm's ``selective_state_update_ref`` (without heads):

    Δ = softplus(dt + dt_bias)                    (bias and softplus optional)
    state = exp(Δ A) ⊙ state + Δ B x
    out = (C · state + D x) · silu(z)

The arithmetic runs in the state's dtype promoted to at least float32; the new state is written back into ``state``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_groups(M: torch.Tensor, dim: int) -> torch.Tensor:
    """(Bt, N) -> (Bt, 1, N), which broadcasts over channels; grouped (Bt, G, N) -> (Bt, dim, N), channel d
    reading group d // (dim // G). Broadcasting instead of ``expand`` keeps the traced ONNX graph an op shorter."""
    if M.dim() == 2:
        return M.unsqueeze(1)
    return M.repeat_interleave(dim // M.shape[1], dim=1)


def selective_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """state: (Bt, D, N), updated in place; x, dt, z: (Bt, D); A: (D, N); B, C: (Bt, N) or grouped (Bt, G, N);
    D, dt_bias: (D,). Returns out (Bt, D) in x's dtype."""
    dtype = torch.promote_types(torch.promote_types(state.dtype, x.dtype), torch.float32)
    dim = x.shape[1]
    xf = x.to(dtype)
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt[:, :, None] * A.to(dtype))  # (Bt, D, N)
    dBx = (dt * xf)[:, :, None] * expand_groups(B.to(dtype), dim)  # (Bt, D, N)
    new_state = state.to(dtype) * dA + dBx  # (Bt, D, N)
    state.copy_(new_state)
    # C · state as a batched matrix-vector product: one MatMul in ONNX, where an einsum is ORT's slow generic op.
    C = C.to(dtype)
    if C.dim() == 2:
        out = torch.matmul(new_state, C.unsqueeze(-1)).squeeze(-1)  # (Bt, D, N) @ (Bt, N, 1) -> (Bt, D)
    else:
        out = (new_state * expand_groups(C, dim)).sum(-1)  # (Bt, D)
    if D is not None:
        out = out + xf * D.to(dtype)
    if z is not None:
        out = out * F.silu(z.to(dtype))
    return out.to(x.dtype)
