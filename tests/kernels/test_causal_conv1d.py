"""causal_conv1d and its decode update: the Triton kernels against the float64 reference, outputs and gradients.

How the kernels run on CPU, and why outputs and inputs are NaN-padded: see kernel_testing.py.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, nan_padded, needs_triton, rel_rms

from sokhan import SokhanError
from sokhan.kernels import causal_conv1d, causal_conv1d_update, dispatch
from sokhan.kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref

pytestmark = needs_triton

# float32 kernels vs a float64 reference: at most 1.3e-7 observed under the interpreter.
TOL_FP32 = 1e-5


def check_against_reference(x, weight, bias, activation) -> None:
    """Forward and every gradient of the Triton op vs the float64 reference on the same inputs."""
    inputs = [t for t in (x, weight, bias) if t is not None]
    for t in inputs:
        t.requires_grad_(True)
    out = causal_conv1d(x, weight, bias, activation, backend="triton")
    grad_out = nan_padded(*out.shape)
    grads = torch.autograd.grad(out, inputs, grad_out)

    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    x64, w64 = inputs64[:2]
    b64 = inputs64[2] if bias is not None else None
    out64 = causal_conv1d_ref(x64, w64, b64, activation)
    grads64 = torch.autograd.grad(out64, inputs64, grad_out.double())

    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_rms(out, out64) <= TOL_FP32
    for name, g, g64 in zip(("x", "weight", "bias"), grads, grads64):
        assert g.shape == g64.shape, name
        assert rel_rms(g, g64) <= TOL_FP32, name


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("seqlen", [1, 7, 63, 129])
def test_forward_and_gradients_match_float64(seqlen, has_bias, activation):
    torch.manual_seed(seqlen)
    dim, width = 37, 4  # 37: not a multiple of any BLOCK_D
    x = nan_padded(2, dim, seqlen)
    weight = nan_padded(dim, width)
    bias = nan_padded(dim) if has_bias else None
    check_against_reference(x, weight, bias, activation)


@pytest.mark.parametrize("width", [1, 2, 3])
def test_other_widths(width):
    torch.manual_seed(width)
    check_against_reference(nan_padded(3, 19, 33), nan_padded(19, width), nan_padded(19), "silu")


def test_strided_input_from_channels_last_projection():
    """The Mamba block hands over x as a (B, L, D) projection transposed to (B, D, L): L is not the unit stride."""
    torch.manual_seed(1)
    x = torch.randn(2, 70, 40, device=DEVICE).transpose(1, 2)  # (B, D, L), stride_l = D
    assert not x.is_contiguous()
    check_against_reference(x, torch.randn(40, 4, device=DEVICE), torch.randn(40, device=DEVICE), "silu")


def test_strided_weight_and_bias():
    """A bias that is a view (``big[::2]``) was read as if contiguous: forward and gradients 30-75 % off."""
    torch.manual_seed(2)
    weight = torch.randn(4, 40, device=DEVICE).T  # (D, W) with stride_d = 1, stride_w = D
    bias = torch.randn(80, device=DEVICE)[::2]
    assert not weight.is_contiguous() and not bias.is_contiguous()
    check_against_reference(torch.randn(2, 40, 33, device=DEVICE), weight, bias, "silu")
    x, state = torch.randn(3, 40, device=DEVICE), torch.randn(3, 40, 4, device=DEVICE)
    with torch.no_grad():
        out = causal_conv1d_update(x, state.clone(), weight, bias, "silu", backend="triton")
    want = causal_conv1d_update_ref(x.double(), state.double(), weight.double(), bias.double(), "silu")
    assert rel_rms(out, want) <= TOL_FP32


def test_float64_inputs_accumulate_in_float64():
    torch.manual_seed(10)
    x, weight, bias = (t.double() for t in (nan_padded(2, 37, 63), nan_padded(37, 4), nan_padded(37)))
    for t in (x, weight, bias):
        t.requires_grad_(True)
    out = causal_conv1d(x, weight, bias, "silu", backend="triton")
    grads = torch.autograd.grad(out.square().sum(), [x, weight, bias])
    out_ref = causal_conv1d_ref(x, weight, bias, "silu")
    grads_ref = torch.autograd.grad(out_ref.square().sum(), [x, weight, bias])
    assert out.dtype == torch.float64 and rel_rms(out, out_ref) <= 1e-12
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float64 and rel_rms(g, g_ref) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(dtype):
    # Inputs rounded to the dtype; the kernel accumulates in float32, so only the output's rounding remains
    # (the interpreter truncates to bfloat16 where a GPU rounds to nearest).
    torch.manual_seed(2)
    x = torch.randn(2, 37, 63, device=DEVICE, dtype=dtype)
    weight = torch.randn(37, 4, device=DEVICE, dtype=dtype)
    out = causal_conv1d(x, weight, None, "silu", backend="triton")
    assert out.dtype == dtype
    assert rel_rms(out, causal_conv1d_ref(x.double(), weight.double(), None, "silu")) <= 1e-2


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_decode_updates_reproduce_the_sequence(has_bias, activation):
    """Stepping causal_conv1d_update over a sequence from a zero state gives causal_conv1d's output; the state
    after each step equals the reference's."""
    torch.manual_seed(3)
    batch, dim, width, seqlen = 3, 37, 4, 6
    x = nan_padded(batch, dim, seqlen)
    weight = nan_padded(dim, width)
    bias = nan_padded(dim) if has_bias else None
    state = nan_padded(batch, dim, width).zero_()
    state64 = state.double()
    steps = []
    for t in range(seqlen):
        steps.append(causal_conv1d_update(x[:, :, t], state, weight, bias, activation, backend="triton"))
        b64 = bias.double() if bias is not None else None
        expected = causal_conv1d_update_ref(x[:, :, t].double(), state64, weight.double(), b64, activation)
        assert rel_rms(steps[-1], expected) <= TOL_FP32
        assert rel_rms(state, state64) <= TOL_FP32
    b64 = bias.double() if bias is not None else None
    full = causal_conv1d_ref(x.double(), weight.double(), b64, activation)
    assert rel_rms(torch.stack(steps, dim=-1), full) <= TOL_FP32


def test_decode_update_without_no_grad_is_refused():
    weight = torch.randn(8, 4, device=DEVICE, requires_grad=True)
    with pytest.raises(SokhanError, match="no backward"):
        causal_conv1d_update(
            torch.randn(2, 8, device=DEVICE), torch.zeros(2, 8, 4, device=DEVICE), weight, backend="triton"
        )


def test_bad_arguments_raise_one_line():
    x = torch.randn(2, 8, 5, device=DEVICE)
    with pytest.raises(SokhanError, match="activation"):
        causal_conv1d(x, torch.randn(8, 4, device=DEVICE), activation="relu")
    with pytest.raises(SokhanError, match="x has shape"):
        causal_conv1d(x, torch.randn(7, 4, device=DEVICE))
    with pytest.raises(SokhanError, match="conv_state has shape"):
        causal_conv1d_update(x[:, :, 0], torch.zeros(2, 8, 3, device=DEVICE), torch.randn(8, 4, device=DEVICE))
    with pytest.raises(SokhanError, match="maximum"):
        causal_conv1d(x, torch.randn(8, 17, device=DEVICE), backend="triton")
    with pytest.raises(SokhanError, match="float32/float16/bfloat16/float64"):
        causal_conv1d(x.to(torch.complex64), torch.randn(8, 4, device=DEVICE), backend="triton")


def test_cpu_without_the_interpreter_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with pytest.raises(SokhanError, match="causal_conv1d: the Triton backend needs CUDA tensors"):
        causal_conv1d(torch.randn(2, 8, 5), torch.randn(8, 4), backend="triton")
