"""``selective_scan``: the Mamba recurrence over a whole sequence, with mamba-ssm's ``selective_scan_fn`` signature.

Implementations behind one entry (see :mod:`sokhan.kernels.dispatch`): ``reference.py`` (sequential, the
definition); the ``cpu`` backend, which is ``compiled.py`` (a fused C++ loop, built on first use) on CPU tensors and
``chunked.py`` (chunked scan in pure PyTorch, differentiable by autograd) where that cannot run (no C++ compiler, or
tensors on another device); and ``triton.py`` (fused kernels; :class:`SelectiveScanFunction` gives them a backward
that recomputes the states).
"""

from __future__ import annotations

import torch

from sokhan import SokhanError
from sokhan.kernels import dispatch
from sokhan.kernels.selective_scan import compiled
from sokhan.kernels.selective_scan.chunked import selective_scan_chunked
from sokhan.kernels.selective_scan.compiled import selective_scan_compiled
from sokhan.kernels.selective_scan.reference import selective_scan_ref

__all__ = [
    "SelectiveScanFunction",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_compiled",
    "selective_scan_ref",
]


def check_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> None:
    """Raise one line naming the first argument whose shape does not fit the others."""

    def bad(name: str, t: torch.Tensor, want: str) -> SokhanError:
        return SokhanError(f"selective_scan: {name} has shape {tuple(t.shape)}, expected {want}")

    if u.dim() != 3 or u.shape[2] == 0:
        raise bad("u", u, "(batch, dim, seqlen) with seqlen >= 1")
    batch, dim, L = u.shape
    if delta.shape != u.shape:
        raise bad("delta", delta, f"{tuple(u.shape)} like u")
    if z is not None and z.shape != u.shape:
        raise bad("z", z, f"{tuple(u.shape)} like u")
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise bad("A", A, f"real ({dim}, dstate)")
    N = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        grouped = M.dim() == 4 and M.shape[1] > 0 and dim % M.shape[1] == 0
        if not (M.dim() == 3 or grouped) or M.shape[0] != batch or tuple(M.shape[-2:]) != (N, L):
            raise bad(name, M, f"({batch}, {N}, {L}) or ({batch}, groups, {N}, {L}) with {dim} % groups == 0")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and tuple(v.shape) != (dim,):
            raise bad(name, v, f"({dim},)")


class SelectiveScanFunction(torch.autograd.Function):
    """Triton forward that keeps only chunk-start states; the backward recomputes the rest chunk by chunk.

    ``apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, blocks)`` returns (out, last_state); ``blocks`` is
    None for the launchers' choice or (BLOCK_L, BLOCK_D) to force the tiling (tests use it to cut odd tiles).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, blocks):
        from sokhan.kernels.selective_scan.triton import selective_scan_fwd

        block_l, block_d = blocks or (None, None)
        out, last_state, checkpoints = selective_scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_l=block_l, block_d=block_d
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, checkpoints)
        ctx.delta_softplus = delta_softplus
        ctx.blocks = (block_l, block_d)
        ctx.set_materialize_grads(False)
        return out, last_state

    @staticmethod
    def backward(ctx, dout, dlast_state):
        from sokhan.kernels.selective_scan.triton import selective_scan_bwd

        u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
        block_l, block_d = ctx.blocks
        grads = selective_scan_bwd(
            dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, checkpoints,
            block_l=block_l, block_d=block_d,
        )
        return (*grads, None, None)


def selective_scan(
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
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan ``x_t = exp(Δ_t A) x_{t-1} + Δ_t B_t u_t``, ``out_t = (C_t · x_t + D u_t) silu(z_t)``.

    u, delta, z: (Bt, D, L); A: (D, N); B, C: (Bt, N, L) or grouped (Bt, G, N, L); D, delta_bias: (D,).
    Returns out (Bt, D, L), or (out, last_state (Bt, D, N)) with ``return_last_state``.
    """
    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    optional = [t for t in (D, z, delta_bias) if t is not None]
    impl = dispatch.resolve("selective_scan", u, delta, A, B, C, *optional, backend=backend, has_fast_path=True)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if impl == "reference":
        return selective_scan_ref(*args, return_last_state)
    if impl == "cpu":
        on_cpu = all(t.device.type == "cpu" for t in (u, delta, A, B, C, *optional))
        fast = selective_scan_compiled if on_cpu and compiled.load() is not None else selective_scan_chunked
        return fast(*args, return_last_state)
    out, last_state = SelectiveScanFunction.apply(*args, None)
    return (out, last_state) if return_last_state else out
