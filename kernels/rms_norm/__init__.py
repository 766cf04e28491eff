"""``rms_norm``: RMSNorm fused with the residual add, with mamba-ssm's ``layer_norm_fn(is_rms_norm=True)`` semantics.

Two implementations behind one entry (see :mod:`sokhan.kernels.dispatch`): ``reference.py`` (plain PyTorch, the
definition and the path ONNX traces) and ``triton.py`` (one pass over each row forward and backward;
:class:`RMSNormFunction` gives them gradients for x, residual and weight).
"""

from __future__ import annotations

import torch

from sokhan import SokhanError
from sokhan.kernels import dispatch
from sokhan.kernels.rms_norm.reference import rms_norm_ref

__all__ = ["RMSNormFunction", "rms_norm", "rms_norm_ref"]


def check_inputs(x, weight, residual) -> None:
    """Raise one line naming the first argument that does not fit the others."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise SokhanError(f"rms_norm: x has shape {tuple(x.shape)}, expected (..., dim) with dim >= 1")
    if tuple(weight.shape) != (x.shape[-1],):
        raise SokhanError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},)")
    if residual is not None and residual.shape != x.shape:
        raise SokhanError(f"rms_norm: residual has shape {tuple(residual.shape)}, expected {tuple(x.shape)} like x")


class RMSNormFunction(torch.autograd.Function):
    """Triton forward storing 1/rms per row; the backward rebuilds x_hat from h and that statistic."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps, prenorm):
        from sokhan.kernels.rms_norm.triton import rms_norm_fwd

        shape = x.shape
        res2 = residual.reshape(-1, shape[-1]) if residual is not None else None
        out, h, rstd = rms_norm_fwd(x.reshape(-1, shape[-1]), weight, eps, res2)
        ctx.save_for_backward(h, weight, rstd)
        ctx.shape = shape
        ctx.x_dtype = x.dtype
        ctx.residual_dtype = residual.dtype if residual is not None else None
        # An unused stream output then arrives as None instead of a zero tensor the kernel would have to read.
        ctx.set_materialize_grads(False)
        out = out.reshape(shape)
        return (out, h.reshape(shape)) if prenorm else out

    @staticmethod
    def backward(ctx, dout, dh=None):
        from sokhan.kernels.rms_norm.triton import rms_norm_bwd

        h, weight, rstd = ctx.saved_tensors
        shape = ctx.shape
        if dout is None:
            dout = torch.zeros(shape, dtype=ctx.x_dtype, device=h.device)
        dh2 = dh.reshape(-1, shape[-1]) if dh is not None else None
        dx, dres, dweight = rms_norm_bwd(
            dout.reshape(-1, shape[-1]), dh2, h, weight, rstd, ctx.x_dtype, ctx.residual_dtype
        )
        dres = dres.reshape(shape) if dres is not None else None
        return dx.reshape(shape), dweight, dres, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``out = h / sqrt(mean(h^2) + eps) * weight`` with ``h = x + residual`` (or x).

    x, residual: (..., D); weight: (D,). Returns out (..., D) in x's dtype, or (out, h) with ``prenorm`` so the
    residual stream h (in the residual's dtype, else x's) is carried to the next block.
    """
    check_inputs(x, weight, residual)
    optional = [residual] if residual is not None else []
    if dispatch.resolve("rms_norm", x, weight, *optional, backend=backend) == "reference":
        return rms_norm_ref(x, weight, eps, residual, prenorm)
    return RMSNormFunction.apply(x, weight, residual, eps, prenorm)
