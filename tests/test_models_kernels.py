"""The models on the Triton kernels (run by Triton's CPU interpreter) against the reference path.

A tiny model of each architecture gives the same logits, the same parameter gradients and the same decode steps
with ``dispatch.use("triton")`` as with ``dispatch.use("reference")``, in float32. Tolerances: logits max abs
difference ≤ 1e-4 (the logits are O(1)); gradients relative L2 error ≤ 1e-4 per parameter.
"""

from __future__ import annotations

import importlib.util
import os

# Triton picks interpreted or compiled kernels when a kernel module is imported; the kernel modules load lazily
# on first use, so setting the variable here (at collection, before any test runs) is early enough.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sokhan.kernels import dispatch  # noqa: E402
from sokhan.pipeline.models import ModelConfig, build  # noqa: E402

VOCAB = 29
LOGITS_TOL = 1e-4
GRAD_TOL = 1e-4
MODELS = {
    "transformer": (dict(arch="transformer", n_heads=2), ["rms_norm", "flash_attention"]),
    "mamba": (dict(arch="mamba"), ["rms_norm", "causal_conv1d", "selective_scan", "selective_state_update"]),
    "mamba-lti": (
        dict(arch="mamba", selective=False),
        ["rms_norm", "causal_conv1d", "selective_scan", "selective_state_update"],
    ),
}


def require_triton(ops: list[str]) -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if not dispatch.interpreting():
        pytest.skip("TRITON_INTERPRET was switched off in this process; the kernels would need CUDA")
    missing = [op for op in ops if importlib.util.find_spec(f"sokhan.kernels.{op}.triton") is None]
    if missing:
        pytest.skip(f"no Triton backend yet for: {', '.join(missing)} (sokhan/kernels/<op>/triton.py)")


def make_model(variant: str):
    torch.manual_seed(0)
    model = build(ModelConfig(d_model=32, n_layers=2, max_seq_len=16, **MODELS[variant][0]).resolve(VOCAB))
    with torch.no_grad():  # weights away from the init so logits are O(1) and every path matters
        for name, p in model.named_parameters():
            if not name.endswith("A_log"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def loss_and_grads(model, ids: torch.Tensor, backend: str):
    model.zero_grad()
    with dispatch.use(backend):
        logits = model(ids[:, :-1])  # (B, L, V)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", MODELS)
def test_triton_forward_and_gradients_match_reference(variant):
    require_triton(MODELS[variant][1])
    model = make_model(variant)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))  # L = 8 after the shift
    ref_logits, ref_grads = loss_and_grads(model, ids, "reference")
    tri_logits, tri_grads = loss_and_grads(model, ids, "triton")
    assert ref_logits.abs().max() > 1.0
    assert (tri_logits - ref_logits).abs().max().item() <= LOGITS_TOL
    for name, ref in ref_grads.items():
        err = ((tri_grads[name] - ref).norm() / ref.norm()).item()
        assert err <= GRAD_TOL, f"{name}: relative gradient error {err:.2e}"


def test_triton_prefill_and_decode_steps_match_reference_forward():
    """Mamba's decode path on Triton: the scan returning its last state, then the conv and state updates."""
    require_triton(MODELS["mamba"][1])
    model = make_model("mamba").eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with dispatch.use("reference"):
            full = model(ids)
        with dispatch.use("triton"):
            logits, state = model.prefill(ids[:, :5])
            stepped = [model.step(ids[:, t], state)[0] for t in range(5, 9)]
    assert (torch.cat((logits, torch.stack(stepped, dim=1)), dim=1) - full).abs().max().item() <= LOGITS_TOL
