"""Which implementation of a kernel runs: Triton, the fast pure-PyTorch path, or the reference.

Precedence, most specific first: the per-call ``backend=`` argument, then the innermost ``with use(...)`` block,
then the ``SOKHAN_KERNELS`` environment variable, then ``auto``. ``None`` and ``"auto"`` mean "no preference" at
every level, so an explicit choice further out still applies.

- ``auto``: Triton on CUDA tensors; on other devices the fast CPU path of ops that have one
  (``selective_scan``'s compiled C++ scan, or its chunked PyTorch scan without a compiler;
  ``linear_cross_entropy``'s chunked logits), else the reference.
- ``triton``: the Triton kernels. They need CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before
  Triton is imported (the interpreter CI uses); otherwise one clear :class:`sokhan.SokhanError`, never a silent
  fallback that would hide which numbers were produced.
- ``cpu``: the fast CPU path (``selective_scan``: the compiled scan on CPU tensors, the chunked PyTorch scan on
  other devices); the reference for ops without one.
- ``reference``: plain PyTorch written for clarity; the path ONNX export traces.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

from sokhan import SokhanError

BACKENDS = ("auto", "triton", "reference", "cpu")
ENV_VAR = "SOKHAN_KERNELS"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("sokhan_kernels_backend", default=None)


def _check(backend: str | None, where: str) -> str | None:
    if backend is None:
        return None
    if backend not in BACKENDS:
        raise SokhanError(f"{where}: unknown kernel backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return backend


@contextlib.contextmanager
def use(backend: str) -> Iterator[None]:
    """Force ``backend`` for every kernel call inside the block (unless a call names its own)."""
    token = _forced.set(_check(backend, "dispatch.use"))
    try:
        yield
    finally:
        _forced.reset(token)


def requested(backend: str | None = None) -> str:
    """The backend asked for, before looking at tensors: argument, then ``use()``, then the environment."""
    for choice, where in (
        (backend, "backend argument"),
        (_forced.get(), "dispatch.use"),
        (os.environ.get(ENV_VAR) or None, f"environment variable {ENV_VAR}"),
    ):
        if _check(choice, where) not in (None, "auto"):
            return choice
    return "auto"


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def triton_available() -> bool:
    """Whether the triton package is installed; looked up once, as resolve() runs on every kernel call."""
    return importlib.util.find_spec("triton") is not None


def output_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A Triton kernel's output: uninitialized on GPU; NaN-filled under the interpreter, so a test sees any element
    a kernel failed to write."""
    if interpreting():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_triton(op: str, *tensors: torch.Tensor) -> None:
    """Raise one clear line when ``op``'s Triton kernel cannot run on these tensors."""
    hint = f"use the reference path instead (backend='reference' or {ENV_VAR}=reference)"
    if not triton_available():
        raise SokhanError(f"{op}: the Triton backend needs the 'triton' package, which is not installed; {hint}")
    devices = {t.device.type for t in tensors}
    if devices <= {"cuda"}:
        return
    if devices == {"cpu"} and interpreting():
        return
    raise SokhanError(
        f"{op}: the Triton backend needs CUDA tensors (got {', '.join(sorted(devices))}) "
        f"or TRITON_INTERPRET=1 set before triton is imported; {hint}"
    )


def resolve(op: str, *tensors: torch.Tensor, backend: str | None = None, has_fast_path: bool = False) -> str:
    """The implementation ``op`` runs on ``tensors``: ``"triton"``, ``"cpu"`` or ``"reference"``.

    ``has_fast_path`` says whether ``op`` has a fast pure-PyTorch path; without one ``cpu`` means the reference.
    """
    choice = requested(backend)
    if choice == "auto":
        if triton_available() and all(t.is_cuda for t in tensors):
            choice = "triton"
        else:
            choice = "cpu"
    if choice == "triton":
        check_triton(op, *tensors)
        return "triton"
    if choice == "cpu" and has_fast_path:
        return "cpu"
    return "reference"
