"""The selective scan with its recurrence as one ``torch.ops.higher_order.scan``: the formulation a prefill graph exports.

``reference.py`` loops over time in Python, so tracing it unrolls the loop into a graph for one sequence length.
Here everything that is parallel over L is computed for all positions at once (softplus of Δ, exp(Δ A), Δ B u, the
C contraction, the skip and gate), and only the elementwise recurrence

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t

goes through ``scan``, which ``torch.export`` keeps as one higher-order op with L symbolic and the ONNX exporter
writes as an ONNX ``Scan`` node. It is meant for export (``sokhan.export.prefill``); in eager PyTorch ``scan``
compiles its body on first use and is no faster than the reference. Same signature and semantics as
``selective_scan_ref``, from h = 0. The scan keeps every state h_t, (L, Bt, D, N) in the compute dtype, for the C
contraction after it: in ONNX Runtime each Scan iteration costs per node run, and moving the contraction into the
body (two more nodes, an (L, Bt, D) output) made a 1024-token prefill slower, not faster.
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.scan import scan

from sokhan.kernels.selective_scan.reference import discretize_delta, expand_groups, skip_and_gate


def _time_first(M: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C, time-first: (Bt, N, L) -> (L, Bt, 1, N), broadcasting over channels; grouped (Bt, G, N, L) ->
    (L, Bt, D, N), channel d reading group d // (D / G)."""
    if M.dim() == 3:
        return M.permute(2, 0, 1).unsqueeze(2)
    return expand_groups(M, dim).permute(3, 0, 1, 2)


def _recurrence_step(h: torch.Tensor, xs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """h (Bt, D, N), (exp(Δ_t A), Δ_t B_t u_t) each (Bt, D, N) -> (h_t, h_t)."""
    dA_t, dBu_t = xs
    h = dA_t * h + dBu_t
    return h, h.clone()  # scan forbids a carry that aliases an output


def selective_scan_hop(
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
    """Selective scan from h = 0 (see ``selective_scan_ref`` for shapes and semantics), recurrence through ``scan``.

    u, delta, z: (Bt, D, L); A: (D, N); B, C: (Bt, N, L) or grouped (Bt, G, N, L); D, delta_bias: (D,).
    Returns out (Bt, D, L) in u's dtype, and with ``return_last_state`` the state after the last step (Bt, D, N).
    """
    dtype_in = u.dtype
    dtype = torch.promote_types(dtype_in, torch.float32)
    u = u.to(dtype)
    delta = discretize_delta(delta, delta_bias, delta_softplus, dtype)  # (Bt, D, L)
    # Laid out time-first: scan runs over dim 0, and ONNX Scan's default scan axis is 0 as well. Broadcasting
    # products, not einsum: ONNX Runtime's Einsum ran these contractions ~20x slower than Mul and MatMul.
    delta_l = delta.permute(2, 0, 1).unsqueeze(-1)  # (L, Bt, D, 1)
    deltaA = torch.exp(delta_l * A.to(dtype))  # (L, Bt, D, N)
    deltaB_u = (delta_l * u.permute(2, 0, 1).unsqueeze(-1)) * _time_first(B.to(dtype), u.shape[1])  # (L, Bt, D, N)
    h0 = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (Bt, D, N)
    last, states = scan(_recurrence_step, h0, (deltaA, deltaB_u))  # (Bt, D, N), (L, Bt, D, N)
    C_l = _time_first(C.to(dtype), u.shape[1])  # (L, Bt, 1 or D, N)
    if C_l.shape[2] == 1:
        y = torch.matmul(states, C_l.transpose(-1, -2)).squeeze(-1)  # (L, Bt, D): one batched matrix-vector product
    else:
        y = (states * C_l).sum(-1)  # (L, Bt, D)
    y = y.permute(1, 2, 0)  # (Bt, D, L)
    out = skip_and_gate(y, u, D, z).to(dtype_in)
    return (out, last) if return_last_state else out
