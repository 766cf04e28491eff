"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

# Parameters that keep their value under weight decay: Mamba's A_log (the state matrix, log-parametrised) and D
# (the skip); decaying them pulls A towards -1 and D towards 0, which changes the model family, not its capacity.
NO_DECAY_NAMES = ("A_log", "D")


def param_groups(model: nn.Module, weight_decay: float, embedding_weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups: matrices decay by ``weight_decay``; norms, biases, A_log and D do not; the embedding table
    decays by ``embedding_weight_decay``, in a third group when that is not 0 (else with the ones that do not).

    A tied output projection is the embedding's own Parameter, so it goes where the embedding goes.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, embeddings = [], [], []
    for name, p in model.named_parameters():  # named_parameters yields a shared (tied) Parameter once
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if id(p) in embedding_ids:
            (embeddings if embedding_weight_decay else no_decay).append(p)
        elif p.ndim < 2 or leaf in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if embeddings:
        groups.append({"params": embeddings, "weight_decay": embedding_weight_decay})
    return groups


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), embedding_weight_decay: float = 0.0
) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, embedding_weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based): linear warmup to ``lr``, cosine decay to ``min_lr``.

    Warmup starts at ``lr / warmup_steps`` (not 0, so the first step moves); the cosine starts at ``lr`` and reaches
    ``min_lr`` at the last step, given two steps or more after the warmup (with one, the run ends at ``lr``: the
    train stage says so).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
