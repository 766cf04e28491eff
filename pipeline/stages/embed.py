"""embed stage: the initial token-embedding table, its nearest neighbours and a PCA plot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SECTIONS = ("embed", "model")
UPSTREAM = ("tokenize",)


@dataclass
class EmbedConfig:
    """How the embedding table is initialised."""

    init: Literal["normal", "ppmi-svd"] = "normal"
    """N(0, std²), or PPMI of windowed co-occurrence counts from the training shards, truncated SVD, rescaled."""
    std: float = 0.02
    window: int = 4
    """ppmi-svd: co-occurrence window (tokens on each side)."""
    seed: int = 0


def run(ctx) -> dict:
    raise NotImplementedError("embed stage: being written this session")
