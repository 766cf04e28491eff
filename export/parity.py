"""Parity between the PyTorch ``step`` and the exported graph in ONNX Runtime, on real prompts.

For each prompt: the prompt's tokens, then ``steps`` greedy tokens, run through ``model.step`` (PyTorch, the
KV-cache or recurrent path) and through the bundle's graph (ONNX Runtime, fed the same tokens). Recorded per
generated step: the max absolute logit difference and whether both argmaxes agree. Agreement at every step is the
same as both sides generating identical greedy sequences on their own (by induction on the step), while the
logits stay comparable even after a disagreement.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from sokhan.export.runtime import Decoder


@torch.no_grad()
def torch_greedy(model: torch.nn.Module, prompt: Sequence[int], steps: int) -> tuple[list[np.ndarray], list[int]]:
    """Logits (V,) before each of ``steps`` greedy tokens, and those tokens, from PyTorch ``step`` at batch 1."""
    state = model.init_state(1, torch.device("cpu"), torch.float32)
    logits = None
    for i in prompt:
        logits, state = model.step(torch.tensor([i]), state)
    out, tokens = [], []
    for n in range(steps):
        out.append(logits[0].double().numpy())
        tokens.append(int(logits[0].argmax()))
        if n + 1 < steps:
            logits, state = model.step(torch.tensor([tokens[-1]]), state)
    return out, tokens


def onnx_logits(decoder: Decoder, prompt: Sequence[int], tokens: Sequence[int]) -> list[np.ndarray]:
    """Logits (V,) before each of ``tokens`` from the graph, fed ``prompt`` then ``tokens`` (teacher forcing)."""
    logits, state = decoder.prefill(list(prompt))
    out = []
    for n, t in enumerate(tokens):
        out.append(logits[0].astype(np.float64))
        if n + 1 < len(tokens):
            logits, state = decoder.step(np.array([t]), state)
    return out


def compare(model: torch.nn.Module, decoder: Decoder, prompt: Sequence[int], steps: int, atol: float) -> dict[str, Any]:
    """One prompt's parity record (see the module docstring); ``passed`` = max diff ≤ atol and all tokens equal."""
    ref, tokens = torch_greedy(model, prompt, steps)
    got = onnx_logits(decoder, prompt, tokens)
    diffs = [float(np.abs(r - g).max()) for r, g in zip(ref, got)]
    agree = [int(g.argmax()) == t for g, t in zip(got, tokens)]
    first = next((n for n, ok in enumerate(agree) if not ok), None)
    return {
        "prompt_tokens": len(prompt),
        "steps": steps,
        "max_abs_diff": max(diffs),
        "max_abs_diff_per_step": diffs,
        "tokens_identical": first is None,
        "first_mismatch_step": first,
        "tokens": tokens,
        "passed": max(diffs) <= atol and first is None,
    }
