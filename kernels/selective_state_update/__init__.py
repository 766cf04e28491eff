"""``selective_state_update``: one decode step of the selective scan, updating the SSM state in place.

Two implementations behind one entry (see :mod:`sokhan.kernels.dispatch`): ``reference.py`` (plain PyTorch, also the
``cpu`` path: one step has nothing to chunk) and ``triton.py`` (one fused kernel reading and writing the state once).
Decoding needs no gradient, so the Triton path has no backward; calling it on tensors that require grad is an error.
"""

from __future__ import annotations

import torch

from sokhan import SokhanError
from sokhan.kernels import dispatch
from sokhan.kernels.selective_state_update.reference import selective_state_update_ref

__all__ = ["selective_state_update", "selective_state_update_ref"]


def check_inputs(state, x, dt, A, B, C, D=None, z=None, dt_bias=None) -> None:
    """Raise one line naming the first argument whose shape does not fit the others."""

    def bad(name: str, t: torch.Tensor, want: str) -> SokhanError:
        return SokhanError(f"selective_state_update: {name} has shape {tuple(t.shape)}, expected {want}")

    if state.dim() != 3:
        raise bad("state", state, "(batch, dim, dstate)")
    batch, dim, N = state.shape
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and tuple(t.shape) != (batch, dim):
            raise bad(name, t, f"({batch}, {dim})")
    if tuple(A.shape) != (dim, N) or A.is_complex():
        raise bad("A", A, f"real ({dim}, {N})")
    for name, M in (("B", B), ("C", C)):
        grouped = M.dim() == 3 and M.shape[1] > 0 and dim % M.shape[1] == 0
        if not (M.dim() == 2 or grouped) or M.shape[0] != batch or M.shape[-1] != N:
            raise bad(name, M, f"({batch}, {N}) or ({batch}, groups, {N}) with {dim} % groups == 0")
    for name, v in (("D", D), ("dt_bias", dt_bias)):
        if v is not None and tuple(v.shape) != (dim,):
            raise bad(name, v, f"({dim},)")


def selective_state_update(
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
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``state = exp(Δ A) state + Δ B x`` in place, returns ``(C · state + D x) silu(z)``.

    state: (Bt, D, N); x, dt, z: (Bt, D); A: (D, N); B, C: (Bt, N) or grouped (Bt, G, N); D, dt_bias: (D,).
    Returns out (Bt, D) in x's dtype.
    """
    check_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    optional = [t for t in (D, z, dt_bias) if t is not None]
    impl = dispatch.resolve("selective_state_update", state, x, dt, A, B, C, *optional, backend=backend)
    args = (state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if impl == "reference":
        return selective_state_update_ref(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[1:-1]):
        raise SokhanError(
            "selective_state_update: the Triton decode step has no backward; call it under torch.no_grad() "
            "or use backend='reference' to differentiate through it"
        )
    from sokhan.kernels.selective_state_update.triton import selective_state_update_fwd

    return selective_state_update_fwd(*args)
