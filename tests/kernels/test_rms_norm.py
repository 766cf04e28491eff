"""rms_norm fused with the residual add: the Triton kernels against the float64 reference, outputs and gradients.

How the kernels run on CPU, and why outputs and inputs are NaN-padded: see kernel_testing.py.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, nan_padded_rows, needs_triton, rel_rms

from sokhan import SokhanError
from sokhan.kernels import dispatch, rms_norm
from sokhan.kernels.rms_norm import rms_norm_ref

pytestmark = needs_triton

# float32 kernels vs a float64 reference: at most 2.0e-7 observed under the interpreter.
TOL_FP32 = 1e-5


def outputs(x, weight, residual, prenorm, fn, **kwargs) -> tuple[torch.Tensor, ...]:
    out = fn(x, weight, 1e-5, residual, prenorm, **kwargs)
    return out if prenorm else (out,)


@pytest.mark.parametrize("prenorm", [False, True], ids=["out", "prenorm"])
@pytest.mark.parametrize("has_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("seqlen,dim", [(1, 7), (7, 64), (63, 37), (129, 300)])
def test_forward_and_gradients_match_float64(seqlen, dim, has_residual, prenorm):
    """Every output (out, and the carried stream with prenorm) and the gradients of x, residual and weight.

    129 x 2 rows spread over several backward programs, so the partial weight-gradient reduction is exercised.
    """
    torch.manual_seed(seqlen * dim)
    x = nan_padded_rows(2, seqlen, dim).requires_grad_(True)
    weight = (1 + 0.1 * torch.randn(dim, device=DEVICE)).requires_grad_(True)
    residual = nan_padded_rows(2, seqlen, dim).requires_grad_(True) if has_residual else None
    inputs = [t for t in (x, weight, residual) if t is not None]

    outs = outputs(x, weight, residual, prenorm, rms_norm, backend="triton")
    grad_outs = [nan_padded_rows(*o.shape) for o in outs]
    grads = torch.autograd.grad(outs, inputs, grad_outs)

    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    residual64 = inputs64[2] if has_residual else None
    outs64 = outputs(inputs64[0], inputs64[1], residual64, prenorm, rms_norm_ref)
    grads64 = torch.autograd.grad(outs64, inputs64, [g.double() for g in grad_outs])

    for o, o64 in zip(outs, outs64):
        assert o.shape == x.shape and o.dtype == x.dtype
        assert rel_rms(o, o64) <= TOL_FP32
    for name, g, g64 in zip(("x", "weight", "residual"), grads, grads64):
        assert rel_rms(g, g64) <= TOL_FP32, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_the_stream_in_the_input_dtype(dtype):
    # The stream h = x + residual is rounded to the input dtype and normalized as rounded, like the reference;
    # the interpreter truncates to bfloat16 where a GPU rounds to nearest, hence the bfloat16 tolerance.
    torch.manual_seed(4)
    x = torch.randn(2, 63, 37, device=DEVICE, dtype=dtype)
    residual = torch.randn(2, 63, 37, device=DEVICE, dtype=dtype)
    weight = torch.randn(37, device=DEVICE)
    out, h = rms_norm(x, weight, residual=residual, prenorm=True, backend="triton")
    out_ref, h_ref = rms_norm_ref(x, weight, residual=residual, prenorm=True)
    assert out.dtype == h.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert rel_rms(h, h_ref) <= tol
    assert rel_rms(out, out_ref) <= tol


def test_float32_stream_beside_float16_blocks():
    """A float32 residual keeps the stream float32 (mamba-ssm's residual_in_fp32) while out follows x; every
    gradient comes back in its input's dtype."""
    torch.manual_seed(6)
    x = torch.randn(3, 17, 40, device=DEVICE, dtype=torch.float16, requires_grad=True)
    residual = torch.randn(3, 17, 40, device=DEVICE, requires_grad=True)
    weight = torch.randn(40, device=DEVICE, requires_grad=True)
    out, h = rms_norm(x, weight, residual=residual, prenorm=True, backend="triton")
    assert (out.dtype, h.dtype) == (torch.float16, torch.float32)
    (out.float().sum() + h.square().sum()).backward()
    assert (x.grad.dtype, residual.grad.dtype, weight.grad.dtype) == (torch.float16, torch.float32, torch.float32)

    x64, residual64, weight64 = (t.detach().double().requires_grad_(True) for t in (x, residual, weight))
    out64, h64 = rms_norm_ref(x64, weight64, residual=residual64, prenorm=True)
    (out64.sum() + h64.square().sum()).backward()
    assert rel_rms(h, h64) <= TOL_FP32  # float16 x + float32 residual is exact in float32 up to one rounding
    assert rel_rms(out, out64) <= 1e-3
    for t, t64 in ((x, x64), (residual, residual64), (weight, weight64)):
        assert rel_rms(t.grad, t64.grad) <= 1e-3


def test_float64_inputs_accumulate_in_float64():
    torch.manual_seed(11)
    x, residual = (nan_padded_rows(2, 63, 37).double().requires_grad_(True) for _ in range(2))
    weight = torch.randn(37, device=DEVICE, dtype=torch.float64, requires_grad=True)
    out, h = rms_norm(x, weight, residual=residual, prenorm=True, backend="triton")
    grads = torch.autograd.grad(out.square().sum() + h.sum(), [x, weight, residual])
    out_ref, h_ref = rms_norm_ref(x, weight, residual=residual, prenorm=True)
    grads_ref = torch.autograd.grad(out_ref.square().sum() + h_ref.sum(), [x, weight, residual])
    assert out.dtype == h.dtype == torch.float64
    assert rel_rms(out, out_ref) <= 1e-12 and rel_rms(h, h_ref) <= 1e-12
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float64 and rel_rms(g, g_ref) <= 1e-12


def test_prenorm_with_only_the_stream_used():
    """Gradient through the carried stream alone (the normalized output unused), as in a block's last norm."""
    torch.manual_seed(7)
    x = torch.randn(2, 9, 24, device=DEVICE, requires_grad=True)
    residual = torch.randn(2, 9, 24, device=DEVICE, requires_grad=True)
    weight = torch.randn(24, device=DEVICE, requires_grad=True)
    _, h = rms_norm(x, weight, residual=residual, prenorm=True, backend="triton")
    h.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(residual.grad, torch.ones_like(residual))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_strided_rows():
    torch.manual_seed(5)
    x = torch.randn(40, 2, 24, device=DEVICE).transpose(0, 1)  # rows are not adjacent in memory
    weight = torch.randn(24, device=DEVICE)
    assert rel_rms(rms_norm(x, weight, backend="triton"), rms_norm_ref(x.double(), weight.double())) <= TOL_FP32


def test_strided_weight():
    """A weight that is a view (``big[::2]``) was read as if contiguous: output and dx wrong by over 100 %."""
    torch.manual_seed(6)
    x = torch.randn(9, 24, device=DEVICE, requires_grad=True)
    weight = torch.randn(48, device=DEVICE)[::2].requires_grad_(True)
    out = rms_norm(x, weight, backend="triton")
    dx, dw = torch.autograd.grad(out, [x, weight], torch.ones_like(out))
    x64, w64 = x.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    out64 = rms_norm_ref(x64, w64)
    dx64, dw64 = torch.autograd.grad(out64, [x64, w64], torch.ones_like(out64))
    assert rel_rms(out, out64) <= TOL_FP32 and rel_rms(dx, dx64) <= TOL_FP32 and rel_rms(dw, dw64) <= TOL_FP32


def test_bad_arguments_raise_one_line():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(SokhanError, match="weight has shape"):
        rms_norm(x, torch.ones(7, device=DEVICE))
    with pytest.raises(SokhanError, match="residual has shape"):
        rms_norm(x, torch.ones(8, device=DEVICE), residual=torch.randn(3, 9, device=DEVICE))
    with pytest.raises(SokhanError, match="limit"):
        rms_norm(torch.randn(1, 16385, device=DEVICE), torch.ones(16385, device=DEVICE), backend="triton")


def test_cpu_without_the_interpreter_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with pytest.raises(SokhanError, match="rms_norm: the Triton backend needs CUDA tensors"):
        rms_norm(torch.randn(3, 8), torch.ones(8), backend="triton")
