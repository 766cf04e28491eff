"""evaluate stage: next-word prediction on held-out text beside an n-gram baseline."""

from __future__ import annotations

from dataclasses import dataclass

SECTIONS = ("evaluate",)
UPSTREAM = ("tokenize", "train")


@dataclass
class EvaluateConfig:
    """What is measured."""

    ngram_order: int = 5
    stride: int = 128
    max_tokens: int = 20000


def run(ctx) -> dict:
    raise NotImplementedError("evaluate stage: being written this session")
