"""``causal_conv1d``: Mamba's depthwise causal convolution over a sequence, and its one-token decode update.

Two implementations behind each entry (see :mod:`sokhan.kernels.dispatch`): ``reference.py`` (``F.conv1d``, the
definition and the path ONNX traces) and ``triton.py`` (fused conv + bias + SiLU kernels;
:class:`CausalConv1dFunction` gives them a backward for x, weight and bias).
"""

from __future__ import annotations

import torch

from sokhan import SokhanError
from sokhan.kernels import dispatch
from sokhan.kernels.causal_conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref

__all__ = [
    "CausalConv1dFunction",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "causal_conv1d_update_ref",
]

ACTIVATIONS = (None, "silu", "swish")


def check_inputs(op: str, x, weight, bias, activation, seq_dims: int, conv_state=None) -> None:
    """Raise one line naming the first argument that does not fit the others."""
    if activation not in ACTIVATIONS:
        raise SokhanError(f"{op}: activation {activation!r} is not supported; valid: None, 'silu'")
    if weight.dim() != 2 or weight.shape[1] < 1:
        raise SokhanError(f"{op}: weight has shape {tuple(weight.shape)}, expected (dim, width) with width >= 1")
    dim, width = weight.shape
    want = f"(batch, {dim}, seqlen) with seqlen >= 1" if seq_dims == 3 else f"(batch, {dim})"
    if x.dim() != seq_dims or x.shape[1] != dim or (seq_dims == 3 and x.shape[2] == 0):
        raise SokhanError(f"{op}: x has shape {tuple(x.shape)}, expected {want} to match weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (dim,):
        raise SokhanError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({dim},)")
    if conv_state is not None and tuple(conv_state.shape) != (x.shape[0], dim, width):
        raise SokhanError(
            f"{op}: conv_state has shape {tuple(conv_state.shape)}, expected ({x.shape[0]}, {dim}, {width})"
        )


class CausalConv1dFunction(torch.autograd.Function):
    """Triton forward; the backward recomputes the pre-activation instead of storing it."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        from sokhan.kernels.causal_conv1d.triton import causal_conv1d_fwd

        ctx.save_for_backward(x, weight, bias)
        ctx.activation = activation
        return causal_conv1d_fwd(x, weight, bias, activation)

    @staticmethod
    def backward(ctx, dout):
        from sokhan.kernels.causal_conv1d.triton import causal_conv1d_bwd

        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = causal_conv1d_bwd(x, weight, bias, dout, ctx.activation)
        return dx, dweight, dbias, None


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution ``out[b, d, t] = act(bias[d] + sum_k weight[d, k] x[b, d, t - W + 1 + k])``.

    x: (Bt, D, L); weight: (D, W); bias: (D,) or None; activation: None or "silu". Returns (Bt, D, L) in x's dtype.
    """
    check_inputs("causal_conv1d", x, weight, bias, activation, seq_dims=3)
    optional = [bias] if bias is not None else []
    if dispatch.resolve("causal_conv1d", x, weight, *optional, backend=backend) == "reference":
        return causal_conv1d_ref(x, weight, bias, activation)
    return CausalConv1dFunction.apply(x, weight, bias, activation)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """One decode step: ``conv_state`` shifts left and takes x last (in place); returns the convolved window.

    x: (Bt, D); conv_state: (Bt, D, W); weight: (D, W); bias: (D,) or None. Returns (Bt, D) in x's dtype.
    """
    check_inputs("causal_conv1d_update", x, weight, bias, activation, seq_dims=2, conv_state=conv_state)
    optional = [bias] if bias is not None else []
    impl = dispatch.resolve("causal_conv1d_update", x, conv_state, weight, *optional, backend=backend)
    if impl == "reference":
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
    # The decode step updates its state in place and has no backward; silently dropping gradients would be worse.
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, *optional)):
        raise SokhanError(
            "causal_conv1d_update: the Triton decode step has no backward; call it under torch.no_grad() "
            "or use backend='reference'"
        )
    from sokhan.kernels.causal_conv1d.triton import causal_conv1d_update_fwd

    return causal_conv1d_update_fwd(x, conv_state, weight, bias, activation)
