"""selective_scan: the Triton kernels and both CPU paths (compiled C++ and chunked PyTorch) against the sequential
reference run in float64.

Each case compares the output, the last state and the gradient of every input (u, Δ, A, B, C, D, z, Δ_bias) by
relative RMS error, on fresh random inputs, with odd lengths (1, 7, 63, 129 against chunks of 32 steps), channel
counts that are not a multiple of the block, N = 1 and 16, grouped B and C, and each optional input on and off.
The Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py) or natively
on CUDA; every buffer they write is allocated NaN-filled, so an element left unwritten fails the comparison. The
compiled scan is built on first use (about a second); where no C++ compiler is found its tests skip and say so.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from kernel_testing import DEVICE, needs_triton
from kernel_testing import rel_rms as _rel_rms

from sokhan import SokhanError
from sokhan.kernels import dispatch, selective_scan
from sokhan.kernels.selective_scan import (
    SelectiveScanFunction,
    compiled,
    selective_scan_chunked,
    selective_scan_compiled,
    selective_scan_ref,
)
from sokhan.kernels.selective_scan.chunked import chunk_bounds

# float32 against float64, largest over the cases' outputs and gradients: 4.3e-7 for Triton, 4.2e-7 for the compiled
# scan, 3.4e-6 for the chunked path (in dA, a sum over batch and time; the chunked path's exp factors reach e^±60, so
# their arguments carry up to 60 ulp); float64 against float64: 6e-16 compiled, 5e-15 chunked.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}

# id: (batch, dim, N, L, groups, D, z, delta_bias, delta_softplus, return_last_state, Triton (BLOCK_L, BLOCK_D))
# The interpreter runs a scan one element at a time (~0.3 ms each), so the shapes are as small as the cases allow.
CASES = [
    pytest.param(2, 3, 16, 1, None, True, True, True, True, True, None, id="L1-N16-all"),
    pytest.param(1, 5, 1, 7, None, False, False, False, False, True, None, id="L7-N1-bare"),
    pytest.param(1, 12, 16, 63, 3, True, False, True, True, True, None, id="L63-N16-grouped3-noz"),
    pytest.param(1, 10, 4, 129, None, True, True, True, True, False, (32, 8), id="L129-N4-D10-nolast"),
    pytest.param(2, 6, 3, 37, 2, False, True, False, True, True, (16, 2), id="L37-N3-grouped2-noD"),
]
PARAMS = "batch, dim, N, L, groups, has_D, has_z, has_bias, softplus, last, blocks"


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error; absolute where expected is exactly zero (dA at L = 1)."""
    return _rel_rms(actual, expected, absolute_below=0.0)


def make_inputs(seed, batch, dim, N, L, groups, has_D, has_z, has_bias, delta_scale=0.5):
    """Float64 inputs shaped like a Mamba layer's: A = -(1..N)·U(0.5, 1.5), Δ around softplus⁻¹ of 0.001..0.1."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    bc_shape = (batch, N, L) if groups is None else (batch, groups, N, L)
    dt = torch.exp(torch.rand(dim, generator=g, dtype=torch.float64) * math.log(100) + math.log(1e-3))
    A_scale = 0.5 + torch.rand(dim, 1, generator=g, dtype=torch.float64)
    return {
        "u": randn(batch, dim, L),
        "delta": delta_scale * randn(batch, dim, L) + (0.0 if has_bias else 1.0),
        "A": -torch.arange(1, N + 1, dtype=torch.float64) * A_scale,
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(dim) if has_D else None,
        "z": randn(batch, dim, L) if has_z else None,
        "delta_bias": dt + torch.log(-torch.expm1(-dt)) if has_bias else None,
    }


def run(fn, inputs, dtype, softplus, last, weights, **kwargs):
    """Outputs and gradients of sum(out · w) (+ sum(last_state · w_s)) w.r.t. every input, in ``dtype``."""
    leaves = {k: v.to(DEVICE, dtype).requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    result = fn(**args, delta_softplus=softplus, return_last_state=last, **kwargs)
    out, state = result if last else (result, None)
    loss = (out * weights[0].to(out)).sum()
    if last:
        loss = loss + (state * weights[1].to(state)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out, state, dict(zip(leaves, grads))


def check_against_reference(fn, dtype, batch, dim, N, L, groups, has_D, has_z, has_bias, softplus, last, **kwargs):
    seed = batch * 10**6 + dim * 10**4 + N * 10**3 + L
    inputs = make_inputs(seed, batch, dim, N, L, groups, has_D, has_z, has_bias)
    g = torch.Generator().manual_seed(seed + 1)
    weights = tuple(torch.randn(*s, generator=g, dtype=torch.float64) for s in ((batch, dim, L), (batch, dim, N)))
    ref_out, ref_state, ref_grads = run(selective_scan_ref, inputs, torch.float64, softplus, last, weights)
    out, state, grads = run(fn, inputs, dtype, softplus, last, weights, **kwargs)
    assert out.dtype == dtype and out.shape == ref_out.shape
    errors = {"out": rel_rms(out, ref_out)}
    if last:
        assert state.shape == (batch, dim, N)
        errors["last_state"] = rel_rms(state, ref_state)
    errors.update({f"d{k}": rel_rms(grads[k], ref_grads[k]) for k in ref_grads})
    bad = {k: e for k, e in errors.items() if not e <= TOL[dtype]}  # NaN fails too
    assert not bad, f"relative RMS errors above {TOL[dtype]:g}: {bad}"


def scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, blocks):
    out, state = SelectiveScanFunction.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, blocks)
    return (out, state) if return_last_state else out


@needs_triton
@pytest.mark.parametrize(PARAMS, CASES)
def test_triton_matches_float64_reference(batch, dim, N, L, groups, has_D, has_z, has_bias, softplus, last, blocks):
    check_against_reference(
        scan_triton, torch.float32, batch, dim, N, L, groups, has_D, has_z, has_bias, softplus, last, blocks=blocks
    )


@needs_triton
def test_triton_computes_in_float64_for_float64_inputs():
    check_against_reference(
        scan_triton, torch.float64, 2, 6, 3, 37, 2, True, True, True, True, True, blocks=(16, 2)
    )


@needs_triton
def test_public_entry_runs_triton_with_and_without_last_state():
    inputs = {k: v.to(DEVICE, torch.float32) for k, v in make_inputs(3, 1, 4, 2, 5, None, True, True, True).items()}
    ref_out, ref_state = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="reference")
    out, state = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="triton")
    with dispatch.use("triton"):
        only_out = selective_scan(**inputs, delta_softplus=True)
    assert rel_rms(out, ref_out) <= 1e-6 and rel_rms(state, ref_state) <= 1e-6
    assert torch.equal(only_out, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(PARAMS, CASES)
def test_chunked_matches_float64_reference(
    dtype, batch, dim, N, L, groups, has_D, has_z, has_bias, softplus, last, blocks
):
    check_against_reference(
        selective_scan_chunked, dtype, batch, dim, N, L, groups, has_D, has_z, has_bias, softplus, last, max_chunk=16
    )


def needs_compiler():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if compiled.load() is None:
            pytest.skip("the compiled CPU scan could not be built here (no C++ compiler, or the build failed)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(PARAMS, CASES)
def test_compiled_matches_float64_reference(
    dtype, batch, dim, N, L, groups, has_D, has_z, has_bias, softplus, last, blocks
):
    needs_compiler()
    check_against_reference(
        selective_scan_compiled, dtype, batch, dim, N, L, groups, has_D, has_z, has_bias, softplus, last
    )


@pytest.mark.parametrize("threads", [3, 16])
def test_compiled_splits_channels_across_threads(threads):
    """More threads than (batch, group) pairs: a group's 5 channels are split into partitions that write separate
    dB/dC buffers, 2 uneven ones with 3 threads, one per channel with 16 (the count is capped at 5)."""
    needs_compiler()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn = selective_scan_compiled
        check_against_reference(fn, torch.float64, 1, 10, 4, 33, 2, True, True, True, True, True)
        check_against_reference(fn, torch.float32, 2, 5, 16, 20, None, True, False, True, True, False)
    finally:
        torch.set_num_threads(previous)


def test_cpu_backend_runs_the_compiled_scan_and_falls_back_without_a_compiler(monkeypatch):
    needs_compiler()
    inputs = {k: v.float() for k, v in make_inputs(5, 2, 6, 4, 19, None, True, True, True).items()}
    out = selective_scan(**inputs, delta_softplus=True, backend="cpu")
    assert torch.equal(out, selective_scan_compiled(**inputs, delta_softplus=True))
    assert torch.equal(selective_scan(**inputs, delta_softplus=True), out)  # auto on CPU tensors
    monkeypatch.setenv("CXX", "sokhan-no-such-compiler")
    compiled.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no C\\+\\+ compiler 'sokhan-no-such-compiler'.*chunked PyTorch scan"):
            fallback = selective_scan(**inputs, delta_softplus=True, backend="cpu")
    finally:
        compiled.load.cache_clear()
    assert torch.equal(fallback, selective_scan_chunked(**inputs, delta_softplus=True))


def test_compiled_refuses_tensors_off_the_cpu():
    inputs = make_inputs(6, 1, 2, 3, 4, None, True, False, False)
    with pytest.raises(SokhanError, match="selective_scan_compiled: needs CPU tensors, got meta"):
        selective_scan_compiled(**{k: v.to("meta") if v is not None else None for k, v in inputs.items()})


def test_concurrent_first_builds_do_not_clash(tmp_path):
    """Two processes (as pytest-xdist workers would) build into one empty cache at once: both load a working library
    and exactly one .so is left, with no temporary files."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on PATH")
    script = (
        "import torch; from sokhan.kernels.selective_scan import compiled, selective_scan_ref as ref; "
        "u = torch.randn(1, 3, 8); A = -torch.rand(3, 2); B = torch.randn(1, 2, 8); "
        "print(compiled.load() is not None and "
        "torch.allclose(compiled.selective_scan_compiled(u, u.abs(), A, B, B), ref(u, u.abs(), A, B, B), atol=1e-5))"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert [out.strip() for out, _ in results] == ["True", "True"]
    assert [p.suffix for p in (tmp_path / "sokhan_cpu_scan").iterdir()] == [".so"]


@pytest.mark.parametrize("fn", [selective_scan_chunked, selective_scan_compiled], ids=["chunked", "compiled"])
def test_stays_exact_under_large_decays(fn):
    """Steps whose decay |Δ A| passes exp's float32 range alone (≈ 88): the chunked path must cut chunks, the
    compiled one's exp must flush to zero, neither may overflow."""
    if fn is selective_scan_compiled:
        needs_compiler()
    inputs = make_inputs(7, 2, 4, 16, 50, None, True, True, False, delta_scale=3.0)
    inputs["delta"][0, 1, 20] = 40.0  # one step with |Δ A| up to 40 · 24: the state is wiped there
    g = torch.Generator().manual_seed(8)
    weights = tuple(torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 4, 50), (2, 4, 16)))
    ref_out, ref_state, ref_grads = run(selective_scan_ref, inputs, torch.float64, True, True, weights)
    out, state, grads = run(fn, inputs, torch.float32, True, True, weights)
    assert rel_rms(out, ref_out) <= TOL[torch.float32]
    assert rel_rms(state, ref_state) <= TOL[torch.float32]
    for k, ref in ref_grads.items():
        assert rel_rms(grads[k], ref) <= TOL[torch.float32], k


def test_compiled_exp_holds_its_accuracy_up_to_the_top_of_the_float_range():
    """exp(Δ A) over the whole normal float range, growth included (positive A through the public entry): above
    e^88.0 the compiled exp returned e^88 instead of e^x, a relative error of up to 0.5."""
    needs_compiler()
    x = torch.cat((torch.linspace(-87.0, 88.72, 500, dtype=torch.float64), torch.tensor([88.0, 88.5, 88.7], dtype=torch.float64)))
    dim = len(x)
    # Two steps, u = (1, 0), Δ = 1, B = C = 1, N = 1 per channel: y_1 = exp(A) · y_0, with y_0 = 1.
    u = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(1, dim, 2).contiguous()
    ones = torch.ones(1, 1, 2, dtype=torch.float64)
    y = selective_scan_compiled(u.float(), torch.ones_like(u).float(), x.float()[:, None], ones.float(), ones.float())
    expected = torch.exp(x.float().double())  # the float32 argument's exact exp
    assert torch.isfinite(y).all()
    assert ((y[0, :, 1].double() - expected).abs() / expected).max() <= 4e-7  # about 3 ulp


def test_chunk_bounds_keep_each_factor_in_range():
    delta = torch.rand(3, 5, 200, generator=torch.Generator().manual_seed(0)) * 4
    A = -torch.rand(5, 8, generator=torch.Generator().manual_seed(1)) * 10
    bounds = chunk_bounds(delta, A, max_chunk=64, bound=30.0)
    assert bounds[0][0] == 0 and bounds[-1][2] == 200
    assert all(prev[2] == nxt[0] for prev, nxt in zip(bounds, bounds[1:]))
    rate = (delta.abs() * A.abs().amax(dim=1)[:, None]).amax(dim=(0, 1))
    for t0, m, t1 in bounds:
        assert t0 <= m < t1 and t1 - t0 <= 64
        R = torch.cat((torch.zeros(1), rate[t0 + 1 : t1].cumsum(0)))  # decay from t0 to each step
        assert (R - R[m - t0]).abs().max() <= 30.0


def test_bad_shapes_name_the_argument():
    inputs = make_inputs(0, 2, 4, 3, 5, None, True, False, False)
    with pytest.raises(SokhanError, match="selective_scan: B has shape"):
        selective_scan(**{**inputs, "B": inputs["B"][:, :, :4]}, backend="reference")
    with pytest.raises(SokhanError, match="selective_scan: B has shape"):
        selective_scan(**{**inputs, "B": torch.randn(2, 3, 3, 5)}, backend="reference")  # 4 channels, 3 groups
    with pytest.raises(SokhanError, match="selective_scan: D has shape"):
        selective_scan(**{**inputs, "D": torch.randn(5)}, backend="reference")
