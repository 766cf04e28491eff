"""flash_attention: the Triton kernels against the float64 reference (SDPA), outputs and gradients.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py before triton is
imported); with CUDA they run natively. Under the interpreter every kernel output is allocated NaN-filled, so an
element a kernel fails to write turns the error into NaN and fails the comparison; inputs are views into larger
NaN-filled buffers, so a read past any edge does the same.
"""

from __future__ import annotations

import pytest
import torch

from sokhan import SokhanError
from sokhan.kernels import dispatch, flash_attention
from sokhan.kernels.flash_attention import flash_attention_ref

pytest.importorskip("triton", reason="the Triton kernels need the triton package")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not dispatch.interpreting():
    pytest.skip("no CUDA and TRITON_INTERPRET is not set, so the Triton kernels cannot run", allow_module_level=True)

# float32 kernels vs a float64 reference: at most 3.7e-7 observed under the interpreter.
TOL_FP32 = 1e-5


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_rms / ||expected||_rms, absolute where the expected value is ~0 (at L = 1 the
    softmax is constant, so dq and dk vanish exactly)."""
    diff = (actual.double() - expected.double()).pow(2).mean().sqrt()
    scale = expected.double().pow(2).mean().sqrt()
    return (diff / scale if scale > 1e-6 else diff).item()


def check_against_reference(q, k, v, causal, scale=None) -> None:
    inputs = [t.requires_grad_(True) for t in (q, k, v)]
    out = flash_attention(q, k, v, causal=causal, scale=scale, backend="triton")
    grad_out = randn(*out.shape)
    grads = torch.autograd.grad(out, inputs, grad_out)

    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    out64 = flash_attention_ref(*inputs64, causal=causal, scale=scale)
    grads64 = torch.autograd.grad(out64, inputs64, grad_out.double())

    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_rms(out, out64) <= TOL_FP32
    for name, g, g64 in zip(("q", "k", "v"), grads, grads64):
        assert g.shape == g64.shape, name
        assert rel_rms(g, g64) <= TOL_FP32, name


def randn(*shape: int) -> torch.Tensor:
    """Random values in a view of a larger NaN-filled buffer: a read past any edge turns the results NaN."""
    buffer = torch.full([n + 3 for n in shape], float("nan"), device=DEVICE)
    view = buffer[tuple(slice(0, n) for n in shape)]
    return view.copy_(torch.randn(*shape, device=DEVICE))


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
    check_against_reference(randn(*shape), randn(*shape), randn(*shape), causal)


@pytest.mark.parametrize("head_dim", [8, 24])
def test_head_dims_that_are_not_a_tile_width(head_dim):
    """Heads are zero-padded to the next power of two >= 16; the scale still uses the true head size."""
    torch.manual_seed(head_dim)
    shape = (1, 2, 40, head_dim)
    check_against_reference(randn(*shape), randn(*shape), randn(*shape), causal=True)


def test_custom_scale_and_long_tail():
    torch.manual_seed(6)
    shape = (1, 2, 150, 32)  # 150 is a multiple of no tile size: every kernel's last tile is partial
    check_against_reference(randn(*shape), randn(*shape), randn(*shape), causal=True, scale=0.3)


def test_queries_against_a_longer_key_cache():
    """Non-causal attention takes Lq != Lk (a decode step over a KV cache)."""
    torch.manual_seed(7)
    check_against_reference(randn(2, 2, 5, 32), randn(2, 2, 70, 32), randn(2, 2, 70, 32), causal=False)


def test_heads_interleaved_layout():
    """q, k, v as (B, L, H, hd) projections transposed to (B, H, L, hd); gradients keep that layout."""
    torch.manual_seed(8)
    q, k, v = (randn(2, 33, 3, 16).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, causal=True)


def test_float16_forward_and_backward():
    torch.manual_seed(9)
    q, k, v = (randn(2, 2, 63, 32).half().requires_grad_(True) for _ in range(3))
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
    q = randn(1, 2, 8, 16)
    with pytest.raises(SokhanError, match="causal attention needs one length"):
        flash_attention(q, randn(1, 2, 9, 16), randn(1, 2, 9, 16))
    with pytest.raises(SokhanError, match="v has shape"):
        flash_attention(q, q, randn(1, 2, 8, 32))
    with pytest.raises(SokhanError, match="head_dim 160"):
        flash_attention(*(randn(1, 2, 8, 160) for _ in range(3)), backend="triton")


def test_cpu_without_the_interpreter_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with pytest.raises(SokhanError, match="flash_attention: the Triton backend needs CUDA tensors"):
        flash_attention(*(torch.randn(1, 2, 8, 16) for _ in range(3)), backend="triton")
