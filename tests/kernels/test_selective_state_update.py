"""selective_state_update: the Triton decode step against the float64 reference, and stepping against the scan.

The Triton kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py) or natively on
CUDA; its output is allocated NaN-filled, so an element left unwritten fails the comparison. The state is compared
after the in-place update too.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, needs_triton, rel_rms

from sokhan import SokhanError
from sokhan.kernels import selective_scan, selective_state_update
from sokhan.kernels.selective_state_update import selective_state_update_ref

TOL_FP32 = 1e-5  # float32 kernel against float64: observed ≤ 2e-7


def make_inputs(seed, batch, dim, N, groups, has_D, has_z, has_bias):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    bc_shape = (batch, N) if groups is None else (batch, groups, N)
    return {
        "state": randn(batch, dim, N),
        "x": randn(batch, dim),
        "dt": randn(batch, dim),
        "A": -torch.rand(dim, N, generator=g, dtype=torch.float64) * 4,
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(dim) if has_D else None,
        "z": randn(batch, dim) if has_z else None,
        "dt_bias": randn(dim) if has_bias else None,
    }


@needs_triton
@pytest.mark.parametrize(
    "batch, dim, N, groups, has_D, has_z, has_bias, softplus, block_d",
    [
        pytest.param(2, 20, 16, None, True, True, True, True, 8, id="D20-N16-blocks8-all"),
        pytest.param(1, 5, 1, None, False, False, False, False, None, id="D5-N1-bare"),
        pytest.param(3, 12, 3, 4, True, False, True, True, 8, id="D12-N3-grouped4"),
    ],
)
def test_triton_matches_float64_reference(batch, dim, N, groups, has_D, has_z, has_bias, softplus, block_d):
    from sokhan.kernels.selective_state_update.triton import selective_state_update_fwd

    inputs = make_inputs(batch * 100 + dim, batch, dim, N, groups, has_D, has_z, has_bias)
    ref_state = inputs["state"].clone()
    ref = selective_state_update_ref(**{**inputs, "state": ref_state}, dt_softplus=softplus)
    f32 = {k: v.to(DEVICE, torch.float32) if v is not None else None for k, v in inputs.items()}
    out = selective_state_update_fwd(**f32, dt_softplus=softplus, block_d=block_d)
    assert rel_rms(out, ref) <= TOL_FP32
    assert rel_rms(f32["state"], ref_state) <= TOL_FP32
    with torch.no_grad():
        f32["state"] = inputs["state"].to(DEVICE, torch.float32)
        assert rel_rms(selective_state_update(**f32, dt_softplus=softplus, backend="triton"), ref) <= TOL_FP32


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_steps_reproduce_the_scan(backend):
    """Stepping through a sequence gives the scan's outputs and its last state (the decode contract)."""
    batch, dim, N, L = 2, 6, 4, 5
    g = torch.Generator().manual_seed(5)
    u, delta, z = (torch.randn(batch, dim, L, generator=g, dtype=torch.float64) for _ in range(3))
    A = -torch.rand(dim, N, generator=g, dtype=torch.float64) * 3
    B, C = (torch.randn(batch, 2, N, L, generator=g, dtype=torch.float64) for _ in range(2))
    D, bias = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    out, last = selective_scan(
        u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True, backend="reference"
    )
    dtype = torch.float32 if backend == "triton" else torch.float64
    state = torch.zeros(batch, dim, N, dtype=dtype, device=DEVICE)
    steps = []
    with torch.no_grad():
        for t in range(L):
            args = [v[..., t].to(DEVICE, dtype) for v in (u, delta, B, C, z)]
            steps.append(
                selective_state_update(
                    state, args[0], args[1], A.to(DEVICE, dtype), args[2], args[3], D.to(DEVICE, dtype), args[4],
                    bias.to(DEVICE, dtype), dt_softplus=True, backend=backend,
                )
            )
    tol = TOL_FP32 if dtype == torch.float32 else 1e-13
    assert rel_rms(torch.stack(steps, dim=-1), out) <= tol
    assert rel_rms(state, last) <= tol


@needs_triton
def test_triton_refuses_tensors_that_need_grad():
    inputs = make_inputs(0, 1, 4, 2, None, True, True, True)
    inputs = {k: v.float() if v is not None else None for k, v in inputs.items()}
    inputs["x"].requires_grad_()
    with pytest.raises(SokhanError, match="no backward"):
        selective_state_update(**inputs, backend="triton")


def test_bad_shapes_name_the_argument():
    inputs = make_inputs(0, 2, 4, 3, None, True, False, False)
    with pytest.raises(SokhanError, match="selective_state_update: C has shape"):
        selective_state_update(**{**inputs, "C": torch.randn(2, 4)}, backend="reference")
    with pytest.raises(SokhanError, match="selective_state_update: dt has shape"):
        selective_state_update(**{**inputs, "dt": torch.randn(2, 5)}, backend="reference")
