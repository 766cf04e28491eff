"""cross_entropy: the Triton kernels against the float64 reference, the loss and the logits' gradient.

How the kernels run on CPU, and why outputs and inputs are NaN-padded: see kernel_testing.py.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, nan_padded_rows, needs_triton, rel_rms

from sokhan import SokhanError
from sokhan.kernels import cross_entropy, dispatch
from sokhan.kernels.cross_entropy import cross_entropy_ref

pytestmark = needs_triton

# float32 kernels vs a float64 reference: at most 1.8e-7 observed under the interpreter.
TOL_FP32 = 1e-5
IGNORE = -100


def padded_logits(rows: int, vocab: int) -> torch.Tensor:
    """Random logits (spread like a trained model's) in a wider NaN-filled buffer: reading past a row's end
    turns the results NaN."""
    return nan_padded_rows(rows, vocab).mul_(3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "rows,vocab",
    [
        pytest.param(1, 7, id="N1-V7"),
        pytest.param(7, 300, id="N7-V300"),
        pytest.param(63, 1000, id="N63-V1000"),
        pytest.param(9, 5000, id="N9-V5000"),  # two vocabulary chunks, the second partial
        pytest.param(129, 64, id="N129-V64"),
    ],
)
def test_loss_and_gradient_match_float64(rows, vocab, reduction):
    torch.manual_seed(rows * vocab)
    logits = padded_logits(rows, vocab).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    targets[1::3] = IGNORE  # padding positions; row 0 always counts
    loss = cross_entropy(logits, targets, ignore_index=IGNORE, reduction=reduction, backend="triton")
    grad_loss = torch.randn_like(loss)
    (grad,) = torch.autograd.grad(loss, [logits], grad_loss)

    logits64 = logits.detach().double().requires_grad_(True)
    loss64 = cross_entropy_ref(logits64, targets, ignore_index=IGNORE, reduction=reduction)
    (grad64,) = torch.autograd.grad(loss64, [logits64], grad_loss.double())

    assert loss.shape == loss64.shape and loss.dtype == torch.float32
    assert rel_rms(loss, loss64) <= TOL_FP32
    assert grad.dtype == logits.dtype
    assert rel_rms(grad, grad64) <= TOL_FP32
    assert torch.all(grad[1::3] == 0)  # ignored rows get no gradient


def test_rows_whose_first_chunk_is_all_minus_inf():
    """Masked logits (-inf) filling the first vocabulary chunk: the running max stayed -inf and the loss was NaN."""
    torch.manual_seed(3)
    rows, vocab = 4, 5000  # two chunks; -inf over the whole first one in rows 0 and 2, scattered in row 1
    logits = padded_logits(rows, vocab)
    logits[0::2, :4096] = float("-inf")
    logits[1, ::3] = float("-inf")
    logits.requires_grad_(True)
    targets = torch.tensor([4500, 1, 4999, IGNORE], device=DEVICE)
    loss = cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum", backend="triton")
    (grad,) = torch.autograd.grad(loss, [logits])
    logits64 = logits.detach().double().requires_grad_(True)
    loss64 = cross_entropy_ref(logits64, targets, ignore_index=IGNORE, reduction="sum")
    (grad64,) = torch.autograd.grad(loss64, [logits64])
    assert torch.isfinite(loss) and rel_rms(loss, loss64) <= TOL_FP32
    assert torch.all(grad[0, :4096] == 0) and rel_rms(grad, grad64) <= TOL_FP32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_without_a_float32_copy(dtype):
    # The kernel reads the half-precision logits and computes in float32, like the reference's upcast; the
    # gradient comes back in the logits' dtype (truncated to bfloat16 by the interpreter, rounded on a GPU).
    torch.manual_seed(3)
    logits = (3 * torch.randn(17, 333, device=DEVICE)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 333, (17,), device=DEVICE)
    loss = cross_entropy(logits, targets, backend="triton")
    loss.backward()
    logits64 = logits.detach().double().requires_grad_(True)
    loss64 = cross_entropy_ref(logits64, targets)
    loss64.backward()
    assert rel_rms(loss, loss64) <= 1e-5  # float32 arithmetic on exactly the same inputs
    assert logits.grad.dtype == dtype
    assert rel_rms(logits.grad, logits64.grad) <= 1e-2


def test_float64_logits_accumulate_in_float64():
    torch.manual_seed(4)
    logits = padded_logits(9, 5000).double().requires_grad_(True)
    targets = torch.randint(0, 5000, (9,), device=DEVICE)
    loss = cross_entropy(logits, targets, backend="triton")
    (grad,) = torch.autograd.grad(loss, [logits])
    loss_ref = cross_entropy_ref(logits, targets)
    (grad_ref,) = torch.autograd.grad(loss_ref, [logits])
    assert loss.dtype == grad.dtype == torch.float64
    assert rel_rms(loss, loss_ref) <= 1e-12 and rel_rms(grad, grad_ref) <= 1e-12


def test_bad_arguments_raise_one_line():
    logits = torch.randn(4, 10, device=DEVICE)
    with pytest.raises(SokhanError, match="reduction"):
        cross_entropy(logits, torch.zeros(4, dtype=torch.long, device=DEVICE), reduction="max")
    with pytest.raises(SokhanError, match="targets has shape"):
        cross_entropy(logits, torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(SokhanError, match="targets has shape"):
        cross_entropy(logits, torch.zeros(4, device=DEVICE))
    with pytest.raises(SokhanError, match="logits has shape"):
        cross_entropy(logits[None], torch.zeros(4, dtype=torch.long, device=DEVICE))


def test_a_target_outside_the_vocabulary_is_a_nan_loss():
    """It was a finite loss read from the next row's logits (or past the tensor); F.cross_entropy raises."""
    torch.manual_seed(8)
    logits = torch.randn(5, 37, device=DEVICE)
    targets = torch.tensor([3, 37, -5, 1037, -100], device=DEVICE)
    losses = cross_entropy(logits, targets, reduction="none", backend="triton")
    assert losses[1:4].isnan().all() and losses[4] == 0
    assert rel_rms(losses[:1], cross_entropy_ref(logits[:1].double(), targets[:1], reduction="none")) <= 1e-6
    assert cross_entropy(logits, targets, backend="triton").isnan()


def test_cpu_without_the_interpreter_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with pytest.raises(SokhanError, match="cross_entropy: the Triton backend needs CUDA tensors"):
        cross_entropy(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), backend="triton")
