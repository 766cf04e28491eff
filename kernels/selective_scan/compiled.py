"""The selective scan as a fused C++ loop on the CPU (``cpu_scan.cpp``): the ``cpu`` backend on CPU tensors.

The kernel is the scan proper (h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t, y_t = C_t · h_t), where all the (Bt, D, L, N)
work lies; Δ's bias and softplus, the skip D u and the silu(z) gate are (Bt, D, L) PyTorch ops around it,
differentiated by autograd (inside the loop, a scalar softplus and sigmoid per step cost more than the 16 vectorized
state updates: the forward ran twice as slow). Forward: per (batch, channel), one pass over L with the N-value state
in L1; exp(ΔA), ΔBu and the states are never stored. Backward: per (batch, channel), the states are recomputed into
a per-thread (L + 1, N) buffer, then the adjoint runs from the last step to the first and forms every gradient in
the same loop. Channels run on ``torch.get_num_threads()`` threads of PyTorch's own OpenMP pool (``parallel_for``
in the source says why); dB and dC, sums over a group's channels, go to one partial buffer per channel partition
(a single one with a thread per (batch, group) or fewer), summed here, so no two threads write the same element.

Building: the source has a plain C ABI and includes no torch header, so it compiles in about 2 s with the system
C++ compiler (``$CXX`` or ``c++``) on the first call that needs it, never at import; ``torch.utils.cpp_extension``
would compile the torch headers too (39 s for a one-line function on the dev box). The library is cached under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) as ``sokhan_cpu_scan/<hash>.so``, the hash covering
the source, the flags, the compiler and the CPU (the build targets ``-march=native``). Concurrent first builds
(pytest-xdist workers) each compile to their own temporary file and rename it into place: the rename is atomic and
any complete build is a valid one, so no lock is needed. If no compiler is found or the build fails, :func:`load`
returns None after one warning and the caller uses the chunked PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from sokhan import SokhanError
from sokhan.kernels.selective_scan.reference import discretize_delta, skip_and_gate

SOURCE = Path(__file__).with_name("cpu_scan.cpp")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-march=native"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_PTR, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_FWD_ARGS = [_PTR] * 5 + [_I64] * 5 + [_PTR, _PTR, _INT]
_BWD_ARGS = [_PTR] * 5 + [_I64] * 5 + [_PTR] * 7 + [_I64, _INT]


def _cpu_id() -> str:
    """The CPU model, so that a cache directory shared between machines never loads another CPU's -march=native."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_id().encode()]))
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    target = root / "sokhan_cpu_scan" / f"{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, built on first call; None (after one warning) when it cannot be built."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    try:
        if compiler is None:
            raise RuntimeError(f"no C++ compiler {os.environ.get('CXX', 'c++')!r} on PATH")
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"sokhan: compiled CPU selective scan unavailable ({exc}); using the chunked PyTorch scan",
                      stacklevel=2)
        return None
    for suffix in _SUFFIX.values():
        getattr(lib, f"sokhan_scan_fwd_{suffix}").argtypes = _FWD_ARGS
        getattr(lib, f"sokhan_scan_bwd_{suffix}").argtypes = _BWD_ARGS
    return lib


class CompiledScanFunction(torch.autograd.Function):
    """``apply(u, delta, A, B, C)`` -> (y, last_state): the scan core h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t,
    y_t = C_t · h_t, with Δ already biased and softplus'd. u, delta (Bt, D, L) and A (D, N) in float32 or float64
    (the compute dtype); B, C (Bt, N, L) or (Bt, G, N, L). y (Bt, D, L), last_state (Bt, D, N)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        batch, dim, L = u.shape
        N = A.shape[1]
        G = 1 if B.dim() == 3 else B.shape[1]
        dtype = u.dtype
        # B, C -> (Bt, G, L, N): a step's N values contiguous for the kernel's inner loop.
        Bk, Ck = (M.detach().reshape(batch, G, N, L).transpose(-1, -2).to(dtype).contiguous() for M in (B, C))
        uk, dk, Ak = (t.detach().to(dtype).contiguous() for t in (u, delta, A))
        y = torch.empty(batch, dim, L, dtype=dtype)
        last_state = torch.empty(batch, dim, N, dtype=dtype)
        getattr(load(), f"sokhan_scan_fwd_{_SUFFIX[dtype]}")(
            uk.data_ptr(), dk.data_ptr(), Ak.data_ptr(), Bk.data_ptr(), Ck.data_ptr(), batch, dim, L, N, G,
            y.data_ptr(), last_state.data_ptr(), torch.get_num_threads(),
        )
        ctx.save_for_backward(uk, dk, Ak, Bk, Ck)
        ctx.bc_shape = B.shape
        ctx.set_materialize_grads(False)
        return y, last_state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dlast_state):
        u, delta, A, B, C = ctx.saved_tensors
        batch, dim, L = u.shape
        G, N = B.shape[1], A.shape[1]
        threads = torch.get_num_threads()
        parts = min(dim // G, -(-threads // (batch * G)))  # channel partitions per (batch, group), see the module doc
        dy = torch.zeros_like(u) if dy is None else dy.to(u.dtype).contiguous()
        dlast = None if dlast_state is None else dlast_state.to(u.dtype).contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dA = torch.empty(batch, dim, N, dtype=u.dtype)
        dB = torch.zeros(batch, G, parts, L, N, dtype=u.dtype)
        dC = torch.zeros(batch, G, parts, L, N, dtype=u.dtype)
        getattr(load(), f"sokhan_scan_bwd_{_SUFFIX[u.dtype]}")(
            u.data_ptr(), delta.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), batch, dim, L, N, G,
            dy.data_ptr(), None if dlast is None else dlast.data_ptr(), du.data_ptr(), ddelta.data_ptr(),
            dA.data_ptr(), dB.data_ptr(), dC.data_ptr(), parts, threads,
        )
        # (Bt, G, P, L, N) summed over the partitions, back to the caller's (Bt, [G,] N, L)
        dB, dC = (M.sum(dim=2).transpose(-1, -2).reshape(ctx.bc_shape) for M in (dB, dC))
        return du, ddelta, dA.sum(dim=0), dB, dC


def selective_scan_compiled(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same signature, shapes and results as :func:`~sokhan.kernels.selective_scan.reference.selective_scan_ref`,
    for CPU tensors. The (Bt, D, L) elementwise parts (bias, softplus, skip, gate) are PyTorch ops differentiated by
    autograd; the scan itself is the compiled kernel."""
    devices = {t.device.type for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None}
    if devices != {"cpu"}:
        raise SokhanError(f"selective_scan_compiled: needs CPU tensors, got {', '.join(sorted(devices))}")
    if load() is None:
        raise SokhanError("selective_scan_compiled: the kernel could not be built (see the warning); "
                          "use selective_scan(..., backend='cpu'), which falls back to the chunked scan")
    dtype_in = u.dtype
    dtype = torch.promote_types(dtype_in, torch.float32)
    u = u.to(dtype)
    delta = discretize_delta(delta, delta_bias, delta_softplus, dtype)  # (Bt, D, L)
    y, last_state = CompiledScanFunction.apply(u, delta, A.to(dtype), B, C)  # (Bt, D, L), (Bt, D, N)
    out = skip_and_gate(y, u, D, z).to(dtype_in)
    return (out, last_state) if return_last_state else out
