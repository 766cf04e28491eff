"""flash_attention: the Triton kernels against the float64 reference (SDPA), outputs and gradients.

How the kernels run on CPU, and why outputs and inputs are NaN-padded: see kernel_testing.py.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import nan_padded, needs_triton
from kernel_testing import rel_rms as _rel_rms

from sokhan import SokhanError
from sokhan.kernels import dispatch, flash_attention
from sokhan.kernels.flash_attention import flash_attention_ref

pytestmark = needs_triton

# float32 kernels vs a float64 reference: at most 3.7e-7 observed under the interpreter.
TOL_FP32 = 1e-5


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error, absolute where the expected value is ~0 (at L = 1 the softmax is constant, so dq and dk
    vanish exactly)."""
    return _rel_rms(actual, expected, absolute_below=1e-6)


def check_against_reference(q, k, v, causal, scale=None) -> None:
    inputs = [t.requires_grad_(True) for t in (q, k, v)]
    out = flash_attention(q, k, v, causal=causal, scale=scale, backend="triton")
    grad_out = nan_padded(*out.shape)
    grads = torch.autograd.grad(out, inputs, grad_out)

    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    out64 = flash_attention_ref(*inputs64, causal=causal, scale=scale)
    grads64 = torch.autograd.grad(out64, inputs64, grad_out.double())

    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_rms(out, out64) <= TOL_FP32
    for name, g, g64 in zip(("q", "k", "v"), grads, grads64):
        assert g.shape == g64.shape, name
        assert rel_rms(g, g64) <= TOL_FP32, name


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "seqlen,head_dim",
    [
        pytest.param(1, 16, id="L1-hd16"),
        pytest.param(7, 32, id="L7-hd32"),
        pytest.param(63, 64, id="L63-hd64"),
        pytest.param(129, 16, id="L129-hd16"),  # crosses tile boundaries with a one-row tail
    ],
)
def test_forward_and_gradients_match_float64(seqlen, head_dim, causal):
    torch.manual_seed(seqlen + head_dim)
    shape = (2, 3, seqlen, head_dim)
    check_against_reference(nan_padded(*shape), nan_padded(*shape), nan_padded(*shape), causal)


@pytest.mark.parametrize("head_dim", [8, 24])
def test_head_dims_that_are_not_a_tile_width(head_dim):
    """Heads are zero-padded to the next power of two >= 16; the scale still uses the true head size."""
    torch.manual_seed(head_dim)
    shape = (1, 2, 40, head_dim)
    check_against_reference(nan_padded(*shape), nan_padded(*shape), nan_padded(*shape), causal=True)


def test_custom_scale_and_long_tail():
    torch.manual_seed(6)
    shape = (1, 2, 150, 32)  # 150 is a multiple of no tile size: every kernel's last tile is partial
    check_against_reference(nan_padded(*shape), nan_padded(*shape), nan_padded(*shape), causal=True, scale=0.3)


def test_queries_against_a_longer_key_cache():
    """Non-causal attention takes Lq != Lk (a decode step over a KV cache)."""
    torch.manual_seed(7)
    check_against_reference(nan_padded(2, 2, 5, 32), nan_padded(2, 2, 70, 32), nan_padded(2, 2, 70, 32), causal=False)


def test_heads_interleaved_layout():
    """q, k, v as (B, L, H, hd) projections transposed to (B, H, L, hd); gradients keep that layout."""
    torch.manual_seed(8)
    q, k, v = (nan_padded(2, 33, 3, 16).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, causal=True)


def test_float16_forward_and_backward():
    torch.manual_seed(9)
    q, k, v = (nan_padded(2, 2, 63, 32).half().requires_grad_(True) for _ in range(3))
    out = flash_attention(q, k, v, causal=True, backend="triton")
    out.backward(torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out64 = flash_attention_ref(q64, k64, v64, causal=True)
    out64.backward(torch.ones_like(out64))
    assert out.dtype == torch.float16
    assert rel_rms(out, out64) <= 2e-3
    for t, t64 in ((q, q64), (k, k64), (v, v64)):
        assert rel_rms(t.grad, t64.grad) <= 1e-2


def test_bad_arguments_raise_one_line():
    q = nan_padded(1, 2, 8, 16)
    with pytest.raises(SokhanError, match="causal attention needs one length"):
        flash_attention(q, nan_padded(1, 2, 9, 16), nan_padded(1, 2, 9, 16))
    with pytest.raises(SokhanError, match="v has shape"):
        flash_attention(q, q, nan_padded(1, 2, 8, 32))
    with pytest.raises(SokhanError, match="head_dim 160"):
        flash_attention(*(nan_padded(1, 2, 8, 160) for _ in range(3)), backend="triton")


def test_cpu_without_the_interpreter_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with pytest.raises(SokhanError, match="flash_attention: the Triton backend needs CUDA tensors"):
        flash_attention(*(torch.randn(1, 2, 8, 16) for _ in range(3)), backend="triton")
