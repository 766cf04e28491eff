"""linear_cross_entropy: the chunked CPU path (gradients formed in the forward pass) against the float64 reference,
the loss and the gradients of the hidden states and the weight; the Triton route; the models' ``targets=`` loss.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, needs_triton, rel_rms

from sokhan import SokhanError
from sokhan.kernels import linear_cross_entropy
from sokhan.kernels.linear_cross_entropy import LinearCrossEntropyFunction, chunked, linear_cross_entropy_ref
from sokhan.kernels.linear_cross_entropy.chunked import chunk_rows, linear_cross_entropy_chunked
from sokhan.pipeline.models import ModelConfig, build

IGNORE = -100
# Tolerances against the float64 reference (relative RMS): float64 differs only in summation order (≤ 1e-15
# observed); float32 by its rounding (≤ 3e-7 observed); bfloat16 inputs compute in float32, their gradients are
# rounded to bfloat16 (8 bits of mantissa).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def inputs(rows: int, d: int, vocab: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, d, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64) / d**0.5 * 3  # logits spread like a model's
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[1::4] = IGNORE  # padding positions; row 0 always counts
    return hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True), targets


def reference(hidden, weight, targets, reduction, grad_loss):
    h64, w64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight))
    loss = linear_cross_entropy_ref(h64, w64, targets, IGNORE, reduction)
    return (loss, *torch.autograd.grad(loss, [h64, w64], grad_loss))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "rows,d,vocab,chunk",
    [
        pytest.param(1, 8, 7, 4, id="N1-one-partial-chunk"),
        pytest.param(37, 16, 50, 5, id="N37-chunks-of-5"),  # the last chunk partial
        pytest.param(64, 12, 300, 64, id="N64-one-whole-chunk"),
        pytest.param(33, 24, 1000, None, id="N33-default-chunk"),
    ],
)
def test_chunked_loss_and_gradients_match_float64(rows, d, vocab, chunk, reduction, dtype):
    hidden, weight, targets = inputs(rows, d, vocab, dtype, seed=rows * vocab)
    grad_loss = torch.tensor(1.7, dtype=torch.float64)  # a scale from upstream (grad_accum, loss weights)
    loss = linear_cross_entropy_chunked(hidden, weight, targets, IGNORE, reduction, rows=chunk)
    assert loss.grad_fn.name().startswith(LinearCrossEntropyFunction.__name__)
    dh, dw = torch.autograd.grad(loss, [hidden, weight], grad_loss.to(loss.dtype))
    loss64, dh64, dw64 = reference(hidden, weight, targets, reduction, grad_loss)

    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (dh.dtype, dw.dtype) == (dtype, dtype)
    assert rel_rms(loss, loss64) <= TOL[torch.float32 if dtype == torch.bfloat16 else dtype]
    assert rel_rms(dh, dh64) <= TOL[dtype] and rel_rms(dw, dw64) <= TOL[dtype]
    assert torch.all(dh[1::4] == 0)  # ignored rows get no gradient


def test_every_row_ignored_is_a_nan_mean_with_zero_gradients():
    """As F.cross_entropy: 0 / 0 for the loss, but no gradient; the gradients were 0 * (1 / 0) = NaN, which one
    all-padding micro-batch spread through gradient accumulation."""
    hidden, weight, targets = inputs(9, 8, 30, torch.float64, seed=3)
    targets[:] = IGNORE
    loss = linear_cross_entropy_chunked(hidden, weight, targets, IGNORE, "mean", rows=4)
    dh, dw = torch.autograd.grad(loss, [hidden, weight])
    loss64, dh64, dw64 = reference(hidden, weight, targets, "mean", torch.tensor(1.0, dtype=torch.float64))
    assert loss.isnan() and loss64.isnan()
    assert torch.equal(dh, dh64) and torch.equal(dw, dw64) and not dh.any() and not dw.any()


def test_without_a_graph_only_the_loss_is_computed():
    hidden, weight, targets = inputs(37, 16, 50, torch.float64, seed=1)
    with_graph = linear_cross_entropy_chunked(hidden, weight, targets, IGNORE, rows=5)
    with torch.no_grad():
        plain = linear_cross_entropy_chunked(hidden, weight, targets, IGNORE, rows=5)
    assert plain.grad_fn is None and rel_rms(plain, with_graph) <= 1e-15
    frozen = linear_cross_entropy_chunked(hidden.detach(), weight.detach(), targets, IGNORE, rows=5)
    assert frozen.grad_fn is None and rel_rms(frozen, with_graph) <= 1e-15


def test_only_the_inputs_that_need_it_get_a_gradient():
    hidden, weight, targets = inputs(9, 8, 30, torch.float64, seed=2)
    loss = linear_cross_entropy_chunked(hidden, weight.detach(), targets, IGNORE, rows=4)
    (dh,) = torch.autograd.grad(loss, [hidden])
    _, dh64, _ = reference(hidden, weight, targets, "mean", torch.tensor(1.0, dtype=torch.float64))
    assert rel_rms(dh, dh64) <= TOL[torch.float64]


def test_chunk_rows_keep_a_few_megabytes_of_logits():
    assert chunk_rows(8000) == 262 and chunk_rows(16000) == 131
    assert chunk_rows(10**7) == 1  # a vocabulary wider than the budget still gets a row a chunk


def test_auto_on_cpu_takes_the_chunked_path_and_reference_on_request():
    hidden, weight, targets = inputs(6, 8, 20, torch.float32, seed=3)
    assert linear_cross_entropy(hidden, weight, targets, IGNORE).grad_fn.name().startswith("LinearCrossEntropy")
    plain = linear_cross_entropy(hidden, weight, targets, IGNORE, backend="reference")
    assert not plain.grad_fn.name().startswith("LinearCrossEntropy")


def test_bad_arguments_raise_one_line():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    long = dict(dtype=torch.long)
    with pytest.raises(SokhanError, match="reduction 'none'"):
        linear_cross_entropy(hidden, weight, torch.zeros(4, **long), reduction="none")
    with pytest.raises(SokhanError, match="hidden has shape"):
        linear_cross_entropy(hidden[None], weight, torch.zeros(4, **long))
    with pytest.raises(SokhanError, match=r"weight has shape \(10, 7\), expected \(vocab, 8\)"):
        linear_cross_entropy(hidden, weight[:, :7], torch.zeros(4, **long))
    with pytest.raises(SokhanError, match="targets has shape"):
        linear_cross_entropy(hidden, weight, torch.zeros(5, **long))
    with pytest.raises(SokhanError, match="targets has shape"):
        linear_cross_entropy(hidden, weight, torch.zeros(4))


@needs_triton
def test_triton_route_matches_float64():
    hidden, weight, targets = (t.to(DEVICE) for t in inputs(17, 16, 333, torch.float32, seed=4))
    hidden, weight = (t.detach().requires_grad_(True) for t in (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, IGNORE, backend="triton")
    dh, dw = torch.autograd.grad(loss, [hidden, weight])
    one = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)
    loss64, dh64, dw64 = reference(hidden, weight, targets, "mean", one)
    assert rel_rms(loss, loss64) <= TOL[torch.float32]
    assert rel_rms(dh, dh64) <= TOL[torch.float32] and rel_rms(dw, dw64) <= TOL[torch.float32]


@pytest.mark.parametrize("arch,tie", [("mamba", True), ("transformer", True), ("transformer", False)])
def test_model_loss_matches_cross_entropy_of_its_logits(arch, tie, monkeypatch):
    """``model(ids, targets=…)`` (the chunked loss, what training runs) against ``F.cross_entropy(model(ids))`` in
    float64: the same loss and the same gradient for every parameter, the tied embedding's two uses included."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 7 * 300)  # 7 rows a chunk: 18 chunks, the last partial
    torch.manual_seed(5)
    cfg = ModelConfig(arch=arch, d_model=16, n_layers=2, n_heads=2, tie_embeddings=tie).resolve(300)
    model = build(cfg).double()
    ids = torch.randint(0, 300, (3, 41))
    x, y = ids[:, :-1], ids[:, 1:]
    loss = model(x, targets=y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    loss_ref = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    grads_ref = torch.autograd.grad(loss_ref, list(model.parameters()))
    assert rel_rms(loss, loss_ref) <= TOL[torch.float64]
    for (name, _), g, g_ref in zip(model.named_parameters(), grads, grads_ref):
        assert rel_rms(g, g_ref) <= 1e-10, name
