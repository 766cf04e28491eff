"""The decode contract: stepping (and prefilling) reproduces the parallel forward, for every architecture.

Weights are the initialisation plus N(0, 0.1) noise so the logits are O(1) (at init they are ~0.1 and a broken
state would hide under the tolerance). Tolerances: max abs difference of logits, 1e-5 in float64, 1e-4 in float32.
"""

from __future__ import annotations

import pytest
import torch

from sokhan import SokhanError
from sokhan.kernels import dispatch
from sokhan.pipeline.models import KVCache, MambaState, ModelConfig, build

VOCAB = 37
BATCH = 3
LENGTH = 11
TOL = {torch.float64: 1e-5, torch.float32: 1e-4}
VARIANTS = {
    "transformer-swiglu": dict(arch="transformer", mlp="swiglu", n_heads=4),
    "transformer-gelu": dict(arch="transformer", mlp="gelu", n_heads=2),
    "mamba": dict(arch="mamba"),
    "mamba-lti": dict(arch="mamba", selective=False),
}
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]
# "reference": every op's plain-PyTorch definition; "auto": what runs on CPU by default (the chunked scan).
BACKENDS = ["reference", "auto"]


def make_model(variant: str, dtype: torch.dtype, max_seq_len: int = 32):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, max_seq_len=max_seq_len, **VARIANTS[variant]).resolve(VOCAB)
    model = build(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("A_log"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def ids_for(length: int = LENGTH, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, length), generator=torch.Generator().manual_seed(seed))


def steps(model, ids: torch.Tensor, state) -> torch.Tensor:
    """Step through ids (B, T) one position at a time -> logits (B, T, V)."""
    out = [model.step(ids[:, t], state)[0] for t in range(ids.shape[1])]
    return torch.stack(out, dim=1) if out else ids.new_zeros(ids.shape[0], 0, VOCAB).to(state.tensors()[0].dtype)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


@pytest.fixture(params=BACKENDS)
def backend(request):
    with dispatch.use(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_step_from_fresh_state_matches_forward(variant, dtype, backend):
    model = make_model(variant, dtype)
    ids = ids_for()
    with torch.no_grad():
        full = model(ids)  # (B, L, V)
        assert full.shape == (BATCH, LENGTH, VOCAB) and full.dtype == dtype
        assert full.abs().max() > 1.0, "logits too small for the comparison to mean anything"
        stepped = steps(model, ids, model.init_state(BATCH, torch.device("cpu"), dtype))
    assert max_diff(stepped, full) <= TOL[dtype]


@pytest.mark.parametrize("prompt", [0, 1, 6])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_then_step_matches_forward(variant, dtype, prompt, backend):
    model = make_model(variant, dtype)
    ids = ids_for()
    with torch.no_grad():
        full = model(ids)
        logits, state = model.prefill(ids[:, :prompt])
        assert logits.shape == (BATCH, prompt, VOCAB)
        rest = steps(model, ids[:, prompt:], state)
    assert max_diff(torch.cat((logits, rest), dim=1), full) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_continues_a_stepped_state(variant, dtype):
    """step 2 tokens, prefill 5 from that state, step the rest: a prompt can be consumed in chunks."""
    model = make_model(variant, dtype)
    ids = ids_for()
    with torch.no_grad(), dispatch.use("reference"):
        full = model(ids)
        state = model.init_state(BATCH, torch.device("cpu"), dtype)
        head = steps(model, ids[:, :2], state)
        middle, state = model.prefill(ids[:, 2:7], state)
        tail = steps(model, ids[:, 7:], state)
    assert max_diff(torch.cat((head, middle, tail), dim=1), full) <= TOL[dtype]


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_round_trips_through_tensors(variant):
    """The flat list the ONNX graph sees rebuilds a state that decodes on exactly as the original."""
    model = make_model(variant, torch.float64)
    ids = ids_for()
    state_class = KVCache if variant.startswith("transformer") else MambaState
    with torch.no_grad(), dispatch.use("reference"):
        full = model(ids)
        _, state = model.prefill(ids[:, :4])
        flat = state.tensors()
        # Two tensors per layer (k, v or conv, ssm), and the transformer's position.
        assert len(flat) == 2 * model.config.n_layers + (1 if state_class is KVCache else 0)
        rebuilt = state_class.from_tensors([t.clone() for t in flat])
        assert all(torch.equal(a, b) for a, b in zip(rebuilt.tensors(), flat))
        rest = steps(model, ids[:, 4:], rebuilt)
    assert max_diff(rest, full[:, 4:]) <= TOL[torch.float64]


def test_mamba_state_shapes():
    model = make_model("mamba", torch.float32)
    cfg = model.config
    state = model.init_state(BATCH, torch.device("cpu"), torch.float32)
    assert len(state.conv_states) == len(state.ssm_states) == cfg.n_layers
    assert state.conv_states[0].shape == (BATCH, cfg.d_inner, cfg.d_conv)
    assert state.ssm_states[0].shape == (BATCH, cfg.d_inner, cfg.d_state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_with_past_matches_forward(dtype):
    """The concatenation form (what the ONNX graph runs): a 4-token prompt on an empty past, then one at a time."""
    model = make_model("transformer-swiglu", dtype)
    cfg = model.config
    ids = ids_for()
    hs = cfg.d_model // cfg.n_heads
    empty = torch.zeros(BATCH, cfg.n_heads, 0, hs, dtype=dtype)
    past = [(empty, empty) for _ in range(cfg.n_layers)]
    out = []
    with torch.no_grad():
        full = model(ids)
        for t0, t1 in [(0, 4)] + [(t, t + 1) for t in range(4, LENGTH)]:
            position_ids = torch.arange(t0, t1).expand(BATCH, -1)  # (B, T)
            logits, past = model.forward_with_past(ids[:, t0:t1], position_ids, past)
            assert past[0][0].shape == (BATCH, cfg.n_heads, t1, hs)
            out.append(logits)
    assert max_diff(torch.cat(out, dim=1), full) <= TOL[dtype]


def test_transformer_cache_is_preallocated_and_counts_position():
    model = make_model("transformer-swiglu", torch.float32, max_seq_len=8)
    state = model.init_state(BATCH)
    assert state.keys[0].shape == (BATCH, 4, 8, 8)
    with torch.no_grad():
        model.prefill(ids_for(5), state)
        model.step(ids_for(1)[:, 0], state)
    assert int(state.position) == 6


def test_stepping_past_max_seq_len_is_an_error():
    model = make_model("transformer-swiglu", torch.float32, max_seq_len=5)
    with torch.no_grad():
        _, state = model.prefill(ids_for(5))
        with pytest.raises(SokhanError, match="max_seq_len = 5"):
            model.step(ids_for(1)[:, 0], state)
        with pytest.raises(SokhanError, match="max_seq_len"):
            model(ids_for(6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["mamba", "mamba-lti"])
def test_long_prefill_then_step_matches_forward(variant, dtype):
    """157 tokens on the default CPU path: the parallel scan's chunks hand over to the recurrent step at 131."""
    model = make_model(variant, dtype)
    ids = ids_for(157)
    with torch.no_grad(), dispatch.use("auto"):
        full = model(ids)
        logits, state = model.prefill(ids[:, :131])
        rest = steps(model, ids[:, 131:], state)
    assert max_diff(torch.cat((logits, rest), dim=1), full) <= TOL[dtype]
