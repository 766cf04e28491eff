"""cross_entropy: the Triton kernels against the float64 reference, the loss and the logits' gradient.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py before triton is
imported); with CUDA they run natively. Under the interpreter every kernel output is allocated NaN-filled, so an
element a kernel fails to write turns the error into NaN and fails the comparison; inputs are views into larger
NaN-filled buffers, so a read past any edge does the same.
"""

from __future__ import annotations

import pytest
import torch

from sokhan import SokhanError
from sokhan.kernels import cross_entropy, dispatch
from sokhan.kernels.cross_entropy import cross_entropy_ref

pytest.importorskip("triton", reason="the Triton kernels need the triton package")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not dispatch.interpreting():
    pytest.skip("no CUDA and TRITON_INTERPRET is not set, so the Triton kernels cannot run", allow_module_level=True)

# float32 kernels vs a float64 reference: at most 1.8e-7 observed under the interpreter.
TOL_FP32 = 1e-5
IGNORE = -100


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_rms / ||expected||_rms."""
    diff = (actual.double() - expected.double()).pow(2).mean().sqrt()
    return (diff / expected.double().pow(2).mean().sqrt()).item()


def nan_padded(rows: int, vocab: int) -> torch.Tensor:
    """Random logits (spread like a trained model's) in a wider NaN-filled buffer: reading past a row's end
    turns the results NaN."""
    buffer = torch.full((rows, vocab + 5), float("nan"), device=DEVICE)
    return buffer[:, :vocab].copy_(3 * torch.randn(rows, vocab, device=DEVICE))


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
    logits = nan_padded(rows, vocab).requires_grad_(True)
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
    logits = nan_padded(9, 5000).double().requires_grad_(True)
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


def test_cpu_without_the_interpreter_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with pytest.raises(SokhanError, match="cross_entropy: the Triton backend needs CUDA tensors"):
        cross_entropy(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), backend="triton")
