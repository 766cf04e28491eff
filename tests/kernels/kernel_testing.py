"""Helpers shared by the kernel tests: the device, the error measure, NaN-padded inputs and the Triton skip.

On CPU the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py before triton
is imported); with CUDA they run natively. Under the interpreter every kernel output is allocated NaN-filled, so an
element a kernel fails to write turns the error into NaN and fails the comparison; inputs built by
:func:`nan_padded` and :func:`nan_padded_rows` are views into larger NaN-filled buffers, so a read past any edge
does the same.

Imported by the test modules beside it as ``kernel_testing`` (pytest puts this folder, which has no
``__init__.py``, on ``sys.path``).
"""

from __future__ import annotations

import pytest
import torch

from sokhan.kernels import dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Marks a test that runs a Triton kernel (or a whole module, as ``pytestmark``); a mark rather than a module-level
# pytest.skip so that the skip report names each test's own file and line.
needs_triton = pytest.mark.skipif(
    not dispatch.triton_available() or (DEVICE == "cpu" and not dispatch.interpreting()),
    reason="no CUDA and TRITON_INTERPRET is not set, so the Triton kernels cannot run"
    if dispatch.triton_available()
    else "the Triton kernels need the triton package",
)


def rel_rms(actual: torch.Tensor, expected: torch.Tensor, absolute_below: float | None = None) -> float:
    """||actual - expected||_rms / ||expected||_rms.

    With ``absolute_below``, the absolute ||actual - expected||_rms where ||expected||_rms <= absolute_below: for
    results that vanish exactly (a gradient at L = 1), where a relative error is 0 / 0.
    """
    diff = (actual.double() - expected.double()).pow(2).mean().sqrt()
    scale = expected.double().pow(2).mean().sqrt()
    if absolute_below is not None and scale <= absolute_below:
        return diff.item()
    return (diff / scale).item()


def nan_padded(*shape: int) -> torch.Tensor:
    """Standard normal values in a view of a buffer 3 larger in every dimension, NaN-filled: a read past any edge
    turns the results NaN."""
    buffer = torch.full([n + 3 for n in shape], float("nan"), device=DEVICE)
    view = buffer[tuple(slice(0, n) for n in shape)]
    return view.copy_(torch.randn(*shape, device=DEVICE))


def nan_padded_rows(*shape: int) -> torch.Tensor:
    """Standard normal rows in a view of a NaN-filled buffer 5 wider in the last dimension (the outer dimensions
    stay dense): a read past a row's end turns the results NaN."""
    buffer = torch.full((*shape[:-1], shape[-1] + 5), float("nan"), device=DEVICE)
    return buffer[..., : shape[-1]].copy_(torch.randn(*shape, device=DEVICE))
